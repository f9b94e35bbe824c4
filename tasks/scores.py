"""The curation score ``ip_similarity``: how close each output is to its image prompt, by the spec's own image
encoder.

Per output and per IP-Adapter, the cosine similarity between the output's image embedding and its image
prompt's: the projection the pipeline's ``encode_image`` returns without hidden states (``image_embeds``, what
plain adapters feed the unet), not the hidden states the plus and full-face adapters take. An image prompt of
several images (a style folder, a list) is the mean of their normalised embeddings; a video is scored on its
first, middle and last frames, and the three cosines averaged.

The outputs of a batch are encoded in one pass of the image encoder, under ``torch.inference_mode()`` on the
pipeline's device and dtype, after the pipeline call (the pixels are already made); the image processor prepares
them on the host first, in a few threads (``preprocess``). The image prompts' embeddings
come from the pipeline's embedding cache (``tasks.embeddings``), keyed by content: a plain adapter's are the very
tensors the render used; a plus adapter's projection is encoded once per distinct content.

A spec with ``score: false``, or a pipeline without an image encoder and its feature extractor, scores nothing
(``None``); so does a batch whose scoring fails (said in one WARNING): a score never fails a row.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import PIL.Image
import torch

log = logging.getLogger("ipaflow.scores")
PREPROCESS_THREADS = min(8, os.cpu_count() or 1)  # threads preparing a batch's outputs for the encoder
DIGITS = 6  # the score as recorded: rounded, so that it reads the same on every reader


def sampled_frames(frames: Sequence[PIL.Image.Image]) -> list[PIL.Image.Image]:
    """The frames a video is scored on: the first, the middle and the last (fewer for a shorter clip)."""
    picks = sorted({0, len(frames) // 2, len(frames) - 1}) if frames else []
    return [frames[i] for i in picks]


def prompt_direction(embeds: torch.Tensor) -> torch.Tensor:
    """One image prompt's direction, from its images' embeddings ``(n_images, dim)``: the mean of the normalised
    embeddings, normalised."""
    unit = torch.nn.functional.normalize(embeds.float(), dim=-1)
    return torch.nn.functional.normalize(unit.mean(0), dim=-1)


def cosines(outputs: torch.Tensor, directions: torch.Tensor) -> list[list[float]]:
    """Per output, per adapter: the mean over the output's frames of the cosine between a frame's embedding and
    the adapter's prompt direction. ``outputs``: ``(n_outputs, n_frames, dim)`` (one frame for an image);
    ``directions``: ``(n_adapters, dim)``, normalised."""
    unit = torch.nn.functional.normalize(outputs.float(), dim=-1)
    values = (unit @ directions.float().T).mean(1)  # (n_outputs, n_adapters)
    return [[round(float(v), DIGITS) for v in row] for row in values]


def preprocess(processor, images: Sequence[PIL.Image.Image], threads: int | None = None) -> torch.Tensor:
    """The encoder's input for ``images``, by the pipeline's own image processor (what ``encode_image`` would run),
    in a few threads at once: resizing a full-size output is host work the GPU waits for, and Pillow resizes
    without the GIL. The result is the processor's, in order, whatever the threads."""
    threads = max(1, min(len(images), threads or PREPROCESS_THREADS))
    if threads == 1:
        return processor(list(images), return_tensors="pt").pixel_values
    size = -(-len(images) // threads)
    chunks = [list(images[i:i + size]) for i in range(0, len(images), size)]
    with ThreadPoolExecutor(max_workers=len(chunks), thread_name_prefix="ipaflow-score") as pool:
        return torch.cat(list(pool.map(lambda chunk: processor(chunk, return_tensors="pt").pixel_values, chunks)))


def can_score(pipe) -> bool:
    """Whether the pipeline has the image encoder (and its feature extractor) to compute the score."""
    return getattr(pipe, "image_encoder", None) is not None and getattr(pipe, "feature_extractor", None) is not None


def score_rows(loaded, inputs: Sequence, results: Sequence[Sequence[PIL.Image.Image]], score: bool = True
               ) -> list[list[list[float]] | None]:
    """Per row of a rendered batch: per output, per adapter, its ``ip_similarity`` (or None, see the module).

    Args:
        loaded: the ``LoadedPipeline`` that rendered the batch.
        inputs: each row's ``RowInputs`` (its image prompts per adapter, with their content keys).
        results: each row's images, or its video's frames.
        score: the rows' spec's ``score`` (a pipeline is shared by specs that differ only in it: not
            ``loaded.spec``'s).
    """
    if not results or not score or not can_score(loaded.pipe):
        return [None] * len(results)
    try:
        return _score(loaded, inputs, results)
    except Exception as exc:  # noqa: BLE001 - a score is for curation: the rows stay rendered, unscored
        log.warning("ip_similarity not computed for a batch of %d: %s: %s", len(results), type(exc).__name__,
                    str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "")
        return [None] * len(results)


def _score(loaded, inputs: Sequence, results: Sequence[Sequence[PIL.Image.Image]]) -> list[list[list[float]]]:
    pipe, device = loaded.pipe, loaded.device
    video = loaded.spec.profile.output == "video"
    shown = [[sampled_frames(frames)] if video else [[image] for image in frames] for frames in results]
    flat = [frame for row in shown for output in row for frame in output]
    pixels = preprocess(pipe.feature_extractor, flat)  # host work, outside the pipeline's lock
    with loaded.lock, torch.inference_mode():
        embeds, _ = pipe.encode_image(pixels, device, 1, False)  # one encoder pass for the batch's outputs
        prompts = [[loaded.embeddings.get(pipe, False, key, images, device)[1] for key, images in row.adapters]
                   for row in inputs]
    scores, start = [], 0
    for row, adapters in zip(shown, prompts):
        directions = torch.stack([prompt_direction(embeds_of_prompt) for embeds_of_prompt in adapters])
        frames = len(row[0])
        count = len(row) * frames
        scores.append(cosines(embeds[start:start + count].reshape(len(row), frames, -1), directions))
        start += count
    return scores
