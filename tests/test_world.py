"""The world job on a reduced budget (tiny step counts): artifacts, their loaders, gates, exit codes.

One module-scoped run (~30-60 s on 2 idle cores) is shared by the tests; the full-budget gate check is
``slow``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from discl_ray import toyworld

SMOKE_BUDGET_S = 12.0


@pytest.fixture(scope="module")
def smoke_world(tmp_path_factory, torch_threads):
    from discl_ray.toyworld.train import train_world

    cache = tmp_path_factory.mktemp("cache")
    man = train_world(cache, seed=0, image_size=32, budget_s=SMOKE_BUDGET_S, check_gates=True, progress=False)
    return cache, man


def test_world_writes_all_artifacts_and_manifest(smoke_world):
    cache, man = smoke_world
    assert (toyworld.generator_dir(cache) / "model_index.json").is_file()
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (toyworld.generator_dir(cache) / sub).is_dir(), sub
    js, pt = toyworld.clip_files(cache)
    assert js.is_file() and pt.is_file() and js.name == "toy-clip.json"
    assert toyworld.classifier_file(cache).is_file()
    disk = json.loads((toyworld.toy_dir(cache) / "manifest.json").read_text())
    assert disk["settings"]["seed"] == 0 and disk["settings"]["image_size"] == 32
    assert set(disk["gates"]) >= {"classifier", "clip", "generator", "clip_scores"}
    # ``passed`` is the AND of the gates that have a verdict, and each verdict matches its own numbers
    verdicts = {k: g["passed"] for k, g in man["gates"].items() if isinstance(g, dict) and "passed" in g}
    assert set(verdicts) == {"clip", "generator"} and man["passed"] is all(verdicts.values())
    clip_gate, gen_gate = man["gates"]["clip"], man["gates"]["generator"]
    assert clip_gate["passed"] is (clip_gate["zero_shot_acc"] >= clip_gate["min_acc"])
    # both ways: a PASS needs λ = 0 at the bar and rising agreement, and a FAIL must lack one of them
    from discl_ray.toyworld.gates import GATE_LAMS, agreement_rises

    by_lam = [gen_gate["acc_by_lam"][f"{lam:g}"] for lam in GATE_LAMS]
    assert gen_gate["lam0_acc"] == by_lam[0] and gen_gate["agreement_rises"] is bool(agreement_rises(by_lam))
    assert gen_gate["passed"] is (gen_gate["lam0_acc"] >= gen_gate["min_lam0_acc"] and gen_gate["agreement_rises"])
    assert man["timing"]["unet"]["steps"] >= 1
    # small enough to cache anywhere (the token tables of the two text towers dominate: docs/toyworld.md)
    assert sum(man["size_mb"].values()) < 32


def test_generator_loads_through_auto_pipeline_and_runs_img2img(smoke_world):
    from diffusers import AutoPipelineForImage2Image, StableDiffusionImg2ImgPipeline

    cache, _ = smoke_world
    pipe = AutoPipelineForImage2Image.from_pretrained(str(toyworld.generator_dir(cache)), local_files_only=True)
    assert isinstance(pipe, StableDiffusionImg2ImgPipeline)
    pipe.set_progress_bar_config(disable=True)
    from discl_ray.toyworld.data import heldout

    src = heldout(0, 32)[0][:1]
    outs = {}
    for strength in (1.0, 0.1, 0.1):
        res = pipe(prompt=["a photo of the digit seven"], image=src, strength=strength, guidance_scale=3.0,
                   num_inference_steps=10, generator=[torch.Generator().manual_seed(0)], output_type="np")
        im = res.images[0]
        assert im.shape == (32, 32, 3) and np.isfinite(im).all() and 0 <= im.min() <= im.max() <= 1
        if strength in outs:     # same seed, same strength: the same image (per-image generators)
            np.testing.assert_allclose(im, outs[strength], atol=1e-5)
        outs[strength] = im
    # strength 1.0 (λ = 0) runs 10 denoising steps from pure noise, 0.1 (λ = 0.9) one step near the source:
    # the λ = 0.9 image stays close to the source, the λ = 0 one does not (the direction, not just "differ")
    source = src[0].permute(1, 2, 0).numpy()
    near, far = np.abs(outs[0.1] - source).mean(), np.abs(outs[1.0] - source).mean()
    assert near < 0.5 * far, (near, far)


def test_clip_loads_from_json_and_weights_and_embeds(smoke_world):
    import open_clip

    cache, _ = smoke_world
    js, pt = toyworld.clip_files(cache)
    open_clip.add_model_config(str(js))
    model, _, preprocess = open_clip.create_model_and_transforms(toyworld.TOY_CLIP, pretrained=str(pt))
    tok = open_clip.get_tokenizer(toyworld.TOY_CLIP)
    with torch.no_grad():
        img = model.encode_image(torch.rand(2, 3, 32, 32))
        txt = model.encode_text(tok(["a photo of the digit seven", "a photo of the digit one"]))
    assert img.shape == (2, 32) and txt.shape == (2, 32)
    assert torch.isfinite(img).all() and not torch.allclose(txt[0], txt[1])


def test_torchscript_classifier_loads_and_predicts(smoke_world):
    from discl_ray.toyworld.data import heldout

    cache, man = smoke_world
    judge = torch.jit.load(str(toyworld.classifier_file(cache)))
    x, y = heldout(0, 32)
    with torch.no_grad():
        logits = judge(x[:64])
    assert logits.shape == (64, 10)
    # even 20 steps beat chance by far on held-out digits
    assert float((logits.argmax(1) == y[:64]).float().mean()) > 0.3
    assert man["gates"]["classifier"]["n"] == len(y)


def test_cache_is_reused_and_force_retrains(smoke_world, monkeypatch):
    from discl_ray.toyworld import train

    cache, man = smoke_world
    again = train.train_world(cache, seed=0, image_size=32, budget_s=SMOKE_BUDGET_S, progress=False)
    assert again["reused"] is True and again["gates"] == man["gates"]
    # force=True retrains even though the cache matches (on a copy: the module's world stays as it is). Capped
    # at a few seconds of wall time: the settings, hence the cache key, are the same as the smoke world's.
    import shutil

    copy = cache.parent / "force-copy"
    shutil.copytree(cache, copy)
    marker = toyworld.toy_dir(copy) / "stale-marker"
    marker.write_text("from the cached world")
    assert train._cached(copy, man["settings"]) is not None          # the copy is a cache hit...
    forced = train.train_world(copy, seed=0, image_size=32, budget_s=SMOKE_BUDGET_S, force=True,
                               check_gates=False, progress=False, max_wall_s=2.0)
    assert forced["reused"] is False and forced["settings"] == man["settings"]   # ...yet it was retrained
    assert not marker.exists()                                       # the old folder was replaced
    assert train.train_world(copy, seed=0, image_size=32, budget_s=SMOKE_BUDGET_S, progress=False)["reused"] is True
    shutil.rmtree(copy)
    # other settings do not match the cached manifest
    assert train._cached(cache, train._settings(1, 32, 0.5, train.WorldPlan.for_budget(SMOKE_BUDGET_S),
                                                True)) is None


@pytest.mark.parametrize("verdict", [True, False])
def test_world_cli_exit_status_follows_the_gates(smoke_world, tmp_path, capsys, verdict):
    """The CLI on a copy of the cached smoke world whose manifest says the CLIP gate passed / failed: exit 0
    and only PASS lines, or exit 1 with a FAIL line and the one-line error (both branches, every run)."""
    import shutil

    from jobs import world

    cache = tmp_path / "cache"
    shutil.copytree(smoke_world[0], cache)
    path = toyworld.toy_dir(cache) / "manifest.json"
    man = json.loads(path.read_text())
    for name in ("clip", "generator"):
        man["gates"][name]["passed"] = True
    man["gates"]["clip"]["passed"] = verdict
    man["passed"] = verdict
    path.write_text(json.dumps(man))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"experiment: w\nrun_root: {tmp_path / 'runs'}\ncache_dir: {cache}\n"
                   "dataset:\n  name: digits_lt\n  seed: 0\n  image_size: 32\n")
    rc = world.main(["--config", str(cfg), "--budget-s", str(SMOKE_BUDGET_S)])
    out = capsys.readouterr()
    assert "reused cache" in out.out and "CLIP zero-shot" in out.out
    if verdict:
        assert rc == 0 and "FAIL" not in out.out and "gate FAILED" not in out.err
    else:
        assert rc == 1 and "[FAIL] CLIP zero-shot" in out.out and "gate FAILED" in out.err


def test_bad_image_size_is_a_clear_error(tmp_path):
    from discl_ray.toyworld.train import train_world

    with pytest.raises(ValueError, match="image_size must be a multiple of 16"):
        train_world(tmp_path, image_size=40, budget_s=1)


@pytest.mark.slow
def test_full_budget_world_passes_its_gates(tmp_path):
    from discl_ray.toyworld.train import train_world

    man = train_world(tmp_path, seed=0, image_size=32, progress=False, force=True)    # not the shipped copy
    assert man["source"] == "trained"
    g = man["gates"]
    assert g["clip"]["zero_shot_acc"] >= 0.90
    assert g["generator"]["lam0_acc"] >= 0.60 and g["generator"]["agreement_rises"]
    assert man["passed"] is True


def test_generator_text_encoder_is_the_toy_clip_text_tower(tmp_path):
    """The generator conditions on the toy CLIP's text tower: same states as open_clip's, position by position."""
    from discl_ray.toyworld import clip as clip_mod
    from discl_ray.toyworld import generator as gen_mod

    model = clip_mod.build(32, tmp_path / "toy-clip.json", seed=3)
    te = gen_mod.text_encoder_from_clip(model, max_length=gen_mod.TEXT_MAX_LENGTH)
    tok = gen_mod.build_tokenizer()
    ids = tok(["a photo of the digit seven", "", "a handwritten two."], padding="max_length",
              max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding[:ids.shape[1]]
        x = model.transformer(x, attn_mask=model.attn_mask[:ids.shape[1], :ids.shape[1]])
        ref = model.ln_final(x)
        got = te(ids)[0]
    assert got.shape == (3, gen_mod.TEXT_MAX_LENGTH, model.token_embedding.weight.shape[1])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # and the open_clip tokenizer gives the same ids up to the end-of-text token
    import open_clip

    oc = open_clip.get_tokenizer(toyworld.TOY_CLIP)(["a photo of the digit seven"])[0]
    n = int((oc != 0).sum())
    assert torch.equal(oc[:n], ids[0, :n])


def test_shipped_form_round_trips_the_trained_models(smoke_world, tmp_path):
    """export → install reproduces the trained models (float16 storage, token rows rebuilt from the seed)."""
    import open_clip

    from discl_ray.toyworld import clip as clip_mod
    from discl_ray.toyworld import generator as gen_mod
    from discl_ray.toyworld import ship
    from discl_ray.toyworld.data import heldout

    cache, man = smoke_world
    assets = tmp_path / "assets"
    shipped = ship.export(cache, man, assets)
    assert shipped["settings"] == man["settings"] and shipped["code_version"]["toyworld_sha256"]
    assert shipped["token_rows"]["stored"] < 100 and shipped["size_mb"] < 5
    assert ship.available(man["settings"], assets) and not ship.available({**man["settings"], "seed": 1}, assets)
    pipe, judge, clip_model = ship.install(tmp_path / "cache", assets)

    x = heldout(0, 32)[0][:16]
    ref_clip, _, _ = clip_mod.load(*toyworld.clip_files(cache))
    tok = open_clip.get_tokenizer(toyworld.TOY_CLIP)
    # a prompt of the captions, and one whose tokens were never trained (rows rebuilt from the seed)
    texts = tok(["a photo of the digit seven", "an oil painting of a cat"])
    with torch.no_grad():
        torch.testing.assert_close(clip_model.encode_text(texts), ref_clip.encode_text(texts), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(clip_model.encode_image(x), ref_clip.encode_image(x), atol=2e-3, rtol=2e-3)
        ref_judge = torch.jit.load(str(toyworld.classifier_file(cache)))
        torch.testing.assert_close(judge(x), ref_judge(x), atol=2e-2, rtol=2e-2)
        again = torch.jit.load(str(toyworld.classifier_file(tmp_path / "cache")))
        torch.testing.assert_close(again(x), judge(x))
    ref = gen_mod.load(toyworld.generator_dir(cache))
    got = gen_mod.load(toyworld.generator_dir(tmp_path / "cache"))   # what the generation stage loads
    kw = dict(prompt=["a photo of the digit seven"], image=x[:1], strength=0.5, guidance_scale=3.0,
              num_inference_steps=6, output_type="np")
    a = ref(**kw, generator=[torch.Generator().manual_seed(0)]).images[0]
    b = got(**kw, generator=[torch.Generator().manual_seed(0)]).images[0]
    assert np.abs(a - b).max() < 0.02


def test_shipped_weights_pass_the_gates(torch_threads):
    """The models in the package (float16) pass the same gates as the float32 run that made them."""
    from discl_ray.toyworld import ship
    from discl_ray.toyworld.train import FULL_BUDGET_S, LOAD_GATE_DDIM_STEPS, WorldPlan, train_world

    man = ship.read_manifest()
    if man is None:
        pytest.fail("no shipped toy world under discl_ray/assets/toyworld (make it: discl world --force --ship)")
    assert (ship.ASSET_DIR / ship.WEIGHTS).stat().st_size < 5 * 2**20
    assert man["trained"]["passed"] is True and man["code_version"]
    import tempfile
    from pathlib import Path

    s = man["settings"]
    assert s["plan"] == json.loads(json.dumps(dataclasses.asdict(WorldPlan.for_budget(FULL_BUDGET_S))))
    with tempfile.TemporaryDirectory() as tmp:
        # the path `discl world` and the quickstart take: unpack, then the load-time gates
        got = train_world(Path(tmp), seed=s["seed"], image_size=s["image_size"], world_fraction=s["world_fraction"],
                          train_text=s["train_text"], progress=False)
    assert got["source"] == "shipped" and got["passed"] is True, got["gates"]
    gates = got["gates"]
    assert gates["generator"]["steps"] == LOAD_GATE_DDIM_STEPS and gates["generator"]["n_per_lam"] == 100
    assert gates["clip"]["zero_shot_acc"] >= 0.90, gates["clip"]
    assert gates["generator"]["lam0_acc"] >= 0.60 and gates["generator"]["agreement_rises"], gates["generator"]
    # the judge has no threshold of its own: its float16 copy must judge like the float32 one did
    assert abs(gates["classifier"]["heldout_acc"] - man["trained"]["gates"]["classifier"]["heldout_acc"]) <= 0.01
