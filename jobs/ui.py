"""`discl ui [--port N]`: serve the MLflow UI on 127.0.0.1 over the run's SQL store (Ctrl-C stops it).

It prints, per experiment with training runs, a link to its runs table set up for comparing curricula
(swept params and headline metrics as columns, training runs only): see :func:`headline_views`."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

from discl_ray.cli.stage import run_stage
from discl_ray.errors import UserError


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", "-p", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default loopback; the UI has no auth, tunnel to it instead)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server to answer")


VIEW_KEY = "discl-headline"
VIEW_TAG = "mlflow.sharedViewState." + VIEW_KEY      # what the UI's "share view" writes and ?viewStateShareKey= reads


def headline_views(uri: str) -> dict[str, str]:
    """For every experiment with training runs, a shared runs-table view showing what a user compares first:
    the Dataset column, the swept params (those that differ between runs, seeds excluded) and the headline
    metrics (many / medium / few / overall accuracy, or OOD / ID F1), training runs only, best first.

    Written as the experiment tag the UI's "Share" button writes; returns {experiment id: name}."""
    import json

    import mlflow

    from discl_ray.report.tables import TABLES, config_columns
    from discl_ray.runtime.tracking import use_uri

    use_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    done = {}
    for exp in client.search_experiments():
        runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.stage = 'train'", max_results=5000)
        if runs.empty:
            continue
        metrics = [m for cols in TABLES.values() for _, m in cols if f"metrics.{m}" in runs.columns]
        params = [c[len("params."):] for c in config_columns(runs)]
        if "params.training.strategy" in runs.columns and "training.strategy" not in params:
            params.insert(0, "training.strategy")
        state = {"searchFilter": "tags.stage = 'train'",
                 "orderByKey": f"metrics.`{metrics[-1]}`" if metrics else "attributes.start_time",
                 "orderByAsc": False,
                 "selectedColumns": ["attributes.`Dataset`", *(f"params.`{p}`" for p in params),
                                     *(f"metrics.`{m}`" for m in metrics)]}
        client.set_experiment_tag(exp.experiment_id, VIEW_TAG, json.dumps(state))
        done[exp.experiment_id] = exp.name
    return done


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


def _body(ctx, args: argparse.Namespace) -> int:
    from discl_ray.runtime.tracking import artifact_root, ui_command, wait_until_up

    uri = ctx.tracking_uri
    try:
        cmd = ui_command(uri, port=args.port, host=args.host, artifacts=artifact_root(ctx.cfg, uri))
    except UserError as err:
        print(f"discl ui: {err}", file=sys.stderr)
        return err.exit_code
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"discl ui: WARNING binding {args.host}: the MLflow UI has no authentication", file=sys.stderr)
    try:
        views = headline_views(uri)
    except Exception as err:  # noqa: BLE001 - an unreadable store still gets a UI (it will say why)
        print(f"discl ui: no headline views ({err})", file=sys.stderr)
        views = {}
    proc = subprocess.Popen(cmd)
    signal.signal(signal.SIGTERM, _interrupt)
    url = f"http://{args.host}:{args.port}"
    try:
        wait_until_up(url + "/health", timeout=args.timeout, proc=proc)
        print(f"MLflow UI for {uri} at {url} (Ctrl-C to stop)", flush=True)
        for exp_id, name in views.items():
            print(f"  {name}: {url}/#/experiments/{exp_id}/runs?viewStateShareKey={VIEW_KEY}", flush=True)
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
