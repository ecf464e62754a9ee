"""``train_world``: train, gate and cache the three toy models (generator, CLIP, judge classifier).

The work is step-based, so a seed reproduces it on an idle or a loaded machine: ``budget_s`` picks the plan
(the full plan fits 6 minutes on 2 idle cores; less = proportionally fewer steps, for smoke runs). An
optional ``max_wall_s`` also stops each model early when its share of that wall-clock time is spent (a
loaded machine then gets fewer steps and, likely, failed gates). The manifest records the steps actually
run, wall and CPU seconds, gate numbers and sizes. A cache whose manifest matches the requested settings is
reused unless ``force``."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from discl_ray import toyworld
from discl_ray.errors import UserError
from discl_ray.toyworld import gates, ship

log = logging.getLogger(__name__)

FULL_BUDGET_S = 360.0
MANIFEST = "manifest.json"
FORMAT_VERSION = 2          # 2: the generator's text encoder is the toy CLIP's (frozen) text tower
# The gates run on the shipped models at every unpack (the quickstart's first step) with DDIM 25 steps instead
# of the training run's 50: half the generator gate's cost, and on the shipped weights the same numbers to the
# last digit (λ = 0 recognised 0.80; by λ 0.80 0.98 0.99 0.97 0.94; docs/toyworld.md).
LOAD_GATE_DDIM_STEPS = 25


@dataclass(frozen=True)
class WorldPlan:
    """Step counts of each model (the full plan fits 6 minutes on 2 idle cores) and the wall-clock share
    of the budget each may use before it stops early."""

    classifier_steps: int = 200
    clip_steps: int = 700
    vae_steps: int = 200
    unet_steps: int = 900
    gate_per_class: int = 10
    gate_ddim_steps: int = 50
    share: tuple[float, float, float, float] = (0.03, 0.22, 0.08, 0.67)   # classifier, CLIP, VAE, UNet

    @classmethod
    def for_budget(cls, budget_s: float) -> "WorldPlan":
        """The full plan at ≥ 6 minutes; proportionally fewer steps (with floors) below, for smoke runs."""
        f = min(1.0, budget_s / FULL_BUDGET_S)
        if f >= 1.0:
            return cls()
        full = cls()
        return cls(classifier_steps=max(60, int(full.classifier_steps * f)),
                   clip_steps=max(10, int(full.clip_steps * f)), vae_steps=max(10, int(full.vae_steps * f)),
                   unet_steps=max(10, int(full.unet_steps * f)), gate_per_class=1 if f < 0.25 else 5,
                   gate_ddim_steps=6 if f < 0.25 else 25)


def _settings(seed: int, image_size: int, world_fraction: float, plan: WorldPlan, train_text: bool) -> dict:
    settings = {"format": FORMAT_VERSION, "seed": seed, "image_size": image_size,
                "world_fraction": world_fraction, "train_text": train_text, "plan": asdict(plan)}
    return json.loads(json.dumps(settings))      # as it reads back from the manifest (tuples → lists)


def _dir_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20, 3)


def _n_params(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def read_manifest(cache_dir: Path) -> dict | None:
    p = toyworld.toy_dir(cache_dir) / MANIFEST
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cached(cache_dir: Path, settings: dict) -> dict | None:
    man = read_manifest(cache_dir)
    files = [toyworld.generator_dir(cache_dir) / "model_index.json", *toyworld.clip_files(cache_dir),
             toyworld.classifier_file(cache_dir)]
    if man and man.get("settings") == settings and all(f.exists() for f in files):
        return man
    return None


def _score_summary(cos: torch.Tensor) -> dict:
    q = torch.quantile(cos, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]))
    return {"mean": float(cos.mean()), "std": float(cos.std()) if len(cos) > 1 else 0.0,
            **{f"q{int(p * 100)}": float(v) for p, v in zip((0.1, 0.25, 0.5, 0.75, 0.9), q)}}


def train_world(cache_dir: Path, seed: int = 0, image_size: int = 32, budget_s: float = FULL_BUDGET_S,
                check_gates: bool = True, force: bool = False, world_fraction: float = 0.5,
                train_text: bool = False, progress: bool = True, threads: int | None = None,
                max_wall_s: float | None = None) -> dict:
    """Train (or reuse) the toy world under ``cache_dir``; returns the manifest (``passed`` = all gates).

    Writes ``toyworld.generator_dir`` (diffusers folder), ``toyworld.clip_files`` (JSON + .pt),
    ``toyworld.classifier_file`` (TorchScript) and ``manifest.json`` beside them."""
    from discl_ray.toyworld import classifier as cls_mod
    from discl_ray.toyworld import clip as clip_mod
    from discl_ray.toyworld import data, diffusion
    from discl_ray.toyworld import generator as gen_mod

    if image_size % (4 * gen_mod.VAE_FACTOR):
        raise UserError(f"image_size must be a multiple of {4 * gen_mod.VAE_FACTOR} for the toy generator "
                         f"(latents {gen_mod.VAE_FACTOR}× smaller, one UNet downsampling); got {image_size}")
    cache_dir = Path(cache_dir)
    plan = WorldPlan.for_budget(budget_s)
    settings = _settings(seed, image_size, world_fraction, plan, train_text)
    if not force and (man := _cached(cache_dir, settings)) is not None:
        log.info("toy world cached at %s (reused; --force retrains)", toyworld.toy_dir(cache_dir))
        return {**man, "reused": True}
    if not force and ship.available(settings):
        return install_shipped(cache_dir, settings, plan, budget_s, check_gates)
    if threads:
        torch.set_num_threads(threads)
    root = toyworld.toy_dir(cache_dir)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t_start, c_start = time.perf_counter(), time.process_time()
    x, y = data.world(seed, image_size, world_fraction)
    xh, yh = data.heldout(seed, image_size, world_fraction)
    timing: dict[str, dict] = {}
    share = [s * max_wall_s if max_wall_s else None for s in plan.share]

    # 1. the judge classifier (first: the generator gate needs it)
    w0, c0 = time.perf_counter(), time.process_time()
    judge = cls_mod.train_classifier(x, y, steps=plan.classifier_steps, seed=seed, budget_s=share[0],
                                     progress=progress)
    cls_mod.save_torchscript(judge, toyworld.classifier_file(cache_dir), image_size)
    timing["classifier"] = {"seconds": time.perf_counter() - w0, "cpu_seconds": time.process_time() - c0}

    # 2. the toy CLIP
    json_path, weights = toyworld.clip_files(cache_dir)
    clip_model = clip_mod.build(image_size, json_path, seed)
    timing["clip"] = clip_mod.train_clip(clip_model, x, y, steps=plan.clip_steps, seed=seed, budget_s=share[1],
                                         progress=progress)
    clip_mod.save(clip_model, weights)

    # 3. the generator: VAE, then the latent UNet with the text encoder
    tok = gen_mod.build_tokenizer()
    text_encoder = gen_mod.text_encoder_from_clip(clip_model)      # as SD: a frozen pre-trained CLIP text tower
    vae = gen_mod.build_vae(image_size, seed)
    unet = gen_mod.build_unet(image_size, text_encoder.config.hidden_size, seed=seed)
    timing["vae"] = asdict(diffusion.train_vae(vae, x, steps=plan.vae_steps, seed=seed, budget_s=share[2],
                                               progress=progress))
    latents = diffusion.encode_latents(vae, x)
    ema_unet, ema_text, st = diffusion.train_unet(unet, text_encoder, tok, gen_mod.train_scheduler(), latents, y,
                                                  steps=plan.unet_steps, train_text=train_text, seed=seed,
                                                  budget_s=share[3], progress=progress)
    timing["unet"] = asdict(st)
    pipe = gen_mod.assemble(vae, ema_unet, ema_text, tok)
    gen_mod.save(pipe, toyworld.generator_dir(cache_dir))
    timing["train_total"] = {"seconds": time.perf_counter() - t_start, "cpu_seconds": time.process_time() - c_start}

    manifest = {"settings": settings, "source": "trained", "code_version": ship.code_version(),
                "budget_s": budget_s, "timing": timing,
                "params": {"classifier": _n_params(judge), "clip": _n_params(clip_model), "vae": _n_params(vae),
                           "unet": _n_params(ema_unet), "text_encoder": _n_params(ema_text)},
                "size_mb": {"generator": _dir_mb(toyworld.generator_dir(cache_dir)),
                            "clip": _dir_mb(json_path.parent),
                            "classifier": round(toyworld.classifier_file(cache_dir).stat().st_size / 2**20, 3)},
                "gates": {}, "passed": None, "reused": False}
    if check_gates:
        manifest["gates"] = evaluate_gates(pipe, judge, clip_model, xh, yh, plan, seed)
        manifest["passed"] = all(g["passed"] for g in manifest["gates"].values() if isinstance(g, dict)
                                 and "passed" in g)
    manifest["timing"]["total"] = {"seconds": time.perf_counter() - t_start,
                                   "cpu_seconds": time.process_time() - c_start}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def install_shipped(cache_dir: Path, settings: dict, plan: WorldPlan, budget_s: float,
                    check_gates: bool = True) -> dict:
    """Unpack the models shipped with the package into the cache and run the same gates on them (the
    float16 copies must pass what the trained float32 models passed); returns the cache's manifest."""
    from discl_ray.toyworld import data

    root = toyworld.toy_dir(cache_dir)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t_start, c_start = time.perf_counter(), time.process_time()
    shipped = ship.read_manifest() or {}
    pipe, judge, clip_model = ship.install(cache_dir)
    timing = {"install": {"seconds": time.perf_counter() - t_start, "cpu_seconds": time.process_time() - c_start}}
    manifest = {"settings": settings, "source": "shipped", "code_version": shipped.get("code_version"),
                "budget_s": budget_s, "timing": timing,
                "params": {"classifier": _n_params(judge), "clip": _n_params(clip_model), "vae": _n_params(pipe.vae),
                           "unet": _n_params(pipe.unet), "text_encoder": _n_params(pipe.text_encoder)},
                "size_mb": {"shipped": shipped.get("size_mb"),
                            "generator": _dir_mb(toyworld.generator_dir(cache_dir)),
                            "clip": _dir_mb(toyworld.clip_files(cache_dir)[0].parent),
                            "classifier": round(toyworld.classifier_file(cache_dir).stat().st_size / 2**20, 3)},
                "trained": shipped.get("trained"), "gates": {}, "passed": None, "reused": False}
    if check_gates:
        xh, yh = data.heldout(settings["seed"], settings["image_size"], settings["world_fraction"])
        g0, c0 = time.perf_counter(), time.process_time()
        load_plan = replace(plan, gate_ddim_steps=min(plan.gate_ddim_steps, LOAD_GATE_DDIM_STEPS))
        manifest["gates"] = evaluate_gates(pipe, judge, clip_model, xh, yh, load_plan, settings["seed"])
        manifest["passed"] = all(g["passed"] for g in manifest["gates"].values() if isinstance(g, dict)
                                 and "passed" in g)
        timing["gates"] = {"seconds": time.perf_counter() - g0, "cpu_seconds": time.process_time() - c0}
    timing["total"] = {"seconds": time.perf_counter() - t_start, "cpu_seconds": time.process_time() - c_start}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def evaluate_gates(pipe, judge, clip_model, xh: torch.Tensor, yh: torch.Tensor, plan: WorldPlan,
                   seed: int = 0) -> dict:
    """All gates plus the CLIP score distributions (real vs generated per λ) for threshold choice."""
    from discl_ray.toyworld import clip as clip_mod

    out = {"classifier": gates.classifier_report(judge, xh, yh)}
    out["clip"] = clip_mod.zero_shot_gate(clip_model, xh, yh, gates.MIN_CLIP_ACC)
    gen = gates.generator_gate(pipe, judge, xh, yh, per_class=plan.gate_per_class, steps=plan.gate_ddim_steps,
                               seed=seed, keep_images=True)
    samples, src, lab = gen.pop("_samples")
    out["generator"] = gen
    right = lambda cos, labels: cos.gather(1, labels.view(-1, 1)).flatten()  # noqa: E731
    scores = {"real": _score_summary(right(clip_mod.cosines(clip_model, xh), yh))}
    for lam, ims in samples.items():
        scores[f"lam_{lam:g}"] = _score_summary(right(clip_mod.cosines(clip_model, ims), lab))
    out["clip_scores"] = scores
    return out
