"""`discl quickstart --profile smoke`: the whole method on the toy world through every stage command, its
console output, and what it leaves in MLflow (read back through the client from the real sqlite store)."""

from __future__ import annotations

import json
import os
import re

import mlflow
import pyarrow.parquet as pq
import pytest

from jobs import quickstart


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qs") / "runs"
    capture = pytest.MonkeyPatch()
    import io
    import sys

    out, err = io.StringIO(), io.StringIO()
    capture.setattr(sys, "stdout", out)
    capture.setattr(sys, "stderr", err)
    # What native code writes to descriptor 2 (Ray's C++ core) reaches the console too: capture it as well.
    native = root.parent / "fd2.txt"
    with open(native, "w") as fd2:
        saved = os.dup(2)
        os.dup2(fd2.fileno(), 2)
        try:
            rc = quickstart.main(["--profile", "smoke", "--run-root", str(root)])
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.undo()
    return root, rc, out.getvalue(), err.getvalue() + native.read_text()


def test_quickstart_smoke_profile_runs_every_stage(smoke_run):
    root, rc, out, _ = smoke_run
    assert rc == 0, out
    for exp in ("toy_lt", "toy_lq"):
        spectrum = pq.read_table(root / exp / "generate" / "spectrum")
        scores = pq.read_table(root / exp / "score" / "scores")
        assert spectrum.num_rows > 0 and scores.num_rows == spectrum.num_rows
        assert json.loads((root / exp / "generate" / "summary.json").read_text())
        assert (root / exp / "report" / "lam_per_epoch.png").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    for exp in ("toy_lt", "toy_lq"):
        runs = mlflow.search_runs(experiment_names=[exp], filter_string="tags.stage = 'train'")
        assert len(runs) == 2, exp
        assert set(runs["tags.strategy"]) == ({"none", "diverse_to_specific"} if exp == "toy_lt"
                                              else {"none", "adaptive"})


def test_quickstart_console_is_short_and_says_what_happened(smoke_run):
    root, _, out, err = smoke_run
    lines = out.splitlines()
    assert len(lines) <= 150, f"{len(lines)} lines"
    # one line per step with its time; the world's source; the result tables; where the logs are
    assert sum(1 for line in lines if line.startswith("[")) == 15
    assert "toy world:" in out and "== timings" in out and "discl ui" in out
    assert "| strategy |" in out or "| training.strategy |" in out or "| n |" in out
    # Ray's per-report lines and worker logs are not on the console, but in the log files
    assert "Reporting training result" not in out + err
    # no line from Ray's C++ core at error level (issue 33; "[date time E pid tid] file.cc:line:"): the stage log has it
    assert not re.search(r"\[[^\]\n]* E \d+ \d+\] \w+\.cc:\d+:", out + err), err[-3000:]
    assert "(RayTrainWorker" not in out + err
    # nor the raylet's notes (its worker-pool size warnings while both tasks run): they go to the stage log
    assert "(raylet)" not in out + err, err[-3000:]
    log = (root / "logs" / "quickstart.log").read_text()
    assert "discl train" in log and "final_test_acc" in log


def test_mlflow_experiment_kind_inputs_and_metrics_read_back(smoke_run):
    """The MLflow UI opens these experiments as model-training runs tables, with datasets and metrics."""
    from mlflow import MlflowClient

    from discl_ray.runtime.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    root, _, _, _ = smoke_run
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    for exp_name, baseline, curriculum, headline in (
            ("toy_lt", "none", "diverse_to_specific", ("final_test_many_acc", "final_test_few_acc", "final_test_acc")),
            ("toy_lq", "none", "adaptive", ("final_test_ood_f1", "final_test_id_f1"))):
        exp = client.get_experiment_by_name(exp_name)
        assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
        runs = {r.data.tags["strategy"]: r for r in client.search_runs([exp.experiment_id], "tags.stage = 'train'")}
        # The two tasks' stages run side by side in one process: each stage's run is filed under its own task's
        # experiment (MLflow's active experiment is process-wide).
        dataset = {r.data.params["dataset.name"] for r in runs.values()}
        for stage in ("generate", "score"):
            staged = client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'")
            assert len(staged) == 1 and {r.data.params["dataset.name"] for r in staged} == dataset, (exp_name, stage)
        for strategy in (baseline, curriculum):
            run = runs[strategy]
            assert all(0.0 <= run.data.metrics[m] <= 1.0 for m in headline), run.data.metrics
            inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
            real = inputs[f"{run.data.params['dataset.name']}-real"]
            assert {t.key: t.value for t in real.tags}["mlflow.data.context"] == "training"
            schema = json.loads(real.dataset.schema)["mlflow_colspec"]
            cols = {c["name"] for c in schema}
            assert {"image_id", "label", "split"} <= cols and "image" not in cols      # metadata, never pixels
            assert json.loads(real.dataset.profile)["num_rows"] > 0
            synthetic = f"{run.data.params['dataset.name']}-synthetic"
            if strategy == baseline:        # a baseline never sees the spectrum
                assert synthetic not in inputs
            else:
                syn = inputs[synthetic]
                assert {c["name"] for c in json.loads(syn.dataset.schema)["mlflow_colspec"]} >= {"lam", "clip_text_cos"}
                spectrum = pq.read_table(root / exp_name / "generate" / "spectrum")
                assert json.loads(syn.dataset.profile)["num_rows"] == spectrum.num_rows


def test_ui_headline_view_selects_swept_params_and_headline_metrics(smoke_run):
    """`discl ui` writes a shared runs-table view per experiment (the tag the UI's ?viewStateShareKey= reads)."""
    from mlflow import MlflowClient

    from jobs import ui

    root, _, _, _ = smoke_run
    uri = f"sqlite:///{root / 'mlflow.db'}"
    views = ui.headline_views(uri)
    assert set(views.values()) == {"toy_lt", "toy_lq"}
    client = MlflowClient(tracking_uri=uri)
    lt = json.loads(client.get_experiment_by_name("toy_lt").tags[ui.VIEW_TAG])
    assert lt["selectedColumns"][:2] == ["attributes.`Dataset`", "params.`training.strategy`"]
    assert {"metrics.`final_test_many_acc`", "metrics.`final_test_few_acc`",
            "metrics.`final_test_acc`"} <= set(lt["selectedColumns"])
    assert not any("seed" in c or "run_root" in c for c in lt["selectedColumns"])
    lq = json.loads(client.get_experiment_by_name("toy_lq").tags[ui.VIEW_TAG])
    assert {"metrics.`final_test_ood_f1`", "metrics.`final_test_id_f1`"} <= set(lq["selectedColumns"])
