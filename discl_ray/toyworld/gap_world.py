"""``train_gap_world``: build, gate, measure and cache the gap variant of the toy world.

Layout under ``<cache>/toyworld-gap/`` (the clean world's stays under ``<cache>/toyworld/``):

* ``generator/`` — diffusers img2img folder: the gap VAE, the clean world's UNet and text encoder;
* ``clip/toy-gap-clip.json`` + ``.pt`` — the clean CLIP with its image tower fine-tuned on random looks;
* ``classifier.pt`` — the judge trained on world digits in random looks (TorchScript);
* ``manifest.json`` — settings (the clean world's settings and a fingerprint of its weights, which the gap
  world is built from), timings, gates and the per-λ gap measurements under ``gap``.

The gap world is derived from the clean world in the same cache: ``train_gap_world`` first makes sure that
one exists (reused, unpacked from the shipped weights, or trained, as ``discl world`` does), then reuses a
matching gap cache, or unpacks the shipped gap weights (``discl_ray/assets/toyworld-gap/``: only what
differs from the clean world) when they were built from the same clean weights, or fine-tunes. See
``discl_ray.toyworld.gap`` for what changes and why; docs/toyworld.md ("Gap variant") for the numbers."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from discl_ray import toyworld
from discl_ray.errors import MissingInput
from discl_ray.toyworld import gap, gates

log = logging.getLogger(__name__)

VARIANT = "gap"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
LOOK = "blueprint"             # the task look the gap world's gates and measurements use
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toyworld-gap"
WEIGHTS = "weights.safetensors"
_CODE = ("gap.py", "gap_world.py")

# Gates of the gap world (measured on the task half in the task look; docs/toyworld.md "Gap variant").
MIN_JUDGE_ACC = 0.90           # the judge must recognise digits in both looks: its rate is the referee
MIN_CLIP_ACC = 0.90            # CLIP zero-shot on clean held-out digits (the clean world's gate)
MIN_CLIP_TASK_ACC = 0.80       # … and on the task's look (the clean CLIP: 1.9 %)
MIN_PROBE_LAM0 = 0.90          # the gap at λ = 0 is large: a linear probe tells generations from real ones
MAX_PROBE_TOP = 0.75           # … and nearly gone at the highest λ (0.5 = indistinguishable)
PROBE_SLACK = 0.05             # sampling noise allowed when the probe accuracy rises from one λ to the next


def read_manifest(cache_dir: Path) -> dict | None:
    try:
        return json.loads((toyworld.toy_dir(cache_dir, VARIANT) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def code_version() -> dict:
    """sha256 of the gap world's code and of the look module, beside the clean world's code version."""
    from discl_ray.data import looks
    from discl_ray.toyworld import ship

    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in [here / name for name in _CODE] + [Path(looks.__file__)]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return {"gap_sha256": h.hexdigest()[:16], **ship.code_version()}


def base_fingerprint(cache_dir: Path) -> str:
    """16 hex digits over the clean world's weights the gap world starts from (CLIP, UNet, VAE), so a gap
    cache or the shipped gap weights are only used on top of the clean world they were made from."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    gen = toyworld.generator_dir(cache_dir)
    parts = {"clip": torch.load(toyworld.clip_files(cache_dir)[1], map_location="cpu", weights_only=True)}
    for sub in ("unet", "vae"):
        parts[sub] = load_file(str(gen / sub / "diffusion_pytorch_model.safetensors"))
    for name, state in parts.items():
        for k in sorted(state):
            h.update(f"{name}.{k}".encode())
            h.update(state[k].detach().to(torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _settings(base: dict, fingerprint: str, plan: gap.GapPlan) -> dict:
    s = {"format": FORMAT_VERSION, "variant": VARIANT, "look": LOOK, "base": base["settings"],
         "base_fingerprint": fingerprint, "plan": asdict(plan)}
    return json.loads(json.dumps(s))


def _files(cache_dir: Path) -> list[Path]:
    return [toyworld.generator_dir(cache_dir, VARIANT) / "model_index.json", *toyworld.clip_files(cache_dir, VARIANT),
            toyworld.classifier_file(cache_dir, VARIANT)]


# -- CLIP files under the gap name ----------------------------------------------------------------------
def save_clip(clip_model, cache_dir: Path, image_size: int) -> None:
    from discl_ray.toyworld import clip as clip_mod

    json_path, weights = toyworld.clip_files(cache_dir, VARIANT)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(clip_mod.clip_config(image_size), indent=2) + "\n", encoding="utf-8")
    clip_mod.save(clip_model, weights)


def load_clip(cache_dir: Path, variant: str = VARIANT):
    """A variant's toy CLIP (eval mode), loaded as the scoring stage loads it."""
    import open_clip

    json_path, weights = toyworld.clip_files(cache_dir, variant)
    open_clip.add_model_config(str(json_path))
    model, _, _ = open_clip.create_model_and_transforms(toyworld.clip_name(variant), pretrained=str(weights))
    return model.eval()


def _load_clean(cache_dir: Path):
    """The clean world's (pipe, judge, CLIP) from the cache, float32."""
    from discl_ray.toyworld import classifier as cls_mod
    from discl_ray.toyworld import generator as gen_mod

    return (gen_mod.load(toyworld.generator_dir(cache_dir)),
            cls_mod.load_torchscript(toyworld.classifier_file(cache_dir)), load_clip(cache_dir, "clean"))


# -- build ----------------------------------------------------------------------------------------------
def train_gap_world(cache_dir: Path, seed: int = 0, image_size: int = 32, budget_s: float | None = None,
                    check_gates: bool = True, force: bool = False, world_fraction: float = 0.5,
                    progress: bool = True, threads: int | None = None, max_wall_s: float | None = None,
                    base: dict | None = None, plan: gap.GapPlan | None = None) -> dict:
    """Build (or reuse) the gap world under ``cache_dir``; returns its manifest (``passed`` = all gates,
    ``base`` = a summary of the clean world's manifest as ``train_world`` returned it). ``force`` rebuilds the
    gap world only (the clean world it starts from is reused or unpacked as usual). ``plan`` overrides the
    gap world's steps (default: ``GapPlan.for_budget(budget_s)``)."""
    from discl_ray.toyworld.train import FULL_BUDGET_S, train_world

    budget_s = FULL_BUDGET_S if budget_s is None else budget_s
    cache_dir = Path(cache_dir)
    if base is None:
        base = train_world(cache_dir, seed=seed, image_size=image_size, budget_s=budget_s, check_gates=check_gates,
                           world_fraction=world_fraction, progress=progress, threads=threads, max_wall_s=max_wall_s)
    plan = plan or gap.GapPlan.for_budget(budget_s, FULL_BUDGET_S)
    settings = _settings(base, base_fingerprint(cache_dir), plan)
    man = read_manifest(cache_dir)
    if not force and man and man.get("settings") == settings and all(f.exists() for f in _files(cache_dir)):
        log.info("gap world cached at %s (reused; --force rebuilds)", toyworld.toy_dir(cache_dir, VARIANT))
        return {**man, "reused": True, "base": _base_summary(base)}
    if not force and shipped_available(settings):
        return install_shipped(cache_dir, settings, plan, budget_s, check_gates, base)
    if threads:
        torch.set_num_threads(threads)
    return _train(cache_dir, settings, plan, budget_s, check_gates, base, progress)


def _base_summary(base: dict) -> dict:
    return {k: base.get(k) for k in ("source", "reused", "passed", "code_version")}


def _train(cache_dir: Path, settings: dict, plan: gap.GapPlan, budget_s: float, check_gates: bool, base: dict,
           progress: bool) -> dict:
    import copy

    from discl_ray.toyworld import classifier as cls_mod
    from discl_ray.toyworld import data, diffusion
    from discl_ray.toyworld import generator as gen_mod

    b = settings["base"]
    seed, image_size, fraction = b["seed"], b["image_size"], b["world_fraction"]
    root = toyworld.toy_dir(cache_dir, VARIANT)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t_start, c_start = time.perf_counter(), time.process_time()
    clean_pipe, _, clip_model = _load_clean(cache_dir)
    x, y = data.world(seed, image_size, fraction)
    pool, py, is_clean = gap.internet_pool(x, y, plan.looks_per_image, seed)
    timing: dict[str, dict] = {"pool": {"seconds": time.perf_counter() - t_start,
                                        "cpu_seconds": time.process_time() - c_start}}

    w0, c0 = time.perf_counter(), time.process_time()
    judge = cls_mod.train_classifier(pool, py, steps=plan.judge_steps, seed=seed, progress=progress)
    cls_mod.save_torchscript(judge, toyworld.classifier_file(cache_dir, VARIANT), image_size)
    timing["judge"] = {"seconds": time.perf_counter() - w0, "cpu_seconds": time.process_time() - c0,
                       "steps": plan.judge_steps, "planned": plan.judge_steps}

    timing["clip"] = gap.finetune_clip(clip_model, pool, py, steps=plan.clip_steps, seed=seed, progress=progress)
    save_clip(clip_model, cache_dir, image_size)

    vae0 = copy.deepcopy(clean_pipe.vae).eval()
    vae = clean_pipe.vae
    timing["vae"] = gap.finetune_vae(vae, pool, is_clean, steps=plan.vae_steps, seed=seed, progress=progress)
    # The generator's text encoder is the CLIP text tower, which fine-tuning left untouched (checked).
    text_encoder = gen_mod.text_encoder_from_clip(clip_model)
    _same_text_encoder(text_encoder, clean_pipe.text_encoder)
    if plan.unet_steps:
        with torch.no_grad():
            clean_lat = diffusion.encode_latents(vae, pool[is_clean])
            look_lat = diffusion.encode_latents(vae, pool[~is_clean])
        unet, timing["unet"] = gap.finetune_unet(clean_pipe.unet, text_encoder, clean_pipe.tokenizer,
                                                 gen_mod.train_scheduler(), clean_lat, look_lat, py[is_clean],
                                                 py[~is_clean], steps=plan.unet_steps, lr=plan.unet_lr,
                                                 max_share=plan.look_share, t_max=plan.look_t_max,
                                                 low_t_frac=plan.low_t_frac, seed=seed, progress=progress)
    else:       # the clean world's UNet: its prior is the world's look, the gap VAE lets it carry any other
        unet, timing["unet"] = clean_pipe.unet.eval(), {"steps": 0, "planned": 0, "seconds": 0.0, "cpu_seconds": 0.0}
    pipe = gen_mod.assemble(vae, unet, text_encoder, clean_pipe.tokenizer)
    gen_mod.save(pipe, toyworld.generator_dir(cache_dir, VARIANT))
    timing["train_total"] = {"seconds": time.perf_counter() - t_start, "cpu_seconds": time.process_time() - c_start}

    xh, yh = data.heldout(seed, image_size, fraction)
    manifest = {"settings": settings, "variant": VARIANT, "source": "trained", "code_version": code_version(),
                "budget_s": budget_s, "timing": timing, "base": _base_summary(base),
                "vae": gap.vae_report(vae, vae0, xh, gap.task_look(xh, seed, fraction, LOOK)),
                "size_mb": _sizes(cache_dir), "gates": {}, "gap": {}, "passed": None, "reused": False}
    if check_gates:
        g0, c0 = time.perf_counter(), time.process_time()
        manifest["gates"], manifest["gap"] = evaluate(pipe, judge, clip_model, settings, plan)
        manifest["passed"] = all(g["passed"] for g in manifest["gates"].values() if "passed" in g)
        timing["gates"] = {"seconds": time.perf_counter() - g0, "cpu_seconds": time.process_time() - c0}
        g0, c0 = time.perf_counter(), time.process_time()
        manifest["gap_clean_world"] = clean_world_gap(cache_dir, settings, plan)
        timing["gap_clean_world"] = {"seconds": time.perf_counter() - g0, "cpu_seconds": time.process_time() - c0}
    timing["total"] = {"seconds": time.perf_counter() - t_start, "cpu_seconds": time.process_time() - c_start}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _same_text_encoder(a, b) -> None:
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        if k in sb and not torch.allclose(v.float(), sb[k].float(), atol=1e-3):
            raise ValueError(f"gap world: the CLIP text tower changed in fine-tuning ({k}); the UNet needs the "
                             "clean world's")


def _sizes(cache_dir: Path) -> dict:
    from discl_ray.toyworld.train import _dir_mb

    return {"generator": _dir_mb(toyworld.generator_dir(cache_dir, VARIANT)),
            "clip": _dir_mb(toyworld.clip_files(cache_dir, VARIANT)[0].parent),
            "classifier": round(toyworld.classifier_file(cache_dir, VARIANT).stat().st_size / 2**20, 3)}


# -- gates and measurements -----------------------------------------------------------------------------
def probe_falls(probe: list[float]) -> bool:
    """The probe accuracy falls with λ: each step may rise by at most ``PROBE_SLACK`` (sampling noise) and
    the highest λ is clearly below λ = 0 (by 0.15)."""
    eps = 1e-6
    return (all(b <= a + PROBE_SLACK + eps for a, b in zip(probe, probe[1:]))
            and probe[-1] < probe[0] - 0.15 + eps)


def evaluate(pipe, judge, clip_model, settings: dict, plan: gap.GapPlan) -> tuple[dict, dict]:
    """(gates, gap table) of a gap world, on the task half in the task look (never trained on)."""
    from discl_ray.toyworld import clip as clip_mod
    from discl_ray.toyworld import data
    from discl_ray.toyworld.classifier import predict

    b = settings["base"]
    seed = b["seed"]
    xh, yh = data.heldout(seed, b["image_size"], b["world_fraction"])
    xl = gap.task_look(xh, seed, b["world_fraction"], settings["look"])
    out: dict = {}
    acc = {"clean": float((predict(judge, xh) == yh).float().mean()),
           settings["look"]: float((predict(judge, xl) == yh).float().mean())}
    out["judge"] = {"passed": min(acc.values()) >= MIN_JUDGE_ACC, "heldout_acc": acc, "min_acc": MIN_JUDGE_ACC,
                    "n": int(len(yh))}
    zs = {"clean": clip_mod.zero_shot_gate(clip_model, xh, yh, MIN_CLIP_ACC),
          settings["look"]: clip_mod.zero_shot_gate(clip_model, xl, yh, MIN_CLIP_TASK_ACC)}
    out["clip"] = {"passed": all(g["passed"] for g in zs.values()),
                   "zero_shot_acc": {k: g["zero_shot_acc"] for k, g in zs.items()},
                   "min_acc": {"clean": MIN_CLIP_ACC, settings["look"]: MIN_CLIP_TASK_ACC},
                   "cos_right": {k: [g["cos_right_mean"], g["cos_right_std"]] for k, g in zs.items()},
                   "cos_wrong": {k: [g["cos_wrong_mean"], g["cos_wrong_std"]] for k, g in zs.items()}}
    gen = gates.generator_gate(pipe, judge, xl, yh, per_class=plan.gate_per_class, lams=gap.GAP_LAMS,
                               steps=plan.gate_ddim_steps, seed=seed, keep_images=True)
    samples, src, lab = gen.pop("_samples")
    gen["sources"] = f"task half, {settings['look']} look"
    out["generator"] = gen
    table = gap.measure_gap(clip_model, judge, src, lab, samples, splits=plan.probe_splits, seed=seed)
    probe = [table[f"{lam:g}"]["probe_acc"] for lam in gap.GAP_LAMS]
    top = f"{gap.GAP_LAMS[-1]:g}"
    out["gap"] = {"passed": bool(probe[0] >= MIN_PROBE_LAM0 and probe[-1] <= MAX_PROBE_TOP and probe_falls(probe)),
                  "probe_lam0": probe[0], "min_probe_lam0": MIN_PROBE_LAM0, f"probe_lam{top}": probe[-1],
                  "max_probe_top": MAX_PROBE_TOP, "falls": probe_falls(probe)}
    right = lambda cos, labels: cos.gather(1, labels.view(-1, 1)).flatten()  # noqa: E731
    from discl_ray.toyworld.train import _score_summary

    scores = {f"real_{settings['look']}": _score_summary(right(clip_mod.cosines(clip_model, xl), yh)),
              "real_clean": _score_summary(right(clip_mod.cosines(clip_model, xh), yh))}
    for lam, ims in samples.items():
        scores[f"lam_{lam:g}"] = _score_summary(right(clip_mod.cosines(clip_model, ims), lab))
    out["clip_scores"] = scores      # not a gate: the distributions behind the gap configs' threshold
    return out, table


def clean_world_gap(cache_dir: Path, settings: dict, plan: gap.GapPlan) -> dict:
    """The same per-λ measurements on the clean world (its own CLIP, judge, generator; clean task images),
    for contrast: there the probe cannot tell λ = 0 generations from real task digits nearly as well."""
    from discl_ray.toyworld import data

    b = settings["base"]
    pipe, judge, clip_model = _load_clean(cache_dir)
    xh, yh = data.heldout(b["seed"], b["image_size"], b["world_fraction"])
    idx = gates.balanced_subset(yh, plan.gate_per_class, b["seed"])
    src, lab = xh[idx], yh[idx]
    samples = {lam: gates.generate(pipe, src, lab, lam, steps=plan.gate_ddim_steps, seed=b["seed"])
               for lam in gap.GAP_LAMS}
    return gap.measure_gap(clip_model, judge, src, lab, samples, splits=plan.probe_splits, seed=b["seed"])


# -- shipping -------------------------------------------------------------------------------------------
def read_shipped_manifest(asset_dir: Path = ASSET_DIR) -> dict | None:
    try:
        return json.loads((Path(asset_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def shipped_available(settings: dict, asset_dir: Path = ASSET_DIR) -> bool:
    """Shipped gap weights made with exactly ``settings`` (so from the same clean weights) exist."""
    man = read_shipped_manifest(asset_dir)
    return bool(man) and man.get("settings") == settings and (Path(asset_dir) / WEIGHTS).is_file()


def quantize_delta(state: dict, base: dict, prefix: str) -> dict:
    """``state − base`` per tensor as int8 with one float32 scale (symmetric, max |delta| ↦ 127): the gap
    UNet is the clean one fine-tuned, so its change is small and a quarter of float32 stores it."""
    out = {}
    for k, v in state.items():
        delta = (v.detach().float() - base[k].detach().float())
        scale = float(delta.abs().max()) / 127.0
        q = torch.zeros_like(delta, dtype=torch.int8) if scale == 0 else (delta / scale).round().to(torch.int8)
        out[f"{prefix}{k}"] = q.contiguous()
        out[f"{prefix}{k}.scale"] = torch.tensor([scale], dtype=torch.float32)
    return out


def apply_delta(base: dict, tensors: dict, prefix: str) -> dict:
    """The inverse of ``quantize_delta``: ``base`` plus the stored int8 deltas times their scales."""
    out = {}
    for k, v in base.items():
        q, scale = tensors[f"{prefix}{k}"], tensors[f"{prefix}{k}.scale"]
        out[k] = v.float() + q.float() * float(scale.flatten()[0])
    return out


def export(cache_dir: Path, manifest: dict, out_dir: Path = ASSET_DIR) -> dict:
    """Write what the gap world adds to the clean one (VAE, CLIP image tower, judge in float16; a fine-tuned UNet
    as an int8 delta from the clean UNet, nothing for the clean UNet itself) and a manifest."""
    from safetensors.torch import save_file

    from discl_ray.toyworld import classifier as cls_mod
    from discl_ray.toyworld import generator as gen_mod

    pipe = gen_mod.load(toyworld.generator_dir(cache_dir, VARIANT))
    clip_model = load_clip(cache_dir, VARIANT)
    judge = cls_mod.load_torchscript(toyworld.classifier_file(cache_dir, VARIANT))
    clean_clip = load_clip(cache_dir, "clean")
    clean_pipe = gen_mod.load(toyworld.generator_dir(cache_dir))
    # Everything but these must be the clean world's (install rebuilds it from there): check before shipping.
    cs = clean_clip.state_dict()
    for k, v in clip_model.state_dict().items():
        if not k.startswith("visual.") and not torch.equal(v, cs[k]):
            raise ValueError(f"gap CLIP differs from the clean CLIP outside the image tower at {k}")
    tensors = {f"clip.{k}": v for k, v in clip_model.state_dict().items() if k.startswith("visual.")}
    tensors.update({f"vae.{k}": v for k, v in pipe.vae.state_dict().items()})
    tensors.update({f"judge.{k}": v for k, v in judge.state_dict().items()})
    tensors = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous() for k, v in tensors.items()}
    unet, clean_unet = pipe.unet.state_dict(), clean_pipe.unet.state_dict()
    if any(not torch.equal(v, clean_unet[k]) for k, v in unet.items()):   # else: the clean UNet, nothing to ship
        tensors.update(quantize_delta(unet, clean_unet, "unet_delta."))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS))
    shipped = {"settings": manifest["settings"], "variant": VARIANT,
               "code_version": manifest.get("code_version") or code_version(),
               # (without ``_name_or_path``: where the build read its VAE from, a path on the building machine)
               "vae_config": {k: v for k, v in dict(pipe.vae.config).items() if k != "_name_or_path"},
               "judge": {"width": int(judge.state_dict()["net.0.weight"].shape[0])},
               "trained": {k: manifest.get(k) for k in ("budget_s", "timing", "vae", "gates", "gap", "gap_clean_world",
                                                        "passed")},
               "size_mb": round((out_dir / WEIGHTS).stat().st_size / 2**20, 3)}
    (out_dir / MANIFEST).write_text(json.dumps(shipped, indent=2, default=str) + "\n", encoding="utf-8")
    return shipped


def install(cache_dir: Path, asset_dir: Path = ASSET_DIR):
    """Unpack the shipped gap weights on top of the clean world in ``cache_dir``; returns (pipe, judge, CLIP)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from discl_ray.toyworld import classifier as cls_mod
    from discl_ray.toyworld import generator as gen_mod

    man = read_shipped_manifest(asset_dir)
    if man is None:
        raise MissingInput(f"no shipped gap world under {asset_dir}")
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(Path(asset_dir) / WEIGHTS)).items()}
    # (int8 UNet deltas stay int8: ``apply_delta`` scales them)
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    s = man["settings"]["base"]
    clean_pipe, _, clip_model = _load_clean(cache_dir)
    state = clip_model.state_dict()
    state.update(part("clip."))
    clip_model.load_state_dict(state)
    clip_model.eval()
    save_clip(clip_model, cache_dir, s["image_size"])
    vae = AutoencoderKL.from_config(man["vae_config"])
    vae.load_state_dict(part("vae."))
    unet = clean_pipe.unet
    if any(k.startswith("unet_delta.") for k in tensors):          # none shipped: the clean world's UNet
        unet.load_state_dict(apply_delta(unet.state_dict(), tensors, "unet_delta."))
    pipe = gen_mod.assemble(vae.eval(), unet.eval(), clean_pipe.text_encoder, clean_pipe.tokenizer)
    gen_mod.save(pipe, toyworld.generator_dir(cache_dir, VARIANT))
    judge = cls_mod.DigitCNN(width=man["judge"]["width"])
    judge.load_state_dict(part("judge."))
    cls_mod.save_torchscript(judge.eval(), toyworld.classifier_file(cache_dir, VARIANT), s["image_size"])
    return pipe, judge.eval(), clip_model


def install_shipped(cache_dir: Path, settings: dict, plan: gap.GapPlan, budget_s: float, check_gates: bool,
                    base: dict) -> dict:
    """Unpack the shipped gap weights and run the gap world's gates (and gap measurements) on them."""
    root = toyworld.toy_dir(cache_dir, VARIANT)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t_start, c_start = time.perf_counter(), time.process_time()
    shipped = read_shipped_manifest() or {}
    pipe, judge, clip_model = install(cache_dir)
    timing = {"install": {"seconds": time.perf_counter() - t_start, "cpu_seconds": time.process_time() - c_start}}
    manifest = {"settings": settings, "variant": VARIANT, "source": "shipped", "code_version": shipped.get("code_version"),
                "budget_s": budget_s, "timing": timing, "base": _base_summary(base),
                "size_mb": {"shipped": shipped.get("size_mb"), **_sizes(cache_dir)},
                "trained": shipped.get("trained"), "gates": {}, "gap": {}, "passed": None, "reused": False}
    if check_gates:
        g0, c0 = time.perf_counter(), time.process_time()
        manifest["gates"], manifest["gap"] = evaluate(pipe, judge, clip_model, settings, plan)
        manifest["passed"] = all(g["passed"] for g in manifest["gates"].values() if "passed" in g)
        timing["gates"] = {"seconds": time.perf_counter() - g0, "cpu_seconds": time.process_time() - c0}
    timing["total"] = {"seconds": time.perf_counter() - t_start, "cpu_seconds": time.process_time() - c_start}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
