"""Micro-batching: rows with different IP-Adapter images share one pipeline call and still each see only
their own image (diffusers' public API would mix them, upstream #9813); embeddings are cached by content."""

from __future__ import annotations

import numpy as np
import pytest

from ipaflow.core.storage import Storage
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.rows import resolve_rows
from ipaflow.tasks.inputs import InputFetcher
from ipaflow.tasks.pipelines import PIPELINES
from ipaflow.tasks.render import batch_key, render_rows

TOLERANCE = 2
IMAGES = ["diner.png", "bear.png", "gummy.png", "face.png"]


def _prepare(spec_name, rows, inputs_dir):
    registry = SpecRegistry()
    for row in rows:
        for column in ("ip_image", "image", "mask", "control_image", "style_folder"):
            if column in row:
                row[column] = str(inputs_dir / row[column])
    jobs, bad = resolve_rows(rows, registry)
    assert not bad, bad
    spec = registry.get(spec_name)
    fetcher = InputFetcher(Storage(), jobs, {spec_name: spec})
    fetcher.prefetch(jobs)
    inputs = [fetcher.get(job) for job in jobs]
    fetcher.close()
    return PIPELINES.get(spec), jobs, inputs


def _pixels(images):
    return [np.asarray(image, dtype=np.int16) for image in images]


def _batched_and_single(loaded, jobs, inputs):
    batched = list(render_rows(loaded, jobs, inputs))
    assert [r.batch_size for r in batched] == [len(jobs)] * len(jobs)
    single = [next(render_rows(loaded, [job], [row])) for job, row in zip(jobs, inputs)]
    assert all(r.problem is None for r in batched + single), [r.problem for r in batched + single]
    return batched, single


def _assert_same(batched, single):
    for b, s in zip(batched, single):
        for x, y in zip(_pixels(b.images), _pixels(s.images)):
            assert np.abs(x - y).max() <= TOLERANCE, b.job.id


def _assert_distinct(results):
    """The rows' outputs differ from each other: equality above is not vacuous."""
    firsts = [_pixels(r.images)[0] for r in results]
    for i in range(len(firsts)):
        for j in range(i + 1, len(firsts)):
            assert np.abs(firsts[i] - firsts[j]).max() > 2 * TOLERANCE


def test_batch_of_different_ip_images_equals_single_calls_sdxl(models_env, inputs_dir):
    rows = [{"id": f"r{i}", "spec": "sdxl-text2img", "prompt": "a photo", "ip_image": IMAGES[i], "seed": 7,
             "num_inference_steps": 3} for i in range(4)]  # same prompt and seed: only the IP image differs
    loaded, jobs, inputs = _prepare("sdxl-text2img", rows, inputs_dir)
    assert len({batch_key(job, row) for job, row in zip(jobs, inputs)}) == 1
    batched, single = _batched_and_single(loaded, jobs, inputs)
    _assert_same(batched, single)
    _assert_distinct(single)


def test_batch_equals_single_calls_sd15_plus_face(models_env, inputs_dir):
    rows = [{"id": f"r{i}", "spec": "sd15-plus-face", "prompt": f"portrait {i}", "ip_image": IMAGES[i],
             "num_inference_steps": 3} for i in range(3)]
    loaded, jobs, inputs = _prepare("sd15-plus-face", rows, inputs_dir)
    batched, single = _batched_and_single(loaded, jobs, inputs)
    _assert_same(batched, single)


def test_guidance_off_batch_equals_single_calls(models_env, inputs_dir):
    """LCM (guidance 1): the embeddings carry positives only."""
    rows = [{"id": f"r{i}", "spec": "lcm-instant", "prompt": "herge_style portrait", "ip_image": IMAGES[i], "seed": 3}
            for i in range(4)]
    loaded, jobs, inputs = _prepare("lcm-instant", rows, inputs_dir)
    assert not loaded.uses_cfg(jobs[0].params["guidance_scale"])
    batched, single = _batched_and_single(loaded, jobs, inputs)
    _assert_same(batched, single)
    _assert_distinct(single)


def test_img2img_batch_with_different_init_images(models_env, inputs_dir):
    rows = [{"id": f"r{i}", "spec": "sdxl-img2img", "image": IMAGES[i], "ip_image": IMAGES[-1 - i],
             "num_inference_steps": 4} for i in range(3)]
    loaded, jobs, inputs = _prepare("sdxl-img2img", rows, inputs_dir)
    batched, single = _batched_and_single(loaded, jobs, inputs)
    _assert_same(batched, single)


def test_video_batch_equals_single_calls(models_env, inputs_dir):
    rows = [{"id": f"r{i}", "spec": "animatediff-video", "prompt": "waving", "ip_image": IMAGES[i], "seed": 1,
             "num_frames": 4, "num_inference_steps": 2} for i in range(2)]
    loaded, jobs, inputs = _prepare("animatediff-video", rows, inputs_dir)
    batched, single = _batched_and_single(loaded, jobs, inputs)
    assert all(len(r.images) == 4 for r in batched)
    _assert_same(batched, single)


def test_shared_style_folder_is_encoded_once(models_env, inputs_dir):
    """Six rows, one style folder of four images and two distinct faces: three encoder runs, not twelve."""
    rows = [{"id": f"r{i}", "spec": "sdxl-multi-style-face", "prompt": f"hero {i}", "style_folder": "style",
             "ip_image": IMAGES[i % 2], "num_inference_steps": 2} for i in range(6)]
    loaded, jobs, inputs = _prepare("sdxl-multi-style-face", rows, inputs_dir)
    loaded.embeddings.clear()
    # the render's own embeddings (the score's projections of plus adapters' prompts are cached alike: test_scores)
    results = list(render_rows(loaded, jobs[:3], inputs[:3], score=False)) + \
        list(render_rows(loaded, jobs[3:], inputs[3:], score=False))
    assert all(r.problem is None for r in results)
    assert loaded.embeddings.encoded == 3


@pytest.mark.parametrize("scale_index", [0, 1])
def test_both_adapters_of_the_multi_spec_take_effect(models_env, inputs_dir, scale_index):
    """Changing either adapter's scale changes the image: both adapters are really used."""
    base = {"id": "r", "spec": "sdxl-multi-style-face", "prompt": "hero", "style_folder": "style",
            "ip_image": "face.png", "num_inference_steps": 2}
    scales = [0.7, 0.3]
    changed = list(scales)
    changed[scale_index] = 0.0
    outputs = []
    for ip_scale in (scales, changed):
        loaded, jobs, inputs = _prepare("sdxl-multi-style-face", [{**base, "ip_scale": ip_scale}], inputs_dir)
        outputs.append(_pixels(next(render_rows(loaded, jobs, inputs)).images)[0])
    assert np.abs(outputs[0] - outputs[1]).max() > 2


def test_lora_is_active(models_env, inputs_dir):
    """Disabling the LCM-LoRA changes the output: the spec's LoRA really is applied."""
    rows = [{"id": "r", "spec": "lcm-instant", "prompt": "herge_style portrait", "ip_image": "face.png"}]
    loaded, jobs, inputs = _prepare("lcm-instant", rows, inputs_dir)
    with_lora = _pixels(next(render_rows(loaded, jobs, inputs)).images)[0]
    loaded.pipe.disable_lora()
    try:
        without = _pixels(next(render_rows(loaded, jobs, inputs)).images)[0]
    finally:
        loaded.pipe.enable_lora()
    assert np.abs(with_lora - without).max() > 2
