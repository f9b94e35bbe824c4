"""``validate`` as strict as ``render``: rows that diffusers would fail deep inside (no denoising step, an init
image smaller than the 8-pixel grid) fail in both commands, with the same column and reason, before any GPU
call; and what render could only find after rendering (a prompt too long for a JPEG's EXIF) never fails it."""

from __future__ import annotations

import json

import PIL.Image
import pytest
from util import read_records

from ipaflow.flows.render import render_manifest
from ipaflow.flows.validate import validate_manifest
from ipaflow.specs.options import RenderOptions
from ipaflow.tasks.media import read_parameters

NO_STEP = "runs no denoising step (task '{task}' runs int(num_inference_steps x strength)); raise " \
          "num_inference_steps or strength"


@pytest.fixture
def strict(tmp_path, inputs_dir):
    PIL.Image.new("RGB", (7, 7), "red").save(tmp_path / "seven.png")
    PIL.Image.new("RGB", (8, 8), "red").save(tmp_path / "eight.png")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "jpeg.yaml").write_text(
        "name: jpeg-text2img\ntask: text2img\nmodel: stabilityai/stable-diffusion-xl-base-1.0\n"
        "ip_adapters: [{model: h94/IP-Adapter, subfolder: sdxl_models, weight_name: ip-adapter_sdxl.bin}]\n"
        "output: {format: jpeg}\n")
    ip = str(inputs_dir / "bear.png")
    rows = [
        # sdxl-inpaint gives 100 steps and leaves strength to the pipeline: 0.9999, so 1 step runs none
        {"id": "inpaint-one-step", "spec": "sdxl-inpaint", "num_inference_steps": 1, "ip_image": ip,
         "image": str(inputs_dir / "diner.png"), "mask": str(inputs_dir / "mask.png")},
        {"id": "img2img-one-step", "spec": "sdxl-img2img", "num_inference_steps": 1, "ip_image": ip,
         "image": str(tmp_path / "eight.png")},
        {"id": "seven-pixels", "spec": "sdxl-img2img", "num_inference_steps": 2, "ip_image": ip,
         "image": str(tmp_path / "seven.png")},
        {"id": "eight-pixels", "spec": "sdxl-img2img", "num_inference_steps": 2, "ip_image": ip,
         "image": str(tmp_path / "eight.png")},
        {"id": "long-jpeg", "spec": "jpeg-text2img", "num_inference_steps": 1, "ip_image": ip, "width": 64,
         "height": 64, "prompt": "a bear " * 14_000},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected = {
        "inpaint-one-step": f"num_inference_steps: 1 step(s) x strength 0.9999 {NO_STEP.format(task='inpaint')}",
        "img2img-one-step": f"num_inference_steps: 1 step(s) x strength 0.6 {NO_STEP.format(task='img2img')}",
        "seven-pixels": f"image: {tmp_path / 'seven.png'}: an image of 7x7 pixels; task 'img2img' renders at the "
                        "size of its init image, which needs at least 8 pixels a side",
    }
    return manifest, RenderOptions(specs=[str(tmp_path / "specs")]), expected


def test_validate_and_render_fail_the_same_rows_before_rendering(strict, models_env, prefect_api, tmp_path):
    manifest, options, expected = strict
    failed, rows = validate_manifest(str(manifest), options)
    assert rows == 5
    assert {row.row: row.error for row in failed} == expected

    summary = render_manifest(str(manifest), out=str(tmp_path / "out"), options=options)
    assert (summary.rendered, summary.failed) == (2, 3)
    records = read_records(tmp_path / "out").set_index("id")
    assert dict(records.loc[list(expected), "error"]) == expected
    long = records.loc["long-jpeg"]
    assert long["status"] == "ok" and json.loads(long["params"])["prompt"] == "a bear " * 14_000  # kept whole
    embedded = read_parameters((tmp_path / "out" / "images" / "long-jpeg.jpg").read_bytes())
    assert embedded["truncated"] == ["prompt"] and embedded["prompt"] == ("a bear " * 14_000)[:4096]
    assert PIL.Image.open(tmp_path / "out" / "images" / "eight-pixels.png").size == (8, 8)
