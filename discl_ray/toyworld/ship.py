"""The toy world's trained models as shipped in the package (``discl_ray/assets/toyworld/``), small.

`discl world` trains for minutes on 2 cores; a newcomer's first run should not. The shipped form is the
same models, stored compactly (about 3 MB instead of 28 MB):

* every tensor in float16 (the loaders cast back to float32);
* no second copy of the text tower: the generator's text encoder *is* the toy CLIP's frozen text tower,
  so it is rebuilt at load with ``generator.text_encoder_from_clip`` (exact, tested);
* of the 49,408 × 64 token table only the rows the captions use are stored. The other rows never get a
  gradient, so AdamW's decoupled weight decay only scales them: they equal the seeded initialisation
  times one factor, which is stored (and checked at export) instead of the rows;
* the tokenizer is rebuilt from open_clip's bundled BPE, the judge is re-traced to TorchScript.

``install`` writes the usual cache layout (diffusers folder, open_clip JSON + weights, TorchScript judge),
so every stage loads the shipped models exactly like trained ones. ``export`` makes the assets from a
trained cache; ``manifest.json`` records the settings, the code version and the gates of the training run.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import torch

from discl_ray import toyworld
from discl_ray.errors import MissingInput

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toyworld"
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
TOKEN_KEY = "clip.token_embedding.weight"
# The files whose code decides what training produces (their hash is the models' code version).
_TRAINING_CODE = ("classifier.py", "clip.py", "data.py", "diffusion.py", "generator.py", "train.py")


def code_version() -> dict:
    """sha256 over the toy world's training code, plus ``git describe`` when run in a checkout."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in _TRAINING_CODE:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    out = {"toyworld_sha256": h.hexdigest()[:16]}
    try:
        git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if git.returncode == 0 and git.stdout.strip():
            out["git_describe"] = git.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def read_manifest(asset_dir: Path = ASSET_DIR) -> dict | None:
    try:
        return json.loads((Path(asset_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def available(settings: dict, asset_dir: Path = ASSET_DIR) -> bool:
    """Whether shipped models exist that were trained with exactly ``settings``."""
    man = read_manifest(asset_dir)
    return bool(man) and man.get("settings") == settings and (Path(asset_dir) / WEIGHTS).is_file()


def caption_token_ids() -> list[int]:
    """Every token id the toy world's prompts use: 6 templates × 10 digits, the DisCL prompt, the empty
    prompt, open_clip's start/end tokens and its padding id 0."""
    import open_clip

    from discl_ray.toyworld.data import TEMPLATES, caption, prompt

    texts = [caption(c, t) for c in range(10) for t in TEMPLATES] + [prompt(c) for c in range(10)] + [""]
    ids = open_clip.get_tokenizer(toyworld.TOY_CLIP)(texts)
    return sorted({int(i) for i in ids.flatten()})


def _initial_token_table(image_size: int, seed: int, tmp: Path) -> torch.Tensor:
    from discl_ray.toyworld import clip as clip_mod

    return clip_mod.build(image_size, tmp / f"{toyworld.TOY_CLIP}.json", seed).token_embedding.weight.detach()


def export(cache_dir: Path, manifest: dict, out_dir: Path = ASSET_DIR) -> dict:
    """Write the compact assets of the trained world under ``cache_dir``; returns the shipped manifest.

    Raises ValueError when the untouched token rows are not a scaled copy of the initialisation (e.g. a
    world trained with ``train_text``), since then the seed cannot stand in for them."""
    import tempfile

    from safetensors.torch import save_file

    from discl_ray.toyworld import classifier as cls_mod
    from discl_ray.toyworld import clip as clip_mod
    from discl_ray.toyworld import generator as gen_mod

    settings = manifest["settings"]
    if settings.get("train_text"):
        raise ValueError("a world trained with train_text has its own text encoder; only the frozen one ships")
    clip_model, _, _ = clip_mod.load(*toyworld.clip_files(cache_dir))
    pipe = gen_mod.load(toyworld.generator_dir(cache_dir))
    judge = cls_mod.load_torchscript(toyworld.classifier_file(cache_dir))
    tensors: dict[str, torch.Tensor] = {}
    clip_state = clip_model.state_dict()
    table = clip_state.pop("token_embedding.weight").float()
    with tempfile.TemporaryDirectory() as tmp:
        init = _initial_token_table(settings["image_size"], settings["seed"], Path(tmp))
    used = caption_token_ids()
    rest = torch.ones(len(table), dtype=torch.bool)
    rest[used] = False
    scale = float((table[rest] * init[rest]).sum() / init[rest].pow(2).sum())
    err = float((table[rest] - scale * init[rest]).abs().max())
    if err > 1e-3 * float(init.abs().max()):      # float16 storage of the cached CLIP: ~1e-4 relative
        raise ValueError(f"token rows outside the captions changed in training (max deviation {err:.2e})")
    tensors["clip.token_embedding.rows"] = table[used]
    tensors["clip.token_embedding.ids"] = torch.tensor(used, dtype=torch.int64)
    for prefix, state in (("clip.", clip_state), ("unet.", pipe.unet.state_dict()),
                          ("vae.", pipe.vae.state_dict()), ("judge.", judge.state_dict())):
        tensors.update({prefix + k: v for k, v in state.items()})
    # The generator's text encoder must be the CLIP tower (what install rebuilds): check before shipping.
    rebuilt = gen_mod.text_encoder_from_clip(clip_model).state_dict()
    for k, v in pipe.text_encoder.state_dict().items():
        if k in rebuilt and not torch.allclose(v.float(), rebuilt[k].float(), atol=1e-3):
            raise ValueError(f"generator text encoder differs from the CLIP text tower at {k}")
    tensors = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
               for k, v in tensors.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS))
    shipped = {"settings": settings, "code_version": manifest.get("code_version") or code_version(),
               "token_rows": {"stored": len(used), "untouched_scale": scale, "max_deviation": err},
               "clip_config": clip_mod.clip_config(settings["image_size"]),
               "unet_config": dict(pipe.unet.config), "vae_config": dict(pipe.vae.config),
               "judge": {"width": int(judge.state_dict()["net.0.weight"].shape[0])},
               "trained": {k: manifest.get(k) for k in ("budget_s", "timing", "params", "gates", "passed")},
               "size_mb": round((out_dir / WEIGHTS).stat().st_size / 2**20, 3)}
    (out_dir / MANIFEST).write_text(json.dumps(shipped, indent=2, default=str) + "\n", encoding="utf-8")
    return shipped


def install(cache_dir: Path, asset_dir: Path = ASSET_DIR):
    """Unpack the shipped models into ``cache_dir``'s toy-world layout; returns (pipe, judge, clip_model)
    in float32, ready for the gates."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    from discl_ray.toyworld import classifier as cls_mod
    from discl_ray.toyworld import clip as clip_mod
    from discl_ray.toyworld import generator as gen_mod

    man = read_manifest(asset_dir)
    if man is None:
        raise MissingInput(f"no shipped toy world under {asset_dir}")
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(Path(asset_dir) / WEIGHTS)).items()}
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    s = man["settings"]

    json_path, weights = toyworld.clip_files(cache_dir)
    clip_model = clip_mod.build(s["image_size"], json_path, s["seed"])     # seeded init: the untouched rows
    clip_state = part("clip.")
    table = clip_model.token_embedding.weight.detach() * man["token_rows"]["untouched_scale"]
    table[clip_state.pop("token_embedding.ids")] = clip_state.pop("token_embedding.rows")
    clip_state["token_embedding.weight"] = table
    clip_model.load_state_dict(clip_state)
    clip_model.eval()
    clip_mod.save(clip_model, weights)

    unet = UNet2DConditionModel.from_config(man["unet_config"])
    unet.load_state_dict(part("unet."))
    vae = AutoencoderKL.from_config(man["vae_config"])
    vae.load_state_dict(part("vae."))
    pipe = gen_mod.assemble(vae.eval(), unet.eval(), gen_mod.text_encoder_from_clip(clip_model),
                            gen_mod.build_tokenizer())
    gen_mod.save(pipe, toyworld.generator_dir(cache_dir))

    judge = cls_mod.DigitCNN(width=man["judge"]["width"])
    judge.load_state_dict(part("judge."))
    cls_mod.save_torchscript(judge.eval(), toyworld.classifier_file(cache_dir), s["image_size"])
    return pipe, judge.eval(), clip_model
