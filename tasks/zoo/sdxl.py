"""Tiny Stable Diffusion XL architecture: stabilityai/stable-diffusion-xl-base-1.0 and
diffusers/stable-diffusion-xl-1.0-inpainting-0.1 (unet in_channels 9).

The real SDXL layout (DownBlock2D + 2 cross-attention blocks, 2 layers per block, so InstantStyle block
scales such as `{"up": {"block_0": [0, 1, 0]}}` address existing layers), two text encoders (CLIPTextModel +
CLIPTextModelWithProjection, concatenated for cross-attention), `text_time` added conditioning with
`projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + text_encoder_2 projection_dim`, and the
EulerDiscreteScheduler. model_index.json has feature_extractor / image_encoder null as the real repo: the
image encoder comes with `load_ip_adapter` (or is passed in).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import components as c
from .sd import VAE as SD_VAE
from .tokenizer import TokenizerSpec, write_clip_tokenizer

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_INPAINT = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"

TEXT1_HIDDEN = 32  # real 768
TEXT2_HIDDEN = 48  # real 1280 (projection 1280)
CROSS_DIM = TEXT1_HIDDEN + TEXT2_HIDDEN  # real 2048
TIME_EMBED_DIM = 8  # real 256

UNET = {  # real: block_out_channels (320, 640, 1280), transformer_layers_per_block (1, 2, 10), heads (5, 10, 20)
    "sample_size": 8,  # x vae scale factor 8 = 64 px default
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (16, 32, 32),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (2, 4, 4),
    "cross_attention_dim": CROSS_DIM,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + TEXT2_HIDDEN,
    "norm_num_groups": 8,
}

VAE = {**SD_VAE, "scaling_factor": 0.13025, "force_upcast": True}  # the real SDXL VAE differs from SD1.5's here


def text_encoder_configs(tok1: TokenizerSpec, tok2: TokenizerSpec) -> tuple[dict, dict]:
    te1 = {  # real: CLIP ViT-L/14 text
        "vocab_size": tok1.vocab_size,
        "hidden_size": TEXT1_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": TEXT1_HIDDEN,
        "bos_token_id": tok1.bos_token_id,
        "eos_token_id": tok1.eos_token_id,
        "pad_token_id": tok1.pad_token_id,
    }
    te2 = {  # real: OpenCLIP ViT-bigG/14 text with projection
        "vocab_size": tok2.vocab_size,
        "hidden_size": TEXT2_HIDDEN,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": TEXT2_HIDDEN,
        "bos_token_id": tok2.bos_token_id,
        "eos_token_id": tok2.eos_token_id,
        "pad_token_id": tok2.pad_token_id,
    }
    return te1, te2


def write_sdxl_repo(
    repo_dir: Path,
    repo_id: str,
    *,
    inpainting: bool = False,
    unet_config: dict = UNET,
    vae_config: dict = VAE,
    text_encoders: Callable[[TokenizerSpec, TokenizerSpec], tuple[dict, dict]] = text_encoder_configs,
    tokenizer_pad_to: int | None = None,
    **model_kw: Any,
) -> None:
    """Write a StableDiffusionXL(Inpaint)Pipeline repo. The defaults are the tiny zoo; `full_size` passes the real
    configs with `model_kw` (std, dtype, empty)."""
    tok1 = write_clip_tokenizer(repo_dir / "tokenizer", pad_to=tokenizer_pad_to)
    tok2 = write_clip_tokenizer(repo_dir / "tokenizer_2", pad_token="!", pad_to=tokenizer_pad_to)
    te1, te2 = text_encoders(tok1, tok2)
    c.save_model(c.clip_text(te1, f"{repo_id}/text_encoder", **model_kw), repo_dir / "text_encoder")
    c.save_model(c.clip_text(te2, f"{repo_id}/text_encoder_2", with_projection=True, **model_kw),
                 repo_dir / "text_encoder_2")
    unet_config = dict(unet_config, in_channels=9) if inpainting else unet_config
    c.save_model(c.unet(unet_config, f"{repo_id}/unet", **model_kw), repo_dir / "unet")
    c.save_model(c.vae(vae_config, f"{repo_id}/vae", **model_kw), repo_dir / "vae")
    c.write_scheduler(repo_dir / "scheduler", c.EULER_SDXL)
    extra = {"force_zeros_for_empty_prompt": True}
    if inpainting:
        extra["requires_aesthetics_score"] = False
    else:
        extra["add_watermarker"] = None
    c.write_model_index(
        repo_dir,
        "StableDiffusionXLInpaintPipeline" if inpainting else "StableDiffusionXLPipeline",
        {
            "feature_extractor": None,
            "image_encoder": None,
            "scheduler": ("diffusers", "EulerDiscreteScheduler"),
            "text_encoder": ("transformers", "CLIPTextModel"),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
            "tokenizer": ("transformers", "CLIPTokenizer"),
            "tokenizer_2": ("transformers", "CLIPTokenizer"),
            "unet": ("diffusers", "UNet2DConditionModel"),
            "vae": ("diffusers", "AutoencoderKL"),
        },
        **extra,
    )
