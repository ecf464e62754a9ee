"""`discl bench gpu --json PATH`: the one GPU check — the spectrum's speed against the chip's peak.

Built to run on a lent GPU machine whose image has torch, transformers, accelerate, timm and pyarrow but no
Ray, MLflow, diffusers or open_clip (the last two travel as wheels: docs/benchmarks.md, "GPU check"). Nothing
here imports Ray or MLflow, and nothing is downloaded: every network is the real architecture built from its
config with seeded random weights (speed does not depend on the weights). In one process, in this order:

1. **training and scoring** (open_clip and torchvision architectures, the trainer's own model wrappers,
   loss and mixed-precision step): CLIP ViT-B/32 scoring images/s in bf16 (``models.clip.encode_images``);
   FLYP ViT-B/16 at batch 256 and ViT-L/14 at batch 200 (``ClipClassifier`` + ``flyp_loss``, fp32 master
   weights, bf16 autocast, AdamW) and ResNet-10 at batch 128 (cross-entropy, Adam): samples/s of forward +
   backward + step on device-resident batches, and peak GPU memory;
2. **the spectrum**, through the project's own engine (``generation.engine.SpectrumEngine`` on an
   SDXL-refiner img2img pipeline: refiner UNet and VAE, OpenCLIP-bigG ``text_encoder_2``, DDIM): one
   generator per output, shared noise as configured, cached prompt embeddings and source latents, at the
   paper's iWildCam size and λ set (``configs/iwildcam/base.yaml``: 480×272, Λ = {.5, .7, .9}, 8 seeds,
   50 steps, w = 10). FLOPs per output are counted once with ``torch.utils.flop_counter.FlopCounterMode``
   around one eager λ sweep through the engine; then, for batch 8/16/32 × bf16/fp16, eager: one warm-up call,
   then one timed λ sweep of ``batch`` outputs per λ (fresh engine, so each source's VAE encode and each
   prompt's text encode are paid once, as in a run) → outputs/s and achieved TFLOP/s;
3. **determinism**: the same keys through two fresh engines give identical images (or the number of pixels
   and the largest 8-bit difference by which they differ), and the same keys at half the batch size;
4. **compiled** (last: it costs most): ``torch.compile(unet)`` as ``generation.compile_unet`` does (inductor,
   default mode; ``--compile-mode`` for the engine's ``max-autotune-no-cudagraphs``), static shapes: the UNet
   specialises on the batch size even under ``dynamic=True`` (measured), so every (dtype, batch) is one compile.
   Largest batch first, bf16 then fp16; a row starts only while ``--budget-s`` leaves room for a compile. Its
   first call's wall time minus the eager warm-up call of the same shape is reported as ``compile_s``.

The JSON is rewritten after every section, so a run cut short still leaves its numbers. Top-level keys:
``outputs_per_s`` and ``tflops`` (the fastest spectrum row), ``peak_fraction`` (tflops / the chip's dense
bf16 peak; null on a CPU), ``train_samples_per_s`` (per model), ``deterministic`` (bool); the rows are under
``spectrum``, ``training``, ``scoring``, ``determinism``.

``--device cpu --tiny`` runs the same code path on miniature architectures in seconds (the default-suite test).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; first match wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H100", 989.4),
    ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 6000 Ada", 364.2), ("RTX A5000", 111.1),
)
# What the spectrum uses when the shipped iWildCam config cannot be read (the same values: tested).
SPECTRUM_DEFAULTS: dict[str, Any] = {"lams": [0.5, 0.7, 0.9], "seeds": list(range(8)), "steps": 50,
                                     "guidance_scale": 10.0, "width": 480, "height": 272, "shared_noise": False,
                                     "negative_prompt": "", "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}
PAPER_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "iwildcam" / "base.yaml"
# OpenCLIP ViT-bigG/14 text tower: the SDXL refiner's text_encoder_2 (token ids of the rebuilt CLIP tokenizer).
REFINER_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                    projection_dim=1280, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77,
                    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, layer_norm_eps=1e-5)
# A miniature open_clip architecture standing in for ViT-B/32, ViT-B/16 and ViT-L/14 under --tiny.
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
TINY_CLIP_NAME = "discl-gpu-bench-tiny"
CLASSES = ("deer", "fox", "boar", "jaguar", "tapir", "bird", "monkey", "rodent", "cattle", "empty")
# Rough seconds for one compiled row on one H100 (an inductor compile of the refiner UNet plus the row), used
# only to skip a row that would overrun --budget-s.
COMPILE_ESTIMATE_S = 100.0


# -- small helpers --------------------------------------------------------------------------------------
def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> Optional[float]:
    import torch

    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def chip_peak(device_name: str) -> Optional[float]:
    """The chip's dense bf16 peak (TFLOP/s) from ``PEAK_BF16_TFLOPS``; None when the name is not listed."""
    for needle, peak in PEAK_BF16_TFLOPS:
        if needle.lower() in device_name.lower():
            return peak
    return None


def spectrum_settings(config: Optional[Path] = PAPER_CONFIG) -> dict[str, Any]:
    """The spectrum's λ set, seeds, steps, guidance, size and noise sharing from a config's ``generation:``
    section (plain YAML: no pydantic on the GPU image), the schema defaults where a key is absent."""
    out = dict(SPECTRUM_DEFAULTS)
    if config is not None and Path(config).is_file():
        import yaml

        gen = (yaml.safe_load(Path(config).read_text()) or {}).get("generation") or {}
        out.update({k: gen[k] for k in SPECTRUM_DEFAULTS if k in gen})
    out["lams"] = sorted(float(x) for x in out["lams"])
    return out


def matmul_tflops(device: str, tiny: bool) -> float:
    """Measured dense matmul rate (bf16 on CUDA, float32 on a CPU): what this chip does at best."""
    import torch

    n = 256 if tiny else 8192
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = _sync(device)
    a @ b
    sync()
    reps = 5 if tiny else 50
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


# -- training and scoring -------------------------------------------------------------------------------
def _clip(name: str, tiny: bool, device: str, precision: str = "fp32"):
    import open_clip

    if tiny:
        name = TINY_CLIP_NAME
    model = open_clip.create_model(name, pretrained=None, precision=precision, device=device)
    return model, open_clip.get_tokenizer(name)


def scoring_rate(name: str, batch: int, n_images: int, device: str, tiny: bool) -> dict:
    """CLIP image embeddings/s through the scoring stage's ``encode_images`` (bf16 weights on CUDA)."""
    import torch

    from discl_ray.models.clip import encode_images

    precision = "bf16" if device.startswith("cuda") else "fp32"
    model, _ = _clip(name, tiny, device, precision)
    model.eval()
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(n_images, 3, *size, device=device)
    sync = _sync(device)
    encode_images(model, images[:batch], batch_size=batch)         # warm-up (cuDNN/cuBLAS choice, allocator)
    sync()
    t0 = time.perf_counter()
    emb = encode_images(model, images, batch_size=batch)
    sync()
    dt = time.perf_counter() - t0
    del model
    return {"model": name, "batch": batch, "images": n_images, "dtype": precision,
            "images_per_s": round(n_images / dt, 2), "finite": bool(torch.isfinite(emb).all())}


def train_rate(model_name: str, batch: int, steps: int, device: str, tiny: bool, warmup: int = 3) -> dict:
    """Samples/s of the trainer's forward + backward + step (bf16 autocast on CUDA) and peak GPU memory."""
    import torch

    from discl_ray.training.distributed import Precision
    from discl_ray.training.losses import classification_loss, flyp_loss
    from discl_ray.training.models import ClipClassifier, class_prompts, resnet10

    _reset_peak(device)
    torch.manual_seed(0)
    flyp = model_name != "resnet10"
    if flyp:
        clip, tokenizer = _clip(model_name, tiny, device)
        prompts = class_prompts(CLASSES, "a camera trap photo of a {name}.")
        net = ClipClassifier(clip.float(), tokenizer(prompts).to(device))
        size = net.image_size
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=0.1)
    else:
        net = resnet10(len(CLASSES)).to(device)
        size = (32, 32) if tiny else (224, 224)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    prec = Precision("bf16", device)
    x = torch.randn(batch, 3, *size, device=device)
    y = torch.randint(0, len(CLASSES), (batch,), device=device)
    sync = _sync(device)
    loss = None
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            t0 = time.perf_counter()
        with prec.autocast():
            if flyp:
                img, txt, scale = net(x, flyp_labels=y)
                loss = flyp_loss(img.float(), txt.float(), scale.float())
            else:
                loss = classification_loss("ce", net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        prec.step(loss, opt)
    sync()
    dt = time.perf_counter() - t0
    out = {"model": model_name, "batch": batch, "steps": steps, "precision": "bf16" if prec.dtype else "fp32",
           "samples_per_s": round(steps * batch / dt, 2), "step_s": round(dt / steps, 4),
           "loss": round(float(loss.detach()), 4), "loss_finite": math.isfinite(float(loss.detach())), "peak_gib": _peak_gib(device)}
    del net, opt, x
    _reset_peak(device)
    return out


# -- the spectrum through the engine -------------------------------------------------------------------
def build_refiner(device: str, dtype: str, tiny: bool, work: Path):
    """An SDXL-refiner img2img pipeline (refiner UNet + VAE, bigG text tower, DDIM) with random weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from discl_ray.bench.generate_shape import REFINER_UNET, REFINER_VAE, TINY_UNET, TINY_VAE
    from discl_ray.generation.pipeline import fix_aesthetics_flag
    from discl_ray.generation.tiny import TINY_TEXT, build_clip_tokenizer

    unet_cfg = TINY_UNET if tiny else REFINER_UNET
    vae_cfg = TINY_VAE if tiny else dict(REFINER_VAE, force_upcast=True)   # the checkpoint's VAE flag
    text_cfg = dict(TINY_TEXT, projection_dim=32) if tiny else REFINER_TEXT
    torch.manual_seed(0)
    with torch.device(device):                 # allocate on the target device (no 9 GB host copy)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=text,
                                            tokenizer_2=build_clip_tokenizer(work / "tokenizer"), unet=unet,
                                            scheduler=scheduler, requires_aesthetics_score=True,
                                            force_zeros_for_empty_prompt=True)
    fix_aesthetics_flag(pipe)
    pipe = pipe.to(device, getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_items(lam: float, batch: int, settings: dict, width: int, height: int, tag: str) -> list:
    """``batch`` work items at λ: the configured seeds of as many sources as needed (seeds batched)."""
    import numpy as np
    from PIL import Image

    from discl_ray.generation.engine import WorkItem, output_key

    seeds = settings["seeds"][:batch]
    items = []
    for s in range(math.ceil(batch / len(seeds))):
        src = f"{tag}-src{s}"
        rng = np.random.default_rng(s)
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        prompt = f"a camera trap photo of a {CLASSES[s % len(CLASSES)]}."
        for seed in seeds:
            if len(items) < batch:
                items.append(WorkItem(output_key(src, lam, seed), src, lam, seed, prompt, img))
    return items


def make_engine(pipe, settings: dict, batch: int):
    from discl_ray.generation.engine import SpectrumEngine

    return SpectrumEngine(pipe, steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                          batch_size=batch, negative_prompt=settings["negative_prompt"],
                          aesthetic_score=settings["aesthetic_score"],
                          negative_aesthetic_score=settings["negative_aesthetic_score"],
                          shared_noise=settings["shared_noise"])


def sweep(engine, settings: dict, batch: int, width: int, height: int, tag: str) -> int:
    """One λ sweep: ``batch`` outputs at every λ, the way an actor's block runs (sources shared over λ)."""
    n = 0
    for lam in settings["lams"]:
        n += len(engine.generate(make_items(lam, batch, settings, width, height, tag)))
    return n


def count_flops(pipe, settings: dict, batch: int, width: int, height: int) -> float:
    """FLOPs per output of one eager λ sweep through the engine (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    engine = make_engine(pipe, settings, batch)
    with FlopCounterMode(display=False) as counter:
        n = sweep(engine, settings, batch, width, height, "flops")
    return counter.get_total_flops() / n


def spectrum_row(pipe, settings: dict, dtype: str, batch: int, compiled: bool, width: int, height: int,
                 device: str, flop_per_output: float) -> dict:
    """Warm-up call, then one timed λ sweep of ``batch`` outputs per λ through a fresh engine."""
    _reset_peak(device)
    sync = _sync(device)
    engine = make_engine(pipe, settings, batch)
    t0 = time.perf_counter()
    engine.generate(make_items(max(settings["lams"]), batch, settings, width, height, f"warm{batch}"))
    sync()
    warmup_s = time.perf_counter() - t0
    engine = make_engine(pipe, settings, batch)
    sync()
    t0 = time.perf_counter()
    n = sweep(engine, settings, batch, width, height, f"b{batch}")
    sync()
    dt = time.perf_counter() - t0
    ops = n / dt
    return {"dtype": dtype, "batch": batch, "compiled": compiled, "outputs": n, "seconds": round(dt, 3),
            "outputs_per_s": round(ops, 3), "tflops": round(flop_per_output * ops / 1e12, 3),
            "steps_run": engine.steps_run, "calls": engine.calls, "warmup_s": round(warmup_s, 2),
            "peak_gib": _peak_gib(device)}


def determinism(pipe, settings: dict, batch: int, width: int, height: int) -> dict:
    """The same keys through two fresh engines (same batch), and once more at half the batch size."""
    import numpy as np

    items = make_items(settings["lams"][0], batch, settings, width, height, "det")

    def run(b):
        return [np.asarray(img) for img in make_engine(pipe, settings, b).generate(items)]

    first, again, half = run(batch), run(batch), run(max(1, batch // 2))

    def diff(a, b):
        d = [np.abs(x.astype(np.int16) - y.astype(np.int16)) for x, y in zip(a, b)]
        return {"identical": all(int(x.max()) == 0 for x in d),
                "images_differing": sum(int(x.max() > 0) for x in d), "images": len(d),
                "pixels_differing": int(sum(int((x > 0).sum()) for x in d)),
                "max_abs_diff": int(max(int(x.max()) for x in d))}

    return {"lam": settings["lams"][0], "batch": batch, "same_keys_twice": diff(first, again),
            "half_batch": diff(first, half)}


# -- the command ----------------------------------------------------------------------------------------
def _table(result: dict) -> str:
    head = f"{'what':<34}{'dtype':>9}{'batch':>6}{'compiled':>9}{'rate/s':>10}{'TFLOP/s':>9}{'peak':>7}{'GiB':>7}"
    lines = [head, "-" * len(head)]
    peak = result.get("peak_bf16_tflops")
    s = result.get("spectrum_settings", {})
    what = f"spectrum {s.get('width')}x{s.get('height')} outputs"
    for r in result.get("spectrum", []):
        frac = f"{r['tflops'] / peak:.0%}" if peak and r.get("tflops") is not None else "-"
        lines.append(f"{what:<34}{r['dtype']:>9}{r['batch']:>6}{str(r['compiled']):>9}{r['outputs_per_s']:>10.2f}"
                     f"{r['tflops']:>9.2f}{frac:>7}{(r['peak_gib'] if r['peak_gib'] is not None else '-'):>7}")
    for r in result.get("scoring", []):
        lines.append(f"{'scoring ' + r['model'] + ' images':<34}{r['dtype']:>9}{r['batch']:>6}{'-':>9}"
                     f"{r['images_per_s']:>10.1f}{'-':>9}{'-':>7}{'-':>7}")
    for r in result.get("training", []):
        if "samples_per_s" not in r:
            lines.append(f"{'train ' + r['model']:<34}{'':>9}{r['batch']:>6}  {r.get('error', 'not run')[:60]}")
            continue
        gib = r["peak_gib"] if r["peak_gib"] is not None else "-"
        lines.append(f"{'train ' + r['model'] + ' samples':<34}{r['precision']:>9}{r['batch']:>6}{'-':>9}"
                     f"{r['samples_per_s']:>10.1f}{'-':>9}{'-':>7}{gib:>7}")
    det = result.get("determinism")
    if det:
        a, h = det["same_keys_twice"], det["half_batch"]
        lines.append(f"determinism: same keys twice {'identical' if a['identical'] else 'DIFFER'} "
                     f"({a['images_differing']}/{a['images']} images, max |Δ| {a['max_abs_diff']}); at half the "
                     f"batch {'identical' if h['identical'] else 'differ'} ({h['images_differing']}/{h['images']} "
                     f"images, {h['pixels_differing']} pixel values, max |Δ| {h['max_abs_diff']})")
    pf = result.get("peak_fraction")
    lines.append(f"device {result['device_name']}: best {result.get('outputs_per_s')} outputs/s, "
                 f"{result.get('tflops')} TFLOP/s = {('%.1f %%' % (100 * pf)) if pf is not None else 'n/a'} of "
                 f"the bf16 peak {peak} (matmul measured {result.get('matmul_tflops')}); "
                 f"{result.get('flop_per_output_tflop')} TFLOP per output; elapsed {result.get('elapsed_s')} s")
    for name, c in result.get("compile", {}).items():
        lines.append(f"compile {name}: {c}")
    for e in result.get("errors", []):
        lines.append(f"error: {e}")
    return "\n".join(lines)


def _summarise(result: dict) -> None:
    rows = [r for r in result["spectrum"] if r.get("outputs_per_s")]
    best = max(rows, key=lambda r: r["outputs_per_s"]) if rows else None
    result["outputs_per_s"] = best["outputs_per_s"] if best else None
    result["tflops"] = best["tflops"] if best else None
    result["best"] = {k: best[k] for k in ("dtype", "batch", "compiled")} if best else None
    peak = result.get("peak_bf16_tflops")
    result["peak_fraction"] = round(best["tflops"] / peak, 4) if best and peak else None
    result["train_samples_per_s"] = {r["model"]: r.get("samples_per_s") for r in result["training"]}
    det = result.get("determinism")
    result["deterministic"] = det["same_keys_twice"]["identical"] if det else None


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="discl bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="miniature architectures: the same code path in seconds")
    p.add_argument("--json", default=None, help="write the results here (rewritten after every section)")
    p.add_argument("--config", default=str(PAPER_CONFIG),
                   help="YAML whose generation: section gives λ set, seeds, steps, size (default: iWildCam's)")
    p.add_argument("--batches", default=None, help="spectrum batch sizes (default 8,16,32; tiny 2,4)")
    p.add_argument("--dtypes", default="bfloat16,float16", help="spectrum dtypes on CUDA (a CPU runs float32)")
    p.add_argument("--compile-dtypes", default="bfloat16,float16",
                   help="dtypes measured compiled as well ('' = none); each row starts only within --budget-s")
    p.add_argument("--compile-batches", default=None,
                   help="batch sizes measured compiled, largest first (default 32,16,8; tiny 2): one compile each")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: inductor's default)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; eager under --tiny: dynamo only, seconds)")
    p.add_argument("--steps", type=int, default=None, help="override the config's steps (tiny default: 10)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=450.0,
                   help=f"start a compiled row only if elapsed + its estimate ({COMPILE_ESTIMATE_S:g} s) stays under this")
    p.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak if not listed")
    p.add_argument("--skip", default="", help="comma list of sections to skip: train,score,spectrum,compile")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device, tiny = args.device, args.tiny
    if not device.startswith("cuda") and not tiny:
        print("discl bench gpu: the real architectures (a 2.3-billion-parameter UNet) need --device cuda; "
              "use --device cpu --tiny", file=sys.stderr)
        return 2
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        print("discl bench gpu: --device cuda but no CUDA device is visible (use --device cpu --tiny to check "
              "the code path)", file=sys.stderr)
        return 2
    skip = {s for s in args.skip.split(",") if s}
    cuda = device.startswith("cuda")
    settings = spectrum_settings(Path(args.config) if args.config else None)
    if tiny:
        settings["steps"] = args.steps or 10
        width, height = args.width or 32, args.height or 32
    else:
        settings["steps"] = args.steps or settings["steps"]
        width, height = args.width or settings["width"], args.height or settings["height"]
    batches = [int(b) for b in (args.batches or ("2,4" if tiny else "8,16,32")).split(",")]
    dtypes = [d for d in args.dtypes.split(",") if d] if cuda else ["float32"]
    compile_dtypes = ([d for d in args.compile_dtypes.split(",") if d] if cuda else ["float32"])
    compile_dtypes = [] if "compile" in skip else compile_dtypes
    compile_batches = sorted((int(b) for b in (args.compile_batches or ("2" if tiny else "32,16,8")).split(",")
                              if b), reverse=True)
    backend = args.compile_backend or ("eager" if tiny else "inductor")
    device_name = torch.cuda.get_device_name(torch.device(device)) if cuda else f"cpu ({platform.machine()})"
    peak = args.peak_tflops or (chip_peak(device_name) if cuda else None)

    import diffusers
    import open_clip

    from discl_ray.generation.engine import steps_for

    result: dict[str, Any] = {
        "device": device, "device_name": device_name, "tiny": tiny, "torch": torch.__version__,
        "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "open_clip": open_clip.__version__,
        "peak_bf16_tflops": peak, "matmul_tflops": None, "spectrum_settings": dict(settings, width=width, height=height),
        "steps_per_output": sum(steps_for(settings["steps"], lam) for lam in settings["lams"]) / len(settings["lams"]),
        "flop_per_output_tflop": None, "spectrum": [], "scoring": [], "training": [], "determinism": None,
        "compile": {}, "errors": [], "sections_s": {}, "outputs_per_s": None, "tflops": None,
        "peak_fraction": None, "train_samples_per_s": {}, "deterministic": None}

    def save(section: str, t0: float) -> None:
        result["sections_s"][section] = round(time.perf_counter() - t0, 2)
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        _summarise(result)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))

    def guarded(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:  # one failing section must not lose the others' numbers (OOM included)
            result["errors"].append(f"{what}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
            _reset_peak(device)
            return None

    with tempfile.TemporaryDirectory(prefix="discl-gpu-bench-") as tmp:
        work = Path(tmp)
        if tiny:
            (work / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP))
            open_clip.add_model_config(work / f"{TINY_CLIP_NAME}.json")
        t0 = time.perf_counter()
        result["matmul_tflops"] = round(matmul_tflops(device, tiny), 2)
        if not cuda:
            result["peak_bf16_tflops"] = peak = None
        save("matmul", t0)

        # 1. scoring and training (before the 6 GB pipeline exists, so peak memory is the model's own)
        if "score" not in skip:
            t0 = time.perf_counter()
            r = guarded("scoring ViT-B-32", lambda: scoring_rate("ViT-B-32", 16 if tiny else 256,
                                                                 64 if tiny else 4096, device, tiny))
            if r:
                result["scoring"].append(r)
            save("scoring", t0)
        if "train" not in skip:
            t0 = time.perf_counter()
            plan = [("ViT-B-16", 256, 10), ("ViT-L-14", 200, 5), ("resnet10", 128, 20)]
            for model, batch, steps in plan:
                if tiny:
                    batch, steps = 8, 2
                r = guarded(f"train {model}", lambda m=model, b=batch, s=steps: train_rate(m, b, s, device, tiny))
                result["training"].append(r or {"model": model, "batch": batch, "error": result["errors"][-1]})
                save("training", t0)

        # 2. the spectrum, eager
        pipe = None
        if "spectrum" not in skip:
            t0 = time.perf_counter()
            pipe = build_refiner(device, dtypes[0], tiny, work)
            result["sections_s"]["build"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            fpo = count_flops(pipe, settings, min(batches), width, height)
            result["flop_per_output_tflop"] = round(fpo / 1e12, 6)
            save("flop_count", t0)
            t0 = time.perf_counter()
            for dtype in dtypes:
                pipe.to(device, getattr(torch, dtype))
                for batch in batches:
                    r = guarded(f"spectrum {dtype} batch {batch}", lambda d=dtype, b=batch: spectrum_row(
                        pipe, settings, d, b, False, width, height, device, fpo))
                    if r:
                        result["spectrum"].append(r)
                    save("spectrum_eager", t0)

            # 3. determinism (the first dtype: the one the table's headline rows use)
            t0 = time.perf_counter()
            pipe.to(device, getattr(torch, dtypes[0]))
            result["determinism"] = determinism(pipe, settings, min(8, max(batches)), width, height)
            save("determinism", t0)

            # 4. compiled (static shapes: the UNet specialises on the batch even under dynamic=True, so each
            # (dtype, batch) is one compile), largest batch first, each only while the budget allows
            t0 = time.perf_counter()
            eager_unet = pipe.unet
            compiled_unet = torch.compile(eager_unet, dynamic=False, backend=backend, mode=args.compile_mode)
            for batch in compile_batches:
                for dtype in compile_dtypes:
                    name = f"{dtype} batch {batch}"
                    if not tiny and time.perf_counter() - t_start + COMPILE_ESTIMATE_S > args.budget_s:
                        result["compile"][name] = "skipped: would overrun --budget-s"
                        continue
                    pipe.unet = eager_unet
                    pipe.to(device, getattr(torch, dtype))
                    pipe.unet = compiled_unet
                    r = guarded(f"compiled {name}", lambda d=dtype, b=batch: spectrum_row(
                        pipe, settings, d, b, True, width, height, device, fpo))
                    if r:   # first call = compile + one warm-up call; the eager warm-up is the latter
                        result["spectrum"].append(r)
                        eager = [e["warmup_s"] for e in result["spectrum"]
                                 if not e["compiled"] and e["dtype"] == dtype and e["batch"] == batch]
                        result["compile"][name] = {
                            "backend": backend, "mode": args.compile_mode, "first_call_s": r["warmup_s"],
                            "compile_s": round(r["warmup_s"] - eager[0], 2) if eager else None}
                    save("spectrum_compiled", t0)
            pipe.unet = eager_unet
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        save("total", t_start)
    print(_table(result), flush=True)
    return 0
