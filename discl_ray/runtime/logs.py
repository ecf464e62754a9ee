"""What a stage prints, and where the rest goes.

By default the console shows what a person needs (stage headers, progress bars, results, warnings that
concern them) and everything else is written to ``<run_root>/logs/discl.log``; Ray's worker output (Train's
per-report lines, Data actors' logs) stays in Ray's session logs (``<run_root>/.ray/session_latest/logs``)
instead of being copied to the driver. ``--verbose`` brings all of it back to the console.

Each setting acts at the source: log levels of handlers and loggers, the libraries' own verbosity
switches, and ``RAY_LOG_TO_DRIVER`` (read by :func:`discl_ray.runtime.cluster.init_ray`). Logger levels stay at INFO,
so tests that capture records (``caplog``) see everything either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

LOG_NAME = "discl.log"
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries whose INFO lines are bookkeeping (schema migrations, HTTP, model-file parsing).
CHATTY = ("alembic", "urllib3", "httpx", "filelock", "matplotlib", "PIL", "fsspec", "numba")
# Notices a user cannot act on: Ray's note, at every local start, that it enabled token authentication for
# the cluster it started (it stays enabled; --verbose shows the notice).
NOTICES = ("ray._private.authentication.authentication_token_setup",)

# Ray Data's own logging config (ray.data._internal.logging.DEFAULT_CONFIG) with the console at WARNING:
# its per-dataset "Starting execution / Execution plan" INFO lines still go to ray-data.log.
_RAY_DATA_CONFIG = """\
version: 1
disable_existing_loggers: false
formatters:
  ray: {format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}
filters:
  console_filter: {"()": ray.data._internal.logging.HiddenRecordFilter}
handlers:
  file: {class: ray.data._internal.logging.SessionFileHandler, formatter: ray, filename: ray-data.log}
  console: {class: ray._private.log.PlainRayHandler, formatter: ray, level: WARNING, filters: [console_filter]}
loggers:
  ray.data: {level: DEBUG, handlers: [file, console], propagate: false}
"""

class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest and the quickstart swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):      # StreamHandler.__init__ assigns it; the property always follows sys.stderr
        pass


_lock = threading.Lock()
_state: dict = {}


def quiet_env(verbose: bool) -> dict[str, str]:
    """Environment switches read by the libraries themselves (set before Ray starts its workers)."""
    env = {"RAY_LOG_TO_DRIVER": "1" if verbose else "0",
           "TOKENIZERS_PARALLELISM": "false",      # fork warnings from transformers' tokenizers
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if not verbose:
        env |= {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                "RAY_LOG_TO_DRIVER_EVENT_LEVEL": "ERROR",     # autoscaler/event chatter on the driver
                # MLflow's loggers get their own stderr handler at import ("Creating initial MLflow database
                # tables..." on a new sqlite store); the level is read from here when they are configured.
                "MLFLOW_LOGGING_LEVEL": "WARNING"}
    return env


def log_file(run_root: str | Path) -> Path:
    """``<run_root>/logs/discl.log``; an object-store run root logs on this machine instead (a log file is
    appended line by line, which object stores cannot do): ``$DISCL_CACHE_DIR`` or ``~/.cache/discl-ray``."""
    from discl_ray.runtime.storage import is_uri

    if is_uri(str(run_root)):
        base = Path(os.environ.get("DISCL_CACHE_DIR") or Path.home() / ".cache" / "discl-ray").expanduser()
        return base.resolve() / "logs" / LOG_NAME
    return Path(run_root).resolve() / "logs" / LOG_NAME


def setup(verbose: bool = False, run_root: str | Path | None = None) -> Path | None:
    """Configure console + file logging for this process (idempotent; thread-safe). Returns the log file.

    Quiet (default): console handlers at WARNING, Python warnings and library INFO to the file only.
    Verbose: console at DEBUG and Ray worker output forwarded to the driver, as before."""
    path = log_file(run_root) if run_root is not None else None
    with _lock:
        if _state.get("key") == (verbose, path):
            return path
        ours = _state.setdefault("env", {})
        for k, v in quiet_env(verbose).items():
            if verbose or os.environ.get(k) in (None, ours.get(k)):   # a user's own setting wins when quiet
                os.environ[k] = ours[k] = v
        root = logging.getLogger()
        root.setLevel(logging.DEBUG if verbose else logging.INFO)
        for h in _state.get("handlers", []):
            root.removeHandler(h)
            logging.getLogger("ray").removeHandler(h)
            h.close()
        console = _Stderr()
        console.setLevel(logging.DEBUG if verbose else logging.WARNING)
        console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
        handlers = [console]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(path, encoding="utf-8")
            fh.setLevel(logging.DEBUG if verbose else logging.INFO)
            fh.setFormatter(logging.Formatter(FILE_FORMAT))
            handlers.append(fh)
        # basicConfig's handler (an earlier stage in this process) would print INFO twice.
        for h in list(root.handlers):
            if type(h) is logging.StreamHandler and h not in handlers:
                root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        logging.captureWarnings(True)        # warnings → the "py.warnings" logger → file (and console if verbose)
        logging.getLogger("py.warnings").setLevel(logging.WARNING)
        if not verbose:
            _warnings_to_file(handlers)
        for name in CHATTY:
            logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
        for name in NOTICES:
            logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
        _configure_ray(verbose, handlers[1:], path)
        _configure_hf(verbose)
        _state.update(key=(verbose, path), handlers=handlers)
    return path


def _warnings_to_file(handlers: list[logging.Handler]) -> None:
    """Python warnings (deprecations inside libraries) are for developers: the file gets them, not the console."""
    w = logging.getLogger("py.warnings")
    w.propagate = False
    for h in list(w.handlers):
        w.removeHandler(h)
    for h in handlers[1:]:
        w.addHandler(h)


def _configure_ray(verbose: bool, file_handlers: list[logging.Handler], path: Path | None) -> None:
    """Ray's driver-side loggers do not propagate to the root: set their console level, add the file."""
    if path is not None and not verbose:
        cfg = path.parent / "ray-data-logging.yaml"
        cfg.write_text(_RAY_DATA_CONFIG, encoding="utf-8")
        os.environ["RAY_DATA_LOGGING_CONFIG"] = str(cfg)
    elif verbose:
        os.environ.pop("RAY_DATA_LOGGING_CONFIG", None)
    import ray  # noqa: F401  (sets up the "ray" logger and its console handler)

    ray_logger = logging.getLogger("ray")
    for h in ray_logger.handlers:
        if type(h).__name__ == "PlainRayHandler":
            h.setLevel(logging.NOTSET if verbose else logging.WARNING)
    for h in file_handlers:
        ray_logger.addHandler(h)
    if "ray.data" in sys.modules:          # already configured at import: apply the new config now
        from ray.data._internal.logging import configure_logging

        configure_logging()


def _configure_hf(verbose: bool) -> None:
    """transformers/diffusers already imported: their log level and model loading/saving progress bars
    (imported later, transformers reads the env switches above; diffusers' loading bar only shows where a
    pipeline is loaded with ``from_pretrained``, which the driver does not do for the toy world)."""
    level = logging.INFO if verbose else logging.ERROR
    for mod in ("transformers.utils.logging", "diffusers.utils.logging"):
        hf = sys.modules.get(mod)
        if hf is not None:
            hf.set_verbosity(level)
            hf.enable_progress_bar() if verbose else hf.disable_progress_bar()


@contextlib.contextmanager
def native_stderr_to(log: TextIO | None) -> Iterator[None]:
    """While the block runs, what native code writes to this process's file descriptor 2 goes to ``log``;
    Python's ``sys.stderr`` (this module's console handler, Ray's, tracebacks) keeps writing to the console.

    Ray's C++ core worker in the driver writes its own log lines to descriptor 2, outside Python's logging:
    nothing above can set their level. The one a healthy run prints is an error-level note, once per
    process, that an actor "has constructor arguments in the object store and max_restarts > 0": every Ray
    Data actor pool (generate, score, mine) gets its transform by reference and restarts its actors, as it
    should. Ray offers no switch for that sink short of ``RAY_BACKEND_LOG_LEVEL=fatal``, which would also
    empty Ray's own driver log file; so a command that keeps a log of its stages' output (``discl
    quickstart``) sends the descriptor there, where the line sits with the rest of the stage's output (Ray
    also keeps it in ``python-core-driver-*.log``). ``log=None`` (``--verbose``): nothing changes."""
    if log is None:
        yield
        return
    for stream in (sys.stdout, sys.stderr, log):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()
    saved = os.dup(2)
    before, console = sys.stderr, None
    try:
        if _writes_to_fd2(before):
            # A new file object on a copy of the console's descriptor: Python-level writes stay on the console.
            console = open(os.dup(saved), "w", buffering=1, encoding=getattr(before, "encoding", None) or "utf-8",
                           errors="backslashreplace")
            sys.stderr = console
        os.dup2(log.fileno(), 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr, log):
            with contextlib.suppress(AttributeError, OSError, ValueError):
                stream.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if console is not None:
            if sys.stderr is console:
                sys.stderr = before
            console.close()


def _writes_to_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):      # pytest's capture, a StringIO: not the descriptor
        return False
