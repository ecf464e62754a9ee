"""The toy CLIP: a 3.4 M-parameter open_clip ViT trained contrastively on world digits with captions.

Saved as an open_clip architecture JSON (``toy-clip.json``, registered with ``open_clip.add_model_config``)
plus a state dict (``toy-clip.pt``), so the scoring stage loads it exactly like a real architecture:
``add_model_config(json); create_model_and_transforms("toy-clip", pretrained=pt)``. The vocab stays at
49,408 so open_clip's bundled tokenizer works unchanged."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from discl_ray.toyworld import TOY_CLIP
from discl_ray.toyworld.data import TEMPLATES, caption


def clip_config(image_size: int) -> dict:
    """Architecture of TOYWORLD.md's trial (97.7 % zero-shot after 75 s there), at ``image_size``."""
    patch = max(2, image_size // 4)
    return {"embed_dim": 32,
            "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "head_width": 32,
                           "patch_size": patch},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def register(json_path: Path) -> None:
    """Make ``toy-clip`` known to open_clip (needs a file, not a dict)."""
    import open_clip

    open_clip.add_model_config(str(json_path))


def build(image_size: int, json_path: Path, seed: int = 0):
    import open_clip

    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(clip_config(image_size), indent=2) + "\n", encoding="utf-8")
    register(json_path)
    torch.manual_seed(seed)
    # A random init is what this asks for; open_clip warns about it on the root logger (no library logger
    # whose level could be set), so logging is muted for the duration of the call.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(TOY_CLIP, pretrained=None)
    finally:
        logging.disable(previous)


def load(json_path: Path, weights: Path):
    """(model, preprocess, tokenizer) the way the scoring stage loads it."""
    import open_clip

    register(json_path)
    model, _, preprocess = open_clip.create_model_and_transforms(TOY_CLIP, pretrained=str(weights))
    return model.eval(), preprocess, open_clip.get_tokenizer(TOY_CLIP)


def _normalize(model, images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images → the model's normalisation (open_clip's default mean/std)."""
    mean = torch.tensor(getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor(getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    return (images - mean) / std


def train_clip(model, images: torch.Tensor, labels: torch.Tensor, steps: int = 500, batch_size: int = 32,
               lr: float = 1e-3, seed: int = 0, budget_s: float | None = None, progress: bool = True) -> dict:
    """open_clip ``ClipLoss`` over (image, random-template caption) pairs; small random shifts on images."""
    import open_clip
    from tqdm.auto import tqdm

    from discl_ray.toyworld.diffusion import one_cycle

    tok = open_clip.get_tokenizer(TOY_CLIP)
    caps = torch.stack([tok([caption(c, t) for t in TEMPLATES]) for c in range(10)])  # (10, T, 77)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = one_cycle(opt, lr, steps, 0.1)
    s = images.shape[-1]
    pad = max(1, s // 16)
    w0, c0, done, loss_v = time.perf_counter(), time.process_time(), 0, float("nan")
    model.train()
    for _ in tqdm(range(steps), desc="toy CLIP", disable=not progress, leave=False):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
        x = F.pad(images[idx], (pad, pad, pad, pad))[:, :, dy:dy + s, dx:dx + s]
        text = caps[labels[idx], torch.randint(0, caps.shape[1], (batch_size,), generator=gen)]
        out = model(_normalize(model, x), text)
        if isinstance(out, dict):
            out = (out["image_features"], out["text_features"], out["logit_scale"])
        loss = loss_fn(*out[:3])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        done, loss_v = done + 1, float(loss.detach())
        if budget_s is not None and time.perf_counter() - w0 > budget_s:
            break
    model.eval()
    return {"steps": done, "planned": steps, "seconds": time.perf_counter() - w0,
            "cpu_seconds": time.process_time() - c0, "final_loss": loss_v}


@torch.no_grad()
def cosines(model, images: torch.Tensor) -> torch.Tensor:
    """Image–text cosine of every image against the 10 prompts ``a photo of the digit {name}``: (N, 10)."""
    import open_clip

    tok = open_clip.get_tokenizer(TOY_CLIP)
    t = F.normalize(model.encode_text(tok([caption(c) for c in range(10)])), dim=-1)
    feats = [F.normalize(model.encode_image(_normalize(model, images[i:i + 256])), dim=-1)
             for i in range(0, len(images), 256)]
    return torch.cat(feats) @ t.T


def zero_shot_gate(model, images: torch.Tensor, labels: torch.Tensor, min_acc: float) -> dict:
    cos = cosines(model, images)
    right = cos.gather(1, labels.view(-1, 1)).flatten()
    wrong = cos.masked_fill(F.one_hot(labels, 10).bool(), float("nan"))
    acc = float((cos.argmax(1) == labels).float().mean())
    return {"passed": acc >= min_acc, "zero_shot_acc": acc, "min_acc": min_acc, "n": int(len(labels)),
            "cos_right_mean": float(right.mean()), "cos_right_std": float(right.std()),
            "cos_wrong_mean": float(wrong.nanmean()),
            "cos_wrong_std": float((wrong - wrong.nanmean()).pow(2).nanmean().sqrt())}


def save(model, weights: Path) -> Path:
    """State dict in float16 (half the bytes; ``load_state_dict`` casts back into the float32 model)."""
    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, weights)
    return weights
