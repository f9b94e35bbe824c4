"""The two tiny CLIP image encoders of h94/IP-Adapter.

`models/image_encoder` stands for OpenCLIP ViT-H/14 and `sdxl_models/image_encoder` for ViT-bigG/14. They get
different hidden sizes and projection dims, so pairing an adapter with the wrong encoder fails loudly (a shape
error), as it does with the real weights.
"""

from __future__ import annotations

from pathlib import Path

from .components import clip_vision, save_model

VIT_H = {  # real: hidden 1280, 32 layers, 16 heads, intermediate 5120, patch 14, image 224, projection 1024
    "hidden_size": 40,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 24,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

BIG_G = {  # real: hidden 1664, 48 layers, 16 heads, intermediate 8192, patch 14, image 224, projection 1280
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 36,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


def write_image_encoder(directory: Path, config: dict, name: str, **kw) -> None:
    """config.json + model.safetensors of a CLIPVisionModelWithProjection."""
    save_model(clip_vision(config, name, **kw), directory)
