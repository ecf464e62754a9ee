"""`discl bench replicate`: paired contrasts with 95 % intervals, and run keys that change with what made a run."""

from __future__ import annotations

import math

from discl_ray.bench import replicate as R
from discl_ray.config import load_config

TOY = "configs/toy/digits_lt.yaml"


def test_paired_difference_matches_t_interval():
    a = {0: 90.0, 1: 92.0, 2: 94.0, 3: 91.0}
    b = {0: 80.0, 1: 85.0, 2: 84.0, 3: 82.0, 9: 10.0}        # seed 9 has no partner: left out
    d = R.paired_difference(a, b)
    assert d["seeds"] == [0, 1, 2, 3] and d["diffs"] == [10.0, 7.0, 10.0, 9.0]
    assert math.isclose(d["mean"], 9.0)
    sd = math.sqrt(((1.0) ** 2 + 2.0 ** 2 + 1.0 ** 2 + 0.0) / 3)
    half = 3.182446305284263 * sd / 2.0                        # t(0.975, df=3)
    assert math.isclose(d["ci95"][0], 9.0 - half, rel_tol=1e-9)
    assert math.isclose(d["ci95"][1], 9.0 + half, rel_tol=1e-9)


def test_paired_difference_single_seed_has_no_interval():
    d = R.paired_difference({0: 1.0}, {0: 0.5})
    assert d["n"] == 1 and d["mean"] == 0.5 and d["ci95"] is None


def test_contrasts_pair_by_seed_in_percent():
    rows = {"digits_lt": {
        "diverse→specific": [{"seed": 0, "final_test_few_acc": 0.9}, {"seed": 1, "final_test_few_acc": 0.8}],
        "CE": [{"seed": 1, "final_test_few_acc": 0.3}, {"seed": 0, "final_test_few_acc": 0.2}],
    }}
    got = [c for c in R.contrasts(rows) if c["metric"] == "few"]
    assert len(got) == 1 and got[0]["a"] == "diverse→specific" and got[0]["b"] == "CE"
    assert got[0]["diffs"] == [70.0, 50.0]                    # seed 0: 90 − 20, seed 1: 80 − 30 (paired, not sorted)
    assert "diverse→specific − CE" in R.contrast_table(got)


def test_run_key_changes_with_config_and_code_not_with_run_root():
    base = load_config(TOY, ["training.seed=0"])
    same = load_config(TOY, ["training.seed=0", "run_root=elsewhere"])
    changed = load_config(TOY, ["training.seed=0", "training.lr=0.123"])
    code = R.code_version()
    assert R.run_key(base, code) == R.run_key(same, code)
    assert R.run_key(base, code) != R.run_key(changed, code)      # a changed arm is rerun, never reused
    assert R.run_key(base, code) != R.run_key(base, code + "x")   # so is one made by other code
    assert len(R.code_version()) == 16
