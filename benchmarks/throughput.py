"""Throughput of ipaflow against the loops a user would write, on the same manifest, in one run.

CPU mode (default), on the tiny zoo, every figure a whole process timed from outside:
  (a) naive: the pipeline reloaded for every row (timed on --naive-rows rows, scaled to the manifest);
  (b) direct: the guide's code in a loop, pipeline loaded once, one call per row, PNGs saved;
  (c) ipaflow: `ipaflow render` end to end, Prefect start-up included.
(b) and (c) alternate for --repeats rounds; medians and the ratios c/b and c/a are printed, with the worst
pixel difference between the images of (b) and (c).

    python benchmarks/throughput.py                       # 160 rows, 16 distinct image prompts
    python benchmarks/throughput.py --rows 40 --repeats 1 # quicker

GPU mode (--gpu): shape-true SD1.5 (512x512, 25 steps, ip-adapter_sd15) and SDXL (1024x1024, 30 steps, ViT-H
with ip-adapter-plus_sdxl_vit-h), real architectures and sizes with random float16 weights, written on the spot.
The guide's direct loop (batch 1) against ipaflow's shard worker (micro-batching, embedding cache, background
I/O; Prefect's fixed start-up left out), eager at batch 1/8/16/32, compiled (``--compile on``) at the same
sizes, and model CPU offload against resident: s/row, the UNet's device time and achieved TFLOP/s, the other
stages (text and image encoders, VAE decode, the rest), compile seconds, peak GPU memory, and the worst pixel
difference against the reference (eager against the direct loop; compiled and offloaded against eager at the
same batch size). Runs are taken most wanted first and skipped when --budget (seconds, everything included)
would not cover them; the table is written row by row to $OUT/throughput-gpu.md (or --table FILE).

    python benchmarks/throughput.py --gpu                 # on a GPU machine; ~8 minutes on one H200
    python benchmarks/throughput.py --gpu --tiny          # the same code on the tiny zoo, on any device

Without diffusers/pydantic on the GPU machine (no network), run benchmarks/gpu_wheels.sh beforehand where pip
can download and bring .gpu-wheels/ along: the benchmark installs them from there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import PIL.Image

ROOT = Path(__file__).resolve().parent.parent
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
# Shape-true models (real architectures and sizes, random float16 weights) written on the spot: SD1.5 at 512x512
# with ip-adapter_sd15 (25 steps) and SDXL at 1024x1024 with the ViT-H encoder and ip-adapter-plus_sdxl_vit-h
# (30 steps), both with guidance. --tiny: the tiny zoo at 64x64, 2 steps, on whatever device there is.
GPU_SPECS = {
    "sd15": (
        "name: sd15-bench\ntask: text2img\nmodel: stable-diffusion-v1-5/stable-diffusion-v1-5\ndtype: float16\n"
        "ip_adapters:\n  - {model: h94/IP-Adapter, subfolder: models, weight_name: ip-adapter_sd15.safetensors, "
        "scale: 0.6}\n"),
    "sdxl": (
        "name: sdxl-bench\ntask: text2img\nmodel: stabilityai/stable-diffusion-xl-base-1.0\ndtype: float16\n"
        "image_encoder: {model: h94/IP-Adapter, subfolder: models/image_encoder}\n"
        "ip_adapters:\n  - {model: h94/IP-Adapter, subfolder: sdxl_models, "
        "weight_name: ip-adapter-plus_sdxl_vit-h.safetensors, scale: 0.7}\n"),
}


@dataclass
class Setup:
    """One model's runs: output size, steps, rows timed per batch size, the batch sizes most wanted first (eager
    and compiled), the batch size of the offload run, and its share of the time budget."""

    name: str
    size: int
    steps: int
    rows: dict[int, int]
    eager: tuple[int, ...]
    compiled: tuple[int, ...]
    offload: int | None
    share: float


GPU_SETUPS = {
    "sd15": Setup("sd15", 512, 25, {1: 8, 8: 32, 16: 32, 32: 32}, (16, 1, 8, 32), (16, 1, 8, 32), None, 0.4),
    "sdxl": Setup("sdxl", 1024, 30, {1: 3, 8: 16, 16: 16, 32: 32}, (8, 16, 1, 32), (8, 16, 1, 32), 8, 0.6),
}
TINY_ROWS = {1: 2, 2: 4, 4: 4}
COLUMNS = ("model", "way", "batch", "rows", "wall s", "s/row", "unet s", "UNet TFLOP/s", "text s", "image s",
           "decode s", "rest s", "compile s", "peak GiB", "worst px vs ref")


def _importable_ipaflow(work: Path) -> None:
    """Make ``ipaflow.*`` importable from this checkout without installing it (a bare GPU machine): the folders
    core/specs/tasks/flows linked under a namespace package ``ipaflow`` on sys.path."""
    try:
        import ipaflow.tasks  # noqa: F401
        return
    except ImportError:
        pass
    shim = work / "shim" / "ipaflow"
    shim.mkdir(parents=True, exist_ok=True)
    for name in ("core", "specs", "tasks", "flows"):
        (shim / name).symlink_to(ROOT / name, target_is_directory=True)
    sys.path.insert(0, str(shim.parent))


def _install_gpu_wheels() -> None:
    """diffusers and pydantic from .gpu-wheels/ (benchmarks/gpu_wheels.sh) when the machine lacks them."""
    try:
        import diffusers  # noqa: F401
        import pydantic  # noqa: F401
        return
    except ImportError:
        pass
    wheels = ROOT / ".gpu-wheels"
    if not wheels.is_dir():
        raise SystemExit("diffusers/pydantic are missing and there is no .gpu-wheels/: run benchmarks/gpu_wheels.sh "
                         "where pip can download, and bring .gpu-wheels/ along")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels)]
    if subprocess.run([*pip, "diffusers", "pydantic"]).returncode != 0:
        # the machine's packages and the folder's do not resolve together: take the folder's as they are
        print("pip could not resolve diffusers/pydantic against this machine's packages; installing the wheels "
              "without dependency checks", flush=True)
        subprocess.run([*pip, "--no-deps", *sorted(str(p) for p in wheels.glob("*.whl"))], check=True)


class Table:
    """The results, written to a markdown file row by row as they are measured, and printed."""

    def __init__(self, path: Path, title: str):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{title}\n\n| {' | '.join(COLUMNS)} |\n|{' --- |' * len(COLUMNS)}\n")
        print(f"table: {path}", flush=True)

    def _append(self, text: str) -> None:
        with open(self.path, "a") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        print(text, flush=True)

    def add(self, **cells) -> None:
        self._append("| " + " | ".join(_cell(cells.get(name)) for name in COLUMNS) + " |")

    def note(self, text: str) -> None:
        self._append(f"\n{text}\n")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _pixels(folder: Path, ids: list[str]) -> dict:
    import numpy as np
    import PIL.Image

    return {i: np.asarray(PIL.Image.open(folder / "images" / f"{i}.png").convert("RGB"), dtype=np.int16) for i in ids}


def _worst(a: dict, b: dict) -> int | None:
    import numpy as np

    common = sorted(set(a) & set(b))
    return max(int(np.abs(a[i] - b[i]).max()) for i in common) if common else None


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def capture_unet_flops(pipe, call) -> float:
    """FLOPs of one UNet forward per latent sample, counted on the inputs the pipeline really hands it (text,
    IP-Adapter tokens, SDXL's added conditioning) during ``call()``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, kw: None if seen else seen.append((a, kw)),
                                                 with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    args, kwargs = seen[0]
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        pipe.unet(*args, **kwargs)
    return float(counter.get_total_flops()) / args[0].shape[0]


def gpu_benchmark(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="ipaflow-gpu-bench-"))
    _install_gpu_wheels()
    _importable_ipaflow(work)
    import logging

    import torch

    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.tasks.pipelines import PIPELINES
    from ipaflow.tasks.zoo import build_full_size_sd15, build_full_size_sdxl, build_zoo

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("--gpu needs a CUDA device (or --tiny, a rehearsal of the same code on any device)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("httpx", "urllib3", "fsspec", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("IPAFLOW_COMPILE_CACHE", str(work / "compile-cache"))  # cold: what a first run pays
    started = time.perf_counter()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks"
    default = out / ("throughput-tiny.md" if args.tiny else "throughput-gpu.md")
    device = torch.cuda.get_device_name() if cuda else "CPU"
    table = Table(Path(args.table) if args.table else default,
                  f"ipaflow's shard worker on {device}, torch {torch.__version__}; "
                  f"{'tiny zoo, float32' if args.tiny else 'shape-true models, random float16 weights'}; guidance on. "
                  "worst px vs ref: eager rows against the direct loop, compiled and offloaded rows against eager "
                  "at the same batch size.")
    models = Path(args.models) if args.models else work / "models"
    (work / "specs").mkdir()
    for name, text in GPU_SPECS.items():
        (work / "specs" / f"{name}.yaml").write_text(text)
        (work / "specs" / f"{name}-offload.yaml").write_text(
            text.replace("-bench\n", "-bench-offload\n", 1) + "memory: {cpu_offload: true}\n")
    registry = SpecRegistry([str(work / "specs")])
    images = draw_prompt_images(work, args.distinct)
    os.environ["IPAFLOW_MODELS"] = str(models)
    for number, name in enumerate(args.only):
        setup = GPU_SETUPS[name]
        if args.tiny:
            setup = Setup(name, 64, 2, TINY_ROWS, (2, 1, 4), (2, 1, 4), 2, setup.share)
        if args.steps:
            setup.steps = args.steps
        shares = sum(GPU_SETUPS[n].share for n in args.only[number:])
        budget = (args.budget - (time.perf_counter() - started)) * setup.share / shares
        model_started = time.perf_counter()
        if args.tiny:
            build_zoo(models)
        elif not args.models:
            (build_full_size_sd15 if name == "sd15" else build_full_size_sdxl)(models)
        table.note(f"{name}: models ready in {time.perf_counter() - model_started:.0f} s")
        run_model(setup, registry, images, table, work, budget - (time.perf_counter() - model_started))
        PIPELINES.clear()
        if cuda:
            torch.cuda.empty_cache()
    table.note(f"whole benchmark: {time.perf_counter() - started:.0f} s")


def run_model(setup: Setup, registry, images, table: Table, work: Path, budget: float) -> None:
    """Every way of rendering one model, most wanted first, each skipped when the budget would not cover it."""
    import PIL.Image
    import torch

    from ipaflow.specs.options import RenderOptions
    from ipaflow.specs.rows import resolve_rows
    from ipaflow.tasks.pipelines import PIPELINES
    from ipaflow.tasks.shards import ShardPlan
    from ipaflow.tasks.stages import StageClock
    from ipaflow.tasks.worker import RunSettings, run_shard

    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    spec = registry.get(f"{setup.name}-bench")
    rows = [{"id": f"{setup.name}-{i:03d}", "spec": spec.name, "prompt": f"a picture of thing number {i}",
             "ip_image": str(images[i % len(images)]), "seed": i, "num_inference_steps": setup.steps,
             "width": setup.size, "height": setup.size} for i in range(max(setup.rows.values()))]
    jobs, bad = resolve_rows(rows, registry)
    assert not bad, bad
    loaded = PIPELINES.get(spec)
    prompt = PIL.Image.open(images[0])
    scale = spec.ip_adapters[0].scale

    def warm_call(steps: int) -> None:
        loaded.pipe.set_ip_adapter_scale(scale)
        loaded.pipe(prompt="warm-up", ip_adapter_image=prompt, num_inference_steps=steps, width=setup.size,
                    height=setup.size)

    flops = capture_unet_flops(loaded.pipe, lambda: warm_call(1))
    warm_call(2)
    table.note(f"{setup.name}: {setup.size}x{setup.size}, {setup.steps} steps; UNet forward {flops / 1e9:.4g} GFLOP "
               f"per latent sample; weights {loaded.memory.weights / 2**30:.3g} GiB")
    pixels: dict[str, dict] = {}  # "way-batch" -> pixels by row id
    seconds_per_row: dict[tuple, float] = {}  # (way, batch) -> s/row

    def affordable(way: str, batch: int, count: int, extra: float = 0.0) -> bool:
        known = seconds_per_row.get((way, batch)) or seconds_per_row.get(("eager", batch))
        if known is None:
            batched = [s for (w, b), s in seconds_per_row.items() if b > 1]
            known = max(seconds_per_row.values(), default=0.0) if batch == 1 else min(batched, default=0.0)
        if time.perf_counter() - started + count * known + extra <= budget:
            return True
        table.add(model=setup.name, way=f"{way}: skipped, over the budget", batch=batch)
        return False

    def measure(way: str, batch: int, count: int, compile_mode: str, target_spec=spec, warm: bool = False) -> dict:
        """``count`` rows through the shard worker at ``batch`` rows per call: one row of the table."""
        target = PIPELINES.get(target_spec)
        clock = StageClock(target.pipe, target.device)
        own = jobs if target_spec is spec else [job.model_copy(update={"spec": target_spec.name}) for job in jobs]
        options = RenderOptions(batch_size=batch, compile=compile_mode)
        compile_s = None
        if warm:  # compile this shape / record the CUDA graphs of this batch size, on one step of one batch
            warm_jobs = [job.model_copy(update={"params": {**job.params, "num_inference_steps": 1}})
                         for job in own[:batch]]
            with clock.watching():
                run_shard(ShardPlan(name="warm", spec=target_spec, jobs=warm_jobs, row_keys={}),
                          RunSettings(run_id="warm", out=str(work / "warm"), options=options))
                warm_denoise = clock.seconds().get("denoiser", 0.0)
        folder = work / f"{setup.name}-{way.split()[0]}-{batch}"
        plan = ShardPlan(name="bench", spec=target_spec, jobs=own[:count], row_keys={j.id: "k" for j in own})
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        _sync(cuda)
        with clock.watching():
            t = time.perf_counter()
            stats = run_shard(plan, RunSettings(run_id=way, out=str(folder), options=options))
            _sync(cuda)
            wall = time.perf_counter() - t
            stages = clock.seconds()
        clock.remove()
        assert stats.failed == 0, stats.failures
        denoise, samples = stages.get("denoiser", 0.0), clock.samples.get("denoiser", 0)
        if warm:  # the warm-up's denoiser time less what one step of that batch takes once compiled
            compile_s = max(0.0, warm_denoise - denoise / count / setup.steps * batch)
        seconds_per_row[(way.split()[0], batch)] = wall / count
        return {"model": setup.name, "way": way, "batch": batch, "rows": count, "wall s": wall,
                "s/row": wall / count, "unet s": denoise,
                "UNet TFLOP/s": flops * samples / denoise / 1e12 if denoise else None,
                "text s": stages.get("text"), "image s": stages.get("image"), "decode s": stages.get("decode"),
                "rest s": wall - sum(stages.get(s, 0.0) for s in ("denoiser", "text", "image", "decode")),
                "compile s": compile_s, "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "pixels": _pixels(folder, [j.id for j in jobs[:count]])}

    def record(row: dict, reference: str | None) -> None:
        mine = pixels[f"{row['way'].split()[0]}-{row['batch']}"] = row.pop("pixels")
        if reference in pixels:
            row["worst px vs ref"] = _worst(mine, pixels[reference])
        table.add(**row)

    if affordable("direct", 1, setup.rows[1]):
        row = direct_loop(loaded, jobs[:setup.rows[1]], work / f"{setup.name}-direct", setup, flops, cuda)
        seconds_per_row[("direct", 1)] = row["s/row"]
        record(row, None)
    for batch in setup.eager:
        if affordable("eager", batch, setup.rows[batch]):
            record(measure("eager", batch, setup.rows[batch], "off"), "direct-1")
    if setup.offload and affordable("offload", setup.offload, setup.rows[setup.offload], extra=30):
        offload = registry.get(f"{setup.name}-bench-offload")
        record(measure("offload (eager)", setup.offload, setup.rows[setup.offload], "off", target_spec=offload),
               f"eager-{setup.offload}")
        PIPELINES.discard(offload)
    for index, batch in enumerate(setup.compiled):
        if affordable("compiled", batch, setup.rows[batch], extra=150 if index == 0 else 5):
            record(measure("compiled", batch, setup.rows[batch], "on", warm=True), f"eager-{batch}")
            if index == 0:  # the same rows again, in the same mode: bit-stable?
                again = measure("recheck (compiled)", batch, batch, "on")["pixels"]
                table.note(f"{setup.name}: compiled, batch {batch}, rendered twice: "
                           f"{'bit-identical' if _worst(again, pixels[f'compiled-{batch}']) == 0 else 'DIFFERENT'}")
    summarize(setup, seconds_per_row, pixels, table)
    table.note(f"{setup.name}: {time.perf_counter() - started:.0f} s of its {budget:.0f} s budget")


def summarize(setup: Setup, seconds_per_row: dict, pixels: dict, table: Table) -> None:
    """The issue's targets, from what was measured."""
    def best(way):
        found = [(s, b) for (w, b), s in seconds_per_row.items() if w == way]
        return min(found) if found else (None, None)

    (eager, eager_b), (compiled, compiled_b) = best("eager"), best("compiled")
    lines = [f"{setup.name}: best eager {eager and f'{eager:.3f}'} s/row (batch {eager_b}), best compiled "
             f"{compiled and f'{compiled:.3f}'} s/row (batch {compiled_b})"]
    direct = seconds_per_row.get(("direct", 1))
    for way in ("eager", "compiled"):
        if direct and (way, 1) in seconds_per_row:
            lines.append(f"batch 1 {way} / direct loop = {seconds_per_row[(way, 1)] / direct:.3f}")
    worst = [_worst(pixels[f"compiled-{b}"], pixels[f"eager-{b}"]) for b in setup.compiled
             if f"compiled-{b}" in pixels and f"eager-{b}" in pixels]
    if worst:
        lines.append(f"worst pixel difference compiled vs eager at the same batch: {max(worst)}/255")
    table.note("; ".join(lines))


def direct_loop(loaded, jobs, folder: Path, setup: Setup, flops: float, cuda: bool) -> dict:
    """(b): the guide's code in a loop, one call per row, ``ip_adapter_image`` each time, PNGs saved."""
    import torch
    from diffusers.utils import load_image

    from ipaflow.tasks.stages import StageClock

    pipe = loaded.pipe
    pipe.set_ip_adapter_scale(loaded.spec.ip_adapters[0].scale)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    clock = StageClock(pipe, loaded.device)
    _sync(cuda)
    with clock.watching():
        t = time.perf_counter()
        for job in jobs:
            image = pipe(prompt=job.params["prompt"], ip_adapter_image=load_image(job.inputs["ip_image"][0]),
                         width=setup.size, height=setup.size, num_inference_steps=setup.steps,
                         generator=torch.Generator("cpu").manual_seed(job.seed)).images[0]
            image.save(folder / "images" / f"{job.id}.png")
        _sync(cuda)
        wall = time.perf_counter() - t
        stages = clock.seconds()
    clock.remove()
    denoise = stages.get("denoiser", 0.0)
    return {"model": setup.name, "way": "direct loop", "batch": 1, "rows": len(jobs), "wall s": wall,
            "s/row": wall / len(jobs), "unet s": denoise,
            "UNet TFLOP/s": flops * clock.samples.get("denoiser", 0) / denoise / 1e12 if denoise else None,
            "text s": stages.get("text"), "image s": stages.get("image"), "decode s": stages.get("decode"),
            "rest s": wall - sum(stages.get(s, 0.0) for s in ("denoiser", "text", "image", "decode")),
            "pixels": _pixels(folder, [j.id for j in jobs])}

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--loop":
        _, _, kind, manifest, out, models, limit = sys.argv
        run_loop(kind, Path(manifest), Path(out), Path(models), int(limit) or None)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the GPU mode (needs CUDA, or --tiny)")
    parser.add_argument("--rows", type=int, default=160, help="rows in the manifest (CPU mode)")
    parser.add_argument("--distinct", type=int, default=16, help="distinct image prompts")
    parser.add_argument("--steps", type=int, help="inference steps (default 20 on CPU; GPU: 25 SD1.5, 30 SDXL)")
    parser.add_argument("--batch-size", type=int, default=8, help="ipaflow's --batch-size (CPU mode)")
    parser.add_argument("--naive-rows", type=int, default=8, help="rows timed for the naive reload loop")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of (b) and (c)")
    parser.add_argument("--tiny", action="store_true", help="GPU mode on the tiny zoo: a rehearsal on any device")
    parser.add_argument("--models", help="CPU mode: zoo folder (default: build or reuse ~/.cache/ipaflow/zoo); "
                                         "GPU mode: an existing folder of the shape-true models")
    parser.add_argument("--only", default="sd15,sdxl", help="GPU mode: which models, in order (sd15, sdxl)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="GPU mode: seconds for everything; runs that would not fit are skipped (default 450)")
    parser.add_argument("--table", help="GPU mode: where the table goes (default $OUT/throughput-gpu.md, else "
                                        "benchmarks/throughput-gpu.md; -tiny.md with --tiny)")
    args = parser.parse_args()
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    if args.gpu and not set(args.only) <= set(GPU_SETUPS):
        parser.error(f"--only takes {', '.join(GPU_SETUPS)}")
    if not args.gpu:
        args.steps = args.steps or 20
    (gpu_benchmark if args.gpu else cpu_benchmark)(args)


if __name__ == "__main__":
    main()
