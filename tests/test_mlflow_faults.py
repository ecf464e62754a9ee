"""The MLflow server goes away while a stage runs (issue 29), with a real ``mlflow server`` on 127.0.0.1.

`discl generate` and `discl score` log only at the end: a server stopped after their outputs are written
must cost the run its MLflow record only — one line on stderr, exit status 1, the outputs complete — and the
rerun against the server brought back on the same address computes nothing and only logs. One server (a
sqlite store kept across restarts, one port) serves the module. The training cases (a server restarted inside
MLflow's retry window, a server gone for good through the `max_failures` restarts) are in tests/test_faults.py.
"""

from __future__ import annotations

import json

import pyarrow.compute as pc
import pytest
from reliab_fixtures import free_port, mlflow_server, stop_server, write_config

from discl_ray.runtime.io import read_parquet_dir


class Server:
    """One ``mlflow server`` for the module, stopped and started again on the same port and store."""

    def __init__(self, root):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._ctx = self.proc = None

    def start(self):
        self._ctx = mlflow_server(self.root, port=self.port)
        _, self.proc = self._ctx.__enter__()

    def stop(self):
        if self._ctx is not None:
            stop_server(self.proc)
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def up(self):
        if self._ctx is None or self.proc.poll() is not None:
            self._ctx = None
            self.start()
        return self


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow"))
    yield srv
    srv.stop()


def _stop_before(monkeypatch, module, name: str, server: Server, check):
    """Stop the server at the one moment that matters: every output written (``check()``), nothing logged."""
    real = getattr(module, name)

    def stop_then_log(*args, **kwargs):
        check()
        server.stop()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, stop_then_log)
    return real


def _one_line(capsys, prog: str, uri: str) -> None:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"discl {prog}:")]
    assert len(err) == 1 and uri in err[0] and "rerun once the server is back" in err[0], err


def _runs(uri: str, experiment: str, stage: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'") if exp else []


def test_mlflow_stopped_after_generate_wrote_its_outputs(tmp_path, ray_local, server, capsys, monkeypatch):
    from gen_fixtures import tiny_sd_dir, write_experiment

    from discl_ray.generation import job
    from jobs.generate import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = write_experiment(tmp_path / "runs", tiny_sd_dir(tmp_path / "models"), n_sources=2, lams=[0.0, 0.5],
                           seeds=[0], overrides={"steps": 2, "batch_size": 2, "rows_per_block": 2})
    data = cfg.model_dump(mode="json")
    data["tracking"] = {**data.get("tracking", {}), "enabled": True, "tracking_uri": server.up().uri,
                        "experiment_name": "gen-stop"}
    path = write_config(tmp_path / "gen.yaml", data)
    spectrum = tmp_path / "runs" / cfg.experiment / "generate" / "spectrum"

    real = _stop_before(monkeypatch, job, "log_to_mlflow", server,
                        lambda: read_parquet_dir(spectrum).num_rows == 4 or pytest.fail("outputs not all written"))
    capsys.readouterr()
    assert main(["--config", str(path)]) == 1
    _one_line(capsys, "generate", server.uri)
    first = read_parquet_dir(spectrum)
    assert first.num_rows == pc.count_distinct(first["image_id"]).as_py() == 4       # outputs complete

    monkeypatch.setattr(job, "log_to_mlflow", real)
    server.up()                                                                        # back on the same address
    assert main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "generated 0, skipped 4" in out, out                                        # the rerun only logs
    runs = _runs(server.uri, "gen-stop", "generate")
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    assert runs[0].data.metrics["planned"] == 4 and runs[0].data.metrics["skipped"] == 4
    again = read_parquet_dir(spectrum)
    same = dict(zip(first["image_id"].to_pylist(), first["image"].to_pylist()))
    assert sorted(again["image_id"].to_pylist()) == sorted(same)
    assert all(same[k] == v for k, v in zip(again["image_id"].to_pylist(), again["image"].to_pylist()))


def test_mlflow_stopped_after_score_wrote_its_outputs(tmp_path, ray_local, server, capsys, monkeypatch):
    from test_scoring_job import make_experiment

    from discl_ray.config import load_config
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.scoring import job
    from jobs.score import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data, ids = make_experiment(tmp_path)
    data = {**data, "tracking": {"enabled": True, "tracking_uri": server.up().uri, "experiment_name": "score-stop"}}
    path = write_config(tmp_path / "score.yaml", data)
    out = RunPaths.from_config(load_config(data=data)).stage("score")
    want = len(ids) - 1                                               # one synthetic image is corrupt: an error row

    def outputs_written():
        assert read_parquet_dir(out / "scores").num_rows == want
        assert json.loads((out / "summary.json").read_text())["scored"] == want

    real = _stop_before(monkeypatch, job, "_log_mlflow", server, outputs_written)
    capsys.readouterr()
    assert main(["--config", str(path)]) == 1
    _one_line(capsys, "score", server.uri)
    first = read_parquet_dir(out / "scores")
    assert first.num_rows == pc.count_distinct(first["image_id"]).as_py() == want     # outputs complete

    monkeypatch.setattr(job, "_log_mlflow", real)
    server.up()
    assert main(["--config", str(path)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 0 and summary["total"] == want                         # the rerun only logs
    runs = _runs(server.uri, "score-stop", "score")
    assert len(runs) == 1 and runs[0].data.metrics["total"] == want
    cols = ["image_id", "clip_text_cos"]
    again = read_parquet_dir(out / "scores").sort_by("image_id").select(cols)
    assert again.equals(first.sort_by("image_id").select(cols))                     # nothing rescored
