"""`discl quickstart --profile smoke`: the whole method on the toy world through every stage command."""

from __future__ import annotations

import json

import mlflow
import pyarrow.parquet as pq

from jobs import quickstart


def test_quickstart_smoke_profile_runs_every_stage(tmp_path, capsys):
    root = tmp_path / "runs"
    assert quickstart.main(["--profile", "smoke", "--run-root", str(root)]) == 0
    out = capsys.readouterr().out
    for exp in ("toy_lt", "toy_lq"):
        spectrum = pq.read_table(root / exp / "generate" / "spectrum")
        scores = pq.read_table(root / exp / "score" / "scores")
        assert spectrum.num_rows > 0 and scores.num_rows == spectrum.num_rows
        assert json.loads((root / exp / "generate" / "summary.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    for exp, n_train in (("toy_lt", 2), ("toy_lq", 2)):
        runs = mlflow.search_runs(experiment_names=[exp], filter_string="tags.stage = 'train'")
        assert len(runs) == n_train, exp
        assert set(runs["tags.strategy"]) == ({"none", "diverse_to_specific"} if exp == "toy_lt"
                                              else {"none", "adaptive"})
    assert "quickstart timings" in out and "discl ui" in out
