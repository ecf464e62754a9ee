"""`discl report`: tables from real MLflow runs (tmp sqlite) equal a recomputation from the raw metrics."""

from __future__ import annotations

import statistics

import mlflow  # a hard dependency: a broken install must fail here, not turn into a skip
import mlflow.data
import pandas as pd
import pytest

from discl_ray.report.tables import build_tables, format_table, to_markdown

STRATS = {"diverse_to_specific": [0.0, 0.5, 1.0], "easy_to_hard": [1.0, 0.5, 0.0]}
STORE, STORE_DIGEST = "/x/_spectra/digits_lt", "0123abcd4567ef89"


def _log_runs(uri: str, experiment: str) -> dict:
    """2 strategies × 2 losses × 3 seeds of long-tail runs plus 2 low-quality runs; returns raw finals."""
    from discl_ray.runtime.tracking import ensure_experiment

    # Artifacts next to the store, not in ./mlruns of the current directory.
    ensure_experiment(uri, experiment, uri.removeprefix("sqlite:///").rsplit("/", 1)[0] + "/mlartifacts")
    from discl_ray.runtime.tracking import use_uri

    use_uri(uri)  # unlike mlflow.set_tracking_uri, leaves MLFLOW_TRACKING_URI for the next tests alone
    mlflow.set_experiment(experiment)
    raw: dict = {}
    with mlflow.start_run(run_name="sweep", tags={"stage": "sweep"}) as parent:
        mlflow.log_params({"training.strategy": "grid", "run_root": "/x"})
    for si, (strategy, lams) in enumerate(STRATS.items()):
        for li, loss in enumerate(["ce", "balanced_softmax"]):
            for seed in range(3):
                finals = {"final_test_many_acc": 0.9 - 0.01 * seed + 0.02 * li,
                          "final_test_medium_acc": 0.6 + 0.03 * seed - 0.01 * si,
                          "final_test_few_acc": 0.2 + 0.05 * seed + 0.1 * si + 0.07 * li,
                          "final_test_acc": 0.55 + 0.01 * seed + 0.02 * si}
                raw.setdefault((strategy, loss), []).append(finals)
                tags = {"stage": "train", "mlflow.parentRunId": parent.info.run_id, "seed": str(seed)}
                with mlflow.start_run(run_name=f"{strategy}-{loss}-{seed}", tags=tags):
                    mlflow.log_params({"training.strategy": strategy, "training.loss": loss,
                                       "training.seed": seed, "dataset.name": "digits_lt",
                                       "run_root": f"/tmp/r{seed}"})
                    for epoch, lam in enumerate(lams):
                        mlflow.log_metrics({"epoch": epoch, "lam": lam, "train_loss": 1.0 / (epoch + 1),
                                            "val_acc": 0.1 * epoch}, step=epoch)
                    mlflow.log_metrics(finals)
                    if strategy == "diverse_to_specific" and loss == "ce":   # as discl train logs it
                        ds = mlflow.data.from_pandas(pd.DataFrame({"key": ["k1", "k2"]}), source=STORE,
                                                     name="digits_lt-spectrum-store", digest=STORE_DIGEST)
                        mlflow.log_input(ds, context="spectrum", tags={"spectrum_store": STORE,
                                                                       "spectrum_store_digest": STORE_DIGEST})
    for seed in range(2):
        with mlflow.start_run(tags={"stage": "train"}):
            mlflow.log_params({"training.strategy": "adaptive", "training.seed": seed, "training.loss": "flyp"})
            mlflow.log_metrics({"final_test_ood_f1": 0.3 + 0.1 * seed, "final_test_id_f1": 0.7 - 0.1 * seed})
    return raw


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating MLflow's schema takes seconds): (uri, raw finals)."""
    path = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{path / 'mlflow.db'}"
    return uri, _log_runs(uri, "rep"), path


def test_tables_equal_recomputation(store):
    uri, raw, _ = store
    tables = build_tables(uri, "rep")
    assert set(tables) == {"long_tail", "low_quality"}
    lt = tables["long_tail"]
    # Rows = configurations: seed and bookkeeping params (run_root) are not row keys.
    assert list(lt.columns[:2]) == ["training.strategy", "training.loss"]
    assert "training.seed" not in lt.columns and "run_root" not in lt.columns
    assert len(lt) == 4 and set(lt["n"]) == {3}
    for (strategy, loss), finals in raw.items():
        row = lt[(lt["training.strategy"] == strategy) & (lt["training.loss"] == loss)].iloc[0]
        for label, metric in [("many", "final_test_many_acc"), ("medium", "final_test_medium_acc"),
                              ("few", "final_test_few_acc"), ("overall", "final_test_acc")]:
            vals = [f[metric] for f in finals]
            assert row[f"{label}_mean"] == pytest.approx(statistics.mean(vals))
            assert row[f"{label}_std"] == pytest.approx(statistics.stdev(vals))
    lq = tables["low_quality"]
    assert len(lq) == 1 and lq.iloc[0]["n"] == 2
    assert lq.iloc[0]["ood_f1_mean"] == pytest.approx(0.35)
    assert lq.iloc[0]["id_f1_std"] == pytest.approx(statistics.stdev([0.7, 0.6]))
    md = to_markdown(format_table(lt, "long_tail"))
    assert md.splitlines()[0] == "| training.strategy | training.loss | n | many | medium | few | overall |"
    assert "±" in md


def test_cli_writes_files_and_logs_report_run(store, tmp_path, capsys, monkeypatch):
    from jobs.report import main

    uri = store[0]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"experiment: rep\nrun_root: {tmp_path / 'runs'}\ntracking:\n  tracking_uri: '{uri}'\n")
    out = tmp_path / "out"
    assert main(["--config", str(cfg), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## long-tail" in printed and "## low-quality" in printed
    # The report names the spectrum store the curriculum runs read, with its digest (issue 27).
    assert f"Spectrum store: `{STORE}` (digest `{STORE_DIGEST}`, read by 3 runs)" in printed
    assert STORE_DIGEST in (out / "report.md").read_text()
    for name in ["long_tail.md", "long_tail.csv", "long_tail_groups.png", "low_quality.csv",
                 "lam_per_epoch.png", "report.md"]:
        assert (out / name).stat().st_size > 0, name
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("rep")
    reports = client.search_runs([exp.experiment_id], "tags.stage = 'report'")
    assert len(reports) == 1
    logged = {a.path for a in client.list_artifacts(reports[0].info.run_id, "report")}
    assert (store[2] / "mlartifacts" / "rep").is_dir()
    assert "report/lam_per_epoch.png" in logged and "report/long_tail.csv" in logged
    # A second report ignores the first report run (no final metrics) and gives the same table.
    assert main(["--config", str(cfg), "--out", str(out), "--no-log"]) == 0
    assert build_tables(uri, "rep")["long_tail"].shape[0] == 4


def test_unknown_experiment_names_existing(store):
    uri = store[0]
    with pytest.raises(ValueError, match="'nope' not found.*rep"):
        build_tables(uri, "nope")


def test_finished_runs_with_an_empty_class_group_name_the_group(tmp_path, monkeypatch):
    """Runs that finished but whose training set had no "many" class (the metric is NaN) make no table; the
    error names the empty group's metric instead of claiming no run finished."""
    from discl_ray.errors import UserError
    from discl_ray.report.tables import write_report
    from discl_ray.runtime.tracking import ensure_experiment, use_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    ensure_experiment(uri, "nomany", str(tmp_path / "art"))
    use_uri(uri)
    mlflow.set_experiment("nomany")
    for seed in range(2):
        with mlflow.start_run():
            mlflow.log_params({"training.seed": seed})
            mlflow.log_metrics({"final_test_acc": 0.5, "final_test_medium_acc": 0.6, "final_test_few_acc": 0.4,
                                "final_test_many_acc": float("nan")})
    with pytest.raises(UserError, match=r"2 run\(s\) finished.*final_test_many_acc \(many classes\)"):
        write_report(uri, "nomany", tmp_path / "out")


def test_lam_plot_draws_real_only_epochs_and_the_baseline(tmp_path):
    """Real-only epochs (sentinel λ = −1) and a `none` baseline appear as markers in their own band."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from discl_ray.report.tables import plot_lams

    rows = [{"run_id": "b", "strategy": "none", "epoch": e, "lam": -1.0} for e in range(6)]
    path = plot_lams(pd.DataFrame(rows), tmp_path / "lam.png")
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    h, w, _ = img.shape
    blue = (np.abs(img - np.array([31, 119, 180])).sum(-1) < 60)      # matplotlib's C0: the first strategy
    plot_area = blue[:, : int(0.7 * w)]                                 # the legend sits right of the axes
    ys = np.nonzero(plot_area)[0]
    assert len(ys) > 50 and ys.min() > 0.6 * h        # six markers, all in the lower band, none on the λ axis

    mixed = rows + [{"run_id": "d", "strategy": "diverse_to_specific", "epoch": e, "lam": v}
                    for e, v in enumerate([0.0, 0.5, 0.9, float("nan"), -1.0, -1.0])]
    assert plot_lams(pd.DataFrame(mixed), tmp_path / "lam2.png").is_file()


def test_cli_writes_the_report_to_an_object_store_run_root(store, tmp_path, capsys, monkeypatch):
    """`run_root=s3://…` (moto's S3 server on 127.0.0.1): the report goes to the bucket through
    discl_ray.runtime.storage, by default under <run_root>/<experiment>/report and to an explicit `--out s3://…`."""
    import boto3
    from moto.server import ThreadedMotoServer

    from jobs.report import main

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, val in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                         "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                         "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(key, val)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.chdir(tmp_path)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="reports")
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"experiment: rep\nrun_root: s3://reports/runs\ntracking:\n  tracking_uri: '{store[0]}'\n")
        assert main(["--config", str(cfg), "--no-log"]) == 0
        assert main(["--config", str(cfg), "--no-log", "--out", "s3://reports/elsewhere"]) == 0
        assert "files to s3://reports/runs/rep/report" in capsys.readouterr().out
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="reports")["Contents"]}
        for prefix in ("runs/rep/report/", "elsewhere/"):
            for name in ("long_tail.md", "long_tail.csv", "long_tail_groups.png", "low_quality.csv",
                         "lam_per_epoch.png", "report.md"):
                assert prefix + name in keys, sorted(keys)
        body = s3.get_object(Bucket="reports", Key="runs/rep/report/report.md")["Body"].read().decode()
        assert "## long-tail" in body
        assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "c.yaml"]   # nothing local
    finally:
        server.stop()
