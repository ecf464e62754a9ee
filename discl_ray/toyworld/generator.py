"""The toy text-conditioned img2img generator: a Stable-Diffusion-shaped diffusers pipeline, tiny.

Why this shape: the generation stage loads every checkpoint with
``AutoPipelineForImage2Image.from_pretrained``, so the toy model is a real ``StableDiffusionImg2ImgPipeline``
(AutoencoderKL + UNet2DConditionModel + CLIPTextModel + CLIPTokenizer + DDIM) and runs through the same code
as SDXL. Choices that made it good enough on 2 CPU cores (measured in docs/toyworld.md):

* The VAE downsamples by 4 (32 px → 8×8 latents). The digits are 8×8 images upsampled bilinearly, so an 8×8
  latent loses almost nothing and the UNet runs ~8× cheaper than at 16 px in pixel space; its decoder
  also produces smooth strokes (pixel-space samples of a first trial were speckled).
* The prompt also enters the timestep embedding (``addition_embed_type="text"``: attention-pooled text
  states), beside cross-attention, so the class signal reaches every ResNet block.
* Linear betas + trailing DDIM spacing: at strength 1.0 (λ = 0) sampling starts from t = 999 where the
  source's signal is ~0.6 % — λ = 0 really is text-only.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import torch

VAE_FACTOR = 4                       # 32 px images → 8×8 latents
LATENT_CHANNELS = 4
TEXT_MAX_LENGTH = 32                 # prompts are short; SDXL uses 77 but nothing here needs more
TRAIN_TIMESTEPS = 1000


def build_tokenizer(max_length: int = TEXT_MAX_LENGTH):
    """A transformers ``CLIPTokenizer`` rebuilt offline from the BPE file bundled with open_clip.

    The vocab is the standard CLIP one (49,408 tokens; same ids as open_clip's tokenizer) with the
    Hugging Face special-token names."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1: 49152 - 256 - 2 + 1]]
    from open_clip.tokenizer import bytes_to_unicode

    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vf, mf = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vf.write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        mf.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(str(vf), str(mf), model_max_length=max_length, pad_token="<|endoftext|>")


def text_encoder_from_clip(clip_model, max_length: int = TEXT_MAX_LENGTH):
    """The toy CLIP's text tower as a transformers ``CLIPTextModel`` (the first ``max_length`` positions).

    Stable Diffusion conditions its UNet on a frozen, contrastively pre-trained CLIP text encoder; the toy
    generator does the same with the toy CLIP's. Measured (docs/toyworld.md): a randomly initialised text
    encoder trained jointly with the UNet left λ = 0 samples recognised 23 % of the time after 900 steps; the
    toy CLIP's frozen tower reached ~50 % after 300. The attention is causal in both models, so dropping
    positions ≥ ``max_length`` leaves the states of the kept positions unchanged."""
    from transformers import CLIPTextConfig, CLIPTextModel

    blocks = clip_model.transformer.resblocks
    emb = clip_model.token_embedding.weight
    if getattr(blocks[0].mlp, "gelu", None) is not None and type(blocks[0].mlp.gelu).__name__ != "GELU":
        raise ValueError(f"text tower activation {type(blocks[0].mlp.gelu).__name__} is not GELU")
    cfg = CLIPTextConfig(vocab_size=emb.shape[0], hidden_size=emb.shape[1],
                         intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
                         num_attention_heads=blocks[0].attn.num_heads, max_position_embeddings=max_length,
                         hidden_act="gelu", projection_dim=emb.shape[1], bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407)
    state = {"embeddings.token_embedding.weight": emb,
             "embeddings.position_embedding.weight": clip_model.positional_embedding[:max_length],
             "final_layer_norm.weight": clip_model.ln_final.weight, "final_layer_norm.bias": clip_model.ln_final.bias}
    for i, b in enumerate(blocks):
        p = f"encoder.layers.{i}."
        for name, w, bias in zip("qkv", b.attn.in_proj_weight.chunk(3), b.attn.in_proj_bias.chunk(3)):
            state[p + f"self_attn.{name}_proj.weight"], state[p + f"self_attn.{name}_proj.bias"] = w, bias
        state.update({p + "self_attn.out_proj.weight": b.attn.out_proj.weight,
                      p + "self_attn.out_proj.bias": b.attn.out_proj.bias,
                      p + "layer_norm1.weight": b.ln_1.weight, p + "layer_norm1.bias": b.ln_1.bias,
                      p + "layer_norm2.weight": b.ln_2.weight, p + "layer_norm2.bias": b.ln_2.bias,
                      p + "mlp.fc1.weight": b.mlp.c_fc.weight, p + "mlp.fc1.bias": b.mlp.c_fc.bias,
                      p + "mlp.fc2.weight": b.mlp.c_proj.weight, p + "mlp.fc2.bias": b.mlp.c_proj.bias})
    model = CLIPTextModel(cfg)
    missing, unexpected = model.load_state_dict({k: v.detach().float().clone() for k, v in state.items()},
                                                strict=False)
    if unexpected or any("position_ids" not in k for k in missing):
        raise ValueError(f"toy CLIP → CLIPTextModel: missing {missing}, unexpected {unexpected}")
    return model.eval()


def build_vae(image_size: int, seed: int = 0):
    """AutoencoderKL with 3 encoder levels (downsampling ×4) and 4 latent channels (~0.3 M parameters)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                         sample_size=image_size)


def build_unet(image_size: int, text_width: int, seed: int = 0, channels=(32, 64),
               text_time: bool = True):
    """UNet over 8×8 latents: two levels, cross-attention on the prompt states in every block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=image_size // VAE_FACTOR, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=tuple(channels), layers_per_block=1, cross_attention_dim=text_width,
        attention_head_dim=8, norm_num_groups=16,
        addition_embed_type="text" if text_time else None, addition_embed_type_num_heads=2)


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, prediction_type="epsilon", clip_sample=False)


def sample_scheduler():
    """DDIM with trailing spacing (first step at t = 999, so strength 1.0 ignores the source)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, prediction_type="epsilon", clip_sample=False,
                         set_alpha_to_one=False, timestep_spacing="trailing", steps_offset=1)


def assemble(vae, unet, text_encoder, tokenizer):
    """The img2img pipeline over the trained parts (safety checker off: digits need none)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=sample_scheduler(), safety_checker=None,
                                          feature_extractor=None, image_encoder=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save(pipe, out_dir: Path) -> Path:
    """``save_pretrained`` into ``out_dir`` (safetensors), loadable by ``AutoPipelineForImage2Image``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def load(out_dir: Path):
    """Load the saved toy generator exactly as the generation stage loads any checkpoint."""
    from diffusers import AutoPipelineForImage2Image

    pipe = AutoPipelineForImage2Image.from_pretrained(str(out_dir), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
