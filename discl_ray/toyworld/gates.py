"""Quality gates of the toy world, measured on held-out digits (the task half, never trained on).

* generator: λ = 0 generations (strength 1.0) at the toy guidance are recognised as the prompted digit by
  the world classifier ≥ ``MIN_TEXT_ACC``; agreement with the source's class rises with λ.
* CLIP: zero-shot accuracy with prompts ``a photo of the digit {name}`` ≥ ``MIN_CLIP_ACC``.

Each gate returns a plain dict (JSON-ready) with ``passed`` and the numbers behind it."""

from __future__ import annotations

import torch

from discl_ray.toyworld.data import prompt

MIN_TEXT_ACC = 0.60
MIN_CLIP_ACC = 0.90
GATE_LAMS = (0.0, 0.3, 0.5, 0.7, 0.9)
TOY_GUIDANCE = 3.0
MONOTONE_SLACK = 0.03        # sampling noise allowed between neighbouring λ (≈ 3 of 100 images)


def strength(lam: float) -> float:
    """strength = 1 − λ, rounded (1 − 0.9 = 0.0999… would run zero DDIM steps and crash)."""
    return round(1.0 - lam, 6)


@torch.no_grad()
def generate(pipe, sources: torch.Tensor, labels: torch.Tensor, lam: float, guidance: float = TOY_GUIDANCE,
             steps: int = 50, seed: int = 0, batch_size: int = 50) -> torch.Tensor:
    """img2img of ``sources`` (float (N, 3, S, S) in [0, 1]) prompted with their ``labels``; returns [0, 1]."""
    s = strength(lam)
    while int(steps * s) < 1:      # diffusers runs int(steps × strength) steps: never zero
        steps += 1
    out = []
    for i in range(0, len(sources), batch_size):
        src, lab = sources[i:i + batch_size], labels[i:i + batch_size]
        gens = [torch.Generator().manual_seed(seed * 100_003 + i + k) for k in range(len(src))]
        res = pipe(prompt=[prompt(int(c)) for c in lab], image=src, strength=s,
                   guidance_scale=guidance, num_inference_steps=steps, generator=gens, output_type="pt")
        out.append(res.images.float().clamp(0, 1))
    return torch.cat(out)


def agreement_rises(vals: list[float]) -> bool:
    """Each λ step may dip by at most ``MONOTONE_SLACK`` and the last beats the first. Compared with a
    tolerance: accuracies are image counts / n, so a dip of exactly 3 of 100 images (0.97 → 0.94) must pass,
    which 0.94 >= 0.97 - 0.03 does not in floating point."""
    eps = 1e-6
    return (all(b >= a - MONOTONE_SLACK - eps for a, b in zip(vals, vals[1:]))
            and vals[-1] > vals[0] + eps)


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``per_class`` images of every class (deterministic for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(10):
        pool = torch.nonzero(labels == c).flatten()
        idx.append(pool[torch.randperm(len(pool), generator=gen)[:per_class]])
    return torch.cat(idx)


def generator_gate(pipe, judge, images: torch.Tensor, labels: torch.Tensor, per_class: int = 10,
                   lams=GATE_LAMS, guidance: float = TOY_GUIDANCE, steps: int = 50, seed: int = 0,
                   keep_images: bool = False) -> dict:
    """Judge accuracy against the prompted (= source) class per λ, plus a λ = 0 run with *shifted* prompts
    (class c + 1 on a class-c source): it shows the text, not the source, decides the digit at λ = 0."""
    from discl_ray.toyworld.classifier import predict

    idx = balanced_subset(labels, per_class, seed)
    src, lab = images[idx], labels[idx]
    acc, samples = {}, {}
    for lam in lams:
        gen = generate(pipe, src, lab, lam, guidance, steps, seed)
        acc[f"{lam:g}"] = float((predict(judge, gen) == lab).float().mean())
        if keep_images:
            samples[lam] = gen
    shifted = (lab + 1) % 10
    gen = generate(pipe, src, shifted, 0.0, guidance, steps, seed + 1)
    text_only = float((predict(judge, gen) == shifted).float().mean())
    vals = [acc[f"{lam:g}"] for lam in lams]
    rising = agreement_rises(vals)
    result = {"passed": bool(vals[0] >= MIN_TEXT_ACC and rising), "lam0_acc": vals[0],
              "min_lam0_acc": MIN_TEXT_ACC, "agreement_rises": bool(rising), "acc_by_lam": acc,
              "lam0_shifted_prompt_acc": text_only, "guidance": guidance, "steps": steps,
              "n_per_lam": int(len(idx))}
    if keep_images:
        result["_samples"] = (samples, src, lab)
    return result


def classifier_report(judge, images: torch.Tensor, labels: torch.Tensor) -> dict:
    from discl_ray.toyworld.classifier import predict

    return {"heldout_acc": float((predict(judge, images) == labels).float().mean()), "n": int(len(labels))}
