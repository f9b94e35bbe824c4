"""Shape-true mode: the real SD1.5 + IP-Adapter architecture, random weights, for GPU throughput benchmarks.

Writes `root/stable-diffusion-v1-5/stable-diffusion-v1-5` (UNet 320/640/1280/1280 with cross-attention 768,
CLIP ViT-L/14 text encoder, VAE 128/256/512/512, PNDM scheduler, 512x512 default) and
`root/h94/IP-Adapter/models/{ip-adapter_sd15.safetensors, image_encoder}` (CLIP ViT-H/14 vision tower with
projection 1024). Weights are 0.02-normal (norms 1/0), so float16 activations stay finite. Models are
constructed on the meta device and filled once, in `dtype`. The tokenizer is the zoo's offline one padded to
CLIP's 49408 ids, so `<|startoftext|>` / `<|endoftext|>` are 49406 / 49407 as in the real tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import components as c
from .build import quiet_progress_bars
from .common import normalize_permissions
from .image_encoders import write_image_encoder
from .ip_adapter import REPO as IP_REPO
from .ip_adapter import adapter_state_dict, write_adapter
from .sd import write_sd15_repo
from .tokenizer import TokenizerSpec, tokenizer_spec

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_VOCAB = 49408
INIT_STD = 0.02

UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
}

VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

VIT_H = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


def text_encoder_config(tok: TokenizerSpec) -> dict:
    """CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14)."""
    return {
        "vocab_size": tok.vocab_size,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
        "layer_norm_eps": 1e-5,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def full_size_configs() -> dict[str, dict]:
    """The configs `build_full_size_sd15` uses (for tests that count parameters on the meta device)."""
    return {
        "unet": UNET,
        "vae": VAE,
        "text_encoder": text_encoder_config(tokenizer_spec(pad_to=CLIP_VOCAB)),
        "image_encoder": VIT_H,
        "scheduler": c.PNDM_SD15,
    }


def build_full_size_sd15(root: Path | str, *, dtype: torch.dtype = torch.float16) -> Path:
    """Write the shape-true SD1.5 + IP-Adapter (plain, ViT-H) models under `root`; returns `root`."""
    root = Path(root).expanduser().absolute()
    with quiet_progress_bars():
        _write_full_size(root, dtype)
    normalize_permissions(root)
    return root


def _write_full_size(root: Path, dtype: torch.dtype) -> None:
    kw = {"std": INIT_STD, "dtype": dtype, "empty": True}
    write_sd15_repo(
        root / SD15,
        f"full-size/{SD15}",
        unet_config=UNET,
        vae_config=VAE,
        text_encoder=text_encoder_config,
        image_size=VIT_H["image_size"],
        tokenizer_pad_to=CLIP_VOCAB,
        **kw,
    )
    models = root / IP_REPO / "models"
    write_image_encoder(models / "image_encoder", VIT_H, f"full-size/{IP_REPO}/models/image_encoder", **kw)
    state = adapter_state_dict(
        "full-size/models/ip-adapter_sd15", "plain", unet_config=UNET, encoder=VIT_H, std=INIT_STD, dtype=dtype
    )
    write_adapter(models, "ip-adapter_sd15", state, bin=False)
