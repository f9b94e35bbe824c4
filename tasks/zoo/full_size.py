"""Shape-true mode: the real SD1.5 and SDXL + IP-Adapter architectures, random weights, for GPU throughput
benchmarks.

`build_full_size_sd15` writes `root/stable-diffusion-v1-5/stable-diffusion-v1-5` (UNet 320/640/1280/1280 with
cross-attention 768, CLIP ViT-L/14 text encoder, VAE 128/256/512/512, PNDM scheduler, 512x512 default) and
`root/h94/IP-Adapter/models/{ip-adapter_sd15.safetensors, image_encoder}` (CLIP ViT-H/14 vision tower with
projection 1024).

`build_full_size_sdxl` writes `root/stabilityai/stable-diffusion-xl-base-1.0` (UNet 320/640/1280 with
transformer depths 1/2/10 and cross-attention 2048, 2.57B parameters; CLIP ViT-L/14 and OpenCLIP ViT-bigG/14
text encoders; the SDXL VAE with `force_upcast`; Euler; 1024x1024 default) and, under `root/h94/IP-Adapter`,
the ViT-H encoder with `sdxl_models/ip-adapter_sdxl_vit-h` and `ip-adapter-plus_sdxl_vit-h` (the Resampler of
dim 1280, 20 heads); `big_g=True` adds `sdxl_models/image_encoder` (ViT-bigG/14, 1.8B parameters) with
`ip-adapter_sdxl`. About 8 GB in float16 (12 GB with ViT-bigG).

Weights are 0.02-normal (norms 1/0), so float16 activations stay finite. Models are constructed on the meta
device and filled once, in `dtype`. The tokenizers are the zoo's offline one padded to CLIP's 49408 ids, so
`<|startoftext|>` / `<|endoftext|>` are 49406 / 49407 as in the real tokenizers (SDXL's second pads with `!`).
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
from .sdxl import SDXL_BASE, write_sdxl_repo
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


# ------------------------------------------------------------------------------------------------ SDXL
SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0/unet/config.json
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 x 256 + 1280 (text_encoder_2's projection)
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

SDXL_VAE = {**VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

VIT_BIG_G = {  # h94/IP-Adapter/sdxl_models/image_encoder (OpenCLIP ViT-bigG/14)
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

# (file stem, kind, image encoder, resampler dim, resampler heads), under sdxl_models/
SDXL_ADAPTERS = (
    ("ip-adapter_sdxl_vit-h", "plain", VIT_H, 0, 1),
    ("ip-adapter-plus_sdxl_vit-h", "plus", VIT_H, 1280, 20),
)
SDXL_BIG_G_ADAPTER = ("ip-adapter_sdxl", "plain", VIT_BIG_G, 0, 1)


def sdxl_text_encoder_configs(tok1: TokenizerSpec, tok2: TokenizerSpec) -> tuple[dict, dict]:
    """CLIP ViT-L/14 text (as SD1.5's) and OpenCLIP ViT-bigG/14 text with a 1280 projection."""
    te2 = {
        "vocab_size": tok2.vocab_size,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 1280,
        "layer_norm_eps": 1e-5,
        "bos_token_id": tok2.bos_token_id,
        "eos_token_id": tok2.eos_token_id,
        "pad_token_id": tok2.pad_token_id,
    }
    return text_encoder_config(tok1), te2


def full_size_sdxl_configs() -> dict[str, dict]:
    """The configs `build_full_size_sdxl` uses (for tests that count parameters on the meta device)."""
    te1, te2 = sdxl_text_encoder_configs(tokenizer_spec(pad_to=CLIP_VOCAB), tokenizer_spec(pad_to=CLIP_VOCAB, pad_token="!"))
    return {
        "unet": SDXL_UNET,
        "vae": SDXL_VAE,
        "text_encoder": te1,
        "text_encoder_2": te2,
        "image_encoder": VIT_H,
        "image_encoder_big_g": VIT_BIG_G,
        "scheduler": c.EULER_SDXL,
    }


def build_full_size_sdxl(root: Path | str, *, dtype: torch.dtype = torch.float16, big_g: bool = False) -> Path:
    """Write the shape-true SDXL + IP-Adapters (ViT-H; with `big_g` also ViT-bigG) under `root`; returns `root`."""
    root = Path(root).expanduser().absolute()
    with quiet_progress_bars():
        _write_full_size_sdxl(root, dtype, big_g)
    normalize_permissions(root)
    return root


def _write_full_size_sdxl(root: Path, dtype: torch.dtype, big_g: bool) -> None:
    kw = {"std": INIT_STD, "dtype": dtype, "empty": True}
    write_sdxl_repo(root / SDXL_BASE, f"full-size/{SDXL_BASE}", unet_config=SDXL_UNET, vae_config=SDXL_VAE,
                    text_encoders=sdxl_text_encoder_configs, tokenizer_pad_to=CLIP_VOCAB, **kw)
    repo = root / IP_REPO
    if not (repo / "models" / "image_encoder" / "config.json").exists():  # shared with the full-size SD1.5
        write_image_encoder(repo / "models" / "image_encoder", VIT_H, f"full-size/{IP_REPO}/models/image_encoder", **kw)
    adapters = SDXL_ADAPTERS + ((SDXL_BIG_G_ADAPTER,) if big_g else ())
    if big_g:
        write_image_encoder(repo / "sdxl_models" / "image_encoder", VIT_BIG_G,
                            f"full-size/{IP_REPO}/sdxl_models/image_encoder", **kw)
    for stem, kind, encoder, dim, heads in adapters:
        state = adapter_state_dict(f"full-size/sdxl_models/{stem}", kind, unet_config=SDXL_UNET, encoder=encoder,
                                   resampler_dim=dim, resampler_heads=heads, std=INIT_STD, dtype=dtype)
        write_adapter(repo / "sdxl_models", stem, state, bin=False)
