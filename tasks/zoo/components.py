"""Writers for single pipeline components (unet, vae, text / image encoders, scheduler, image processor,
model_index.json), each in the folder layout and with the file names of the hub repos."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import randomize_, seed_for, write_json

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def finish(model: nn.Module, name: str, *, std: float | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Seeded re-initialisation (seed derived from `name`), eval mode, optional dtype."""
    if dtype is not None:
        model.to(dtype)
    randomize_(model, seed_for(name), std=std)
    return model.eval()


def make(factory: Callable[[], nn.Module], name: str, *, empty: bool = False, **kw: Any) -> nn.Module:
    """Construct with `factory()` and `finish`. `empty=True` (full-size mode) constructs on the meta device
    and allocates uninitialised memory in the target dtype, skipping the default initialisers (every
    parameter is written by `finish`; a persistent buffer would not be, so that raises)."""
    if not empty:
        return finish(factory(), name, **kw)
    with torch.device("meta"):
        model = factory()
    if kw.get("dtype") is not None:
        model.to(kw["dtype"])
    model.to_empty(device="cpu")
    persistent = set(model.state_dict())
    stray = [n for n, _ in model.named_buffers() if n in persistent]
    if stray:
        raise RuntimeError(f"{name}: persistent buffers would be saved uninitialised: {stray[:5]}")
    return finish(model, name, **kw)


def save_model(model: Any, directory: Path) -> None:
    """`save_pretrained` with safetensors: diffusers writes config.json + diffusion_pytorch_model.safetensors,
    transformers config.json + model.safetensors, as in the hub repos."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)


def unet(config: dict, name: str, **kw: Any) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return make(lambda: UNet2DConditionModel(**config), name, **kw)


def vae(config: dict, name: str, **kw: Any) -> nn.Module:
    from diffusers import AutoencoderKL

    model = make(lambda: AutoencoderKL(**config), name, **kw)
    if kw.get("std") is None:
        # Tiny mode: half-scale output conv, so a random decoder fills [-1, 1] without saturating most
        # pixels and differences between conditions survive the uint8 conversion.
        with torch.no_grad():
            model.decoder.conv_out.weight.mul_(0.5)
    return model


def clip_text(config: dict, name: str, *, with_projection: bool = False, **kw: Any) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return make(lambda: cls(CLIPTextConfig(**config)), name, **kw)


def clip_vision(config: dict, name: str, **kw: Any) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return make(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**config)), name, **kw)


def write_scheduler(directory: Path, config: dict) -> None:
    """scheduler/scheduler_config.json exactly as given (the real repos' short configs)."""
    write_json(directory / "scheduler_config.json", {**config, "_diffusers_version": _diffusers_version()})


def write_feature_extractor(directory: Path, size: int) -> None:
    """A CLIP image processor config that says `CLIPImageProcessor`, as the real repos do (transformers 5
    without torchvision would save `CLIPImageProcessorPil`; it loads this file either way)."""
    write_json(
        directory / "preprocessor_config.json",
        {
            "crop_size": {"height": size, "width": size},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": CLIP_MEAN,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": CLIP_STD,
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": size},
        },
    )


def write_model_index(directory: Path, class_name: str, components: dict[str, Any], **extra: Any) -> None:
    """model_index.json: `components` maps a name to (library, class) or None (written as [null, null])."""
    index: dict[str, Any] = {"_class_name": class_name, "_diffusers_version": _diffusers_version()}
    for key, value in components.items():
        index[key] = [None, None] if value is None else list(value)
    index.update(extra)
    write_json(directory / "model_index.json", index)


# Scheduler configs as the real repos ship them.
PNDM_SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

EULER_SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
