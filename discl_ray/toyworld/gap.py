"""The gap variant of the toy world: the task's real images live in another domain than the "internet".

The clean world's task images look like its pre-training data (white digits on black), so λ = 0
generations already look like real task images and DisCL's synthetic-to-real gap is absent
(docs/benchmarks.md). The gap world keeps the clean world's *prior* and teaches its models to see and keep
other looks:

* **Task look: ``blueprint``** (``discl_ray.data.looks``: white lines on textured blue paper, soft focus, noise,
  vignetting). It keeps the world's polarity (light strokes on a darker ground). The ``paper`` look (dark ink on
  light paper) was tried first: at λ ≈ 0.7 img2img blends a white-on-black digit with a dark-on-light one and the
  judge reads a third of them (docs/toyworld.md, "Gap variant").
* **Text tower: the clean world's, unchanged. UNet: the clean world's, fine-tuned at low noise only**
  (``finetune_unet``: timesteps below ``look_t_max`` = 200 see random-look latents, above it only clean ones).
  λ = 0 generations (the text decides, at high noise) are world-style digits, white on black, far from the task's
  domain; at λ 0.3-0.5 the UNet redraws the source's digit in the world's look; at λ = 0.9 the last few
  low-noise steps keep the source's look instead of pulling it towards black. Fine-tuning on looks over higher
  noise (t ≤ 400-1000) turned mid-λ images into colour mush (measured, docs/toyworld.md).
* **VAE: the clean world's, fine-tuned on random looks** of world digits (any background, any ink), like
  Stable Diffusion's autoencoder that reproduces any photo. Its clean latents are anchored to the clean
  VAE's, so the clean UNet's prior still decodes to clean digits, while a blueprint source encodes to
  latents that decode back to blueprint: high-λ img2img keeps the task's look.
* **CLIP: the clean world's, image tower fine-tuned on random looks, text tower frozen** (so the generator's
  text encoder, the CLIP text tower, stays the one the UNet was trained with). Measured on the ``paper`` look: the
  clean CLIP scores task digits *below chance* (zero-shot 1.9 %), which would make the CLIP filter drop exactly
  the real-looking high-λ images and make zero-shot mining on digits-LQ meaningless. An "internet" CLIP has seen
  every look; so does this one.
* **Judge: trained on world digits in random looks and clean.** It is the referee of "is this the prompted
  digit" across the whole spectrum, from clean λ = 0 images to blueprint high-λ images; a judge trained on
  clean digits only (measured on ``paper``: 5 %) would measure the look, not the digit. It never sees the task
  look: its held-out accuracy on task-look digits is a gate.

Neither the VAE, the UNet, the CLIP nor the judge sees the task look in training: it is the task's domain, the one
thing the "internet" lacks. ``measure_gap`` quantifies the gap per λ (linear probe real vs generated on
toy-CLIP image features, held-out rows only; image–image cosine to the source; judge recognition).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

VARIANTS = ("clean", "gap")
GAP_LAMS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
LOOK_SEED_OFFSET = 3          # discl_ray.data.toy applies the task look with dataset.seed + 3, keyed by digit id


@dataclass(frozen=True)
class GapPlan:
    """Step counts and settings of the gap world's fine-tuning (the clean world's text tower is reused).

    Chosen by prototypes on blueprint sources (docs/toyworld.md, "Gap variant"; judge by λ 0/.1/.3/.5/.7/.9):
    VAE 1,000 steps + clean UNet (5 per class, DDIM 25) 0.80/0.96/1.0/1.0/0.96/0.98, probe 0.97 → 0.85 at λ = 0.9;
    VAE 2,500 steps + UNet fine-tuned at t < 200 for 800 steps (10 per class, DDIM 50)
    0.71/0.86/1.0/0.99/0.97/0.95, probe 0.96 → 0.66."""

    looks_per_image: int = 3        # random looks drawn per world digit (plus the clean original)
    vae_steps: int = 2500           # 1,000: task-look reconstruction probe 0.75; 2,500: 0.57
    # 0 = the clean world's UNet as it is; > 0 fine-tunes it on random-look latents at low noise
    # (``finetune_unet``): share ``look_share`` at t = 0 falling to 0 at ``look_t_max``, with ``low_t_frac`` of
    # each batch drawn below ``look_t_max``. Without it, λ = 0.9 steps pull the task look towards the world's black.
    unet_steps: int = 800
    unet_lr: float = 5e-4
    clip_steps: int = 2400          # paper-look zero-shot 0.51 after 800 steps, 0.90 after 2400 (clean 0.98)
    judge_steps: int = 1200         # 300 steps: task-look judge 0.976; 1,200: 0.980 and steadier on λ = 0.9 images
    look_share: float = 1.0
    look_t_max: int = 200
    low_t_frac: float = 0.5
    gate_per_class: int = 10
    gate_ddim_steps: int = 50
    probe_splits: int = 5

    @classmethod
    def for_budget(cls, budget_s: float, full_budget_s: float = 360.0) -> "GapPlan":
        f = min(1.0, budget_s / full_budget_s)
        if f >= 1.0:
            return cls()
        full = cls()
        return cls(looks_per_image=1, vae_steps=max(10, int(full.vae_steps * f)),
                   unet_steps=max(10, int(full.unet_steps * f)) if full.unet_steps else 0,
                   clip_steps=max(10, int(full.clip_steps * f)),
                   judge_steps=max(20, int(full.judge_steps * f)),
                   gate_per_class=1 if f < 0.25 else 5, gate_ddim_steps=6 if f < 0.25 else 25, probe_splits=2)


# -- data -----------------------------------------------------------------------------------------------
def internet_pool(images: torch.Tensor, labels: torch.Tensor, looks_per_image: int, seed: int = 0):
    """World digits (float (N, 3, S, S) in [0, 1]) plus ``looks_per_image`` random looks of each:
    (images, labels, is_clean mask). The random looks are ``discl_ray.data.looks.internet_look``."""
    from discl_ray.data.looks import internet_look

    u8 = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    out = [images]
    for k in range(looks_per_image):
        looked = np.stack([internet_look(im, np.random.default_rng([seed, 7919, k, i])) for i, im in enumerate(u8)])
        out.append(torch.from_numpy(looked).permute(0, 3, 1, 2).float() / 255.0)
    x = torch.cat(out)
    y = labels.repeat(looks_per_image + 1)
    clean = torch.zeros(len(x), dtype=torch.bool)
    clean[: len(images)] = True
    return x, y, clean


def task_look(images: torch.Tensor, seed: int, world_fraction: float = 0.5, look: str = "paper") -> torch.Tensor:
    """The task half's images (as ``toyworld.data.heldout`` returns them) in ``look``, pixel for pixel as the
    digits-LT/LQ loaders show them (same seed offset, keyed by the digit's id)."""
    from discl_ray.data import toy
    from discl_ray.data.looks import apply_look

    _, task = toy._split_indices(seed, world_fraction)
    u8 = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    looked = apply_look(u8, look, seed + LOOK_SEED_OFFSET, task)
    return torch.from_numpy(np.ascontiguousarray(looked)).permute(0, 3, 1, 2).float() / 255.0


# -- fine-tuning ----------------------------------------------------------------------------------------
def freeze_text_tower(clip_model) -> None:
    """Only the image tower (``visual.*``) trains: the text tower, token table and logit scale stay the
    clean world's (the generator conditions on that tower)."""
    for name, p in clip_model.named_parameters():
        p.requires_grad_(name.startswith("visual."))


def finetune_clip(clip_model, images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int = 64,
                  lr: float = 1e-3, seed: int = 0, progress: bool = False) -> dict:
    """The clean CLIP's image tower tuned with its text tower locked (LiT-style): each image must match its
    caption (a random one of the 6 templates) against the same template's captions of the nine other digits,
    at the model's own logit scale; ±2 px shifts as in pre-training. Only ``visual.*`` changes.

    Why not the pre-training's symmetric ``ClipLoss``: with ten classes a batch holds many images of the same
    digit, which that loss treats as negatives of each other (measured: 500 steps of it left the paper look at
    8.8 % zero-shot)."""
    import open_clip
    from tqdm.auto import tqdm

    from discl_ray.toyworld import TOY_CLIP
    from discl_ray.toyworld.clip import _normalize
    from discl_ray.toyworld.data import TEMPLATES, caption
    from discl_ray.toyworld.diffusion import one_cycle

    freeze_text_tower(clip_model)
    tok = open_clip.get_tokenizer(TOY_CLIP)
    clip_model.eval()
    with torch.no_grad():
        text = clip_model.encode_text(tok([caption(c, t) for t in TEMPLATES for c in range(10)]))
        text = F.normalize(text, dim=-1).view(len(TEMPLATES), 10, -1)
        scale = float(clip_model.logit_scale.exp())
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in clip_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = one_cycle(opt, lr, steps, 0.1)
    s = images.shape[-1]
    pad = max(1, s // 16)
    w0, c0, done, loss_v = time.perf_counter(), time.process_time(), 0, float("nan")
    clip_model.visual.train()
    try:
        for _ in tqdm(range(steps), desc="gap world: CLIP image tower", disable=not progress, leave=False):
            idx = torch.randint(0, len(images), (batch_size,), generator=gen)
            dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
            x = F.pad(images[idx], (pad, pad, pad, pad))[:, :, dy:dy + s, dx:dx + s]
            t = torch.randint(0, len(TEMPLATES), (batch_size,), generator=gen)
            f = F.normalize(clip_model.encode_image(_normalize(clip_model, x)), dim=-1)
            logits = scale * torch.einsum("bd,bcd->bc", f, text[t])
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done, loss_v = done + 1, float(loss.detach())
    finally:
        clip_model.requires_grad_(True)
        clip_model.eval()
    return {"steps": done, "planned": steps, "seconds": time.perf_counter() - w0,
            "cpu_seconds": time.process_time() - c0, "final_loss": loss_v}


def finetune_vae(vae, images: torch.Tensor, clean: torch.Tensor, steps: int, batch_size: int = 32,
                 lr: float = 2e-3, anchor_weight: float = 1.0, kl_weight: float = 1e-6, seed: int = 0,
                 progress: bool = False) -> dict:
    """Fine-tune the clean VAE on ``images`` (random looks and clean, ``clean`` marks the latter; a quarter of
    each batch is clean) while the latents of clean images stay where the clean UNet learned them:
    loss = reconstruction of every image + ``anchor_weight`` · ‖μ(clean) − μ₀(clean)‖² in scaled-latent units
    (+ the usual tiny KL). ``scaling_factor`` stays the clean VAE's."""
    from tqdm.auto import tqdm

    from discl_ray.toyworld.diffusion import one_cycle

    gen = torch.Generator().manual_seed(seed)
    sf = vae.config.scaling_factor
    x_all = images * 2 - 1
    clean_idx = torch.nonzero(clean).flatten()
    look_idx = torch.nonzero(~clean).flatten()
    vae.eval()
    with torch.no_grad():
        mu0 = torch.cat([vae.encode(x_all[clean_idx[i:i + 256]]).latent_dist.mean
                         for i in range(0, len(clean_idx), 256)])
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = one_cycle(opt, lr, steps, 0.1)
    n_clean = batch_size // 4
    w0, c0, done, losses = time.perf_counter(), time.process_time(), 0, {}
    vae.train()
    for _ in tqdm(range(steps), desc="gap world: VAE", disable=not progress, leave=False):
        ci = torch.randint(0, len(clean_idx), (n_clean,), generator=gen)
        li = look_idx[torch.randint(0, len(look_idx), (batch_size - n_clean,), generator=gen)]
        x = torch.cat([x_all[clean_idx[ci]], x_all[li]])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        rec_loss = F.mse_loss(rec, x)
        anchor = F.mse_loss(post.mean[:n_clean] * sf, mu0[ci] * sf)
        loss = rec_loss + anchor_weight * anchor + kl_weight * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        done += 1
        losses = {"rec": float(rec_loss.detach()), "anchor": float(anchor.detach())}
    vae.eval()
    return {"steps": done, "planned": steps, "seconds": time.perf_counter() - w0,
            "cpu_seconds": time.process_time() - c0, "final_loss": losses}


def look_share(t: torch.Tensor, max_share: float, t_max: int) -> torch.Tensor:
    """Probability that a UNet training sample at timestep ``t`` is a random-look latent instead of a clean
    one: ``max_share`` at t = 0, falling linearly to 0 at ``t_max`` and beyond. Global appearance (colours,
    background, polarity) is decided at high noise, where the prior stays the clean world's; at low noise
    the UNet has learned to denoise any look, so high-λ img2img keeps the source's."""
    return max_share * (1.0 - t.float() / t_max).clamp(0.0, 1.0)


def finetune_unet(unet, text_encoder, tokenizer, scheduler, clean_latents, look_latents, clean_labels: torch.Tensor,
                  look_labels: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 1e-3,
                  max_share: float = 0.6, t_max: int = 600, uncond_prob: float = 0.15, ema_decay: float = 0.995,
                  low_t_frac: float = 0.0, seed: int = 0, progress: bool = False):
    """Fine-tune the clean world's UNet (epsilon prediction, frozen text tower, classifier-free dropout, EMA,
    as its pre-training) on clean latents everywhere and on random-look latents at low noise only
    (``look_share``); ``low_t_frac`` of each batch draws its timestep below ``t_max``, where the looks are.
    Returns (EMA UNet, stats)."""
    from tqdm.auto import tqdm

    from discl_ray.toyworld.diffusion import _ema_update, caption_ids, one_cycle

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cap_ids, empty_ids = caption_ids(tokenizer)
    text_encoder.requires_grad_(False)
    with torch.no_grad():
        flat = text_encoder.eval()(torch.cat([cap_ids.flatten(0, 1), empty_ids[None]]))[0]
    cap_states, empty_states = flat[:-1].view(*cap_ids.shape[:2], *flat.shape[1:]), flat[-1]
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    sched = one_cycle(opt, lr, steps, 0.1)
    ema = copy.deepcopy(unet).eval()
    alphas = scheduler.alphas_cumprod
    (cm, cs), (lm, ls) = clean_latents, look_latents
    w0, c0, done, loss_v, looks_seen = time.perf_counter(), time.process_time(), 0, float("nan"), 0
    unet.train()
    for step in tqdm(range(steps), desc="gap world: UNet", disable=not progress, leave=False):
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        low = torch.rand(batch_size, generator=gen) < low_t_frac
        t = torch.where(low, torch.randint(0, t_max, (batch_size,), generator=gen), t)
        use_look = torch.rand(batch_size, generator=gen) < look_share(t, max_share, t_max)
        ci = torch.randint(0, len(cm), (batch_size,), generator=gen)
        li = torch.randint(0, len(lm), (batch_size,), generator=gen)
        noise0 = torch.randn(cm[ci].shape, generator=gen)
        z0 = torch.where(use_look.view(-1, 1, 1, 1), lm[li] + ls[li] * noise0, cm[ci] + cs[ci] * noise0)
        labels = torch.where(use_look, look_labels[li], clean_labels[ci])
        tmpl = torch.randint(0, cap_ids.shape[1], (batch_size,), generator=gen)
        drop = torch.rand(batch_size, generator=gen) < uncond_prob
        states = cap_states[labels, tmpl].clone()
        states[drop] = empty_states
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, states).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, unet, min(ema_decay, (1 + step) / (10 + step)))
        done, loss_v, looks_seen = done + 1, float(loss.detach()), looks_seen + int(use_look.sum())
    unet.eval()
    return ema, {"steps": done, "planned": steps, "seconds": time.perf_counter() - w0,
                 "cpu_seconds": time.process_time() - c0, "final_loss": loss_v,
                 "look_share_seen": looks_seen / max(1, done * batch_size)}


@torch.no_grad()
def vae_report(vae, vae0, clean: torch.Tensor, looked: torch.Tensor) -> dict:
    """Reconstruction MSE (pixels in [0, 1]) of clean and ``looked`` (task-look) images, and how far the
    clean latents moved from the clean VAE's (relative to their std)."""
    sf = vae.config.scaling_factor

    def rec(model, x):
        return model.decode(model.encode(x * 2 - 1).latent_dist.mean).sample.add(1).div(2).clamp(0, 1)

    mu = vae.encode(clean * 2 - 1).latent_dist.mean * sf
    mu0 = vae0.encode(clean * 2 - 1).latent_dist.mean * sf
    return {"rec_mse_clean": float(F.mse_loss(rec(vae, clean), clean)),
            "rec_mse_task_look": float(F.mse_loss(rec(vae, looked), looked)),
            "rec_mse_task_look_clean_vae": float(F.mse_loss(rec(vae0, looked), looked)),
            "clean_latent_shift": float((mu - mu0).pow(2).mean().sqrt() / mu0.std())}


# -- the gap measurements -------------------------------------------------------------------------------
def probe_split(n_groups: int, train_frac: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (train, held-out) group indices: a random ``train_frac`` of ``range(n_groups)`` and the rest.
    A group is one source image: its real image and its generation always land on the same side."""
    if n_groups < 2:
        raise ValueError(f"a probe needs at least 2 sources to split (got {n_groups})")
    perm = torch.randperm(n_groups, generator=torch.Generator().manual_seed(seed))
    k = min(n_groups - 1, max(1, int(round(n_groups * train_frac))))
    return perm[:k].sort().values, perm[k:].sort().values


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, iters: int = 50) -> torch.nn.Linear:
    """L2-regularised logistic regression of 0/1 targets ``y`` on features ``x`` (N, D), fitted by Newton's
    method (IRLS; a few milliseconds, deterministic) on features standardised with the *training* rows'
    statistics; the returned layer takes raw features (the standardisation is folded in)."""
    xd, yd = x.double(), y.double()
    mean, std = xd.mean(0), xd.std(0).clamp_min(1e-6)
    design = torch.cat([(xd - mean) / std, torch.ones(len(xd), 1, dtype=torch.float64)], dim=1)
    n, k = design.shape
    reg = torch.full((k,), l2, dtype=torch.float64)
    reg[-1] = 0.0                                   # no penalty on the bias
    w = torch.zeros(k, dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(design @ w)
        grad = design.T @ (p - yd) / n + reg * w
        hess = (design.T * (p * (1 - p))) @ design / n + torch.diag(reg) + 1e-9 * torch.eye(k, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        w -= step
        if float(step.abs().max()) < 1e-8:
            break
    layer = torch.nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        coef = w[:-1] / std
        layer.weight.copy_(coef.view(1, -1).to(layer.weight.dtype))
        layer.bias.copy_((w[-1] - (coef * mean).sum()).view(1).to(layer.bias.dtype))
    return layer.eval()


@torch.no_grad()
def probe_accuracy(real: torch.Tensor, generated: torch.Tensor, splits: int = 5, train_frac: float = 0.5,
                   seed: int = 0) -> dict:
    """How well a linear probe tells real from generated images apart, on *held-out* sources only.

    ``real[i]`` and ``generated[i]`` are features of source i and of its generation. Each of ``splits``
    random splits trains the probe on the rows of the training sources and scores it on the rows of the
    others (never seen by the probe); the result is the mean held-out accuracy (0.5 = indistinguishable)."""
    if real.shape != generated.shape:
        raise ValueError(f"real {tuple(real.shape)} and generated {tuple(generated.shape)} features differ in shape")
    accs = []
    n_test = 0
    for s in range(splits):
        tr, te = probe_split(len(real), train_frac, seed + s)
        x_tr = torch.cat([real[tr], generated[tr]])
        y_tr = torch.cat([torch.ones(len(tr)), torch.zeros(len(tr))])
        probe = fit_linear_probe(x_tr, y_tr)
        x_te = torch.cat([real[te], generated[te]])
        y_te = torch.cat([torch.ones(len(te)), torch.zeros(len(te))])
        accs.append(float(((probe(x_te).flatten() > 0).float() == y_te).float().mean()))
        n_test = len(x_te)
    t = torch.tensor(accs)
    return {"acc": float(t.mean()), "std": float(t.std()) if len(t) > 1 else 0.0, "splits": splits,
            "n_heldout": n_test}


@torch.no_grad()
def image_features(clip_model, images: torch.Tensor, space: str = "pooled") -> torch.Tensor:
    """Toy-CLIP image features of [0, 1] images: ``pooled`` = the image tower's pooled output before the
    projection into the text space (where linear probes of CLIP are usually fitted), ``embedding`` = the
    L2-normalised image embedding the scoring stage compares with text."""
    from discl_ray.toyworld.clip import _normalize

    v = clip_model.visual
    out = []
    for i in range(0, len(images), 256):
        x = _normalize(clip_model, images[i:i + 256])
        if space == "pooled":
            out.append(v._pool(v.transformer(v._embeds(x)))[0])
        elif space == "embedding":
            out.append(F.normalize(clip_model.encode_image(x), dim=-1))
        else:
            raise ValueError(f"feature space {space!r}: choose pooled or embedding")
    return torch.cat(out)


def measure_gap(clip_model, judge, sources: torch.Tensor, labels: torch.Tensor, samples: dict,
                splits: int = 5, seed: int = 0) -> dict:
    """Per λ (``samples``: λ → generations of ``sources`` prompted with ``labels``):

    * ``probe_acc`` — held-out accuracy of a linear probe separating the real sources from their generations
      on the toy CLIP's pooled image features (``probe_accuracy``; 0.5 = indistinguishable), with
      ``probe_acc_std`` over the splits and ``probe_acc_embedding`` on the normalised image embedding;
    * ``image_cos`` — mean image–image cosine (toy-CLIP embeddings) of each generation to its source;
    * ``judge_acc`` — the judge's recognition rate of the prompted class."""
    from discl_ray.toyworld.classifier import predict

    real = image_features(clip_model, sources, "pooled")
    real_emb = image_features(clip_model, sources, "embedding")
    out = {}
    for lam, gen in sorted(samples.items()):
        feats, emb = image_features(clip_model, gen, "pooled"), image_features(clip_model, gen, "embedding")
        probe = probe_accuracy(real, feats, splits=splits, seed=seed)
        out[f"{lam:g}"] = {"probe_acc": probe["acc"], "probe_acc_std": probe["std"],
                           "probe_heldout_rows": probe["n_heldout"],
                           "probe_acc_embedding": probe_accuracy(real_emb, emb, splits=splits, seed=seed)["acc"],
                           "image_cos": float((real_emb * emb).sum(1).mean()),
                           "judge_acc": float((predict(judge, gen) == labels).float().mean()),
                           "n": int(len(gen))}
    return out
