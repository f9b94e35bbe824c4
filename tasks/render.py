"""Rendering: one diffusers call for a micro-batch of compatible rows, each with its own prompt, seed and
IP-Adapter image(s); a batch that runs out of GPU memory is split and retried; a failing row fails alone.

A batch of one row is exactly the guide's call (``prompt`` a string, one ``torch.Generator("cpu")``); a batch
of several passes lists and per-row generators, which gives the same pixels row by row.

Around the call: the VAE savers the batch needs (``ipaflow.tasks.memory``), the compiled mode where it runs or
pays (``ipaflow.tasks.compile``; a compile failure renders the batch again eagerly and never fails a row), and
the images come back as one tensor, turned into 8-bit pixels on the device in one step (the rounding of
diffusers' own ``numpy_to_pil``, so the pixels are the same) and copied to the host once per batch. Then the
batch's outputs are scored against their image prompts (``ipaflow.tasks.scores``: ``ip_similarity``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from ipaflow.core.problems import Problem, describe_exception
from ipaflow.specs.rows import CALL_PARAMS, Job
from ipaflow.tasks.compile import Plan
from ipaflow.tasks.embeddings import batch_embeds
from ipaflow.tasks.inputs import RowInputs
from ipaflow.tasks.pipelines import LoadedPipeline
from ipaflow.tasks.scores import score_rows

log = logging.getLogger("ipaflow.render")


@dataclass
class Rendered:
    job: Job
    images: list[PIL.Image.Image] | None = None  # images, or the frames of a video
    problem: Problem | None = None  # why the row failed
    batch_size: int = 1
    seconds: float = 0.0
    similarities: list[list[float]] | None = None  # per output, per adapter: ip_similarity (tasks.scores)


def batch_key(job: Job, inputs: RowInputs) -> tuple:
    """Rows with equal keys can share one pipeline call: the row's call group (``Job.call_group``, what the
    shard planner sorts by) plus what only its fetched inputs tell (image sizes, images per adapter)."""
    return (
        job.call_group(),
        tuple(len(images) for _, images in inputs.adapters),
        tuple((name, image.size) for name, image in sorted(inputs.images.items())),
    )


def _ip_masks(loaded: LoadedPipeline, job: Job, inputs: RowInputs) -> list | None:
    if inputs.ip_masks is None:
        return None
    from diffusers.image_processor import IPAdapterMaskProcessor

    default_w, default_h = loaded.default_size
    width, height = job.params.get("width", default_w), job.params.get("height", default_h)
    masks = IPAdapterMaskProcessor().preprocess(inputs.ip_masks, height=height, width=width)
    masks = masks.reshape(1, masks.shape[0], masks.shape[2], masks.shape[3])
    return [masks if column == "ip_image" else None for column in loaded.spec.image_columns]


def call_kwargs(loaded: LoadedPipeline, jobs: Sequence[Job], inputs: Sequence[RowInputs]) -> dict:
    """The keyword arguments of the pipeline call for a batch of compatible rows."""
    first = jobs[0].params
    single = len(jobs) == 1
    kwargs: dict = {name: first[name] for name in CALL_PARAMS if name in first}
    pick = (lambda values: values[0]) if single else list

    kwargs["prompt"] = pick([job.params["prompt"] for job in jobs])
    if first.get("negative_prompt") is not None:
        kwargs["negative_prompt"] = pick([job.params["negative_prompt"] for job in jobs])
    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
    kwargs["generator"] = pick(generators)
    if single and jobs[0].num_images > 1:
        kwargs["num_images_per_prompt"] = jobs[0].num_images

    for column, role in loaded.spec.profile.inputs.items():
        kwargs[role.argument] = pick([row.images[column] for row in inputs])

    guidance = first.get("guidance_scale", loaded.default_guidance)
    hidden = loaded.adapter_hidden_states
    per_row = [
        [
            loaded.embeddings.get(loaded.pipe, hidden[index], key, images, loaded.device)
            for index, (key, images) in enumerate(row.adapters)
        ]
        for row in inputs
    ]
    kwargs["ip_adapter_image_embeds"] = batch_embeds(per_row, loaded.uses_cfg(guidance))
    masks = _ip_masks(loaded, jobs[0], inputs[0]) if single else None
    if masks is not None:
        kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": masks}
    return kwargs


def _scales(job: Job) -> list:
    return list(job.params["ip_adapter_scale"])


@contextlib.contextmanager
def per_row_ip_embeds(pipe, rows: int):
    """Make the pipeline use ``ip_adapter_image_embeds`` exactly as given for a batch of several rows.

    The pipelines call ``prepare_ip_adapter_image_embeds(..., batch_size * num_images_per_prompt, ...)``, which
    repeats the embeddings once per row: with per-row embeddings of shape (2B, ...) the unet then receives
    2B*B of them, and each row attends to every row's image tokens (upstream #9813). For the duration of the
    call, the bound method is shadowed on the instance by one that hands the per-row tensors through
    unchanged (they are already ordered like the prompt embeddings). A single row keeps the stock method,
    so it is the guide's call exactly.
    """
    if rows == 1:
        yield
        return

    def as_given(ip_adapter_image, ip_adapter_image_embeds, device, num_images_per_prompt, do_classifier_free_guidance):
        return [embeds.to(device=device) for embeds in ip_adapter_image_embeds]

    pipe.prepare_ip_adapter_image_embeds = as_given
    try:
        yield
    finally:
        del pipe.prepare_ip_adapter_image_embeds


def _restore_vae_dtype(loaded: LoadedPipeline) -> None:
    """SDXL pipelines upcast a float16 VAE to float32 to decode, and cast it back after; a call that fails in
    between (out of GPU memory in the decoder) leaves it float32, and every later call fails on the mismatch."""
    vae = getattr(loaded.pipe, "vae", None)
    if vae is not None and vae.dtype != loaded.dtype:
        vae.to(dtype=loaded.dtype)


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """Images in [0, 1], (N, C, H, W) on any device, as PIL images: scaled, rounded and cast to 8 bits where they
    are (on the GPU: one small copy to the host instead of float32 frames), with the arithmetic of diffusers'
    ``numpy_to_pil`` (float32 x 255, round half to even), so the pixels are the same."""
    pixels = images.float().mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    if pixels.shape[-1] == 1:
        return [PIL.Image.fromarray(np.ascontiguousarray(p[..., 0]), mode="L") for p in pixels]
    return [PIL.Image.fromarray(p) for p in pixels]


def compile_key(jobs: Sequence[Job], inputs: Sequence[RowInputs], shape) -> tuple:
    """What fixes the denoiser's compiled code for a batch: the row shape, image prompts per adapter (their tokens),
    the input images' sizes, and whether the batch dimension is 1 (which the compiler specialises); not the
    batch size, which is compiled dynamic (``ipaflow.tasks.compile``)."""
    return (shape, tuple(len(images) for _, images in inputs[0].adapters),
            tuple((name, image.size) for name, image in sorted(inputs[0].images.items())),
            len(jobs) * shape.samples == 1)


def _call(loaded: LoadedPipeline, jobs: Sequence[Job], inputs: Sequence[RowInputs], plan: Plan):
    with loaded.compiler.running(plan):
        return loaded.pipe(**call_kwargs(loaded, jobs, inputs), output_type="pt")


def _compiled_call(loaded: LoadedPipeline, jobs: Sequence[Job], inputs: Sequence[RowInputs], plan: Plan):
    """(output, None), or (None, what failed) when a call with compiled units failed otherwise than out of memory;
    returned rather than handled inside ``except``, whose traceback would hold the failed call's tensors while the
    eager call runs."""
    try:
        return _call(loaded, jobs, inputs, plan), None
    except Exception as exc:
        if not plan.units or _is_oom(exc):
            raise
        log.debug("compiled call failed:\n%s", traceback.format_exc())
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        return None, f"{type(exc).__name__}: {text}"


def render_batch(loaded: LoadedPipeline, jobs: Sequence[Job], inputs: Sequence[RowInputs]) -> list[list[PIL.Image.Image]]:
    """One pipeline call; per row its images (or its video's frames)."""
    shape = loaded.row_shape(jobs[0], inputs[0].images)
    rows, steps = len(jobs), loaded.steps(jobs[0])
    compiler, clock = loaded.compiler, loaded.clock
    key = compile_key(jobs, inputs, shape)
    with loaded.lock, torch.inference_mode(), per_row_ip_embeds(loaded.pipe, rows):
        loaded.pipe.set_ip_adapter_scale(_scales(jobs[0]))
        loaded.memory.apply_vae_savers(shape, rows)
        plan = compiler.choose(key, jobs[0].call_group(), rows, steps)
        watch = clock.watching() if compiler.watching() else contextlib.nullcontext()
        try:
            with watch, loaded.memory.measured(shape, rows):
                output, failure = _compiled_call(loaded, jobs, inputs, plan)
                if failure is not None:  # a compile failure never fails a row: the same call, eagerly
                    _restore_vae_dtype(loaded)
                    output = _call(loaded, jobs, inputs, Plan([], []))  # raises if the rows are at fault
                    compiler.failed(plan, key, failure)
                    plan = Plan([], [])
            if compiler.watching():
                compiler.observe(plan, key, rows, steps, clock.seconds())
        finally:
            _restore_vae_dtype(loaded)
    compiler.rendered(jobs[0].call_group(), rows)
    if loaded.spec.profile.output == "video":
        frames = output.frames  # (rows, frames, C, H, W)
        pixels = to_pil(frames.flatten(0, 1))
        return [pixels[i * frames.shape[1]:(i + 1) * frames.shape[1]] for i in range(rows)]
    images = to_pil(output.images)
    per_row = len(images) // rows
    return [images[i * per_row:(i + 1) * per_row] for i in range(rows)]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def output_shape(job: Job) -> tuple:
    """What decides a batch's memory besides its size."""
    return tuple(job.params.get(name) for name in ("width", "height", "num_frames"))


def render_rows(loaded: LoadedPipeline, jobs: Sequence[Job], inputs: Sequence[RowInputs],
                redact: Callable[[str], str] = str, score: bool = True) -> Iterator[Rendered]:
    """Render a batch; on out-of-memory split it in halves and retry (and remember the smaller size for the
    shape); if a batch fails otherwise, retry its rows one by one so that only the row at fault fails. With
    ``score`` (the spec's), each output's ``ip_similarity`` is computed after the call (``tasks.scores``)."""
    start = time.perf_counter()
    try:
        results = render_batch(loaded, jobs, inputs)
    except Exception as exc:  # noqa: BLE001 - every failure is turned into rows' reasons
        oom, problem = _is_oom(exc), describe_exception("render", exc, redact)
        log.debug("batch of %d from row %s failed:\n%s", len(jobs), jobs[0].id, traceback.format_exc())
        results = None  # retried below, once the exception is gone: its traceback holds the call's tensors
    if results is None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(jobs) > 1:
            if oom:
                shape = output_shape(jobs[0])
                loaded.batch_limits[shape] = min(loaded.batch_limits.get(shape, len(jobs)), len(jobs) // 2)
                log.warning("out of GPU memory at a batch of %d; batches of this shape now hold at most %d",
                            len(jobs), loaded.batch_limits[shape])
            else:
                log.warning("batch of %d failed (%s); rendering its rows one by one", len(jobs), problem)
            half = len(jobs) // 2 if oom else 1
            parts = [(jobs[i:i + half], inputs[i:i + half]) for i in range(0, len(jobs), half)]
            for part_jobs, part_inputs in parts:
                yield from render_rows(loaded, part_jobs, part_inputs, redact, score)
            return
        if oom:
            problem = Problem("render", "out of GPU memory even as a batch of one")
        yield Rendered(job=jobs[0], problem=problem)
        return
    scores = score_rows(loaded, inputs, results, score)
    seconds = (time.perf_counter() - start) / len(jobs)
    for job, images, similarities in zip(jobs, results, scores):
        yield Rendered(job=job, images=images, batch_size=len(jobs), seconds=seconds, similarities=similarities)
