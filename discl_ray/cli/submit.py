"""Submit any stage as a Ray job (``JobSubmissionClient``) and follow it to the end.

    job_id = submit_stage("train", "http://127.0.0.1:8265", config="configs/iwildcam/discl.yaml",
                          overrides=["training.epochs=20"])
    status = follow(job_id, "http://127.0.0.1:8265")          # streams logs, returns the final status

The job's entry point is ``python -m discl_ray.cli STAGE --config … overrides`` run inside a runtime env whose
``working_dir`` is this checkout (minus run outputs, virtualenvs, data and caches), so the cluster runs exactly
the code on disk here. The config is resolved and validated *before* submitting; a config file that lives
outside the working dir travels as resolved YAML in an env var (``DISCL_CONFIG_YAML``) and
``python -m discl_ray.cli.submit STAGE …`` writes it out on the cluster side.

Token auth: Ray 2.60 clusters require a bearer token; a client talking to an explicit address only sends it
when ``RAY_AUTH_MODE=token`` (the token comes from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``). We set that mode unless the caller chose one.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Optional, TextIO

import yaml

from discl_ray.errors import UserError

# Never uploaded with the working dir: outputs, environments, datasets, caches, VCS. Top-level folders are
# anchored with '/' (gitignore syntax): a bare "data/" would also drop the discl_ray/data package.
EXCLUDES = ["/runs/", "/.venv/", "/venv/", "/data/", "/.git/", "/mlruns/", "/mlartifacts/", "/.ray/", "/build/",
            "/dist/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/", "*.egg-info/", "*.parquet", "*.pt",
            "*.ckpt", "*.safetensors", "*.db",
            # … except the toy worlds' shipped weights: a submitted toy job unpacks them on the cluster
            "!/discl_ray/assets/**"]
CONFIG_ENV = "DISCL_CONFIG_YAML"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def enable_token_auth() -> None:
    """Send the cluster token with every request (Ray 2.60 only does so for explicit addresses when asked)."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")


def auth_headers() -> dict[str, str]:
    """``Authorization: Bearer <token>`` from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.

    Passed explicitly because Ray reads ``RAY_AUTH_MODE`` once per process: a process that imported Ray
    before (a notebook, a test session) would otherwise send no token. Empty when auth is disabled.
    """
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def resolve_config_yaml(config: Optional[str], overrides: Iterable[str] = ()) -> str:
    """The validated, fully resolved config (base chain and overrides applied) as YAML text."""
    from discl_ray.cli.stage import DEFAULT_CONFIG
    from discl_ray.config import load_config

    path = config or DEFAULT_CONFIG
    cfg = load_config(path, list(overrides))  # ConfigError here means nothing was submitted
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def entrypoint(stage: str, config: Optional[str], overrides: Iterable[str], working_dir: Path,
               stage_args: Iterable[str] = (), python: str = "python") -> tuple[str, dict]:
    """The job's shell command and extra env vars for ``stage`` with ``config`` and ``overrides``;
    ``stage_args`` are the stage's own positional words (``pipeline``'s stage names); ``python`` the
    interpreter the job runs (``python`` on the cluster's PATH; this client's own for a workstation head)."""
    from discl_ray.cli import COMMANDS

    if stage not in COMMANDS or stage in ("submit", "ui"):
        valid = [c for c in COMMANDS if c not in ("submit", "ui")]
        raise UserError(f"stage {stage!r} cannot be submitted; choose from: {', '.join(valid)}")
    stage_args = list(stage_args)
    if stage == "pipeline":
        from jobs.pipeline import STAGES

        bad = [s for s in stage_args if s not in STAGES]
        if bad or not stage_args:
            raise UserError(f"pipeline needs stage names in order; {'unknown ' + repr(bad[0]) if bad else 'none given'}"
                             f"; choose from: {', '.join(STAGES)}")
    elif stage_args:
        raise UserError(f"{stage} takes key=value overrides only; got {stage_args[0]!r}")
    stage = shlex.join([stage, *stage_args])
    overrides = list(overrides)
    env: dict[str, str] = {}
    if config is None:
        cmd = [python, "-m", "discl_ray.cli", *shlex.split(stage)]
    else:
        cfg_path = Path(config).resolve()
        try:
            rel = cfg_path.relative_to(working_dir.resolve())
            cmd = [python, "-m", "discl_ray.cli", *shlex.split(stage), "--config", rel.as_posix()]
        except ValueError:  # outside the uploaded tree: ship the resolved config itself
            env[CONFIG_ENV] = resolve_config_yaml(config, overrides)
            cmd, overrides = [python, "-m", "discl_ray.cli.submit", *shlex.split(stage)], []
    return shlex.join(cmd + overrides), env


LOOPBACK_HOSTS = ("localhost", "0.0.0.0", "::1", "[::1]")


def is_loopback_host(host: str) -> bool:
    host = (host or "").lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def is_loopback_address(address: Optional[str]) -> bool:
    """A Ray address (``http://127.0.0.1:8265``, ``127.0.0.1:6379``, ``localhost``) on this machine."""
    from urllib.parse import urlparse

    if not address:
        return False
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    return is_loopback_host(parsed.hostname or "")


def check_forwardable(uri: Optional[str], setting: str, address: Optional[str] = None) -> None:
    """Refuse a tracking URI that means this client machine: a loopback server or a local file store.

    On the cluster 127.0.0.1 is the job's own pod/node, where no MLflow server runs, and a sqlite/file path
    is a path on this laptop; the job would fail (or log somewhere nobody looks) after minutes of work.
    A workstation head (``address`` on loopback too) runs the job on this machine: a loopback server is then
    the right one, and allowed."""
    from urllib.parse import urlparse

    if not uri:
        return
    parsed = urlparse(uri)
    host = (parsed.hostname or "").lower()
    if parsed.scheme in ("http", "https"):
        if is_loopback_host(host) and not is_loopback_address(address):
            raise UserError(f"{setting}={uri} is a loopback address: on the cluster it names the job's own node. "
                             "Use the tracking server's cluster-reachable address (e.g. the infra's MLflow service)")
        return
    if parsed.scheme in ("", "file", "sqlite"):
        if is_loopback_address(address):
            raise UserError(f"{setting}={uri} is a store only one process can write safely; the job's stages run "
                             "in several processes: start an MLflow server (mlflow server --host 127.0.0.1 …) and "
                             "use its http:// address")
        raise UserError(f"{setting}={uri} is a store on this machine, not reachable from the cluster; use an "
                         "http(s) MLflow server")


def runtime_env(working_dir: Path, env_vars: Optional[dict] = None, excludes: Iterable[str] = EXCLUDES,
                address: Optional[str] = None) -> dict:
    """Runtime env: the checkout as working_dir minus outputs/data, plus env vars the stages expect.

    Only settings travel (the tracking server's address, the auth mode), never credentials: a job's runtime
    env is readable by anyone holding the cluster token, so keys and passwords come from the nodes' own
    environment (docs/cluster.md, "Secrets")."""
    env = {"PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    check_forwardable(os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI", address)
    for key in ("MLFLOW_TRACKING_URI", "RAY_AUTH_MODE"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    env.update(env_vars or {})
    return {"working_dir": str(working_dir), "excludes": list(excludes), "env_vars": env}


# How long `discl submit` waits for a just-started head's job agent (see submit_stage).
AGENT_WAIT_S = 120.0


def submit_stage(stage: str, address: str, *, config: Optional[str] = None, overrides: Iterable[str] = (),
                 working_dir: str | Path = ".", submission_id: Optional[str] = None,
                 num_cpus: Optional[float] = None, num_gpus: Optional[float] = None,
                 env_vars: Optional[dict] = None, stage_args: Iterable[str] = ()) -> str:
    """Validate the config, submit ``stage`` as a Ray job at ``address``; returns the submission id."""
    enable_token_auth()  # before Ray is imported in this process
    from ray.job_submission import JobSubmissionClient

    overrides = list(overrides)
    resolved = yaml.safe_load(resolve_config_yaml(config, overrides))  # fail here, not on the cluster
    check_forwardable((resolved.get("tracking") or {}).get("tracking_uri"), "tracking.tracking_uri", address)
    check_forwardable(os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI", address)
    wd = Path(working_dir).resolve()
    # A workstation head (`ray start --head` on this machine) runs jobs with whatever `python` the shell that
    # started it had on its PATH, often not this virtualenv: the job uses this client's interpreter instead.
    python = sys.executable if is_loopback_address(address) else "python"
    cmd, extra_env = entrypoint(stage, config, overrides, wd, stage_args, python=python)
    client = JobSubmissionClient(address, headers=auth_headers())
    kwargs = {}
    if num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = num_cpus
    if num_gpus is not None:
        kwargs["entrypoint_num_gpus"] = num_gpus
    env = runtime_env(wd, {**(env_vars or {}), **extra_env}, address=address)
    # A head started moments ago (`ray start --head`, a RayCluster just up) answers before its dashboard agent has
    # registered, and refuses the job with "No available agent to submit job, please try again later": asked again,
    # for up to AGENT_WAIT_S, as Ray's message says; any other refusal is reported at once.
    # The id is chosen here, once (by Ray's own generator), so a retry can never start a second job.
    from ray.dashboard.modules.job.job_manager import generate_job_id

    submission_id = submission_id or generate_job_id()
    deadline = time.monotonic() + AGENT_WAIT_S
    retried = False
    while True:
        try:
            return client.submit_job(entrypoint=cmd, runtime_env=env, submission_id=submission_id,
                                     metadata={"stage": stage, "tool": "discl"}, **kwargs)
        except RuntimeError as err:
            if retried and f"{submission_id} already exists" in str(err):
                return submission_id        # an earlier try reached the agent after all
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            retried = True
            print(f"discl submit: the Ray head at {address} has no job agent yet; trying again",
                  file=sys.stderr, flush=True)
            time.sleep(3.0)


def follow(submission_id: str, address: str, out: Optional[TextIO] = None) -> str:
    """Stream the job's logs to ``out`` (stdout) until it ends; returns its final status name."""
    import asyncio

    out = out or sys.stdout
    enable_token_auth()
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address, headers=auth_headers())

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())
    status = client.get_job_status(submission_id)
    while str(status.value) not in TERMINAL:  # logs can close a moment before the status settles
        import time

        time.sleep(0.5)
        status = client.get_job_status(submission_id)
    return str(status.value)


def _run_shipped_config(argv: list[str]) -> int:
    """Cluster side of a job whose config travelled in ``DISCL_CONFIG_YAML``: write it, run the stage."""
    from discl_ray.cli import main as cli_main

    text = os.environ.get(CONFIG_ENV)
    if not argv or text is None:
        print(f"usage: python -m discl_ray.cli.submit STAGE  (with {CONFIG_ENV} set)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "config.yaml")
        path.write_text(text)
        return cli_main([argv[0], "--config", str(path), *argv[1:]])


if __name__ == "__main__":
    sys.exit(_run_shipped_config(sys.argv[1:]))
