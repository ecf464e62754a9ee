"""Per-epoch training sets from parquet: threshold/λ filter at load, Algorithm 1/2 composition,
tail:non-tail ratio kept at every stage, guidance-validation set disjoint from training data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from discl_ray.config import load_config
from discl_ray.training import data as D
from discl_ray.training.fixture import write_fixture
from discl_ray.training.images import open_images
from discl_ray.training.schedules import REAL_ONLY, schedule
from discl_ray.training.transforms import build_pipeline


def make_cfg(run_root, *extra):
    return load_config(None, [f"run_root={run_root}", "experiment=fx", "dataset.image_size=16",
                              "mining.few_max=10", "mining.many_min=30", "generation.lams=[0.0,0.5,0.9]",
                              "training.lams=[0.0,0.5,1.0]", "scoring.threshold=0.3", "training.backbone=small_cnn",
                              *extra])


@pytest.fixture()
def lt(run_root):
    cfg = make_cfg(run_root)
    write_fixture(cfg, corrupt=1)
    # The image cache (the toy world's path) decodes every row once and drops the undecodable ones.
    pool, _images = open_images(cfg, D.load_pool(cfg), build_pipeline(cfg))
    return cfg, pool


def test_pool_applies_trainers_threshold_and_lam_set(lt, run_root):
    cfg, pool = lt
    syn = pool.split == "syn"
    assert set(np.round(pool.lam[syn], 3)) == {0.0, 0.5}          # 0.9 generated but not in training.lams
    assert pool.n_bad_images == 1                                    # corrupt row dropped, not fatal
    strict = D.load_pool(make_cfg(run_root, "training.threshold=0.7"))
    assert 0 < (strict.split == "syn").sum() < syn.sum()
    # Hard rows are exactly the tail classes' training rows; tail labels follow.
    assert pool.tail_labels == {3, 4}
    assert set(pool.labels[pool.hard]) == {3, 4} and pool.hard.sum() == 6 + 4


def test_epoch_sets_follow_algorithm_1(run_root):
    cfg = make_cfg(run_root, "training.keep_tail_ratio=false")
    write_fixture(cfg)
    pool = D.load_pool(cfg)
    rng = np.random.default_rng(0)
    train = pool.train_real
    at0 = D.epoch_indices(cfg, pool, 0.0, rng)
    assert set(at0) == set(pool.syn_idx(0.0)) | set(train)          # S_λ ∪ D_nh ∪ D_h
    assert set(D.epoch_indices(cfg, pool, 1.0, rng)) == set(train)   # λ=1: the real hard images themselves
    assert set(D.epoch_indices(cfg, pool, REAL_ONLY, rng)) == set(train)
    mixed = D.epoch_indices(cfg, pool, float("nan"), rng)
    assert set(mixed) == set(pool.syn_idx()) | set(train)
    no_hard = make_cfg(run_root, "training.keep_tail_ratio=false", "training.use_real_hard=false")
    at5 = D.epoch_indices(no_hard, pool, 0.5, rng)
    assert not set(at5) & set(train[pool.hard[train]])


@pytest.mark.parametrize("ratio", [None, 0.25])
def test_undersampling_keeps_ratio_at_every_stage(run_root, ratio):
    cfg = make_cfg(run_root, f"training.tail_ratio={'null' if ratio is None else ratio}", "training.tail_ratio_stages=all")
    write_fixture(cfg)
    pool = D.load_pool(cfg)
    target = D.target_tail_ratio(cfg, pool)
    assert target == pytest.approx(ratio if ratio else 2 / 5)       # paper: #tail classes / #classes
    lams = schedule("diverse_to_specific", epochs=5, curriculum_epochs=3, lams=cfg.training.lams)
    sizes = []
    for e, lam in enumerate(lams + [float("nan")]):
        idx = D.epoch_indices(cfg, pool, lam, np.random.default_rng(e))
        tail = np.isin(pool.labels[idx], [3, 4]).sum()
        nontail = len(idx) - tail
        assert abs(tail / nontail - target) <= target / min(tail, nontail) + 1e-9, (e, lam, tail, nontail)
        sizes.append(len(idx))
        assert len(np.unique(idx)) == len(idx)
    assert len(set(sizes)) > 1          # stages differ in size, the ratio does not


def test_tail_ratio_only_on_curriculum_stages(run_root):
    cfg = make_cfg(run_root, "training.tail_ratio_stages=curriculum")
    write_fixture(cfg)
    pool = D.load_pool(cfg)
    real_only = D.epoch_indices(cfg, pool, REAL_ONLY, np.random.default_rng(0))
    assert set(real_only) == set(pool.train_real)                    # all real data in real-only epochs
    at0 = D.epoch_indices(cfg, pool, 0.0, np.random.default_rng(0))
    tail = np.isin(pool.labels[at0], [3, 4]).sum()
    assert tail / (len(at0) - tail) == pytest.approx(0.4, abs=0.02)


def test_undersample_prefers_real_hard_when_tail_is_cut():
    rng = np.random.default_rng(0)
    tail, nontail = np.arange(100), np.arange(100, 110)
    out = D.undersample_to_ratio(tail, nontail, 2.0, rng, keep_first=np.arange(5))
    assert len(out) == 30 and set(range(5)) <= set(out) and set(nontail) <= set(out)
    assert len(D.undersample_to_ratio(tail, nontail, math.inf, rng)) == 110


def test_guidance_val_disjoint_from_training(run_root):
    cfg = load_config(None, [f"run_root={run_root}", "experiment=lq", "dataset.image_size=16",
                             "generation.lams=[0.5,0.7,0.9]", "training.lams=[0.5,0.7,0.9,1.0]",
                             "training.task=low_quality", "training.strategy=adaptive", "scoring.threshold=0.0",
                             "training.guidance_val_size=6", "training.backbone=small_cnn"])
    write_fixture(cfg, low_quality=True, train_counts=(12, 12, 12))
    pool = D.load_pool(cfg)
    val = D.choose_guidance_val(cfg, pool, np.random.default_rng(0))
    assert set(val) == {0.5, 0.7, 0.9, 1.0}
    assert all(0 < len(v) <= 6 for v in val.values())
    v_all = set(np.concatenate(list(val.values())))
    train_sets = [D.epoch_indices(cfg, pool, lam, np.random.default_rng(0)) for lam in (0.5, 0.7, 0.9, 1.0, REAL_ONLY)]
    for idx in train_sets:
        assert not v_all & set(idx)
    # Only V's own rows leave training (issue 28, A.3.2): a held-out source's other synthetic images still train.
    every = set().union(*map(set, train_sets))
    siblings = {i for i in np.flatnonzero(np.isin(pool.source, list(pool.heldout_sources))) if i not in v_all}
    assert siblings and siblings & every
    # Algorithm 2 line 8: S_λ ∪ D_nh (no real hard rows at λ < 1).
    at5 = train_sets[0]
    assert not pool.hard[at5].any() and (pool.split[at5] == "syn").any()
