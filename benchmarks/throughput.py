"""Throughput of ipaflow against the loops a user would write, on the same manifest, in one run.

CPU mode (default), on the tiny zoo, every figure a whole process timed from outside:
  (a) naive: the pipeline reloaded for every row (timed on --naive-rows rows, scaled to the manifest);
  (b) direct: the guide's code in a loop, pipeline loaded once, one call per row, PNGs saved;
  (c) ipaflow: `ipaflow render` end to end, Prefect start-up included.
(b) and (c) alternate for --repeats rounds; medians and the ratios c/b and c/a are printed, with the worst
pixel difference between the images of (b) and (c).

    python benchmarks/throughput.py                       # 160 rows, 16 distinct image prompts
    python benchmarks/throughput.py --rows 40 --repeats 1 # quicker

GPU mode (--gpu): a shape-true SD1.5 (real architecture and sizes, random weights, float16, 512x512) with
ip-adapter_sd15; (b) the direct loop against (c) ipaflow's shard worker (micro-batching, embedding cache,
background I/O; Prefect's fixed start-up is left out) for --rows rows at batch sizes 1/4/8/16, and the UNet's
achieved TFLOP/s against the card's dense fp16 peak.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import PIL.Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SPEC = "sdxl-text2img"


# ---------------------------------------------------------------------------------------------- inputs
def draw_prompt_images(folder: Path, count: int) -> list[Path]:
    """``count`` distinct 64x64 image prompts (a disc and a bar in varying colours)."""
    import PIL.Image
    import PIL.ImageDraw

    paths = []
    for k in range(count):
        image = PIL.Image.new("RGB", (64, 64), ((37 * k) % 256, (91 * k) % 256, (53 * k + 80) % 256))
        draw = PIL.ImageDraw.Draw(image)
        draw.ellipse([8 + k % 8, 8, 40 + k % 8, 40], fill=((200 + 13 * k) % 256, 40, (120 * k) % 256))
        draw.rectangle([0, 44 + k % 10, 63, 52 + k % 10], fill=(20, (150 + 29 * k) % 256, 60))
        path = folder / f"prompt-{k:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def write_manifest(folder: Path, rows: int, distinct: int, steps: int) -> Path:
    import pandas as pd

    images = draw_prompt_images(folder, distinct)
    frame = pd.DataFrame(
        {
            "id": [f"row-{i:04d}" for i in range(rows)],
            "spec": SPEC,
            "prompt": [f"a picture of thing number {i}" for i in range(rows)],
            "ip_image": [str(images[i % distinct]) for i in range(rows)],
            "seed": list(range(rows)),
            "num_inference_steps": steps,
        }
    )
    path = folder / "manifest.parquet"
    frame.to_parquet(path, index=False)
    return path


# ------------------------------------------------------------------------------- the loops users write
def guide_pipeline(models: Path):
    """The guide's SDXL text-to-image set-up (float32 on a CPU)."""
    import torch
    from diffusers import AutoPipelineForText2Image

    pipeline = AutoPipelineForText2Image.from_pretrained(
        str(models / "stabilityai/stable-diffusion-xl-base-1.0"), torch_dtype=torch.float32)
    pipeline.load_ip_adapter(str(models / "h94/IP-Adapter"), subfolder="sdxl_models", weight_name="ip-adapter_sdxl.bin")
    pipeline.set_ip_adapter_scale(0.6)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def guide_call(pipeline, row) -> PIL.Image.Image:
    import torch
    from diffusers.utils import load_image

    return pipeline(
        prompt=row["prompt"],
        ip_adapter_image=load_image(row["ip_image"]),
        negative_prompt="deformed, ugly, wrong proportion, low res, bad anatomy, worst quality, low quality",
        num_inference_steps=int(row["num_inference_steps"]),
        generator=torch.Generator(device="cpu").manual_seed(int(row["seed"])),
    ).images[0]


def run_loop(kind: str, manifest: Path, out: Path, models: Path, limit: int | None) -> None:
    """(a) or (b), as its own process: ``--loop naive|direct``."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    rows = pd.read_parquet(manifest).to_dict("records")[:limit]
    pipeline = guide_pipeline(models) if kind == "direct" else None
    for row in rows:
        if kind == "naive":
            pipeline = guide_pipeline(models)
        guide_call(pipeline, row).save(out / f"{row['id']}.png")


# ------------------------------------------------------------------------------------------ measuring
def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def worst_pixel_difference(a: Path, b: Path) -> int:
    import numpy as np
    import PIL.Image

    worst = 0
    for path in sorted(a.glob("*.png")):
        x = np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.int16)
        y = np.asarray(PIL.Image.open(b / path.name).convert("RGB"), dtype=np.int16)
        worst = max(worst, int(np.abs(x - y).max()))
    return worst


def cpu_benchmark(args) -> None:
    from ipaflow.tasks.zoo import build_zoo

    work = Path(tempfile.mkdtemp(prefix="ipaflow-bench-"))
    models = Path(args.models) if args.models else build_zoo(Path.home() / ".cache/ipaflow/zoo")
    manifest = write_manifest(work, args.rows, args.distinct, args.steps)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IPAFLOW_MODELS": str(models), "PREFECT_HOME": str(work / "prefect"),
           "PREFECT_LOGGING_LEVEL": "WARNING", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    me = [sys.executable, str(Path(__file__).resolve())]
    ipaflow = [sys.executable, "-m", "ipaflow.flows.cli", "render", str(manifest), "--batch-size", str(args.batch_size)]
    env["PYTHONPATH"] = str(ROOT)
    print(f"{args.rows} rows of {SPEC}, {args.distinct} distinct image prompts, {args.steps} steps, 64x64, "
          f"batch size {args.batch_size}; work dir {work}", flush=True)
    timed(ipaflow + ["--out", str(work / "warm-up"), "--limit", "1"], env)  # Prefect's database, created once

    naive = timed(me + ["--loop", "naive", str(manifest), str(work / "naive"), str(models), str(args.naive_rows)], env)
    naive_total = naive / args.naive_rows * args.rows
    direct, ours = [], []
    for round_ in range(args.repeats):
        direct.append(timed(me + ["--loop", "direct", str(manifest), str(work / "direct"), str(models), "0"], env))
        ours.append(timed(ipaflow + ["--out", str(work / f"ipaflow-{round_}")], env))
        print(f"round {round_ + 1}: direct {direct[-1]:.1f}s, ipaflow {ours[-1]:.1f}s", flush=True)
    b, c = statistics.median(direct), statistics.median(ours)
    ratios = [o / d for o, d in zip(ours, direct)]
    worst = worst_pixel_difference(work / "direct", work / "ipaflow-0" / "images")
    print()
    print(f"{'way':34} {'wall s (median)':>16} {'s/row':>8}")
    print(f"{'(a) naive reload per row':34} {naive_total:>16.1f} {naive_total / args.rows:>8.3f}"
          f"   (measured on {args.naive_rows} rows, scaled)")
    print(f"{'(b) direct diffusers loop':34} {b:>16.1f} {b / args.rows:>8.3f}")
    print(f"{'(c) ipaflow render, end to end':34} {c:>16.1f} {c / args.rows:>8.3f}")
    print(f"c/b = {statistics.median(ratios):.3f} (median of pairs; {1 / statistics.median(ratios):.2f}x faster), "
          f"c/a = {c / naive_total:.3f} ({naive_total / c:.1f}x faster)")
    print(f"worst pixel difference (b) vs (c): {worst}/255")


# ------------------------------------------------------------------------------------------- GPU mode
def gpu_benchmark(args) -> None:
    import PIL.Image
    import torch

    from ipaflow.specs.options import RenderOptions
    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.specs.rows import resolve_rows
    from ipaflow.tasks.pipelines import PIPELINES
    from ipaflow.tasks.shards import ShardPlan
    from ipaflow.tasks.worker import RunSettings, run_shard
    from ipaflow.tasks.zoo import build_full_size_sd15, build_zoo

    assert torch.cuda.is_available() or args.tiny, "--gpu needs a CUDA device (or --tiny for a rehearsal)"
    work = Path(tempfile.mkdtemp(prefix="ipaflow-gpu-bench-"))
    started = time.perf_counter()
    models = build_zoo(work / "models") if args.tiny else build_full_size_sd15(work / "models")
    size = 64 if args.tiny else 512
    print(f"models written in {time.perf_counter() - started:.1f}s", flush=True)
    os.environ["IPAFLOW_MODELS"] = str(models)
    (work / "specs").mkdir()
    (work / "specs" / "sd15-full.yaml").write_text(
        "name: sd15-full\ntask: text2img\nmodel: stable-diffusion-v1-5/stable-diffusion-v1-5\ndtype: float16\n"
        "ip_adapters:\n  - {model: h94/IP-Adapter, subfolder: models, weight_name: ip-adapter_sd15.safetensors, "
        "scale: 0.6}\n")
    registry = SpecRegistry([str(work / "specs")])
    spec = registry.get("sd15-full")
    images = draw_prompt_images(work, args.distinct)
    rows = [{"id": f"row-{i:03d}", "spec": "sd15-full", "prompt": f"a picture of thing number {i}",
             "ip_image": str(images[i % len(images)]), "seed": i, "num_inference_steps": args.steps,
             "width": size, "height": size} for i in range(args.rows)]
    jobs, bad = resolve_rows(rows, registry)
    assert not bad, bad
    loaded = PIPELINES.get(spec, str(models))
    pipe, unet = loaded.pipe, loaded.pipe.unet

    flops_per_sample = unet_flops(unet, loaded.device)
    unet_timer = UnetTimer(unet)
    pipe(prompt="warm-up", ip_adapter_image=PIL.Image.open(images[0]), num_inference_steps=2)  # CUDA kernels, caches

    def direct_loop() -> None:
        from diffusers.utils import load_image

        pipe.set_ip_adapter_scale(0.6)
        out = work / "direct"
        out.mkdir(exist_ok=True)
        for row in rows:
            pipe(prompt=row["prompt"], ip_adapter_image=load_image(row["ip_image"]), width=size, height=size,
                 num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(row["seed"])
                 ).images[0].save(out / f"{row['id']}.png")

    def synchronize() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    results = []
    for name, batch_size in [("(b) direct loop", 1)] + [(f"(c) ipaflow batch {b}", b) for b in (1, 4, 8, 16)]:
        unet_timer.reset()
        synchronize()
        started = time.perf_counter()
        if name.startswith("(b)"):
            direct_loop()
        else:
            settings = RunSettings(run_id=f"bench-{batch_size}", out=str(work / f"ipaflow-{batch_size}"),
                                   options=RenderOptions(batch_size=batch_size, models=str(models)))
            shard = ShardPlan(name="bench", spec=spec, jobs=jobs, row_keys={j.id: "k" for j in jobs})
            stats = run_shard(shard, settings)
            assert stats.failed == 0, stats.failures
        synchronize()
        wall = time.perf_counter() - started
        samples = unet_timer.samples
        tflops = flops_per_sample * samples / unet_timer.seconds / 1e12
        results.append((name, wall, wall / args.rows, unet_timer.seconds, tflops))
        print(f"{name}: {wall:.1f}s", flush=True)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = dense_fp16_peak_tflops(device)
    model = "tiny zoo SD1.5, float32" if args.tiny else "SD1.5 full size, float16"
    print(f"\n{args.rows} rows, {model}, {size}x{size}, {args.steps} steps, CFG; {device}")
    print(f"{'way':24} {'wall s':>8} {'s/row':>8} {'x direct':>9} {'unet s':>8} {'unet TFLOP/s':>13} {'of peak':>8}")
    direct_wall = results[0][1]
    for name, wall, per_row, unet_s, tflops in results:
        print(f"{name:24} {wall:>8.2f} {per_row:>8.3f} {direct_wall / wall:>9.2f} {unet_s:>8.2f} {tflops:>13.1f} "
              f"{tflops / peak:>8.1%}")
    print(f"UNet forward: {flops_per_sample / 1e9:.1f} GFLOP per latent sample; peak taken as {peak} TFLOP/s")
    print(f"worst pixel difference (b) vs (c, batch 1): "
          f"{worst_pixel_difference(work / 'direct', work / 'ipaflow-1' / 'images')}/255; "
          f"(b) vs (c, batch 16): {worst_pixel_difference(work / 'direct', work / 'ipaflow-16' / 'images')}/255")


def unet_flops(unet, device) -> float:
    """FLOPs of one UNet forward for one latent sample at the unet's native size (text + IP tokens)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    projection = unet.encoder_hid_proj.image_projection_layers[0]
    side = unet.config.sample_size
    sample = torch.randn(1, 4, side, side, device=device, dtype=unet.dtype)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
    embeds = [torch.randn(1, 1, projection.image_embeds.in_features, device=device, dtype=unet.dtype)]
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(sample, 999, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": embeds})
    return float(counter.get_total_flops())


class UnetTimer:
    """Seconds spent in the UNet's forward and how many latent samples it processed (CUDA events on a GPU,
    so the figure is device time, not launch time)."""

    def __init__(self, unet):
        import torch

        self._torch, self._cuda = torch, torch.cuda.is_available()
        self.reset()
        unet.register_forward_pre_hook(self._before)
        unet.register_forward_hook(self._after)

    def reset(self) -> None:
        self.pairs, self.samples = [], 0

    def _mark(self):
        if self._cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _before(self, module, args):
        self.pairs.append([self._mark(), None])
        self.samples += args[0].shape[0]

    def _after(self, module, args, output):
        self.pairs[-1][1] = self._mark()

    @property
    def seconds(self) -> float:
        if not self._cuda:
            return sum(end - start for start, end in self.pairs)
        self._torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.pairs) / 1000


def dense_fp16_peak_tflops(name: str) -> float:
    """Published dense (no sparsity) FP16/BF16 tensor-core peaks of the SXM parts."""
    name = name.upper()
    for key, peak in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0)):
        if key in name:
            return peak
    return float("nan")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--loop":
        _, _, kind, manifest, out, models, limit = sys.argv
        run_loop(kind, Path(manifest), Path(out), Path(models), int(limit) or None)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the GPU mode (needs CUDA)")
    parser.add_argument("--rows", type=int, help="rows in the manifest (default 160 on CPU, 64 on GPU)")
    parser.add_argument("--distinct", type=int, default=16, help="distinct image prompts")
    parser.add_argument("--steps", type=int, help="inference steps (default 20 on CPU, 25 on GPU)")
    parser.add_argument("--batch-size", type=int, default=8, help="ipaflow's --batch-size (CPU mode)")
    parser.add_argument("--naive-rows", type=int, default=8, help="rows timed for the naive reload loop")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of (b) and (c)")
    parser.add_argument("--tiny", action="store_true", help="GPU mode on the tiny zoo: a rehearsal on any device")
    parser.add_argument("--models", help="zoo folder (default: build or reuse ~/.cache/ipaflow/zoo)")
    args = parser.parse_args()
    args.rows = args.rows or (64 if args.gpu else 160)
    args.steps = args.steps or (25 if args.gpu else 20)
    (gpu_benchmark if args.gpu else cpu_benchmark)(args)


if __name__ == "__main__":
    main()
