"""Tiny random img2img checkpoints built offline: smoke configs, tests and the generation benchmark.

Nothing can be downloaded here, so the CLIP tokenizer is rebuilt from the BPE merges file that ships inside
open_clip (same 49,408-token vocabulary and ids as the real CLIP tokenizer), and every network is a
freshly initialised, seeded miniature of the real architecture. Two families are built:

* ``build_tiny_sd``   — Stable-Diffusion style (AutoencoderKL + UNet2DConditionModel + CLIPTextModel),
  the contract the toy-world generator follows;
* ``build_tiny_sdxl`` — an SDXL *refiner* look-alike (no first text encoder, ``text_encoder_2`` with a
  projection, aesthetic-score conditioning), the architecture of the real default checkpoint.

Both are saved with ``save_pretrained`` so they load through ``load_img2img`` exactly like hub checkpoints.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=49407, layer_norm_eps=1e-5)


def build_clip_tokenizer(out_dir: str | Path):
    """A transformers ``CLIPTokenizer`` rebuilt offline from open_clip's bundled BPE file."""
    import open_clip
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = merges[1:49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    byte_chars = list(open_clip.tokenizer.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    return CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=77)


_TOKENIZER_CACHE: list = []


def _tokenizer():
    """Build the tokenizer once per process (parsing 49k merges is the slow part of a tiny build)."""
    import copy
    import tempfile

    if not _TOKENIZER_CACHE:
        with tempfile.TemporaryDirectory() as tmp:
            _TOKENIZER_CACHE.append(build_clip_tokenizer(tmp))
    return copy.deepcopy(_TOKENIZER_CACHE[0])


def _tiny_vae(width: int = 32):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[width, 2 * width], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, norm_num_groups=width // 2, sample_size=32)


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_tiny_sd(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a random SD-style img2img pipeline (~2M parameters, 4 latent channels) to ``out_dir``."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                                in_channels=4, out_channels=4, norm_num_groups=16, cross_attention_dim=32,
                                attention_head_dim=(2, 4),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    tokenizer = _tokenizer()
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=_ddim(), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return out_dir


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0, requires_aesthetics_score: bool = True,
                    width: int = 32, text_width: int = 32) -> Path:
    """Save a random SDXL-refiner-like img2img pipeline (``text_encoder_2`` only) to ``out_dir``.

    ``projection_class_embeddings_input_dim`` = n_time_ids × 8 + text_width with n_time_ids = 5 when the
    aesthetic score is used (refiner) and 6 otherwise (base), so the saved flag matches the UNet. ``width``
    (UNet and VAE channels: width, 2·width) and ``text_width`` (the text encoder's hidden size, whose
    49,408-token embedding dominates the size) shrink it further: ``discl rehearse`` uses 8 and 8."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    n_time_ids = 5 if requires_aesthetics_score else 6
    unet = UNet2DConditionModel(block_out_channels=(width, 2 * width), layers_per_block=1, sample_size=16,
                                in_channels=4, out_channels=4, norm_num_groups=width // 2, attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                                projection_class_embeddings_input_dim=n_time_ids * 8 + text_width,
                                cross_attention_dim=text_width,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = _tiny_vae(width)
    text = {**TINY_TEXT, "hidden_size": text_width, "num_attention_heads": min(4, text_width // 2)}
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=text_width))
    tokenizer_2 = _tokenizer()
    pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, tokenizer=None,
                                            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, unet=unet,
                                            scheduler=_ddim(), requires_aesthetics_score=requires_aesthetics_score,
                                            force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(out_dir)
    return out_dir
