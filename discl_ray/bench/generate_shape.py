"""`discl bench generate --shape sdxl-refiner --device cuda`: what one GPU does with the real architecture.

Builds the SDXL-refiner UNet and VAE *architectures* with random weights (nothing is downloaded: the
throughput and FLOPs of a network do not depend on its weights) and measures, at 480×272 (latents 60×34),
for batch 8/16/32 × fp16/bf16 × eager/``torch.compile``:

* one UNet call with classifier-free guidance (batch 2B: conditional + unconditional), one VAE encode and
  one VAE decode of B images, each timed after warm-up with CUDA synchronisation;
* outputs/s = B / (steps × t_unet + t_encode + t_decode), ``steps`` = the mean denoising steps per output of
  the configured λ set (Σ int(steps·(1−λ)) / |Λ|; paper: 50 steps, Λ = {0, .1, .3, .5} → 36.5);
* FLOPs per output counted by ``torch.utils.flop_counter.FlopCounterMode`` on the eager modules, and the
  achieved TFLOP/s = FLOPs per output × outputs/s (compare with the GPU's dense bf16 peak).

``--shape tiny`` runs the same measurement with a miniature UNet/VAE so the code path is checked on a CPU.
The refiner's UNet has ~2.3 B parameters: on a CPU it is refused with a clear message.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# diffusers' published SDXL-refiner UNet and VAE configs (stabilityai/stable-diffusion-xl-refiner-1.0).
REFINER_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(384, 768, 1536, 1536), attention_head_dim=(6, 12, 24, 24),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4, cross_attention_dim=1280, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560)
REFINER_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=False)
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
    block_out_channels=(32, 64), attention_head_dim=(2, 4), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=1, cross_attention_dim=32,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=5 * 8 + 32)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), norm_num_groups=16,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SHAPES = {"sdxl-refiner": (REFINER_UNET, REFINER_VAE, 1280), "tiny": (TINY_UNET, TINY_VAE, 32)}


def mean_steps(steps: int, lams: list[float]) -> float:
    from discl_ray.generation.engine import steps_for

    return sum(steps_for(steps, lam) for lam in lams) / len(lams)


def build(shape: str, device: str, dtype):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_cfg, vae_cfg, ctx = SHAPES[shape]
    torch.manual_seed(0)
    with torch.device(device):                 # allocate on the target device directly (no 9 GB CPU copy)
        unet = UNet2DConditionModel(**unet_cfg).to(dtype).eval()
        vae = AutoencoderKL(**vae_cfg).to(dtype).eval()
    return unet, vae, ctx


def inputs(batch: int, width: int, height: int, ctx: int, proj: int, device: str, dtype):
    """UNet inputs for a CFG call (2B rows), and B images in [-1, 1] for the VAE."""
    import torch

    lat = torch.randn(2 * batch, 4, height // 8, width // 8, device=device, dtype=dtype)
    cond = dict(encoder_hidden_states=torch.randn(2 * batch, 77, ctx, device=device, dtype=dtype),
                added_cond_kwargs={"text_embeds": torch.randn(2 * batch, proj, device=device, dtype=dtype),
                                   "time_ids": torch.randn(2 * batch, 5, device=device, dtype=dtype)})
    images = torch.rand(batch, 3, height, width, device=device, dtype=dtype) * 2 - 1
    return lat, cond, images


def timed(fn, device: str, repeat: int) -> float:
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(shape: str, device: str, dtype_name: str, batch: int, compiled: bool, width: int, height: int,
            steps: float, repeat: int) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    unet, vae, ctx = build(shape, device, dtype)
    proj = unet.config.projection_class_embeddings_input_dim - 5 * unet.config.addition_time_embed_dim
    lat, cond, images = inputs(batch, width, height, ctx, proj, device, dtype)
    t = torch.tensor(500, device=device)
    with torch.inference_mode():
        run_unet = lambda m=unet: m(lat, t, **cond).sample  # noqa: E731
        run_enc = lambda m=vae: m.encode(images).latent_dist.mode()  # noqa: E731
        run_dec = lambda m=vae: m.decode(lat[:batch]).sample  # noqa: E731
        f_unet, f_enc, f_dec = flops(run_unet), flops(run_enc), flops(run_dec)
        if compiled:
            cu, cv = torch.compile(unet), torch.compile(vae)
            run_unet = lambda: cu(lat, t, **cond).sample  # noqa: E731
            run_enc = lambda: cv.encode(images).latent_dist.mode()  # noqa: E731
            run_dec = lambda: cv.decode(lat[:batch]).sample  # noqa: E731
            run_unet(), run_enc(), run_dec()              # compile outside the timed region
        t_unet, t_enc, t_dec = (timed(f, device, repeat) for f in (run_unet, run_enc, run_dec))
    per_batch_s = steps * t_unet + t_enc + t_dec
    flop_per_output = (steps * f_unet + f_enc + f_dec) / batch
    ops = batch / per_batch_s
    del unet, vae
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"shape": shape, "dtype": dtype_name, "batch": batch, "compiled": compiled, "width": width,
            "height": height, "unet_call_s": round(t_unet, 5), "vae_encode_s": round(t_enc, 5),
            "vae_decode_s": round(t_dec, 5), "outputs_per_s": round(ops, 3),
            "tflop_per_output": round(flop_per_output / 1e12, 4), "achieved_tflops": round(flop_per_output * ops / 1e12, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="discl bench generate --shape", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", default="8,16,32")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--compile", default="off,on", help="off, on or off,on")
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--height", type=int, default=272)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lams", default="0,0.1,0.3,0.5")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None)
    args, _ = p.parse_known_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("discl bench generate: --device cuda but no CUDA device is visible here", file=sys.stderr)
        return 2
    if args.shape == "sdxl-refiner" and not args.device.startswith("cuda"):
        print("discl bench generate: --shape sdxl-refiner builds a 2.3-billion-parameter UNet; it needs "
              "--device cuda (use --shape tiny to check the measurement on a CPU)", file=sys.stderr)
        return 2
    if args.width % 8 or args.height % 8:
        print("discl bench generate: --width and --height must be multiples of 8 (VAE downsampling)", file=sys.stderr)
        return 2
    steps = mean_steps(args.steps, [float(x) for x in args.lams.split(",")])
    rows = []
    print(f"{'dtype':<9}{'batch':>6}{'compiled':>9}{'UNet s':>9}{'enc s':>8}{'dec s':>8}{'out/s':>9}{'TFLOP/s':>9}")
    for dtype in args.dtypes.split(","):
        if args.device == "cpu" and dtype != "float32":
            dtype = "float32"  # half types are slow or missing on CPUs: the tiny check runs float32
        for batch in (int(b) for b in args.batches.split(",")):
            for compiled in (c == "on" for c in args.compile.split(",")):
                r = measure(args.shape, args.device, dtype, batch, compiled, args.width, args.height, steps,
                            args.repeat)
                rows.append(r)
                print(f"{dtype:<9}{batch:>6}{str(compiled):>9}{r['unet_call_s']:>9.4f}{r['vae_encode_s']:>8.4f}"
                      f"{r['vae_decode_s']:>8.4f}{r['outputs_per_s']:>9.2f}{r['achieved_tflops']:>9.2f}", flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"steps per output (mean over λ): {steps:g}; device: {device_name}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": device_name, "steps_per_output": steps, "rows": rows}, indent=1))
    return 0
