"""The IP-Adapter guide's code, as the guide writes it, for the fidelity tests.

Deviations, all forced by the CPU test machine or by what changed upstream since the guide was written:
``torch_dtype=torch.float16`` -> ``torch.float32`` and no ``.to("cuda")`` / ``enable_model_cpu_offload()``
(CPU), ``pipeline.enable_vae_slicing()`` -> ``pipeline.vae.enable_slicing()`` (removed in diffusers 0.40),
``.image[0]`` -> ``.images[0]`` (a typo in the guide), ``pipe.scheduler`` -> ``pipeline.scheduler`` (a typo),
the LoRA's ``weight_name`` (offline mode requires it), and the tests' fewer steps / frames. Bare hub ids load the
tiny zoo through a fake offline HF cache.
"""

from __future__ import annotations

import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    ControlNetModel,
    DDIMScheduler,
    DiffusionPipeline,
    LCMScheduler,
    MotionAdapter,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from transformers import CLIPVisionModelWithProjection

DTYPE = torch.float32  # the guide's float16, on a CPU


def sdxl_text2img(image, prompt, seed, steps):
    pipeline = AutoPipelineForText2Image.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=DTYPE)
    pipeline.load_ip_adapter("h94/IP-Adapter", subfolder="sdxl_models", weight_name="ip-adapter_sdxl.bin")
    pipeline.set_ip_adapter_scale(0.6)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = pipeline(
        prompt=prompt,
        ip_adapter_image=image,
        negative_prompt="deformed, ugly, wrong proportion, low res, bad anatomy, worst quality, low quality",
        num_inference_steps=steps,
        generator=generator,
    ).images
    return images[0]


def sdxl_img2img(image, ip_image, prompt, seed, steps):
    pipeline = AutoPipelineForImage2Image.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=DTYPE)
    pipeline.load_ip_adapter("h94/IP-Adapter", subfolder="sdxl_models", weight_name="ip-adapter_sdxl.bin")
    pipeline.set_ip_adapter_scale(0.6)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = pipeline(
        prompt=prompt,
        image=image,
        ip_adapter_image=ip_image,
        generator=generator,
        strength=0.6,
        num_inference_steps=steps,
    ).images
    return images[0]


def sdxl_inpaint(image, mask_image, ip_image, prompt, seed, steps):
    pipeline = AutoPipelineForInpainting.from_pretrained("diffusers/stable-diffusion-xl-1.0-inpainting-0.1", torch_dtype=DTYPE)
    pipeline.load_ip_adapter("h94/IP-Adapter", subfolder="sdxl_models", weight_name="ip-adapter_sdxl.bin")
    pipeline.set_ip_adapter_scale(0.6)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = pipeline(
        prompt=prompt,
        image=image,
        mask_image=mask_image,
        ip_adapter_image=ip_image,
        generator=generator,
        num_inference_steps=steps,
    ).images
    return images[0]


def animatediff_video(ip_adapter_image, prompt, seed, steps, num_frames):
    adapter = MotionAdapter.from_pretrained("guoyww/animatediff-motion-adapter-v1-5-2", torch_dtype=DTYPE)
    pipeline = AnimateDiffPipeline.from_pretrained("emilianJR/epiCRealism", motion_adapter=adapter, torch_dtype=DTYPE)
    scheduler = DDIMScheduler.from_pretrained(
        "emilianJR/epiCRealism",
        subfolder="scheduler",
        clip_sample=False,
        timestep_spacing="linspace",
        beta_schedule="linear",
        steps_offset=1,
    )
    pipeline.scheduler = scheduler
    pipeline.vae.enable_slicing()
    pipeline.load_ip_adapter("h94/IP-Adapter", subfolder="models", weight_name="ip-adapter_sd15.bin")
    output = pipeline(
        prompt=prompt,
        negative_prompt="bad quality, worse quality, low resolution",
        ip_adapter_image=ip_adapter_image,
        num_frames=num_frames,
        guidance_scale=7.5,
        num_inference_steps=steps,
        generator=torch.Generator(device="cpu").manual_seed(seed),
    )
    return output.frames[0]


def sd15_face(weight_name, image, prompt, seed, steps):
    pipeline = StableDiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", torch_dtype=DTYPE)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.load_ip_adapter("h94/IP-Adapter", subfolder="models", weight_name=weight_name)
    pipeline.set_ip_adapter_scale(0.5)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    image = pipeline(
        prompt=prompt,
        ip_adapter_image=image,
        negative_prompt="lowres, bad anatomy, worst quality, low quality",
        num_inference_steps=steps,
        generator=generator,
    ).images[0]
    return image


def sdxl_multi_style_face(style_images, face_image, prompt, seed, steps, scales=(0.7, 0.3)):
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        "h94/IP-Adapter",
        subfolder="models/image_encoder",
        torch_dtype=DTYPE,
    )
    pipeline = AutoPipelineForText2Image.from_pretrained(
        "stabilityai/stable-diffusion-xl-base-1.0",
        torch_dtype=DTYPE,
        image_encoder=image_encoder,
    )
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.load_ip_adapter(
        "h94/IP-Adapter",
        subfolder="sdxl_models",
        weight_name=["ip-adapter-plus_sdxl_vit-h.safetensors", "ip-adapter-plus-face_sdxl_vit-h.safetensors"],
    )
    pipeline.set_ip_adapter_scale(list(scales))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    image = pipeline(
        prompt=prompt,
        ip_adapter_image=[style_images, face_image],
        negative_prompt="monochrome, lowres, bad anatomy, worst quality, low quality",
        num_inference_steps=steps, num_images_per_prompt=1,
        generator=generator,
    ).images[0]
    return image


def lcm_instant(ip_adapter_image, prompt, seed, steps=4):
    """The guide passes no generator here; the fidelity test passes the row's, as docs/design.md says (Fidelity)."""
    model_id = "sd-dreambooth-library/herge-style"
    lcm_lora_id = "latent-consistency/lcm-lora-sdv1-5"
    pipeline = DiffusionPipeline.from_pretrained(model_id, torch_dtype=DTYPE)
    pipeline.load_ip_adapter("h94/IP-Adapter", subfolder="models", weight_name="ip-adapter_sd15.bin")
    pipeline.load_lora_weights(lcm_lora_id, weight_name="pytorch_lora_weights.safetensors")  # offline needs the name
    pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_ip_adapter_scale(0.4)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    image = pipeline(
        prompt=prompt,
        ip_adapter_image=ip_adapter_image,
        num_inference_steps=steps,
        guidance_scale=1,
        generator=generator,
    ).images[0]
    return image


def sd15_controlnet_depth(depth_map, ip_adapter_image, seed, steps, prompt="best quality, high quality",
                          **extra):
    """``extra``: call arguments the guide leaves at their defaults (the fidelity test passes
    ``controlnet_conditioning_scale`` to check the spec field that sets it)."""
    controlnet_model_path = "lllyasviel/control_v11f1p_sd15_depth"
    controlnet = ControlNetModel.from_pretrained(controlnet_model_path, torch_dtype=DTYPE)
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(
        "runwayml/stable-diffusion-v1-5", controlnet=controlnet, torch_dtype=DTYPE)
    pipeline.load_ip_adapter("h94/IP-Adapter", subfolder="models", weight_name="ip-adapter_sd15.bin")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    image = pipeline(
        prompt=prompt,
        image=depth_map,
        ip_adapter_image=ip_adapter_image,
        negative_prompt="monochrome, lowres, bad anatomy, worst quality, low quality",
        num_inference_steps=steps,
        generator=generator,
        **extra,
    ).images[0]
    return image
