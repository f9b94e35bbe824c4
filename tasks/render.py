"""Rendering: one diffusers call for a micro-batch of compatible rows, each with its own prompt, seed and
IP-Adapter image(s); a batch that runs out of GPU memory is split and retried; a failing row fails alone.

A batch of one row is exactly the guide's call (``prompt`` a string, one ``torch.Generator("cpu")``); a batch
of several passes lists and per-row generators, which gives the same pixels row by row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import traceback
from dataclasses import dataclass
from typing import Iterator, Sequence

import PIL.Image
import torch

from specs.jobs import Job
from tasks.embeddings import batch_embeds
from tasks.inputs import RowInputs
from tasks.pipelines import LoadedPipeline
from tasks.storage import redact

log = logging.getLogger("ipaflow.render")
CALL_PARAMS = ("num_inference_steps", "guidance_scale", "strength", "width", "height", "num_frames",
               "controlnet_conditioning_scale")


@dataclass
class Rendered:
    job: Job
    images: list[PIL.Image.Image] | None = None  # images, or the frames of a video
    error: str | None = None
    batch_size: int = 1
    seconds: float = 0.0


def batch_key(job: Job, inputs: RowInputs) -> tuple:
    """Rows with equal keys can share one pipeline call."""
    solo = job.num_images > 1 or inputs.ip_masks is not None
    params = job.params
    return (
        job.id if solo else "",
        tuple((name, params.get(name)) for name in CALL_PARAMS),
        params.get("negative_prompt") is None,
        json.dumps(params.get("ip_adapter_scale"), sort_keys=True),
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

    task = loaded.spec.task
    if task in ("img2img", "inpaint"):
        kwargs["image"] = pick([row.images["image"] for row in inputs])
    if task == "inpaint":
        kwargs["mask_image"] = pick([row.images["mask"] for row in inputs])
    if task == "controlnet":
        kwargs["image"] = pick([row.images["control_image"] for row in inputs])

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


def render_batch(loaded: LoadedPipeline, jobs: Sequence[Job], inputs: Sequence[RowInputs]) -> list[list[PIL.Image.Image]]:
    """One pipeline call; per row its images (or its video's frames)."""
    with loaded.lock, torch.inference_mode(), per_row_ip_embeds(loaded.pipe, len(jobs)):
        loaded.pipe.set_ip_adapter_scale(_scales(jobs[0]))
        try:
            output = loaded.pipe(**call_kwargs(loaded, jobs, inputs), output_type="pil")
        finally:
            _restore_vae_dtype(loaded)
    if loaded.spec.task == "video":
        return [list(frames) for frames in output.frames]
    per_row = len(output.images) // len(jobs)
    return [output.images[i * per_row:(i + 1) * per_row] for i in range(len(jobs))]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def describe_error(exc: BaseException) -> str:
    """A one-line, credential-free reason for a row that failed while rendering."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return redact(f"render: {type(exc).__name__}: {first}"[:500])


def output_shape(job: Job) -> tuple:
    """What decides a batch's memory besides its size."""
    return tuple(job.params.get(name) for name in ("width", "height", "num_frames"))


def render_rows(loaded: LoadedPipeline, jobs: Sequence[Job], inputs: Sequence[RowInputs]) -> Iterator[Rendered]:
    """Render a batch; on out-of-memory split it in halves and retry (and remember the smaller size for the
    shape); if a batch fails otherwise, retry its rows one by one so that only the row at fault fails."""
    import time

    start = time.perf_counter()
    try:
        results = render_batch(loaded, jobs, inputs)
    except Exception as exc:  # noqa: BLE001 - every failure is turned into rows' reasons
        oom, reason = _is_oom(exc), describe_error(exc)
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
                log.warning("batch of %d failed (%s); rendering its rows one by one", len(jobs), reason)
            half = len(jobs) // 2 if oom else 1
            parts = [(jobs[i:i + half], inputs[i:i + half]) for i in range(0, len(jobs), half)]
            for part_jobs, part_inputs in parts:
                yield from render_rows(loaded, part_jobs, part_inputs)
            return
        yield Rendered(job=jobs[0], error="render: out of GPU memory even as a batch of one" if oom else reason)
        return
    seconds = (time.perf_counter() - start) / len(jobs)
    for job, images in zip(jobs, results):
        yield Rendered(job=job, images=images, batch_size=len(jobs), seconds=seconds)
