"""Adapters around the SD1.5 architecture: AnimateDiff motion adapter, depth ControlNet, LCM-LoRA."""

from __future__ import annotations

from pathlib import Path

import torch

from . import components as c
from . import sd
from .common import seed_for

MOTION_ADAPTER = "guoyww/animatediff-motion-adapter-v1-5-2"
CONTROLNET_DEPTH = "lllyasviel/control_v11f1p_sd15_depth"
LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"

MOTION = {  # block sizes equal to the SD1.5 unet's (real: 320/640/1280/1280, 8 heads, 32 groups)
    "block_out_channels": sd.UNET["block_out_channels"],
    "motion_layers_per_block": sd.UNET["layers_per_block"],
    "motion_mid_block_layers_per_block": 1,
    "motion_num_attention_heads": 2,
    "motion_norm_num_groups": sd.UNET["norm_num_groups"],
    "motion_max_seq_length": 32,
    "use_motion_mid_block": True,
}

# 3 stride-2 convs: a control image the size of the output lands on the latent grid (VAE scale 8).
CONTROLNET_CONDITIONING_CHANNELS = (8, 16, 32, 32)  # real: (16, 32, 96, 256)

# The modules the real LCM-LoRA adapts, at a small rank.
LCM_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
]
LCM_LORA_RANK = 4


def write_motion_adapter(repo_dir: Path) -> None:
    """config.json + diffusion_pytorch_model.safetensors; 8-16 (up to 32) frames."""
    from diffusers import MotionAdapter

    c.save_model(c.finish(MotionAdapter(**MOTION), MOTION_ADAPTER), repo_dir)


def write_controlnet(repo_dir: Path) -> None:
    """`ControlNetModel.from_unet` of the SD1.5 unet, then re-initialised with its own seed, zero convs
    included, so the depth map visibly steers the output."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(
        sd.build_unet(sd.SD15_REPOS[0]),
        conditioning_embedding_out_channels=CONTROLNET_CONDITIONING_CHANNELS,
    )
    c.finish(controlnet, CONTROLNET_DEPTH)
    # The conditioning embedding is a stack of convs without norms: with a plain random init its output
    # shrinks to ~0.02 and the control image barely matters. Rescale its last conv so that a test pattern
    # (a gradient in [0, 1]) embeds at unit std, like the latents it is added to.
    embedding = controlnet.controlnet_cond_embedding
    size = 8 * sd.UNET["sample_size"]
    pattern = torch.linspace(0.0, 1.0, size).view(1, 1, 1, size).expand(1, 3, size, size)
    with torch.no_grad():
        gain = 1.0 / embedding(pattern).std().item()
        embedding.conv_out.weight.mul_(gain)
        embedding.conv_out.bias.mul_(gain)
    c.save_model(controlnet, repo_dir)


def write_lcm_lora(repo_dir: Path) -> None:
    """pytorch_lora_weights.safetensors, saved by the pipeline's `save_lora_weights(dir, unet_lora_layers=...)`
    from a PEFT-injected SD1.5 unet (converting the state dict first yields a file that loads only partly),
    with non-zero A and B so that the LoRA changes the output."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = sd.build_unet(sd.SD15_REPOS[0])
    unet.add_adapter(
        LoraConfig(r=LCM_LORA_RANK, lora_alpha=LCM_LORA_RANK, target_modules=LCM_LORA_TARGETS, init_lora_weights=False)
    )
    lora = {k: v for k, v in unet.named_parameters() if "lora_" in k}
    generator = torch.Generator().manual_seed(seed_for(LCM_LORA))
    with torch.no_grad():
        for name in sorted(lora):
            param = lora[name]
            fan_in = param[0].numel()
            # A ~ 1/sqrt(fan_in); B smaller: a clear but not overwhelming change of every adapted layer
            std = fan_in**-0.5 if "lora_A" in name else 0.5 * fan_in**-0.5
            param.copy_(torch.empty(param.shape).normal_(0.0, std, generator=generator))
    state = get_peft_model_state_dict(unet)
    repo_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(repo_dir, unet_lora_layers=state, safe_serialization=True)


__all__ = [
    "CONTROLNET_DEPTH", "LCM_LORA", "MOTION_ADAPTER",
    "write_controlnet", "write_lcm_lora", "write_motion_adapter",
]
