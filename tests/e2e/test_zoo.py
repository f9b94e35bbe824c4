"""The tiny model zoo: deterministic bytes, hub layout, HF-cache registration, and every workflow of the
IP-Adapter guide (seed/ip_adapter_guide.md) loading and running through the real diffusers API with bare hub
ids. Deviations from the guide's code, all forced by CPU / offline: torch.float16 -> torch.float32, no
`.to("cuda")`, no `enable_model_cpu_offload()`, `pipeline.vae.enable_slicing()` for the removed
`pipeline.enable_vae_slicing()`, `pipe.scheduler` (a typo in the guide) -> `pipeline.scheduler`,
`.image[0]` -> `.images[0]`, few steps at 64x64, local random images instead of URLs, and
`load_lora_weights` names its `weight_name` (offline, diffusers refuses to guess it for a hub id).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipaflow.tasks.zoo import (
    MARKER,
    ZOO_ALIASES,
    ZOO_REPOS,
    build_zoo,
    full_size_configs,
    link_into_hf_cache,
    read_marker,
)

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_INPAINT = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
IPA = "h94/IP-Adapter"
F32 = torch.float32  # the guide's torch.float16, on CPU


@pytest.fixture(scope="module", autouse=True)
def _quiet_single_thread():
    """Quiet loaders, and one torch thread: these models are too small to gain from two, and when another
    process shares the 2 cores, 2 OpenMP threads per process stall for seconds per call (measured 0.4 s
    -> 7-11 s per image)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    yield
    dlog.enable_progress_bar()
    torch.set_num_threads(threads)


def picture(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A deterministic random RGB image (stands in for the guide's downloaded images)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------- the zoo


def test_build_is_deterministic_small_and_complete(zoo_dir, tmp_path):
    start = time.perf_counter()
    second = build_zoo(tmp_path / "again")
    build_s = time.perf_counter() - start
    first_hashes, second_hashes = tree_hashes(zoo_dir), tree_hashes(second)
    assert first_hashes == second_hashes  # same bytes, file for file (marker included)
    total = sum(p.stat().st_size for p in zoo_dir.rglob("*") if p.is_file())
    assert 5e6 < total < 100e6, total
    assert build_s < 30, build_s
    for repo in ZOO_REPOS:
        assert (zoo_dir / repo).is_dir(), repo
    for alias in ZOO_ALIASES:
        assert not (zoo_dir / alias).exists()  # aliases live only in the HF cache
    names = set(first_hashes)
    for sub, stems in {
        "models": ["ip-adapter_sd15", "ip-adapter-plus_sd15", "ip-adapter-plus-face_sd15", "ip-adapter-full-face_sd15"],
        "sdxl_models": [
            "ip-adapter_sdxl", "ip-adapter_sdxl_vit-h", "ip-adapter-plus_sdxl_vit-h", "ip-adapter-plus-face_sdxl_vit-h"
        ],
    }.items():
        for stem in stems:
            for ext in ("bin", "safetensors"):
                assert f"{IPA}/{sub}/{stem}.{ext}" in names
        assert f"{IPA}/{sub}/image_encoder/config.json" in names
        assert f"{IPA}/{sub}/image_encoder/model.safetensors" in names
    for expected in [
        f"{SDXL}/unet/diffusion_pytorch_model.safetensors",
        f"{SDXL}/text_encoder_2/model.safetensors",
        f"{SDXL}/tokenizer_2/merges.txt",
        f"{SD15}/feature_extractor/preprocessor_config.json",
        "latent-consistency/lcm-lora-sdv1-5/pytorch_lora_weights.safetensors",
        "guoyww/animatediff-motion-adapter-v1-5-2/diffusion_pytorch_model.safetensors",
        "lllyasviel/control_v11f1p_sd15_depth/diffusion_pytorch_model.safetensors",
    ]:
        assert expected in names, expected


def test_second_build_is_a_fast_no_op(zoo_dir):
    marker_before = (zoo_dir / MARKER).read_bytes()
    start = time.perf_counter()
    assert build_zoo(zoo_dir) == zoo_dir
    assert time.perf_counter() - start < 1.0
    assert (zoo_dir / MARKER).read_bytes() == marker_before


def test_incomplete_zoo_is_not_trusted_and_foreign_folders_are_kept(zoo_dir, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(zoo_dir / "h94", half / "h94")
    shutil.copy(zoo_dir / MARKER, half / MARKER)
    assert read_marker(zoo_dir) is not None
    assert read_marker(half) is None  # files listed in the marker are missing
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_zoo(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_hf_cache_layout_resolves_offline(zoo_dir):
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    cache = Path(os.environ["HF_HUB_CACHE"])
    assert constants.HF_HUB_OFFLINE and Path(constants.HF_HUB_CACHE) == cache
    for repo in (*ZOO_REPOS, *ZOO_ALIASES):
        folder = cache / ("models--" + repo.replace("/", "--"))
        revision = (folder / "refs" / "main").read_text()
        assert re.fullmatch(r"[0-9a-f]{40}", revision)
        assert (folder / "snapshots" / revision).is_dir()
    path = hf_hub_download(IPA, "ip-adapter_sd15.bin", subfolder="models")
    assert Path(path).read_bytes() == (zoo_dir / IPA / "models" / "ip-adapter_sd15.bin").read_bytes()
    alias = Path(snapshot_download("runwayml/stable-diffusion-v1-5"))
    assert (alias / "model_index.json").read_bytes() == (zoo_dir / SD15 / "model_index.json").read_bytes()
    before = {p: p.read_text() for p in cache.glob("models--*/refs/main")}
    link_into_hf_cache(zoo_dir, cache)  # idempotent
    assert {p: p.read_text() for p in cache.glob("models--*/refs/main")} == before


# ------------------------------------------------------------------------------------- file formats


def test_ip_adapter_files_use_the_original_key_format(zoo_dir):
    from safetensors.torch import load_file

    models = zoo_dir / IPA
    nested = torch.load(models / "models/ip-adapter-plus_sd15.bin", weights_only=True)
    flat = load_file(models / "models/ip-adapter-plus_sd15.safetensors")
    assert set(nested) == {"image_proj", "ip_adapter"}
    assert {f"{g}.{k}" for g, d in nested.items() for k in d} == set(flat)
    assert all(torch.equal(nested[k.split(".", 1)[0]][k.split(".", 1)[1]], v) for k, v in flat.items())
    image_proj = nested["image_proj"]
    assert {int(k.split(".")[1]) for k in image_proj if k.startswith("layers.")} == {0, 1, 2, 3}
    assert image_proj["layers.0.0.to_q.weight"].shape[0] % 64 == 0
    ids = sorted({int(k.split(".")[0]) for k in nested["ip_adapter"]})
    assert ids == list(range(1, 2 * len(ids), 2)) and len(ids) == 16  # SD1.5 has 16 cross-attention layers
    assert all(v.abs().sum() > 0 for v in nested["ip_adapter"].values())
    plain = torch.load(models / "models/ip-adapter_sd15.bin", weights_only=True)["image_proj"]
    assert plain["proj.weight"].shape[0] % 4 == 0 and "norm.weight" in plain
    full = torch.load(models / "models/ip-adapter-full-face_sd15.bin", weights_only=True)["image_proj"]
    assert {"proj.0.weight", "proj.2.weight", "proj.3.weight"} <= set(full)
    vit_h = json.loads((models / "models/image_encoder/config.json").read_text())
    big_g = json.loads((models / "sdxl_models/image_encoder/config.json").read_text())
    assert vit_h["hidden_size"] != big_g["hidden_size"] and vit_h["projection_dim"] != big_g["projection_dim"]


def test_configs_say_what_the_real_repos_say(zoo_dir):
    sd_index = json.loads((zoo_dir / SD15 / "model_index.json").read_text())
    assert sd_index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    assert sd_index["safety_checker"] == [None, None] and sd_index["requires_safety_checker"] is False
    fe = json.loads((zoo_dir / SD15 / "feature_extractor/preprocessor_config.json").read_text())
    encoder = json.loads((zoo_dir / IPA / "models/image_encoder/config.json").read_text())
    assert fe["image_processor_type"] == "CLIPImageProcessor"
    assert fe["size"]["shortest_edge"] == fe["crop_size"]["height"] == encoder["image_size"]
    xl_index = json.loads((zoo_dir / SDXL / "model_index.json").read_text())
    assert xl_index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert xl_index["feature_extractor"] == [None, None] and xl_index["image_encoder"] == [None, None]
    unet = json.loads((zoo_dir / SDXL / "unet/config.json").read_text())
    te2 = json.loads((zoo_dir / SDXL / "text_encoder_2/config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
    inpaint = json.loads((zoo_dir / SDXL_INPAINT / "unet/config.json").read_text())
    assert inpaint["in_channels"] == 9


def test_tokenizer_and_text_encoder_tell_prompts_apart(zoo_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(SD15, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(SD15, subfolder="text_encoder")
    assert tokenizer.model_max_length == 77
    assert encoder.config.vocab_size == len(tokenizer)
    assert (encoder.config.bos_token_id, encoder.config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    batch = tokenizer(["a polar bear in a chair", "a cute gummy bear waving"], padding="max_length",
                      max_length=77, truncation=True, return_tensors="pt")
    ids = batch.input_ids
    assert ids[0, 0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids[0].tolist()
    assert not torch.equal(ids[0], ids[1])
    with torch.no_grad():
        hidden = encoder(ids).last_hidden_state
    assert max_diff(hidden[0], hidden[1]) > 1e-2


def test_full_size_configs_have_real_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    configs = full_size_configs()
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**configs["unet"]),
            "vae": AutoencoderKL(**configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**configs["image_encoder"])),
        }
    counts = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models.items()}
    assert 855 < counts["unet"] < 865, counts
    assert 82 < counts["vae"] < 85, counts
    assert 122 < counts["text_encoder"] < 124, counts
    assert 628 < counts["image_encoder"] < 636, counts
    text = configs["text_encoder"]
    assert text["vocab_size"] == 49408 and (text["bos_token_id"], text["eos_token_id"]) == (49406, 49407)
    assert configs["image_encoder"]["image_size"] == 224 and configs["unet"]["cross_attention_dim"] == 768


def test_full_size_sdxl_configs_have_real_parameter_counts():
    """SDXL base as the guide uses it (UNet 2.57B, CLIP ViT-L + OpenCLIP ViT-bigG text towers, the SDXL VAE) and
    the IP-Adapter encoders (ViT-H, and ViT-bigG for ip-adapter_sdxl), counted on the meta device; the adapter
    state dicts fit that UNet (70 cross-attention processors) and encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from ipaflow.tasks.zoo import full_size_sdxl_configs
    from ipaflow.tasks.zoo.full_size import SDXL_ADAPTERS
    from ipaflow.tasks.zoo.ip_adapter import adapter_state_dict, cross_attention_hidden_sizes

    configs = full_size_sdxl_configs()
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**configs["unet"]),
            "vae": AutoencoderKL(**configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**configs["image_encoder"])),
            "image_encoder_big_g": CLIPVisionModelWithProjection(CLIPVisionConfig(**configs["image_encoder_big_g"])),
        }
    counts = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models.items()}
    assert 2565 < counts["unet"] < 2570, counts
    assert 83 < counts["vae"] < 84.5, counts
    assert 122 < counts["text_encoder"] < 124, counts
    assert 693 < counts["text_encoder_2"] < 696, counts
    assert 630 < counts["image_encoder"] < 634, counts
    assert 1840 < counts["image_encoder_big_g"] < 1850, counts
    unet = configs["unet"]
    assert unet["sample_size"] * 8 == 1024 and configs["vae"]["force_upcast"]
    text2 = configs["text_encoder_2"]
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + text2["projection_dim"]
    assert unet["cross_attention_dim"] == configs["text_encoder"]["hidden_size"] + text2["hidden_size"]
    assert len(cross_attention_hidden_sizes(unet)) == 70
    stem, kind, encoder, dim, heads = SDXL_ADAPTERS[1]  # the plus adapter: Resampler of dim 1280, 20 heads
    with torch.device("meta"):
        state = adapter_state_dict(stem, kind, unet_config=unet, encoder=encoder, resampler_dim=dim,
                                   resampler_heads=heads, std=0.02)
    assert state["image_proj"]["proj_in.weight"].shape == (1280, encoder["hidden_size"])
    assert state["image_proj"]["proj_out.weight"].shape == (2048, 1280)
    assert state["ip_adapter"]["139.to_k_ip.weight"].shape[1] == 2048


# ----------------------------------------------------------------------------- the guide's workflows


@pytest.fixture(scope="module")
def sdxl_text2img(zoo_dir):
    from diffusers import AutoPipelineForText2Image

    pipeline = AutoPipelineForText2Image.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=F32)
    pipeline.load_ip_adapter("h94/IP-Adapter", subfolder="sdxl_models", weight_name="ip-adapter_sdxl.bin")
    pipeline.set_ip_adapter_scale(0.6)
    return pipeline


def _sdxl_call(pipeline, prompt="a polar bear sitting in a chair drinking a milkshake", ip=1):
    return pipeline(
        prompt=prompt,
        ip_adapter_image=picture(ip, (80, 72)),
        negative_prompt="deformed, ugly, wrong proportion, low res, bad anatomy, worst quality, low quality",
        num_inference_steps=3,
        generator=gen(0),
        output_type="np",
    ).images


def test_sdxl_text2img_ip_adapter(sdxl_text2img, tmp_path):
    from diffusers.utils import load_image

    assert type(sdxl_text2img).__name__ == "StableDiffusionXLPipeline"
    path = tmp_path / "diner.png"
    picture(1, (80, 72)).save(path)
    images = sdxl_text2img(
        prompt="a polar bear sitting in a chair drinking a milkshake",
        ip_adapter_image=load_image(str(path)),
        negative_prompt="deformed, ugly, wrong proportion, low res, bad anatomy, worst quality, low quality",
        num_inference_steps=3,
        generator=gen(0),
    ).images
    assert images[0].size == (64, 64)  # default size = unet sample_size * vae scale factor
    base = _sdxl_call(sdxl_text2img)
    assert np.isfinite(base).all() and 0.03 < base.std() < 0.45  # neither blank nor saturated
    assert max_diff(base, np.asarray(images[0]) / 255.0) < 2 / 255  # same call, same image
    assert max_diff(base, _sdxl_call(sdxl_text2img)) == 0.0  # seeded: reproducible
    assert max_diff(base, _sdxl_call(sdxl_text2img, ip=2)) > 0.02  # the IP image matters
    assert max_diff(base, _sdxl_call(sdxl_text2img, prompt="a cat on the moon")) > 0.02  # the prompt matters


def test_sdxl_image2image_ip_adapter(zoo_dir):
    from diffusers import AutoPipelineForImage2Image

    pipeline = AutoPipelineForImage2Image.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=F32)
    pipeline.load_ip_adapter("h94/IP-Adapter", subfolder="sdxl_models", weight_name="ip-adapter_sdxl.bin")
    pipeline.set_ip_adapter_scale(0.6)
    assert type(pipeline).__name__ == "StableDiffusionXLImg2ImgPipeline"
    kwargs = dict(prompt="best quality, high quality", image=picture(3), strength=0.6, num_inference_steps=4,
                  output_type="np")
    a = pipeline(ip_adapter_image=picture(4), generator=gen(4), **kwargs).images
    b = pipeline(ip_adapter_image=picture(5), generator=gen(4), **kwargs).images
    assert a.shape == (1, 64, 64, 3) and max_diff(a, b) > 0.01


def test_sdxl_inpainting_ip_adapter(zoo_dir):
    from diffusers import AutoPipelineForInpainting

    pipeline = AutoPipelineForInpainting.from_pretrained(
        "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", torch_dtype=F32
    )
    pipeline.load_ip_adapter("h94/IP-Adapter", subfolder="sdxl_models", weight_name="ip-adapter_sdxl.bin")
    pipeline.set_ip_adapter_scale(0.6)
    assert type(pipeline).__name__ == "StableDiffusionXLInpaintPipeline"
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    kwargs = dict(prompt="a cute gummy bear waving", image=picture(3), mask_image=mask, num_inference_steps=3,
                  output_type="np")
    a = pipeline(ip_adapter_image=picture(6), generator=gen(4), **kwargs).images
    b = pipeline(ip_adapter_image=picture(7), generator=gen(4), **kwargs).images
    assert a.shape == (1, 64, 64, 3) and max_diff(a, b) > 0.01


def test_animatediff_motion_adapter_ip_adapter(zoo_dir, tmp_path):
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter
    from diffusers.utils import export_to_gif

    adapter = MotionAdapter.from_pretrained("guoyww/animatediff-motion-adapter-v1-5-2", torch_dtype=F32)
    pipeline = AnimateDiffPipeline.from_pretrained("emilianJR/epiCRealism", motion_adapter=adapter, torch_dtype=F32)
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
    assert scheduler.config.beta_schedule == "linear" and scheduler.config.clip_sample is False
    output = pipeline(
        prompt="A cute gummy bear waving",
        negative_prompt="bad quality, worse quality, low resolution",
        ip_adapter_image=picture(8),
        num_frames=8,
        guidance_scale=7.5,
        num_inference_steps=2,
        generator=torch.Generator(device="cpu").manual_seed(0),
    )
    frames = output.frames[0]
    assert len(frames) == 8 and frames[0].size == (64, 64)
    assert max_diff(frames[0], frames[-1]) > 0  # frames are not copies of one image
    gif = export_to_gif(frames, str(tmp_path / "gummy_bear.gif"))
    assert Image.open(gif).n_frames == 8


@pytest.mark.parametrize("stem", ["ip-adapter-full-face_sd15", "ip-adapter-plus-face_sd15"])
def test_sd15_face_models_bin_and_safetensors(zoo_dir, stem):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    outputs = {}
    for ext in ("bin", "safetensors"):
        pipeline = StableDiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", torch_dtype=F32)
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        pipeline.load_ip_adapter("h94/IP-Adapter", subfolder="models", weight_name=f"{stem}.{ext}")
        pipeline.set_ip_adapter_scale(0.5)
        outputs[ext] = pipeline(
            prompt="A photo of Einstein as a chef, wearing an apron, cooking in a French restaurant",
            ip_adapter_image=picture(9),
            negative_prompt="lowres, bad anatomy, worst quality, low quality",
            num_inference_steps=2,
            generator=gen(26),
            output_type="np",
        ).images
    assert outputs["bin"].shape == (1, 64, 64, 3)
    assert max_diff(outputs["bin"], outputs["safetensors"]) < 1e-5  # the two files hold the same weights
    pipeline.set_ip_adapter_scale(0.0)
    no_ip = pipeline(prompt="A photo of Einstein as a chef, wearing an apron, cooking in a French restaurant",
                     ip_adapter_image=picture(9), negative_prompt="lowres, bad anatomy, worst quality, low quality",
                     num_inference_steps=2, generator=gen(26), output_type="np").images
    assert max_diff(outputs["safetensors"], no_ip) > 0.01  # the adapter has an effect


def test_sdxl_multi_ip_adapter_with_passed_image_encoder(zoo_dir):
    """The guide's multi IP-Adapter code (tests/guide.py) runs on the zoo, and every style image counts."""
    import guide

    face_image = picture(20, (96, 96))
    style_images = [picture(30 + i, (64, 80)) for i in range(3)]
    a = guide.sdxl_multi_style_face(style_images, face_image, "wonderwoman", seed=0, steps=2)
    assert a.size == (64, 64)
    b = guide.sdxl_multi_style_face(style_images[:2], face_image, "wonderwoman", seed=0, steps=2)
    assert max_diff(np.asarray(a, dtype=np.float32) / 255, np.asarray(b, dtype=np.float32) / 255) > 1e-3


@pytest.mark.parametrize("weight_name", ["ip-adapter-plus_sdxl_vit-h.safetensors", "ip-adapter_sdxl_vit-h.bin"])
def test_vit_h_sdxl_adapter_with_the_bigg_encoder_fails_loudly(zoo_dir, weight_name):
    from diffusers import AutoPipelineForText2Image

    pipeline = AutoPipelineForText2Image.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=F32)
    pipeline.load_ip_adapter("h94/IP-Adapter", subfolder="sdxl_models", weight_name=weight_name)  # loads bigG
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        pipeline(prompt="wonderwoman", ip_adapter_image=picture(1), num_inference_steps=2)


def test_lcm_lora_after_ip_adapter(zoo_dir):
    from diffusers import DiffusionPipeline, LCMScheduler
    from safetensors.torch import load_file

    model_id = "sd-dreambooth-library/herge-style"
    lcm_lora_id = "latent-consistency/lcm-lora-sdv1-5"
    pipeline = DiffusionPipeline.from_pretrained(model_id, torch_dtype=F32)
    pipeline.load_ip_adapter("h94/IP-Adapter", subfolder="models", weight_name="ip-adapter_sd15.bin")
    # Offline, diffusers cannot list a hub repo to guess the file ("When using the offline mode, you must
    # specify a `weight_name`."): name it. A local folder (the zoo path) needs no weight_name.
    pipeline.load_lora_weights(lcm_lora_id, weight_name="pytorch_lora_weights.safetensors")
    pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_ip_adapter_scale(0.4)
    file_keys = load_file(zoo_dir / lcm_lora_id / "pytorch_lora_weights.safetensors")
    lora_a = [k for k in file_keys if "lora_A" in k]
    injected = [n for n, m in pipeline.unet.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A]
    assert len(lora_a) > 50 and len(injected) == len(lora_a)  # every LoRA layer of the file is in the unet

    def run():
        return pipeline(
            prompt="herge_style woman in armor, best quality, high quality",
            ip_adapter_image=picture(10),
            num_inference_steps=4,
            guidance_scale=1,
            generator=gen(0),
            output_type="np",
        ).images

    with_lora = run()
    pipeline.disable_lora()
    without_lora = run()
    pipeline.enable_lora()
    assert with_lora.shape == (1, 64, 64, 3) and max_diff(with_lora, without_lora) > 0.02
    assert max_diff(with_lora, run()) == 0.0

    local = DiffusionPipeline.from_pretrained(model_id, torch_dtype=F32)
    local.load_lora_weights(str(zoo_dir / lcm_lora_id))  # local folder: no weight_name needed
    assert "default_0" in local.get_list_adapters()["unet"]


def test_controlnet_depth_with_ip_adapter(zoo_dir):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    controlnet_model_path = "lllyasviel/control_v11f1p_sd15_depth"
    controlnet = ControlNetModel.from_pretrained(controlnet_model_path, torch_dtype=F32)
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(
        "runwayml/stable-diffusion-v1-5", controlnet=controlnet, torch_dtype=F32
    )
    pipeline.load_ip_adapter("h94/IP-Adapter", subfolder="models", weight_name="ip-adapter_sd15.bin")
    depth_map = Image.fromarray(np.tile(np.linspace(0, 255, 64).astype(np.uint8)[:, None, None], (1, 64, 3)))

    def run(control):
        return pipeline(
            prompt="best quality, high quality",
            image=control,
            ip_adapter_image=picture(11),
            negative_prompt="monochrome, lowres, bad anatomy, worst quality, low quality",
            num_inference_steps=2,
            generator=torch.Generator(device="cpu").manual_seed(33),
            output_type="np",
        ).images

    a = run(depth_map)
    assert a.shape == (1, 64, 64, 3)
    assert max_diff(a, run(depth_map.transpose(Image.Transpose.ROTATE_90))) > 0.005  # the depth map steers
