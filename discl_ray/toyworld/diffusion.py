"""Training loops of the toy generator: the AutoencoderKL first, then the text-conditioned latent UNet.

Both loops are step-based (reproducible for a seed) with a wall-clock cap (``budget_s``) so the world job
keeps its time promise on a loaded machine; a capped run reports how many steps it managed."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from discl_ray.toyworld.data import TEMPLATES, caption


@dataclass
class LoopStats:
    steps: int
    planned: int
    seconds: float
    cpu_seconds: float
    final_loss: float


def one_cycle(opt, lr: float, steps: int, pct_start: float):
    """OneCycleLR that also works for smoke runs of a few steps (warm-up of at least 2 steps)."""
    pct = min(0.5, max(pct_start, 2.5 / max(steps, 1)))
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 5), pct_start=pct)


def _clock():
    return time.perf_counter(), time.process_time()


def train_vae(vae, images: torch.Tensor, steps: int = 400, batch_size: int = 64, lr: float = 2e-3,
              kl_weight: float = 1e-6, seed: int = 0, budget_s: float | None = None,
              progress: bool = True) -> LoopStats:
    """Reconstruction (MSE) + a tiny KL term, then set ``scaling_factor`` so latents have unit std.

    ``images`` are float (N, 3, S, S) in [0, 1]; the VAE sees them in [-1, 1] like SD's."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    x_all = images * 2 - 1
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = one_cycle(opt, lr, steps, 0.1)
    (w0, c0), loss_v, done = _clock(), float("nan"), 0
    vae.train()
    for _ in tqdm(range(steps), desc="toy generator: VAE", disable=not progress, leave=False):
        x = x_all[torch.randint(0, len(x_all), (batch_size,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loss_v, done = float(loss.detach()), done + 1
        if budget_s is not None and time.perf_counter() - w0 > budget_s:
            break
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(x_all[i:i + 256]).latent_dist.mean for i in range(0, len(x_all), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    w1, c1 = _clock()
    return LoopStats(done, steps, w1 - w0, c1 - c0, loss_v)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, already multiplied by the VAE's scaling factor."""
    sf = vae.config.scaling_factor
    means, stds = [], []
    for i in range(0, len(images), 256):
        d = vae.encode(images[i:i + 256] * 2 - 1).latent_dist
        means.append(d.mean * sf)
        stds.append(d.std * sf)
    return torch.cat(means), torch.cat(stds)


def caption_ids(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every (label, template) caption, shape (10, T, L), and of the empty prompt (L,)."""
    def ids(texts):
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    return torch.stack([ids([caption(c, t) for t in TEMPLATES]) for c in range(10)]), ids([""])[0]


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def train_unet(unet, text_encoder, tokenizer, scheduler, latents: tuple[torch.Tensor, torch.Tensor],
               labels: torch.Tensor, steps: int = 1200, batch_size: int = 64, lr: float = 2e-3,
               train_text: bool = False, uncond_prob: float = 0.15, ema_decay: float = 0.995, seed: int = 0,
               budget_s: float | None = None, progress: bool = True):
    """Epsilon-prediction DDPM training on VAE latents, prompts through the CLIP text encoder.

    The text encoder stays frozen (as in Stable Diffusion) unless ``train_text``; frozen, the states of the
    60 captions and the empty prompt are computed once. Classifier-free guidance: the prompt is replaced by
    the empty string with ``uncond_prob``. Returns the EMA copy of the UNet, the text encoder (its EMA copy
    when trained) and the loop stats."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mean, std = latents
    cap_ids, empty_ids = caption_ids(tokenizer)          # (10, T, L), (L,)
    n_templates = cap_ids.shape[1]
    text_encoder.requires_grad_(train_text)
    if not train_text:
        with torch.no_grad():
            text_encoder.eval()
            flat = text_encoder(torch.cat([cap_ids.flatten(0, 1), empty_ids[None]]))[0]
        cap_states, empty_states = flat[:-1].view(*cap_ids.shape[:2], *flat.shape[1:]), flat[-1]
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = one_cycle(opt, lr, steps, 0.05)
    ema_unet = copy.deepcopy(unet).eval()
    ema_text = copy.deepcopy(text_encoder).eval() if train_text else text_encoder
    alphas = scheduler.alphas_cumprod
    (w0, c0), loss_v, done = _clock(), float("nan"), 0
    unet.train()
    text_encoder.train(train_text)
    bar = tqdm(range(steps), desc="toy generator: UNet", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, len(mean), (batch_size,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        tmpl = torch.randint(0, n_templates, (batch_size,), generator=gen)
        drop = torch.rand(batch_size, generator=gen) < uncond_prob
        if train_text:
            ids = cap_ids[labels[idx], tmpl]
            ids[drop] = empty_ids
            states = text_encoder(ids)[0]
        else:
            states = cap_states[labels[idx], tmpl].clone()
            states[drop] = empty_states
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(zt, t, states).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        if train_text:
            _ema_update(ema_text, text_encoder, decay)
        loss_v, done = float(loss.detach()), done + 1
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_v:.3f}")
        if budget_s is not None and time.perf_counter() - w0 > budget_s:
            break
    w1, c1 = _clock()
    text_encoder.eval()
    return ema_unet, ema_text, LoopStats(done, steps, w1 - w0, c1 - c0, loss_v)
