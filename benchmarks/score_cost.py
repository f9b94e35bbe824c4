"""What the curation score ``ip_similarity`` costs: the same render with ``score: false`` and with the score on.

1. Measured, on the tiny zoo (CPU): one spec's rows rendered in batches by the worker's own ``render_rows`` on the
   cached pipeline, with the score off and on, alternating in ``--pairs`` pairs (the order reverses every other
   pair, so warm-up and drift fall on both). Printed: the median seconds per row of each, the median of the
   per-pair ratios, and the score's share of the render time, ``(on - off) / on``, with the median time of
   ``score_rows`` alone for one batch. On the tiny zoo the denoiser is a few milligrams of weights at 64x64, so a
   row's steps are nearly free and the image encoder's one pass per output weighs far more than it does on real
   models: this share is an upper bound of the real one, not an estimate.

2. Counted, at real sizes (FLOPs on PyTorch's meta device: no weights, no compute; ``benchmarks/cpu_costs.py``'s
   counters): one image-encoder pass for one output against one row's UNet, VAE decode and text encoders, for
   SD1.5 at 512x512 (25 steps, CFG; CLIP ViT-H/14, its adapters' encoder) and SDXL at 1024x1024 (30 steps, CFG;
   ViT-H/14 for the ``vit-h`` adapters, OpenCLIP ViT-bigG/14 for ``ip-adapter_sdxl``). The image prompt's own
   embedding is computed once per distinct content (and is the render's own for plain adapters), so per output
   the score adds one pass. A GPU does that pass; the image processor (resize to 224x224, crop, normalise) stays
   on the host, so it is timed here on a 512x512 image, and both are set against the SD1.5 row measured on an
   H200 (``H200_*``: docs/performance.md) for the GPU-shaped share.

    python benchmarks/score_cost.py                       # both parts, about 2 minutes on 2 cores
    python benchmarks/score_cost.py --skip-flops --pairs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny zoo only


def _rows(spec_name: str, rows: int, steps: int, inputs: Path):
    from ipaflow.core.storage import Storage
    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.specs.rows import resolve_rows
    from ipaflow.tasks.inputs import InputFetcher

    registry = SpecRegistry()
    images = ["diner.png", "bear.png", "gummy.png", "face.png"]
    manifest = [{"id": f"r{i}", "spec": spec_name, "prompt": f"picture {i}", "num_inference_steps": steps,
                 "ip_image": str(inputs / images[i % len(images)])} for i in range(rows)]
    jobs, bad = resolve_rows(manifest, registry)
    assert not bad, bad
    fetcher = InputFetcher(Storage(), jobs, {spec_name: registry.get(spec_name)})
    fetcher.prefetch(jobs)
    loaded_inputs = [fetcher.get(job) for job in jobs]
    fetcher.close()
    return registry.get(spec_name), jobs, loaded_inputs


def measured(spec_name: str, rows: int, batch: int, steps: int, pairs: int, work: Path) -> list[str]:
    from ipaflow.flows.demo import draw_inputs
    from ipaflow.tasks.pipelines import PIPELINES
    from ipaflow.tasks.render import render_rows
    from ipaflow.tasks.scores import score_rows
    from ipaflow.tasks.zoo import build_zoo

    if not os.environ.get("IPAFLOW_MODELS"):  # the tiny zoo, built here unless given
        build_zoo(work / "zoo")
        os.environ["IPAFLOW_MODELS"] = str(work / "zoo")
    for name, image in draw_inputs().items():
        path = work / "inputs" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    spec, jobs, inputs = _rows(spec_name, rows, steps, work / "inputs")
    loaded = PIPELINES.get(spec)

    def render(score: bool) -> float:
        start = time.perf_counter()
        for first in range(0, len(jobs), batch):
            for rendered in render_rows(loaded, jobs[first:first + batch], inputs[first:first + batch], score=score):
                assert rendered.problem is None, rendered.problem
                assert (rendered.similarities is not None) == score
        return (time.perf_counter() - start) / len(jobs)

    render(True)  # warm: the pipeline, its prompts' embeddings (cached for both ways, as in a run)
    off, on = [], []
    for pair in range(pairs):
        for score in ((False, True) if pair % 2 == 0 else (True, False)):
            (on if score else off).append(render(score))
    outputs = [next(render_rows(loaded, [job], [row], score=False)).images for job, row in zip(jobs[:batch], inputs)]
    alone = []
    for _ in range(pairs):
        start = time.perf_counter()
        score_rows(loaded, inputs[:batch], outputs)
        alone.append(time.perf_counter() - start)
    ratio = statistics.median(b / a for a, b in zip(off, on))
    off_s, on_s, alone_s = statistics.median(off), statistics.median(on), statistics.median(alone) / batch
    return [
        f"tiny zoo, {spec_name}, {rows} rows in batches of {batch}, {steps} steps, {torch.get_num_threads()} threads, "
        f"medians of {pairs} pairs:",
        f"  score off: {off_s * 1000:.1f} ms/row   score on: {on_s * 1000:.1f} ms/row   on/off (median of the "
        f"pairs' ratios): {ratio:.3f}x, so the score's share of render time: {100 * (1 - 1 / ratio):.1f}%",
        f"  score_rows alone: {alone_s * 1000:.1f} ms/row = {100 * alone_s / on_s:.1f}% of a scored row",
    ]


def preprocessing(pairs: int, threads: int) -> float:
    """Host seconds per output of the real encoders' image processor (CLIP's, 224x224) on a batch of 16 512x512
    images, through ``tasks.scores.preprocess`` in ``threads`` threads: the part of the score a GPU does not take."""
    import numpy as np
    import PIL.Image
    from transformers import CLIPImageProcessor

    from ipaflow.tasks.scores import preprocess

    processor = CLIPImageProcessor()
    images = [PIL.Image.fromarray(np.random.default_rng(i).integers(0, 255, (512, 512, 3), np.uint8))
              for i in range(16)]
    times = []
    for _ in range(pairs):
        start = time.perf_counter()
        preprocess(processor, images, threads)
        times.append((time.perf_counter() - start) / len(images))
    return statistics.median(times)


# Measured on one H200 (docs/performance.md, "On a GPU"): the eager UNet's rate at batch 32, and the shard worker's
# seconds per shape-true SD1.5 512x512 row (25 steps, CFG) at batch 16.
H200_UNET_FLOPS = 262e12
H200_SD15_ROW_S = 0.220


def counted(pairs: int) -> list[str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from cpu_costs import image_encoder, text_encoder, unet_step, vae_decode

    from ipaflow.tasks.zoo.full_size import full_size_configs, full_size_sdxl_configs

    sd, xl = full_size_configs(), full_size_sdxl_configs()
    sd_row = 25 * unet_step(sd["unet"], 2, 512, sdxl=False) + vae_decode(sd["vae"], 512) + \
        text_encoder(sd["text_encoder"], 2)
    xl_row = 30 * unet_step(xl["unet"], 2, 1024, sdxl=True) + vae_decode(xl["vae"], 1024) + \
        text_encoder(xl["text_encoder"], 2) + text_encoder(xl["text_encoder_2"], 2, projection=True)
    vit_h, big_g = image_encoder(xl["image_encoder"]), image_encoder(xl["image_encoder_big_g"])
    lines = ["FLOPs at real sizes (meta device): one image-encoder pass per output against one row:"]
    for model, row, encoders in (("SD1.5 512x512, 25 steps, CFG", sd_row, [("ViT-H/14", vit_h)]),
                                 ("SDXL 1024x1024, 30 steps, CFG", xl_row, [("ViT-H/14", vit_h),
                                                                            ("ViT-bigG/14", big_g)])):
        for name, flops in encoders:
            lines.append(f"  {model}: row {row / 1e12:.1f} TFLOP, {name} pass {flops / 1e12:.3f} TFLOP = "
                         f"{100 * flops / row:.2f}% of the row")
    from ipaflow.tasks.scores import PREPROCESS_THREADS

    device = vit_h / H200_UNET_FLOPS
    for threads in sorted({1, PREPROCESS_THREADS}):
        host = preprocessing(pairs, threads)
        lines += [f"image processor on the host, 512x512 -> 224x224, {threads} thread(s): {host * 1000:.2f} ms per "
                  f"output; SD1.5 row on an H200 ({H200_SD15_ROW_S * 1000:.0f} ms at batch 16, measured): ViT-H pass "
                  f"at the eager UNet's {H200_UNET_FLOPS / 1e12:.0f} TFLOP/s {device * 1000:.2f} ms + host "
                  f"{host * 1000:.2f} ms = {100 * (device + host) / (H200_SD15_ROW_S + device + host):.1f}% of a "
                  "scored row"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="sdxl-text2img")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--skip-flops", action="store_true")
    args = parser.parse_args()
    from ipaflow.tasks.pipelines import quiet_libraries

    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="ipaflow-score-cost-"))
    try:
        lines = measured(args.spec, args.rows, args.batch, args.steps, args.pairs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.skip_flops:
        lines += counted(args.pairs)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
