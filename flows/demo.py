"""``ipaflow demo``: synthetic inputs (drawn here, nothing downloaded) and a manifest with rows for every
bundled spec, rendered on the tiny zoo (or on real weights where ``--models`` / the HF cache has them)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd
import PIL.Image
import PIL.ImageDraw

from ipaflow.specs.registry import SpecRegistry

SIZE = 64  # the tiny zoo's native size; real models render at their own defaults when no size is given
DEMO_STEPS = 8


def _canvas(color) -> tuple[PIL.Image.Image, PIL.ImageDraw.ImageDraw]:
    image = PIL.Image.new("RGB", (SIZE, SIZE), color)
    return image, PIL.ImageDraw.Draw(image)


def draw_inputs() -> dict[str, PIL.Image.Image]:
    """Small synthetic pictures standing in for the guide's example images."""
    images = {}
    image, draw = _canvas((250, 235, 200))  # a diner: counter, stools, a lamp
    draw.rectangle([0, 40, 63, 63], fill=(150, 40, 40))
    for x in (10, 30, 50):
        draw.ellipse([x - 5, 30, x + 5, 40], fill=(200, 200, 210))
    draw.ellipse([26, 2, 38, 14], fill=(255, 220, 80))
    images["diner"] = image
    image, draw = _canvas((120, 170, 230))  # a bear: brown body on grass
    draw.rectangle([0, 48, 63, 63], fill=(60, 150, 60))
    draw.ellipse([14, 20, 50, 56], fill=(120, 80, 40))
    draw.ellipse([22, 8, 42, 28], fill=(130, 90, 50))
    images["bear"] = image
    image, draw = _canvas((255, 255, 255))  # a gummy bear
    draw.ellipse([20, 14, 44, 54], fill=(230, 60, 90))
    draw.ellipse([24, 4, 40, 20], fill=(230, 60, 90))
    images["gummy"] = image
    image, draw = _canvas((235, 235, 235))  # a face: oval, eyes, mouth
    draw.ellipse([14, 6, 50, 58], fill=(230, 190, 160))
    draw.ellipse([22, 22, 28, 28], fill=(40, 40, 40))
    draw.ellipse([36, 22, 42, 28], fill=(40, 40, 40))
    draw.arc([24, 34, 40, 46], 20, 160, fill=(150, 40, 40), width=2)
    images["face"] = image
    mask = PIL.Image.new("L", (SIZE, SIZE), 0)  # inpainting mask: the centre
    PIL.ImageDraw.Draw(mask).ellipse([16, 16, 48, 48], fill=255)
    images["mask"] = mask.convert("RGB")
    depth = PIL.Image.new("L", (SIZE, SIZE))  # a depth map: a sphere in front of a ramp
    depth.putdata([
        max(int(255 * y / SIZE * 0.6), int(255 * max(0.0, 1 - math.hypot(x - 32, y - 32) / 20)))
        for y in range(SIZE) for x in range(SIZE)
    ])
    images["depth"] = depth.convert("RGB")
    for k in range(4):  # a style folder: stripes in one palette
        image, draw = _canvas((20 + 40 * k, 30, 90))
        for x in range(-SIZE, SIZE, 12):
            draw.line([x + 4 * k, 0, x + SIZE + 4 * k, SIZE], fill=(240, 180 - 30 * k, 40), width=4)
        images[f"style/img{k}"] = image
    return images


def _write_if_changed(path: Path, data: bytes) -> None:
    """Same bytes as last time: leave the file alone (its identity, hence the rows' keys, stays the same)."""
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_demo(folder: Path) -> Path:
    """Write the demo inputs and manifest under ``folder``; returns the manifest path."""
    folder = Path(folder)
    for name, image in draw_inputs().items():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        _write_if_changed(folder / "inputs" / f"{name}.png", buffer.getvalue())
    manifest = folder / "manifest.parquet"
    frame = pd.DataFrame(demo_rows())
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    _write_if_changed(manifest, buffer.getvalue())
    return manifest


def demo_rows() -> list[dict]:
    """Rows for every bundled spec; paths are relative to the manifest's folder."""
    rows = [
        {"id": "diner-polar-bear", "spec": "sdxl-text2img", "ip_image": "inputs/diner.png",
         "prompt": "a polar bear sitting in a chair drinking a milkshake"},
        {"id": "diner-robot", "spec": "sdxl-text2img", "ip_image": "inputs/diner.png",
         "prompt": "a robot waiter in a retro diner"},
        {"id": "gummy-text2img", "spec": "sdxl-text2img", "ip_image": "inputs/gummy.png",
         "prompt": "a gummy bear on a plate", "num_images": 2},
        {"id": "bear-img2img", "spec": "sdxl-img2img", "image": "inputs/bear.png", "ip_image": "inputs/bear.png",
         "prompt": "best quality, high quality"},
        {"id": "bear-inpaint", "spec": "sdxl-inpaint", "image": "inputs/bear.png", "mask": "inputs/mask.png",
         "ip_image": "inputs/gummy.png", "prompt": "a cute gummy bear waving"},
        {"id": "gummy-video", "spec": "animatediff-video", "ip_image": "inputs/gummy.png",
         "prompt": "A cute gummy bear waving", "num_frames": 8},
        {"id": "chef-full-face", "spec": "sd15-full-face", "ip_image": "inputs/face.png",
         "prompt": "A photo of Einstein as a chef, wearing an apron, cooking in a French restaurant"},
        {"id": "chef-plus-face", "spec": "sd15-plus-face", "ip_image": "inputs/face.png",
         "prompt": "A photo of a chef, wearing an apron, cooking in a French restaurant"},
        {"id": "wonderwoman", "spec": "sdxl-multi-style-face", "style_folder": "inputs/style",
         "ip_image": "inputs/face.png", "prompt": "wonderwoman"},
        {"id": "herge-armor", "spec": "lcm-instant", "ip_image": "inputs/face.png",
         "prompt": "herge_style woman in armor, best quality, high quality"},
        {"id": "statue-depth", "spec": "sd15-controlnet-depth", "control_image": "inputs/depth.png",
         "ip_image": "inputs/diner.png", "prompt": "best quality, high quality"},
    ]
    registry = SpecRegistry()
    for row in rows:
        steps = registry.get(row["spec"]).defaults.num_inference_steps or DEMO_STEPS
        row["num_inference_steps"] = min(steps, DEMO_STEPS)
        row.setdefault("num_images", 1)
        row.setdefault("num_frames", None)
    return rows
