"""Size and encode time of one 16-frame 512x512 clip as GIF, MP4 (H.264) and WebM (VP9), through ipaflow's own
encoder (``ipaflow.tasks.video.encode_video``, the settings a render uses, parameters embedded).

The frames are a synthetic scene with the traits of a rendered clip: a smooth sky gradient over fractal value
noise terrain (textured down to single pixels, its colours mixed from three noise fields: soil, grass, rock),
the camera panning 6 pixels a frame, a shaded ball crossing it and the light slowly changing, built with a fixed
seed so every run encodes the same pixels. GIF's palette and LZW fare worse on such content than on flat
cartoons, and better than on pure noise; real AnimateDiff output sits in between.
Each format is encoded --runs times (one thread, as a render does); the median time is printed with the size,
the size relative to GIF, the quality kept (PSNR of the decoded frames against the frames encoded, RGB) and the
frames and fps the clip decodes with (GIF stores delays in 10 ms: 8 fps plays at 8.33).

    python benchmarks/video_formats.py            # about 30 s on 2 cores
    python benchmarks/video_formats.py --runs 3 --fps 8
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time

import numpy as np
import PIL.Image

from ipaflow.tasks.video import encode_video, read_video

FORMATS = ("gif", "mp4", "webm")


def fractal_noise(height: int, width: int, rng: np.random.Generator, octaves: int = 8) -> np.ndarray:
    """Value noise in [0, 1]: random grids of growing resolution, upsampled bilinearly and summed (1/f-like)."""
    total = np.zeros((height, width), dtype=np.float32)
    weight_sum = 0.0
    for octave in range(octaves):
        cells = 4 * 2 ** octave
        grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
        image = PIL.Image.fromarray(grid, mode="F").resize((width, height), PIL.Image.BILINEAR)
        weight = 0.7 ** octave
        total += weight * np.asarray(image)
        weight_sum += weight
    total /= weight_sum
    return (total - total.min()) / (total.max() - total.min())


def scene(frames: int = 16, size: int = 512, pan: int = 6, seed: int = 0) -> list[PIL.Image.Image]:
    """The synthetic clip: panning textured terrain under a sky, a shaded ball crossing, light changing."""
    rng = np.random.default_rng(seed)
    wide = size + pan * frames
    terrain, moisture, rock = (fractal_noise(size, wide, rng) for _ in range(3))
    soil = np.array([40, 70, 30], np.float32) + terrain[..., None] * np.array([130, 80, 60], np.float32)
    grass = np.array([30, 110, 40], np.float32) + terrain[..., None] * np.array([60, 90, 30], np.float32)
    stone = np.array([90, 90, 100], np.float32) + terrain[..., None] * np.array([120, 115, 110], np.float32)
    ground = soil + moisture[..., None] * (grass - soil)  # colours vary in three independent directions
    ground += np.clip(rock * 2.5 - 1.5, 0, 1)[..., None] * (stone - ground)
    rows = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    sky = np.array([90, 140, 220], np.float32) * (1 - rows) + np.array([210, 225, 240], np.float32) * rows
    horizon = (size * 0.45 + 40 * np.sin(np.linspace(0, 3 * np.pi, wide)) * terrain[size // 2]).astype(int)
    yy, xx = np.mgrid[0:size, 0:wide]
    world = np.where((yy >= horizon[None, :])[..., None], ground, np.broadcast_to(sky, (size, wide, 3)))
    out = []
    for t in range(frames):
        view = world[:, t * pan:t * pan + size].copy()
        view *= 0.85 + 0.15 * np.sin(t / frames * np.pi)  # the light changing
        cy, cx, radius = size * 0.6, size * (0.15 + 0.7 * t / (frames - 1)), size * 0.09
        dy, dx = np.mgrid[0:size, 0:size]
        inside = (dy - cy) ** 2 + (dx - cx) ** 2 <= radius ** 2
        shade = np.clip(1 - ((dy - cy + radius / 2) ** 2 + (dx - cx + radius / 2) ** 2) / (2 * radius ** 2), 0.2, 1)
        view[inside] = (np.array([220, 60, 50], np.float32) * shade[..., None])[inside]
        out.append(PIL.Image.fromarray(np.clip(view, 0, 255).astype(np.uint8)))
    return out


def psnr(frames: list[PIL.Image.Image], data: bytes) -> float:
    """Peak signal-to-noise ratio of the decoded clip against the frames encoded, in dB (RGB, all frames)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    error = np.mean([np.mean((got.astype(np.float64) - np.asarray(sent, np.float64)) ** 2)
                     for got, sent in zip(decoded, frames)])
    return float(10 * np.log10(255 ** 2 / error))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fps", type=int, default=8)
    args = parser.parse_args()
    frames = scene()
    params = {"id": "bench", "spec": "animatediff-video", "seed": 0, "prompt": "a red ball rolling over hills"}
    results = {}
    for fmt in FORMATS:
        times, data = [], b""
        for _ in range(args.runs):
            start = time.perf_counter()
            data = encode_video(frames, fmt, args.fps, params)
            times.append(time.perf_counter() - start)
        info = read_video(data)
        assert info.frames == len(frames) and (info.width, info.height) == (512, 512), info
        results[fmt] = (len(data), statistics.median(times), info, psnr(frames, data))
    gif_bytes = results["gif"][0]
    print(f"{len(frames)} frames of 512x512 (synthetic panning scene), {args.fps} fps, median of {args.runs} encodes; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one encoder thread")
    print()
    print("| format | codec | bytes | KiB | vs GIF | encode s | PSNR dB | decoded frames @ fps |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for fmt, (size, seconds, info, quality) in results.items():
        print(f"| {fmt} | {info.codec} | {size} | {size / 1024:.0f} | {size / gif_bytes:.1%} | {seconds:.3f} | "
              f"{quality:.1f} | {info.frames} @ {float(info.fps):g} |")


if __name__ == "__main__":
    main()
