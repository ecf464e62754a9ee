"""Content-addressed storage primitives shared by the spectrum store (:mod:`discl_ray.generation.store`) and the
canonical dataset rows (:func:`discl_ray.data.materialize`): digests, the store's folders under the run root, and
its writer lock. A layer below the stages, so the data layer uses them without importing a stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from discl_ray.runtime.storage import Storage, as_storage

if TYPE_CHECKING:
    from discl_ray.config import ExperimentConfig
    from discl_ray.runtime.cluster import RunPaths

log = logging.getLogger(__name__)

STORE_DIR = "_spectra"
ROWS_DIR = "rows"
LOCK_WAIT_S = 6 * 3600.0


def _h(*parts: object, size: int = 16) -> str:
    return hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=size).hexdigest()


def files_digest(path: "str | Path", cache: Optional[Path] = None) -> str:
    """A digest of a file or of every file under a folder (relative names and bytes).

    Remembered in ``<cache>/digests.json`` by (path, size, mtime), so multi-GB checkpoints are read once."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
    stamp = _h(*[f"{f.relative_to(path) if f != path else f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                 for f in files])
    memo_file = Path(cache, "digests.json") if cache else None
    memo: dict = {}
    if memo_file and memo_file.is_file():
        with contextlib.suppress(ValueError, OSError):
            memo = json.loads(memo_file.read_text())
    mkey = f"{path.resolve()}|{stamp}"
    if mkey in memo:
        return memo[mkey]
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()
    if memo_file:
        memo[mkey] = digest
        with contextlib.suppress(OSError):
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_name(f"digests.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_file)
    return digest


def store_root(cfg: "ExperimentConfig", paths: "Optional[RunPaths]" = None) -> Storage:
    """``<run_root>/_spectra/<dataset.name>/`` (``paths``: the run's locations when the caller has them)."""
    from discl_ray.runtime.cluster import RunPaths

    return as_storage((paths or RunPaths.from_config(cfg)).root / STORE_DIR / cfg.dataset.name)


def rows_root(cfg: "ExperimentConfig", paths: "Optional[RunPaths]" = None) -> Storage:
    """``<run_root>/_spectra/<dataset.name>/rows/``: the dataset's canonical rows, one folder per rows key
    (written by :func:`discl_ray.data.materialize`; its own writer lock, see there)."""
    return store_root(cfg, paths).join(ROWS_DIR)


@contextlib.contextmanager
def writer_lock(store: "str | Storage", what: str, wait_s: float = LOCK_WAIT_S):
    """Hold the store's writer lock; wait (polling) while another run holds it.

    Local stores use ``flock`` (released by the kernel when the holder dies, so never stale); object stores a
    :class:`~discl_ray.runtime.lease.StageLease` on the store folder, retried until it is free."""
    store = as_storage(store)
    t0 = time.monotonic()
    said = False
    if store.is_local:
        import fcntl

        store.mkdir()
        fd = os.open(os.path.join(store.path, "_writer.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() - t0 > wait_s:
                        raise TimeoutError(f"{store}: another run held the spectrum store for {wait_s:.0f} s") from None
                    if not said:
                        log.info("%s: waiting for another run writing the spectrum store %s", what, store)
                        said = True
                    time.sleep(0.5)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "what": what}).encode())
            for root, _dirs, files in os.walk(store.path):  # temp files of killed writers
                for name in files:
                    if name.endswith(".tmp"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(root, name))
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    from discl_ray.runtime.lease import StageBusy, StageLease

    while True:
        lease = StageLease(store, f"store:{what}")
        try:
            lease.acquire()
            break
        except StageBusy:
            if time.monotonic() - t0 > wait_s:
                raise
            time.sleep(2.0)
    try:
        yield
    finally:
        lease.release()
