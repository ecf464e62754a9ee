"""The gap variant of the toy world: the probe's held-out discipline, the config wiring that sends every
stage to the gap world's models, and (slow) the full build with its gates and the gap's trend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from discl_ray import toyworld
from discl_ray.config import load_config
from discl_ray.toyworld import gap

ROOT = Path(__file__).resolve().parents[1]
GAP_CONFIGS = ("digits_lt_gap.yaml", "digits_lq_gap.yaml")


# -- the probe ------------------------------------------------------------------------------------------
def test_probe_split_is_disjoint_and_covers_every_source():
    for n in (2, 7, 100):
        tr, te = gap.probe_split(n, 0.5, seed=3)
        assert len(tr) and len(te)
        assert set(tr.tolist()).isdisjoint(te.tolist())
        assert sorted(tr.tolist() + te.tolist()) == list(range(n))
    a, b = gap.probe_split(50, 0.5, seed=1), gap.probe_split(50, 0.5, seed=2)
    assert not torch.equal(a[0], b[0])                     # another seed, another split
    with pytest.raises(ValueError, match="at least 2"):
        gap.probe_split(1)


def test_probe_accuracy_counts_held_out_rows_only():
    gen = torch.Generator().manual_seed(0)
    n, d = 60, 16
    real = torch.randn(n, d, generator=gen)
    fake = real + 3.0 * torch.ones(d)                      # easy to tell apart …
    _, te = gap.probe_split(n, 0.5, seed=0)
    fake[te] = real[te]                                    # … except for the held-out sources: identical pairs
    res = gap.probe_accuracy(real, fake, splits=1, seed=0)
    # an identical (real, generated) pair gets one prediction, so exactly half of the held-out rows are right;
    # any training row in the count would push the accuracy above 0.5
    assert res["acc"] == 0.5
    assert res["n_heldout"] == 2 * len(te)
    # the probe did learn the training rows (so 0.5 is not a dead probe)
    tr, _ = gap.probe_split(n, 0.5, seed=0)
    probe = gap.fit_linear_probe(torch.cat([real[tr], fake[tr]]), torch.cat([torch.ones(len(tr)), torch.zeros(len(tr))]))
    with torch.no_grad():
        assert float(((probe(torch.cat([real[tr], fake[tr]])).flatten() > 0).float()
                      == torch.cat([torch.ones(len(tr)), torch.zeros(len(tr))])).float().mean()) == 1.0


def test_probe_on_noise_is_near_chance_and_on_a_shift_near_one():
    gen = torch.Generator().manual_seed(1)
    n, d = 80, 48                  # 80 training rows in 48 dims: training accuracy alone would be ~1.0
    real, fake = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    assert gap.probe_accuracy(real, fake, splits=5)["acc"] < 0.7
    assert gap.probe_accuracy(real, real + 1.5, splits=5)["acc"] > 0.95


def test_probe_falls_rule():
    from discl_ray.toyworld.gap_world import probe_falls

    assert probe_falls([1.0, 0.98, 0.9, 0.7, 0.6, 0.55])
    assert probe_falls([1.0, 0.95, 0.99, 0.6])             # a rise within sampling noise (0.04 ≤ 0.05)
    assert not probe_falls([1.0, 0.9, 0.97, 0.6])          # a rise of 0.07
    assert not probe_falls([0.9, 0.85, 0.8])               # falls, but not clearly (0.1 < 0.15)


# -- wiring ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GAP_CONFIGS)
def test_gap_configs_name_the_gap_world_and_the_task_look(name):
    cfg = load_config(ROOT / "configs" / "toy" / name)
    clean = load_config(ROOT / "configs" / "toy" / name.replace("_gap", ""))
    assert toyworld.variants_named(cfg) == {"gap"} and toyworld.variants_named(clean) == {"clean"}
    assert cfg.dataset.toy.look == "blueprint" and clean.dataset.toy.look == "clean"
    assert cfg.experiment != clean.experiment                       # their runs never mix
    # everything else is the clean task's: same data split, mining, arms
    for section in ("mining", "training", "prompts"):
        assert getattr(cfg, section) == getattr(clean, section), section
    assert cfg.generation.model_copy(update={"model": "toy"}) == clean.generation


def test_every_stage_resolves_the_gap_models(tmp_path):
    from discl_ray.cli.preflight import PreflightError, _mine, toy_generator
    from discl_ray.generation.pipeline import resolve_model
    from discl_ray.models.clip import resolve_clip_source

    cfg = load_config(ROOT / "configs" / "toy" / "digits_lq_gap.yaml",
                      [f"cache_dir={tmp_path}", f"run_root={tmp_path / 'runs'}", "mining.classifier=toy-gap"])
    gap_dir = tmp_path / "toyworld-gap"
    assert toyworld.toy_dir(tmp_path) == tmp_path / "toyworld"          # the clean layout is unchanged
    assert toyworld.toy_dir(tmp_path, "gap") == gap_dir
    # before `discl world --variant gap`: each stage says which command builds what it misses
    with pytest.raises(FileNotFoundError, match="discl world --variant gap"):
        resolve_model(cfg.generation.model, tmp_path)
    with pytest.raises(FileNotFoundError, match="discl world --variant gap"):
        resolve_clip_source(cfg.scoring, tmp_path)
    with pytest.raises(PreflightError, match="discl world --variant gap"):
        _mine(cfg, [])
    with pytest.raises(PreflightError, match="discl world --variant gap"):
        toy_generator(cfg.generation.model, tmp_path)
    # the layout the gap world writes (the files' content is the slow test's business)
    (gap_dir / "generator").mkdir(parents=True)
    (gap_dir / "generator" / "model_index.json").write_text("{}")
    (gap_dir / "clip").mkdir()
    for f in toyworld.clip_files(tmp_path, "gap"):
        f.write_text("{}")
    toyworld.classifier_file(tmp_path, "gap").write_text("")
    assert resolve_model("toy-gap", tmp_path) == str(gap_dir / "generator")
    assert toy_generator("toy-gap", tmp_path) and not toy_generator("some/hub-id", tmp_path)
    json_path, weights = resolve_clip_source(cfg.scoring, tmp_path)
    assert (json_path, weights) == (str(gap_dir / "clip" / "toy-gap-clip.json"), str(gap_dir / "clip" / "toy-gap-clip.pt"))
    _mine(cfg, [])                                                        # the gap judge is found
    # the trainer's CLIP (backbone=clip, FLYP) is the scoring CLIP unless training.clip names another
    from discl_ray.training.clip_backbone import trainer_clip_config

    assert resolve_clip_source(trainer_clip_config(cfg), tmp_path)[1] == weights


def test_world_cli_rejects_an_unknown_variant(capsys):
    from jobs import world

    assert world.main(["--variant", "sepia", "--no-gates"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["discl world: --variant: unknown toy world variant 'sepia'; choose from: clean, gap"]


def test_shipped_gap_manifest_is_consistent():
    from discl_ray.toyworld import gap_world, ship

    man = gap_world.read_shipped_manifest()
    # shipped with the package (discl_ray/assets/toyworld-gap): missing is a packaging regression, not a skip
    assert man is not None, "the shipped gap world's manifest is missing"
    clean = ship.read_manifest()
    assert man["settings"]["base"] == clean["settings"]      # built on the shipped clean world's settings
    assert man["settings"]["plan"] == json.loads(json.dumps(gap.GapPlan().__dict__))
    assert "_name_or_path" not in man["vae_config"]           # no path of the machine that built it
    trained = man["trained"]
    assert trained["passed"] is True
    probe = [trained["gap"][f"{lam:g}"]["probe_acc"] for lam in gap.GAP_LAMS]
    assert probe[0] >= gap_world.MIN_PROBE_LAM0 and probe[-1] <= gap_world.MAX_PROBE_TOP
    assert gap_world.probe_falls(probe)
    total = sum(p.stat().st_size for d in (ship.ASSET_DIR, gap_world.ASSET_DIR) for p in d.iterdir())
    assert total < 6.5 * 2**20


# -- the full build -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_plan_gap_world_passes_its_gates_and_the_gap_falls_with_lam(tmp_path, torch_threads):
    """Trains the gap world (full plan; ≈ 8 minutes on 2 cores) on top of the shipped clean world."""
    from discl_ray.toyworld import gap_world

    man = gap_world.train_gap_world(tmp_path, force=True, progress=False)
    assert man["source"] == "trained" and man["passed"] is True, json.dumps(man["gates"], indent=1)
    probe = [man["gap"][f"{lam:g}"]["probe_acc"] for lam in gap.GAP_LAMS]
    assert probe[0] >= 0.9 and probe[-1] <= 0.75 and gap_world.probe_falls(probe)
    cos = [man["gap"][f"{lam:g}"]["image_cos"] for lam in gap.GAP_LAMS]
    assert cos[-1] > cos[0] + 0.2                          # high-λ images stay close to their sources
    assert set(man["gap_clean_world"]) == {f"{lam:g}" for lam in gap.GAP_LAMS}
    again = gap_world.train_gap_world(tmp_path, progress=False)
    assert again["reused"] is True and again["settings"] == man["settings"]


def test_shipped_gap_weights_pass_the_gates(tmp_path, torch_threads):
    """Unpacks the shipped clean and gap worlds and gates the gap one, as `discl world --variant gap` does on a fresh
    checkout (the clean world's own gates are test_world.py's business)."""
    from discl_ray.toyworld import gap_world
    from discl_ray.toyworld.train import train_world

    assert gap_world.read_shipped_manifest() is not None, "the shipped gap world is missing"
    base = train_world(tmp_path, check_gates=False, progress=False)
    man = gap_world.train_gap_world(tmp_path, progress=False, base=base)
    assert man["source"] == "shipped" and man["passed"] is True, json.dumps(man["gates"], indent=1)
    probe = [man["gap"][f"{lam:g}"]["probe_acc"] for lam in gap.GAP_LAMS]
    assert probe[0] >= gap_world.MIN_PROBE_LAM0 and probe[-1] <= gap_world.MAX_PROBE_TOP
    # the int8 UNet delta and float16 weights reproduce the build: the gap table within sampling noise
    built = man["trained"]["gap"]
    for lam in gap.GAP_LAMS:
        assert abs(man["gap"][f"{lam:g}"]["judge_acc"] - built[f"{lam:g}"]["judge_acc"]) <= 0.06, lam
