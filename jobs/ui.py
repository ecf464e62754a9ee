"""`discl ui [--port N]`: serve the MLflow UI on 127.0.0.1 over the run's SQL store (Ctrl-C stops it)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

from discl_ray.cli_common import run_stage
from discl_ray.config import ExperimentConfig


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", "-p", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default loopback; the UI has no auth, tunnel to it instead)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server to answer")


def _interrupt(signum, frame) -> None:
    """SIGTERM (from a supervisor or a test) stops the server like Ctrl-C does."""
    raise KeyboardInterrupt


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _body(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    from discl_ray.runtime import tracking_uri
    from discl_ray.tracking import artifact_root, ui_command, wait_until_up

    uri = tracking_uri(cfg)
    try:
        cmd = ui_command(uri, port=args.port, host=args.host, artifacts=artifact_root(cfg, uri))
    except ValueError as err:
        print(f"discl ui: {err}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"discl ui: WARNING binding {args.host}: the MLflow UI has no authentication", file=sys.stderr)
    proc = subprocess.Popen(cmd)
    signal.signal(signal.SIGTERM, _interrupt)
    url = f"http://{args.host}:{args.port}"
    try:
        wait_until_up(url + "/health", timeout=args.timeout, proc=proc)
        print(f"MLflow UI for {uri} at {url} (Ctrl-C to stop)", flush=True)
        return int(proc.wait())
    except (RuntimeError, TimeoutError) as err:
        print(f"discl ui: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(proc)


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, "ui", "Serve the MLflow UI on 127.0.0.1 over the run's tracking store.", _body, _args)
