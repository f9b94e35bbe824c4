"""The CPU-measurable figures of the performance page (docs/performance.md, "Where a row's work is"): where a row's work is,
and what turning a decoded batch into PIL images costs on the host.

1. FLOPs per row, counted with ``torch.utils.flop_counter.FlopCounterMode`` on PyTorch's meta device: the models
   are built from the shape-true configs of ``ipaflow.tasks.zoo.full_size`` under ``torch.device("meta")`` (no
   weights, no memory, no compute) and called once at the real shapes. Attention on the meta device decomposes
   into matmuls, which the counter sees.
   - SD1.5 at 512x512, 25 steps with classifier-free guidance: the UNet on a batch of 2 (64x64 latents, 77 text
     tokens of 768) x 25; the VAE decode of one 64x64 latent; the CLIP ViT-L text encoder on 2 prompts
     (prompt and negative prompt, 77 tokens each).
   - SDXL at 1024x1024, 30 steps with guidance: the UNet on a batch of 2 (128x128 latents, 77 tokens of 2048,
     SDXL's added text/time conditioning) x 30; the VAE decode of one 128x128 latent in float32 (its VAE's
     ``force_upcast``; FLOPs do not depend on the dtype); both text encoders on 2 prompts each.
   Shares are of UNet + decode + text encoder(s). The UNets are counted without the IP-Adapter's extra
   cross-attention (4 or 16 image tokens next to 77 text tokens). The IP-Adapter image encoder (CLIP ViT-H/14,
   one 224x224 image) is listed apart: ipaflow encodes each distinct image prompt once, not once per row.

2. Host cost per 512x512 image of turning a decoded batch into PIL images, one torch thread, from the tensor both
   paths start from (images in [0, 1]: ``VaeImageProcessor.postprocess`` denormalizes where the tensor is, on the
   GPU, in either path): diffusers' own (the rest of ``postprocess(..., output_type="pil")``: ``pt_to_numpy``,
   a float32 copy to the host, then ``numpy_to_pil``, x 255 and rounding on the CPU) against ipaflow's
   (``ipaflow.tasks.render.to_pil``: scaled, rounded and cast to 8 bits where the tensor is, then one copy).
   On this CPU the "device" work is host work too, so ipaflow's figure includes its cast; a third figure times
   only what stays on the host when the cast runs on a GPU (8-bit frames -> numpy -> PIL). The paths alternate in
   --pairs pairs (the order reverses every other pair); medians per image are printed, with the median of the
   per-pair ratios and the worst pixel difference between the two outputs (0 expected).

    python benchmarks/cpu_costs.py              # both parts, about 15 s on 2 cores
    python benchmarks/cpu_costs.py --skip-flops # only the conversion timing
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import PIL.Image
import torch


def count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def unet_step(config: dict, batch: int, size: int, sdxl: bool) -> float:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        latents = torch.empty(batch, config["in_channels"], size // 8, size // 8)
        text = torch.empty(batch, 77, config["cross_attention_dim"])
        added = {"text_embeds": torch.empty(batch, 1280), "time_ids": torch.empty(batch, 6)} if sdxl else None
        return count(lambda: unet(latents, torch.tensor(999), encoder_hidden_states=text, added_cond_kwargs=added))


def vae_decode(config: dict, size: int) -> float:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**config)
        latents = torch.empty(1, config["latent_channels"], size // 8, size // 8)
        return count(lambda: vae.decode(latents))


def text_encoder(config: dict, prompts: int, projection: bool = False) -> float:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with torch.device("meta"):
        model = cls(CLIPTextConfig(**config))
        ids = torch.zeros(prompts, 77, dtype=torch.long)
        return count(lambda: model(ids, output_hidden_states=True))


def image_encoder(config: dict) -> float:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
        pixels = torch.empty(1, 3, config["image_size"], config["image_size"])
        return count(lambda: model(pixels, output_hidden_states=True))


def flops_table() -> list[str]:
    from ipaflow.tasks.zoo.full_size import full_size_configs, full_size_sdxl_configs

    sd, xl = full_size_configs(), full_size_sdxl_configs()
    models = {
        "SD1.5 512x512, 25 steps, CFG": {
            "UNet (batch 2 x 25 steps)": 25 * unet_step(sd["unet"], 2, 512, sdxl=False),
            "VAE decode": vae_decode(sd["vae"], 512),
            "text encoder (CLIP ViT-L, 2 prompts)": text_encoder(sd["text_encoder"], 2),
        },
        "SDXL 1024x1024, 30 steps, CFG": {
            "UNet (batch 2 x 30 steps)": 30 * unet_step(xl["unet"], 2, 1024, sdxl=True),
            "VAE decode (float32)": vae_decode(xl["vae"], 1024),
            "text encoder (CLIP ViT-L, 2 prompts)": text_encoder(xl["text_encoder"], 2),
            "text encoder 2 (OpenCLIP ViT-bigG, 2 prompts)": text_encoder(xl["text_encoder_2"], 2, projection=True),
        },
    }
    lines = ["| model | stage | TFLOP per row | share |", "|---|---|---:|---:|"]
    for model, stages in models.items():
        total = sum(stages.values())
        for stage, flops in stages.items():
            share = 100 * flops / total
            lines.append(f"| {model} | {stage} | {flops / 1e12:.3f} | {f'{share:.1f}%' if share >= 0.1 else '<0.1%'} |")
        lines.append(f"| {model} | **row total** | {total / 1e12:.3f} | 100% |")
    lines.append(f"| IP-Adapter | image encoder (CLIP ViT-H/14, per distinct image) | "
                 f"{image_encoder(sd['image_encoder']) / 1e12:.3f} | - |")
    return lines


def conversion_table(pairs: int, batch: int, size: int) -> list[str]:
    from diffusers.image_processor import VaeImageProcessor

    from ipaflow.tasks.render import to_pil

    torch.set_num_threads(1)
    processor = VaeImageProcessor(vae_scale_factor=8)
    decoded = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    images = processor.postprocess(decoded, output_type="pt")  # in [0, 1]: what both paths convert

    def diffusers_path():  # postprocess(output_type="pil") after its denormalize
        return processor.numpy_to_pil(processor.pt_to_numpy(images))

    def ipaflow_path():
        return to_pil(images)

    frames = images.mul(255).round_().to(torch.uint8)  # what a GPU hands the host in ipaflow's path

    def ipaflow_host_part():  # .contiguous() stands for the one copy to the host (.cpu() is free here)
        return [PIL.Image.fromarray(p) for p in frames.permute(0, 2, 3, 1).contiguous().numpy()]

    def timed(fn):
        start = time.perf_counter()
        images = fn()
        return (time.perf_counter() - start) / batch, images

    diffusers_path(), ipaflow_path(), ipaflow_host_part()  # warm-up
    times = {"diffusers": [], "ipaflow": [], "host": []}
    worst = 0
    for i in range(pairs):
        order = [("diffusers", diffusers_path), ("ipaflow", ipaflow_path), ("host", ipaflow_host_part)]
        outputs = {}
        for name, fn in order if i % 2 == 0 else order[::-1]:
            seconds, outputs[name] = timed(fn)
            times[name].append(seconds)
        worst = max(worst, max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
                               for a, b in zip(outputs["diffusers"], outputs["ipaflow"])))
    ratio = statistics.median(b / a for a, b in zip(times["diffusers"], times["ipaflow"]))
    d, p, h = (statistics.median(times[k]) * 1e3 for k in ("diffusers", "ipaflow", "host"))
    return [f"| path | ms per {size}x{size} image (median of {pairs} pairs, batch {batch}, 1 thread) |",
            "|---|---:|",
            f"| diffusers: pt_to_numpy (float32) + numpy_to_pil | {d:.2f} |",
            f"| ipaflow: to_pil (8 bits, then one copy) | {p:.2f} |",
            f"| ipaflow, host part alone (8-bit frames -> numpy -> PIL; the cast on a GPU) | {h:.2f} |",
            "",
            f"ipaflow/diffusers, median of per-pair ratios: {ratio:.2f}; worst pixel difference: {worst}/255"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=15, help="alternating pairs for the conversion timing (15)")
    parser.add_argument("--batch", type=int, default=8, help="images per decoded batch (8)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels for the conversion (512)")
    parser.add_argument("--skip-flops", action="store_true", help="leave out the meta-device FLOP count")
    parser.add_argument("--skip-conversion", action="store_true", help="leave out the conversion timing")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available\n")
    if not args.skip_flops:
        start = time.perf_counter()
        print("## FLOPs per row (meta device, torch.utils.flop_counter)\n")
        print("\n".join(flops_table()))
        print(f"\n(counted in {time.perf_counter() - start:.0f} s)\n")
    if not args.skip_conversion:
        print("## Host cost of decoded images -> PIL\n")
        print("\n".join(conversion_table(args.pairs, args.batch, args.size)))


if __name__ == "__main__":
    main()
