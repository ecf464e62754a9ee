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


def test_key_arms_run_every_seed_the_others_fewer():
    assert R.arm_seeds("digits_lt", "diverse→specific", [0, 1, 2, 3, 4], [0, 1, 2]) == [0, 1, 2, 3, 4]
    assert R.arm_seeds("digits_lt", "text-only (λ=0)", [0, 1, 2, 3, 4], [0, 1, 2]) == [0, 1, 2]
    assert {"adaptive", "random", "FLYP fine-tune"} <= R.KEY_ARMS["digits_lq"]
    assert {"diverse→specific", "CE", "all-level", "specific→diverse"} <= R.KEY_ARMS["digits_lt"]


def test_data_seeds_vary_split_sample_and_noise_but_not_the_world():
    from discl_ray.data.toy import load_digits_lt, load_world

    base = load_config(TOY, [])
    assert R.data_overrides(base, 3, "training") == []
    o0, o1 = R.data_overrides(base, 0, "data"), R.data_overrides(base, 1, "data")
    c0, c1 = load_config(TOY, o0), load_config(TOY, o1)
    assert c0.experiment != c1.experiment != base.experiment          # own cached stages per data seed
    assert (c0.dataset.seed, c1.dataset.seed) == (0, 1)
    assert not set(c0.generation.seeds) & set(c1.generation.seeds)    # a new spectrum noise draw
    assert len(c1.generation.seeds) == len(base.generation.seeds)
    assert c0.dataset.toy.world_seed == c1.dataset.toy.world_seed == base.dataset.seed
    small = {"dataset.image_size": 8}
    d0 = c0.dataset.model_copy(update=small)
    d1 = c1.dataset.model_copy(update=small)
    # the world the toy models learnt from is the same; the task's training split is a new draw
    assert load_world(d0)["image_id"].to_pylist() == load_world(d1)["image_id"].to_pylist()
    t0, t1 = load_digits_lt(d0), load_digits_lt(d1)
    train = lambda t: {i for i, s in zip(t["image_id"].to_pylist(), t["split"].to_pylist()) if s == "train"}  # noqa: E731
    assert train(t0) != train(t1) and len(train(t0)) == len(train(t1))
    assert not train(t1) & set(load_world(d1)["image_id"].to_pylist())


def test_a_changed_override_reruns_an_arm_never_reuses_its_result(tmp_path):
    arms = [("CE", ["training.strategy=none", "training.loss=ce"])]
    common = [f"run_root={tmp_path}"]
    kw = dict(task="digits_lt", world="clean", vary="data", other_seeds=[0], cache_root=tmp_path / "c", collect=True)
    rows = R.run_task(TOY, arms, [0], common, "x", **kw)
    assert rows["CE"] == [{"seed": 0, "missing": True}]               # nothing finished yet
    # a finished run's result file, named by its key, is what a rerun of the same config reuses
    cfg = load_config(TOY, [*common, *R.data_overrides(load_config(TOY, common), 0, "data"), *arms[0][1],
                            "training.seed=0", "tracking.experiment_name=x"])
    name = f"{R.run_name('CE', 0)}_{R.run_key(cfg)}"
    path = R.result_path(tmp_path / "c", "clean", "digits_lt", name)
    path.parent.mkdir(parents=True)
    path.write_text('{"seed": 0, "final_test_few_acc": 0.25, "final_test_acc": 0.5}')
    rows = R.run_task(TOY, arms, [0], common, "x", **kw)
    assert rows["CE"][0]["final_test_few_acc"] == 0.25
    # the same arm with a changed override (or made by other code) has another key: rerun, not reused
    rows = R.run_task(TOY, arms, [0], [*common, "training.lr=0.002"], "x", **kw)
    assert rows["CE"] == [{"seed": 0, "missing": True}]
    rows = R.run_task(TOY, [("CE", [*arms[0][1], "training.epochs=39"])], [0], common, "x", **kw)
    assert rows["CE"] == [{"seed": 0, "missing": True}]
    # and training-only seeds are other runs than data seeds
    rows = R.run_task(TOY, arms, [0], common, "x", **(kw | {"vary": "training"}))
    assert rows["CE"] == [{"seed": 0, "missing": True}]


def test_collect_writes_per_world_task_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = R.main(["--collect", "--tasks", "lt", "--arms", "CE", "diverse→specific", "--seeds", "0", "1",
                 "--run-root", str(tmp_path), "--json", str(out)])
    assert rc == 0
    import json

    data = json.loads(out.read_text())
    lt = data["worlds"]["clean"]["digits_lt"]
    assert data["vary"] == "data" and set(lt["arms"]) == {"CE", "diverse→specific"}
    assert lt["arms"]["CE"]["n"] == 0 and lt["arms"]["CE"]["missing_seeds"] == [0, 1]
    assert "[clean world] digits-LT" in capsys.readouterr().out


def test_bad_world_or_arm_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(R.WORLDS, "nowhere", {"lt": "no_such.yaml", "lq": "no_such.yaml"})
    assert R.main(["--collect", "--worlds", "nowhere", "--run-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--worlds nowhere" in err and "no_such.yaml" in err and "clean" in err
    assert R.main(["--collect", "--arms", "bogus", "--run-root", str(tmp_path)]) == 2
    assert "unknown --arms ['bogus']" in capsys.readouterr().err


def _c(task, a, b, metric, diffs):
    return {"task": task, "a": a, "b": b, "metric": metric, "key": True} | R.paired_difference(
        dict(enumerate(diffs)), dict.fromkeys(range(len(diffs)), 0.0))


def test_holm_adjusts_step_down_and_decides_on_the_adjusted_p():
    from scipy import stats

    strong = _c("digits_lt", "diverse→specific", "CE", "few", [50.0, 55.0, 60.0, 52.0, 58.0])
    weak = _c("digits_lt", "diverse→specific", "all-level", "few", [3.0, -1.0, 4.0, 2.0, 1.0])
    null = _c("digits_lt", "adaptive", "diverse→specific", "few", [-2.0, 2.0, -1.0, 1.0, 0.5])
    items = R.annotate([weak, null, strong])
    ps = sorted(c["p"] for c in items)
    assert math.isclose(strong["p_holm"], 3 * ps[0]) and strong["decided"]
    assert math.isclose(weak["p_holm"], max(3 * ps[0], 2 * ps[1])) and not weak["decided"]
    assert null["p_holm"] == max(weak["p_holm"], min(1.0, null["p"]))
    # Holm's level for the first step is 1 − α/3: its interval is wider than the raw 95 % one
    assert math.isclose(strong["holm_level"], 1 - 0.05 / 3)
    assert strong["ci_holm"][0] < strong["ci95"][0] and strong["ci_holm"][1] > strong["ci95"][1]
    half = stats.t.ppf(1 - 0.05 / 6, 4) * strong["std"] / math.sqrt(5)
    assert math.isclose(strong["ci_holm"][1] - strong["mean"], half)
    # the paper's number and sign: adaptive − diverse→specific is −6.86 in Table 1 (16.78 − 23.64)
    assert math.isclose(null["paper"], 16.78 - 23.64) and "16.78" in null["paper_source"]
    assert strong["agrees_with_paper_sign"] is True and weak["agrees_with_paper_sign"] is True
    assert null["agrees_with_paper_sign"] is (null["mean"] < 0)
    table = R.contrast_table(items)
    assert "Holm p" in table and "Table 1: 23.64 − 19.17" in table


def test_seeds_for_power_matches_the_noncentral_t():
    from scipy import stats

    n = R.seeds_for_power(4.47, 5.4)          # the paper's diverse→specific − all-level, the toy's per-seed SD
    def power(k):
        crit, nc = stats.t.ppf(0.975, k - 1), 4.47 / (5.4 / math.sqrt(k))
        return stats.nct.sf(crit, k - 1, nc) + stats.nct.cdf(-crit, k - 1, nc)
    assert power(n) >= 0.8 > power(n - 1) and 12 <= n <= 15
    assert R.seeds_for_power(4.47, 5.4, alpha=0.05 / 11) > n
    c = R.annotate([_c("digits_lt", "diverse→specific", "all-level", "few", [4.0, -3.0, 9.0, 1.0])])[0]
    assert c["seeds_for_paper_effect"]["n_raw"] == R.seeds_for_power(23.64 - 19.17, c["std"])


def test_lam_history_is_kept_and_written_as_strict_json():
    import json

    run = {"seed": 0, "final_test_few_acc": 0.5, "lam_history": [float("nan"), 0.3, -1.0],
           "gain_history": [{"0.0": 0.1, "1.0": 0.2}, {}, {}]}
    out = R.summarize({"adaptive": [run]}, [("adaptive", [])], R.LT_COLS)
    kept = out["adaptive"]["runs"][0]
    assert kept["lam_history"] == ["all", 0.3, "real"] and kept["gain_history"][0] == {"0.0": 0.1, "1.0": 0.2}
    json.dumps(out, allow_nan=False)
    assert set(R.KEEP_LISTS) == {"lam_history", "gain_history"}


def test_holm_family_counts_contrasts_that_did_not_run_as_p_one():
    items = [_c("digits_lt", "diverse→specific", "CE", "few", [50.0, 55.0, 60.0, 52.0, 58.0])]
    alone = dict(R.annotate([dict(items[0])])[0])
    in_six = R.annotate([dict(items[0])], family=6)[0]
    assert math.isclose(in_six["p_holm"], min(1.0, 6 * alone["p"])) and math.isclose(alone["p_holm"], alone["p"])
    assert math.isclose(in_six["holm_level"], 1 - 0.05 / 6)
    assert sum(1 for c in R.CONTRASTS if c[0] == "digits_lt") == 6
