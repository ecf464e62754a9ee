"""`discl train --plan` on the toy world: the paper's epoch composition (A.1.2 tail ratio, §5 ablations)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest

from discl_ray.config import load_config
from discl_ray.training.plan import FIELDS, build_plan

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*/*.yaml"))
LT = REPO / "configs/toy/digits_lt.yaml"


def _lt(run_root, *over):
    return load_config(LT, [f"run_root={run_root}", "training.epochs=12", "training.curriculum_epochs=10", *over])


def _tail(e):
    return e["n_syn"] + e["n_real_tail"]


def test_baseline_and_real_only_epochs_use_every_real_row(tmp_path):
    base = build_plan(_lt(tmp_path, "training.strategy=none", "training.tail_ratio=0.136"))
    assert {e["n_total"] for e in base.epochs} == {base.n_real_train} and base.n_real_train > 100
    assert all(e["n_syn"] == 0 and e["stage"] == "real_only" for e in base.epochs)
    d2s = build_plan(_lt(tmp_path, "training.tail_ratio=0.136"))
    real_only = [e for e in d2s.epochs if e["stage"] == "real_only"]
    assert [e["epoch"] for e in real_only] == [10, 11]
    assert all(e["n_total"] == d2s.n_real_train and e["n_syn"] == 0 for e in real_only)


@pytest.mark.parametrize("ratio", [0.136, 0.5, 1.0])
def test_curriculum_stages_hold_the_tail_ratio(tmp_path, ratio):
    plan = build_plan(_lt(tmp_path, f"training.tail_ratio={ratio}"))
    stages = [e for e in plan.epochs if e["stage"] == "curriculum"]
    # At 0.136 the toy has too few non-tail rows, so the tail side is cut (real hard images kept first).
    assert len(stages) == 10 and (ratio < 0.5 or any(e["n_syn"] for e in stages))
    for e in stages:
        # undersample_to_ratio rounds one side to an integer: within one row of the target.
        assert abs(_tail(e) - ratio * e["n_real_nontail"]) <= 1 or abs(e["n_real_nontail"] - _tail(e) / ratio) <= 1, e
    assert plan.estimated


def test_authors_variant_keeps_30_percent_of_non_tail(tmp_path):
    base = build_plan(_lt(tmp_path, "training.strategy=none"))
    nontail_all = base.epochs[0]["n_real_nontail"]
    plan = build_plan(_lt(tmp_path, "training.tail_ratio=0.136", "training.tail_ratio_rule=authors"))
    for e in (e for e in plan.epochs if e["stage"] == "curriculum"):
        assert e["n_real_nontail"] == round(0.3 * nontail_all)
        assert _tail(e) == min(round(0.136 / 0.864 * e["n_real_nontail"]), _tail(e) + 10 ** 6)
        assert _tail(e) / e["n_total"] == pytest.approx(0.136, abs=0.02)


def test_fixed_and_text_only_leave_out_real_hard_images(tmp_path):
    for strategy in ("text_only", "fixed"):
        plan = build_plan(_lt(tmp_path, f"training.strategy={strategy}", "training.fixed_lam=0.3",
                              "training.keep_tail_ratio=false"))
        cur = [e for e in plan.epochs if e["stage"] == "curriculum"]
        assert cur and all(e["n_real_tail"] == 0 and e["n_syn"] > 0 for e in cur), strategy
    d2s = build_plan(_lt(tmp_path, "training.keep_tail_ratio=false"))
    assert all(e["n_real_tail"] > 0 for e in d2s.epochs)
    old = build_plan(_lt(tmp_path, "training.strategy=text_only", "training.keep_tail_ratio=false",
                         "training.ablations_use_real_hard=true"))
    assert all(e["n_real_tail"] > 0 for e in old.epochs)


def test_many_means_more_than_100_images():
    from discl_ray.config import MiningConfig
    from discl_ray.data.loaders.groups import class_groups

    m = load_config(REPO / "configs/imagenet_lt/base.yaml").mining
    labels = [0] * 101 + [1] * 100 + [2] * 20 + [3] * 19
    expect = {0: "many", 1: "medium", 2: "medium", 3: "few"}
    assert class_groups(labels, m.few_max, m.many_min) == expect == class_groups(labels)
    assert MiningConfig().many_min == 101


def test_synthetic_volume_knob(tmp_path):
    full = build_plan(_lt(tmp_path, "training.keep_tail_ratio=false"))
    half = build_plan(_lt(tmp_path, "training.keep_tail_ratio=false", "training.syn_per_source=2"))
    assert full.epochs[0]["n_syn"] == 2 * half.epochs[0]["n_syn"] > 0   # the toy config generates 4 seeds


def test_plan_counts_the_filtered_spectrum_when_it_exists(tmp_path):
    from discl_ray.training.fixture import write_fixture

    cfg = _lt(tmp_path, "experiment=fix", "training.keep_tail_ratio=false", "mining.few_max=10",
              "mining.many_min=30", "generation.lams=[0.0,0.5]", "training.lams=[0.0,0.5,1.0]",
              "training.syn_per_source=1")
    write_fixture(cfg, seeds=(0, 1, 2))
    plan = build_plan(cfg)
    assert not plan.estimated
    from discl_ray.runtime.cluster import RunPaths
    from discl_ray.runtime.io import read_parquet_dir

    scores = read_parquet_dir(RunPaths.from_config(cfg).stage("score", "scores"))
    kept = {(r["source_image_id"]) for r in scores.to_pylist() if r["lam"] == 0.0 and r["clip_text_cos"] >= 0.5}
    assert plan.epochs[0]["lam"] == 0.0 and plan.epochs[0]["n_syn"] == len(kept)   # ≤ 1 image per source


def _toy_world(path: Path, run_root: Path, tmp: Path):
    """A shipped config moved onto the toy world: the dataset and run root change, its training rules do not."""
    raw = load_config(path)
    lt = raw.training.task == "long_tail"
    over = [f"run_root={run_root}", "dataset.name=" + ("digits_lt" if lt else "digits_lq"), "dataset.root=null",
            "dataset.image_size=16", f"experiment=plan_{'lt' if lt else 'lq'}"]
    if raw.mining.mode == "frequency":
        over += ["mining.few_max=10", "mining.many_min=30"]
    cfg = load_config(path, over)
    if not lt and raw.training.strategy != "none":
        from discl_ray.data import read_rows
        from discl_ray.runtime.cluster import RunPaths
        from discl_ray.runtime.io import replace_parquet_dir

        train = read_rows(cfg, ("train",))
        hard = train.take(pa.array(range(0, train.num_rows, 4)))     # a mined hard set, as `discl mine` writes it
        replace_parquet_dir(hard.select(["image_id", "label", "class_name"]), RunPaths.from_config(cfg).stage("mine"))
    return cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_plan_for_every_shipped_config(tmp_path_factory, path):
    run_root = tmp_path_factory.getbasetemp() / "plan_runs"
    cfg = _toy_world(path, run_root, tmp_path_factory.getbasetemp())
    plan = build_plan(cfg)
    assert len(plan.epochs) == cfg.training.epochs
    for e in plan.epochs:
        assert set(FIELDS) <= set(e) and e["n_total"] == e["n_syn"] + e["n_real_tail"] + e["n_real_nontail"]
        if e["stage"] == "real_only":
            assert e["n_total"] == plan.n_real_train
    if cfg.training.strategy == "none":
        assert all(e["stage"] == "real_only" for e in plan.epochs)


def test_cli_plan_json_and_clear_error_without_data(tmp_path, capsys):
    from jobs.train import main

    out = tmp_path / "plan.json"
    assert main(["--config", str(LT), "--plan", "--json", str(out), f"run_root={tmp_path}", "training.epochs=3",
                 "training.curriculum_epochs=2"]) == 0
    rows = json.loads(out.read_text())
    assert [r["epoch"] for r in rows] == [0, 1, 2] and set(FIELDS) <= set(rows[0])
    assert rows[2]["lam"] is None and rows[0]["lam"] == 0.0 and not math.isnan(rows[1]["n_total"])
    assert "real_only" in capsys.readouterr().out
    code = main(["--config", str(REPO / "configs/imagenet_lt/discl_d2s.yaml"), "--plan", f"run_root={tmp_path}",
                 f"dataset.root={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("discl train: ") and "missing" in err


def test_adaptive_plan_v_equal_per_lambda_and_only_v_leaves_training(tmp_path):
    """digits-LT adaptive: V has the same size at every λ (4 = ⌊0.25 · n_c⌋ summed over the tail classes, the
    originals at λ = 1), and the real-only epochs train on every real row but V's 4 originals."""
    from discl_ray.training.plan import format_plan

    cfg = _lt(tmp_path, "training.strategy=adaptive")
    plan = build_plan(cfg)
    assert plan.guidance_val == {"0": 4, "0.1": 4, "0.3": 4, "0.5": 4, "1": 4}
    base = build_plan(_lt(tmp_path, "training.strategy=none"))
    assert plan.n_real_train == base.n_real_train - 4
    assert "guidance-validation set V" in format_plan(cfg, plan)
