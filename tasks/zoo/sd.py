"""Tiny Stable Diffusion 1.5 architecture: stable-diffusion-v1-5, epiCRealism, herge-style.

The real SD1.5 layout (4 unet blocks, 3 with cross-attention, 2 layers each: 16 cross-attention processors)
at a small width, so the SD1.5 IP-Adapters, the AnimateDiff motion adapter, the depth ControlNet and the
LCM-LoRA of the zoo fit every SD1.5-architecture repo.

The repos ship no safety checker: model_index.json says `safety_checker: [null, null]` and
`requires_safety_checker: false` (the real SD1.5 repo ships StableDiffusionSafetyChecker, which would only
blank random images here). The feature extractor's size equals the IP-Adapter image encoder's image_size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import components as c
from .image_encoders import VIT_H
from .tokenizer import TokenizerSpec, write_clip_tokenizer

SD15_REPOS = (
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "emilianJR/epiCRealism",
    "sd-dreambooth-library/herge-style",
)

# cross-attention width = text encoder hidden size (real: 768)
TEXT_HIDDEN = 32

UNET = {  # real: block_out_channels (320, 640, 1280, 1280), attention_head_dim 8, cross_attention_dim 768
    "sample_size": 8,  # x vae scale factor 8 = 64 px default
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (16, 32, 32, 32),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": TEXT_HIDDEN,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}

VAE = {  # real: block_out_channels (128, 256, 512, 512), 2 layers per block
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (8, 16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}


def text_encoder_config(tok: TokenizerSpec) -> dict:
    return {  # real: CLIP ViT-L/14 text, hidden 768, 12 layers, 12 heads
        "vocab_size": tok.vocab_size,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": TEXT_HIDDEN,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def build_unet(repo_id: str):
    """The SD1.5-architecture unet of `repo_id` (also used for the ControlNet, motion adapter and LoRA)."""
    return c.unet(UNET, f"{repo_id}/unet")


def write_sd15_repo(
    repo_dir: Path,
    repo_id: str,
    *,
    scheduler: dict = c.PNDM_SD15,
    unet_config: dict = UNET,
    vae_config: dict = VAE,
    text_encoder: Callable[[TokenizerSpec], dict] = text_encoder_config,
    image_size: int = VIT_H["image_size"],
    tokenizer_pad_to: int | None = None,
    **model_kw: Any,
) -> None:
    """Write a StableDiffusionPipeline repo. The defaults are the tiny zoo; `full_size` passes the real
    configs with `model_kw` (std, dtype, empty)."""
    tok = write_clip_tokenizer(repo_dir / "tokenizer", pad_to=tokenizer_pad_to)
    text_model = c.clip_text(text_encoder(tok), f"{repo_id}/text_encoder", **model_kw)
    c.save_model(text_model, repo_dir / "text_encoder")
    del text_model
    c.save_model(c.unet(unet_config, f"{repo_id}/unet", **model_kw), repo_dir / "unet")
    c.save_model(c.vae(vae_config, f"{repo_id}/vae", **model_kw), repo_dir / "vae")
    c.write_scheduler(repo_dir / "scheduler", scheduler)
    c.write_feature_extractor(repo_dir / "feature_extractor", image_size)
    c.write_model_index(
        repo_dir,
        "StableDiffusionPipeline",
        {
            "feature_extractor": ("transformers", "CLIPImageProcessor"),
            "image_encoder": None,
            "safety_checker": None,
            "scheduler": ("diffusers", scheduler["_class_name"]),
            "text_encoder": ("transformers", "CLIPTextModel"),
            "tokenizer": ("transformers", "CLIPTokenizer"),
            "unet": ("diffusers", "UNet2DConditionModel"),
            "vae": ("diffusers", "AutoencoderKL"),
        },
        requires_safety_checker=False,
    )


__all__ = ["SD15_REPOS", "UNET", "VAE", "build_unet", "text_encoder_config", "write_sd15_repo"]
