"""λ schedules (exact sequences), the adaptive DoCL rule, and the selector's state/resume semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from discl_ray.training.schedules import (
    REAL_ONLY,
    adaptive_gains,
    pick_adaptive,
    robust_mean,
    schedule,
    scheduled_lam,
)
from discl_ray.training.selector import LambdaSelector, actor_name, get_selector

LAMS = [0.5, 0.0, 1.0, 0.1]        # unsorted on purpose: schedules sort Λ
R = REAL_ONLY


def seq(strategy, epochs=10, cl=8, **kw):
    return schedule(strategy, epochs=epochs, curriculum_epochs=cl, lams=LAMS, **kw)


def test_diverse_to_specific_linear_equal_blocks():
    assert seq("diverse_to_specific") == [0.0, 0.0, 0.1, 0.1, 0.5, 0.5, 1.0, 1.0, R, R]
    assert seq("easy_to_hard") == seq("diverse_to_specific")
    # E_CL not divisible by |Λ|: floor(e·K/E_CL) gives blocks 2, 2, 2, 1 (earlier levels get the extra epoch).
    assert seq("diverse_to_specific", epochs=7, cl=7) == [0.0, 0.0, 0.1, 0.1, 0.5, 0.5, 1.0]
    assert seq("diverse_to_specific", epochs=3, cl=0) == [R, R, R]


def test_specific_to_diverse_reverses():
    assert seq("specific_to_diverse") == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1, 0.0, 0.0, R, R]


def test_fixed_text_only_all_level_none():
    assert seq("fixed", fixed_lam=0.5) == [0.5] * 8 + [R, R]
    assert seq("text_only") == [0.0] * 8 + [R, R]
    all_level = seq("all_level")
    assert all(math.isnan(v) for v in all_level[:8]) and all_level[8:] == [R, R]
    assert seq("none") == [R] * 10


def test_random_is_seeded_and_within_set():
    a, b, c = seq("random", seed=3), seq("random", seed=3), seq("random", seed=4)
    assert a == b and a != c
    assert set(a[:8]) <= {0.0, 0.1, 0.5, 1.0} and a[8:] == [R, R]
    assert len(set(a[:8])) > 1


def test_schedule_rejects_adaptive_and_bad_epoch():
    with pytest.raises(ValueError, match="no fixed schedule"):
        seq("adaptive")
    with pytest.raises(ValueError, match="outside"):
        scheduled_lam("fixed", 5, epochs=2, curriculum_epochs=2, lams=LAMS, fixed_lam=0.5)


def test_robust_mean_drops_outlier():
    vals = [0.1, 0.11, 0.09, 0.1, 0.12, 5.0]
    assert robust_mean(vals) == pytest.approx(np.mean(vals[:5]))
    assert math.isnan(robust_mean([]))


def test_adaptive_picks_largest_gain_ignoring_planted_outlier():
    rng = np.random.default_rng(0)
    before = {lam: rng.uniform(0.2, 0.4, 50) for lam in (0.5, 0.7, 0.9)}
    true_gain = {0.5: 0.02, 0.7: 0.08, 0.9: 0.05}
    after = {lam: before[lam] + true_gain[lam] + rng.normal(0, 0.003, 50) for lam in before}
    # Three images at λ=0.5 jump by +1.5: the plain mean makes 0.5 win, the robust mean must not.
    after[0.5][:3] += 1.5
    plain = {lam: float(np.mean(after[lam] - before[lam])) for lam in before}
    assert max(plain, key=plain.get) == 0.5
    gains = adaptive_gains(before, after)
    assert pick_adaptive(gains) == 0.7
    assert gains[0.7] == pytest.approx(0.08, abs=0.002)
    assert gains[0.5] == pytest.approx(0.02, abs=0.002)


def test_pick_adaptive_ties_and_nan():
    assert pick_adaptive({0.9: 0.1, 0.5: 0.1, 0.7: float("nan")}) == 0.5
    with pytest.raises(ValueError, match="finite gain"):
        pick_adaptive({0.5: float("nan")})


def test_selector_history_state_and_resume():
    sel = LambdaSelector("diverse_to_specific", LAMS, epochs=6, curriculum_epochs=4)
    got = [sel.choose(e) for e in range(3)]
    assert got == [0.0, 0.1, 0.5]
    assert sel.choose(1) == 0.1                      # idempotent per epoch
    state = sel.state()
    sel.choose(3)                                    # an epoch that "died" before its checkpoint
    fresh = LambdaSelector("diverse_to_specific", LAMS, epochs=6, curriculum_epochs=4)
    fresh.load_state(sel.state(), upto_epoch=3)
    assert fresh.lam_history() == [0.0, 0.1, 0.5]
    assert [fresh.choose(e) for e in range(3, 6)] == [1.0, R, R]
    with pytest.raises(ValueError, match="out of order"):
        LambdaSelector("fixed", LAMS, 4, 2, fixed_lam=0.5).choose(2)
    with pytest.raises(ValueError, match="same training config"):
        LambdaSelector("random", LAMS, 6, 4).load_state(state)


def test_selector_adaptive_records_gains():
    sel = LambdaSelector("adaptive", [0.5, 0.9, 1.0], epochs=3, curriculum_epochs=2)
    assert sel.needs_gains(0)
    assert sel.choose(0, {0.5: 0.01, 0.9: 0.03, 1.0: 0.02}) == 0.9
    with pytest.raises(ValueError, match="gains per λ are required"):
        sel.choose(1)
    assert sel.choose(1, {0.5: 0.04, 0.9: 0.03, 1.0: 0.02}) == 0.5
    assert sel.choose(2) == R
    assert sel.get_history()[0]["gains"] == {"0.5": 0.01, "0.9": 0.03, "1.0": 0.02}
    with pytest.raises(ValueError, match="unknown strategy"):
        LambdaSelector("bogus", [0.5], 2, 1)


def test_selector_actor_named_per_run(ray_local):
    from discl_ray.config import load_config

    tc = load_config(None, ["training.epochs=4", "training.curriculum_epochs=2", "training.strategy=text_only"]).training
    a = get_selector("run/1", tc)
    b = get_selector("run/1", tc)                    # get_if_exists: the same actor
    assert ray_local.get(a.choose.remote(0)) == 0.0
    assert ray_local.get(b.lam_history.remote()) == [0.0]
    assert actor_name("run/1") == "discl-selector-run_1"
    ray_local.kill(a)


def test_learning_rate_cosine_with_linear_warmup():
    from discl_ray.training.schedules import learning_rate

    # cosine over epochs, no warm-up
    assert learning_rate(1e-3, "cosine", 0, 10) == pytest.approx(1e-3)
    assert learning_rate(1e-3, "cosine", 5, 10) == pytest.approx(5e-4)
    assert learning_rate(1e-3, "constant", 7, 10) == pytest.approx(1e-3)
    # warm-up: linear in the global step, then the schedule alone (paper Table 8, iWildCam: 500 steps)
    ramp = [learning_rate(1e-5, "constant", 0, 20, step, warmup_steps=500) for step in (0, 249, 499, 500, 10_000)]
    assert ramp == pytest.approx([1e-5 / 500, 1e-5 * 250 / 500, 1e-5, 1e-5, 1e-5])
    assert learning_rate(1e-3, "cosine", 5, 10, 99, warmup_steps=200) == pytest.approx(5e-4 * 100 / 200)


def test_iwildcam_config_has_the_papers_warmup():
    from pathlib import Path

    from discl_ray.config import load_config

    root = Path(__file__).resolve().parent.parent
    assert load_config(root / "configs/iwildcam/base.yaml").training.warmup_steps == 500
    assert load_config(root / "configs/toy/digits_lt.yaml").training.warmup_steps == 0
