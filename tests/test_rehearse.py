"""The end-to-end path's pieces that need no cluster: what a job forwards, what submit accepts for a workstation
head, a config's upstream experiments, the rehearsal's plan and miniature. The real path runs in
tests/test_rehearse_workstation.py (slow)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from discl_ray.config import load_config

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for p in (REPO / "configs").glob("*/*.yaml") if p.name != "base.yaml")


def test_inside_a_ray_job_nothing_the_job_sets_is_forwarded_again(monkeypatch):
    from discl_ray.runtime import cluster as runtime

    job = {"runtime_env": {"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "PYTHONPATH": "x"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hush")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok")
    monkeypatch.setenv("HF_TOKEN", "hf")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    env = runtime.driver_runtime_env(joined=True)["env_vars"]
    # Ray refuses a key the job's runtime env already has ("Failed to merge the Job's runtime env")
    assert "MLFLOW_TRACKING_URI" not in env and "PYTHONPATH" not in env
    assert env["AWS_ENDPOINT_URL"] == "http://s3:9000"
    # credentials come from the nodes' own environment, never through the (plain-text) runtime env
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
                "MLFLOW_TRACKING_PASSWORD"} & set(env)
    # this process's own local cluster: nothing leaves the machine, workers see what the driver sees
    local = runtime.driver_runtime_env(joined=False)["env_vars"]
    assert local["AWS_SECRET_ACCESS_KEY"] == "hush"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert runtime.driver_runtime_env(joined=True)["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_workstation_head_accepts_loopback_mlflow_and_uses_this_python():
    from discl_ray.cli.submit import EXCLUDES, check_forwardable, entrypoint, is_loopback_address

    assert is_loopback_address("http://127.0.0.1:8265") and is_loopback_address("localhost:6379")
    assert not is_loopback_address("http://ray-head.discl:8265") and not is_loopback_address(None)
    check_forwardable("http://127.0.0.1:5000", "MLFLOW_TRACKING_URI", "http://127.0.0.1:8265")
    with pytest.raises(ValueError, match="loopback address"):
        check_forwardable("http://127.0.0.1:5000", "MLFLOW_TRACKING_URI", "http://10.0.0.5:8265")
    with pytest.raises(ValueError, match="start an MLflow server"):
        check_forwardable("sqlite:///runs/mlflow.db", "MLFLOW_TRACKING_URI", "http://127.0.0.1:8265")
    cmd, _ = entrypoint("rehearse", str(REPO / "configs/iwildcam/discl_adaptive.yaml"), ["run_root=s3://b/r"],
                        REPO, python=sys.executable)
    assert cmd.startswith(f"{sys.executable} -m discl_ray.cli rehearse --config configs/iwildcam/")
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", EXCLUDES)
    assert not spec.match_file("discl_ray/assets/toyworld/weights.safetensors")   # the toy world travels
    assert spec.match_file("models/unet.safetensors") and spec.match_file("runs/x/part.parquet")


def test_upstream_experiments_are_named_with_their_configs():
    from discl_ray.experiment.upstream import upstream_of, upstream_overrides

    cfg = load_config(REPO / "configs/iwildcam/discl_adaptive.yaml")
    ups = upstream_of(cfg, REPO / "configs/iwildcam/discl_adaptive.yaml")
    assert [(u.setting, u.name, u.config.name, u.stages) for u in ups] == [
        ("mining.classifier_from", "iwildcam_flyp", "baseline_flyp.yaml", ("mine",))]
    cfg = load_config(REPO / "configs/imagenet_lt/sweep_curricula.yaml")
    ups = upstream_of(cfg, REPO / "configs/imagenet_lt/sweep_curricula.yaml")
    assert [(u.setting, u.config.name) for u in ups] == [("training.init_from", "baseline_ce.yaml")]
    assert upstream_of(load_config(REPO / "configs/imagenet_lt/baseline_ce.yaml"), None) == []
    assert upstream_overrides(["run_root=s3://b", "experiment=x", "training.epochs=1", "dataset.root=/d"]) == [
        "run_root=s3://b", "dataset.root=/d"]


def test_pipeline_without_a_baseline_names_the_command(tmp_path, capsys):
    from jobs.pipeline import main

    rc = main(["train", "--no-upstream", "--config", str(REPO / "configs/imagenet_lt/discl_d2s.yaml"),
               f"run_root={tmp_path}", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "training.init_from=imagenet_lt_ce has no finished run" in err
    assert "discl train --config " in err and "baseline_ce.yaml" in err


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_has_a_valid_rehearsal_plan(path):
    from discl_ray.experiment.rehearse import SUFFIX, plan

    steps = plan(str(path), [])
    main = load_config(path)
    assert steps[-1].experiment == main.experiment + SUFFIX
    assert all(s.experiment.endswith(SUFFIX) for s in steps)
    mine = [s for s in steps if s.experiment == main.experiment + SUFFIX]
    cfg = load_config(path, mine[0].overrides)      # the miniature validates
    assert cfg.training.epochs == 2 and cfg.experiment == main.experiment + SUFFIX
    if main.training.init_from:                     # the upstream baseline trains first, under its own name
        assert steps[0].stage == "train" and cfg.training.init_from.endswith(SUFFIX)
        assert steps[0].experiment == main.training.init_from + SUFFIX
    if main.sweep.space:
        assert all(len(v.get("grid", [0])) == 1 for v in cfg.sweep.space.values())
    if main.training.task == "long_tail":
        # `discl report`'s long-tail table needs a test accuracy of every class group: an empty group is NaN and
        # the report finds no finished run (the toy digits-LT rehearsal did: its head capped at 12, many_min 20)
        from discl_ray.data.loaders.groups import class_groups

        counts = _miniature_train_counts(cfg)
        labels = [c for c, n in enumerate(counts) for _ in range(n)]
        groups = class_groups(labels, cfg.mining.few_max, cfg.mining.many_min)
        assert set(groups.values()) == {"many", "medium", "few"}, (counts, cfg.mining.few_max, cfg.mining.many_min)


def test_subset_rows_keeps_the_biggest_classes_renumbered():
    from discl_ray.data import subset_rows

    rows = [(f"t{c}_{i}", c, "train") for c, n in ((0, 2), (1, 5), (2, 4), (3, 1)) for i in range(n)]
    rows += [(f"e{c}", c, "test") for c in range(4)]
    table = pa.table({"image_id": [r[0] for r in rows], "label": pa.array([r[1] for r in rows], pa.int64()),
                      "split": [r[2] for r in rows], "class_name": [f"c{r[1]}" for r in rows]})
    out = subset_rows(table, 2, 3)
    names = dict(zip(out["label"].to_pylist(), out["class_name"].to_pylist()))
    assert names == {0: "c1", 1: "c2"}                       # the two biggest, renumbered in label order
    train = [lab for lab, s in zip(out["label"].to_pylist(), out["split"].to_pylist()) if s == "train"]
    assert sorted(train) == [0, 0, 0, 1, 1, 1] and out.num_rows == 8
    assert subset_rows(table, None, None) is table


def test_miniature_of_a_real_long_tail_set_keeps_every_frequency_group():
    """On a real long-tail dataset the biggest classes all exceed the rehearsal's cap: capped alike they would all
    be "many" (nothing mined, the report's medium/few NaN). With the rehearsal's ``dataset.miniature_groups`` the
    miniature caps training rows on a descending profile (evaluation splits keep max_per_class); a set whose capped
    counts already have every group is left as it was."""
    from discl_ray.data import subset_rows
    from discl_ray.data.loaders.groups import class_groups

    def table(counts):
        rows = [(f"t{c}_{i:03d}", c, "train") for c, n in enumerate(counts) for i in range(n)]
        rows += [(f"v{c}_{i}", c, "val") for c in range(len(counts)) for i in range(20)]
        return pa.table({"image_id": [r[0] for r in rows], "label": pa.array([r[1] for r in rows], pa.int64()),
                         "split": [r[2] for r in rows], "class_name": [f"c{r[1]}" for r in rows]})

    def counts_of(out, split):
        got: dict[int, int] = {}
        for lab, s in zip(out["label"].to_pylist(), out["split"].to_pylist()):
            if s == split:
                got[lab] = got.get(lab, 0) + 1
        return [got[c] for c in sorted(got)]

    real = table([1280, 900, 640, 400, 300, 200, 5, 5])            # ImageNet-LT-like head: the 6 biggest kept
    flat = counts_of(subset_rows(real, 6, 12), "train")
    assert flat == [12] * 6                                        # without the groups: all "many"
    out = subset_rows(real, 6, 12, (6, 12))
    train = counts_of(out, "train")
    assert train == [12, 12, 8, 8, 3, 3]
    labels = [c for c, n in enumerate(train) for _ in range(n)]
    assert set(class_groups(labels, 6, 12).values()) == {"many", "medium", "few"}
    assert counts_of(out, "val") == [12] * 6                      # evaluation keeps max_per_class
    shaped = table([14, 12, 8, 5, 3, 2])                           # the fakes' profile: every group already there
    assert subset_rows(shaped, 6, 12, (6, 12)).equals(subset_rows(shaped, 6, 12))


def _miniature_train_counts(cfg) -> list[int]:
    """Training images per class of ``cfg``'s rehearsal miniature, from the dataset's count profile: the toy
    worlds' own, the fakes' (tests/fakes.py, as tests/test_rehearse_configs.py builds them)."""
    from fakes import CIFAR_NAMES, IMAGENET_COUNTS
    from test_rehearse_configs import CIFAR_TRAIN_PER_CLASS

    from discl_ray.data.loaders.cifar100_lt import lt_counts as cifar_counts
    from discl_ray.data.toy import lt_counts

    d = cfg.dataset
    if d.name == "digits_lt":
        counts = lt_counts(d.toy.n_max, d.imbalance_ratio)
    elif d.name == "cifar100_lt":
        counts = cifar_counts(len(CIFAR_NAMES), CIFAR_TRAIN_PER_CLASS, d.imbalance_ratio)
    else:
        counts = list(IMAGENET_COUNTS)
    counts = sorted(counts, reverse=True)[: d.max_classes or len(counts)]   # subset_rows: the biggest classes
    return [min(n, d.max_per_class or n) for n in counts]

