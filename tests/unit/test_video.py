"""Video outputs: GIF, MP4 (H.264, yuv420p) and WebM (VP9) decode with PyAV to the frames, frame rate and size
they were given, carry their parameters in the container, come out byte for byte the same from the same
frames, and travel through the spec, the Parquet container and the gallery under their own extension."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest

from ipaflow.specs.registry import SpecError, SpecRegistry, parse_spec
from ipaflow.tasks.containers import ContainerBuilder, _parquet_without
from ipaflow.tasks.gallery import render_gallery
from ipaflow.tasks.video import CODECS, encode_video, first_frame, is_film, read_video

PARAMS = {"id": "wave", "spec": "animatediff-video", "seed": 7, "prompt": "a gummy bear waving, ünïcödé ✓"}


def moving_frames(count: int = 16, width: int = 64, height: int = 48) -> list[PIL.Image.Image]:
    """A smooth scene that moves: a gradient background and a bright square sliding across it."""
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(count):
        image = np.stack([(x * 4 + t * 8) % 256, (y * 5) % 256, np.full_like(x, 96)], axis=-1).astype(np.uint8)
        left = (t * 3) % (width - 12)
        image[10:22, left:left + 12] = (250, 240, 40)
        frames.append(PIL.Image.fromarray(image))
    return frames


def decoded_frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.parametrize("fmt, codec, fps", [("mp4", "h264", 8), ("webm", "vp9", 12), ("mp4", "h264", 24)])
def test_a_clip_decodes_with_its_frames_fps_size_and_parameters(fmt, codec, fps):
    frames = moving_frames()
    data = encode_video(frames, fmt, fps, PARAMS)
    info = read_video(data)
    assert (info.frames, info.fps, info.width, info.height, info.codec) == (16, Fraction(fps), 64, 48, codec)
    assert info.params == PARAMS
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert abs(container.duration - 16 * 1_000_000 / fps) <= 1000  # 16 frames of 1/fps (WebM counts in ms)
    # the pixels survive the lossy codec (a mean error of a few levels out of 255)
    for got, sent in zip(decoded_frames(data), frames):
        assert np.abs(got.astype(int) - np.asarray(sent, dtype=int)).mean() < 4


def mp4_boxes(data: bytes) -> list[str]:
    """The top-level boxes of an MP4, in file order."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        boxes.append(data[offset + 4:offset + 8].decode("ascii"))
        if size < 8:
            break
        offset += size
    return boxes


def test_an_mp4_starts_with_its_index_so_players_stream_it():
    boxes = mp4_boxes(encode_video(moving_frames(), "mp4", 8, PARAMS))
    assert boxes.index("moov") < boxes.index("mdat"), boxes


def test_gif_keeps_its_comment_and_frames():
    info = read_video(encode_video(moving_frames(8), "gif", 8, PARAMS))
    assert (info.frames, info.codec, info.params) == (8, "gif", PARAMS)
    assert info.fps == Fraction(25, 3)  # 8 fps is a 125 ms delay, which GIF stores in 10 ms: 120 ms


@pytest.mark.parametrize("fmt", ["gif", "mp4", "webm"])
@pytest.mark.parametrize("size", [(64, 48), (96, 64)])  # sizes where x264's macroblock tree varied run to run
def test_the_same_frames_give_the_same_bytes(fmt, size):
    frames = moving_frames(16, *size)
    first = encode_video(frames, fmt, 8, PARAMS)
    assert {encode_video(moving_frames(16, *size), fmt, 8, PARAMS) for _ in range(6)} == {first}
    assert encode_video(frames, fmt, 8, {**PARAMS, "seed": 8}) != first  # the parameters are in the bytes
    if fmt != "gif":
        assert b"Lavf6" not in first and b"Lavc6" not in first  # bit-exact muxing: no FFmpeg version strings


def test_clips_encoded_side_by_side_are_those_encoded_alone():
    """The shard writer encodes outputs in several threads at once (tasks/writers.py)."""
    jobs = [(fmt, size) for fmt in ("mp4", "webm") for size in ((64, 48), (96, 64), (64, 64))] * 2
    alone = [encode_video(moving_frames(8, *size), fmt, 8, PARAMS) for fmt, size in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda job: encode_video(moving_frames(8, *job[1]), job[0], 8, PARAMS), jobs))
    assert together == alone


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_long_non_ascii_parameters_read_back_whole(fmt):
    params = {**PARAMS, "prompt": "ß✓ " * 40_000}
    assert read_video(encode_video(moving_frames(2), fmt, 8, params)).params == params


def test_odd_sizes_and_mixed_sizes_are_refused():
    with pytest.raises(ValueError, match="needs an even width and height, got 63x48"):
        encode_video(moving_frames(2, width=63), "mp4", 8, PARAMS)
    with pytest.raises(ValueError, match="frame 1 is 32x48, the first 64x48"):
        encode_video([moving_frames(1)[0], moving_frames(1, width=32)[0]], "webm", 8, PARAMS)
    with pytest.raises(ValueError, match="unknown video format 'mov'"):
        encode_video(moving_frames(1), "mov", 8, PARAMS)


def test_video_specs_choose_gif_mp4_or_webm_and_image_specs_cannot():
    video = SpecRegistry().get("animatediff-video")
    assert video.output_format == "gif" and video.profile.formats == ("gif", "mp4", "webm")
    assert set(video.profile.formats) == {"gif", *CODECS}  # every format a video spec may name has an encoder
    base = Path(SpecRegistry().source("animatediff-video")).read_text()
    for fmt in ("mp4", "webm"):
        spec = parse_spec(base.replace("output: {format: gif, fps: 8}", f"output: {{format: {fmt}, fps: 12}}"), "x")
        assert (spec.output_format, spec.output.fps) == (fmt, 12)
        assert spec.fingerprint() != video.fingerprint()  # a new format renders the rows again
    image_spec = Path(SpecRegistry().source("sdxl-text2img")).read_text()
    assert "output:" not in image_spec
    with pytest.raises(SpecError, match="output format 'mp4' is not one task 'text2img' writes"):
        parse_spec(image_spec + "\noutput: {format: mp4}\n", "x")


def test_a_parquet_container_of_films_has_a_video_column():
    builder = ContainerBuilder("parquet")
    clips = {name: encode_video(moving_frames(4), "mp4", 8, {**PARAMS, "id": name}) for name in ("a", "b")}
    for name, blob in clips.items():
        builder.add(f"{name}.mp4", blob, {"id": name, "key": "k", "spec": "s", "seed": 1})
    with pytest.raises(ValueError, match="holds images or videos, not both"):
        builder.add("c.png", b"png", {"id": "c"})
    data = builder.payload()
    table = pq.read_table(io.BytesIO(data))
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert "image" not in table.column_names and features["video"] == {"_type": "Video"}
    assert [v["path"] for v in table.column("video").to_pylist()] == ["a.mp4", "b.mp4"]
    assert read_video(table.column("video").to_pylist()[1]["bytes"]).params["id"] == "b"
    kept, left = _parquet_without(data, {"a.mp4"})
    table = pq.read_table(io.BytesIO(kept))
    assert left == 1 and table.schema.metadata == pq.read_table(io.BytesIO(data)).schema.metadata
    assert table.column("video").to_pylist()[0]["path"] == "b.mp4"


def test_the_gallery_plays_films_and_shows_gifs():
    out = "/renders/run"
    hostile = "'><script>alert(1)</script>"
    records = [{"id": hostile, "spec": "v", "status": "ok", "error": None, "params": "{}",
                "outputs": [f"{out}/videos/a.mp4"]},
               {"id": "b", "spec": "v", "status": "ok", "error": None, "params": "{}", "outputs": [f"{out}/videos/b.gif"]},
               {"id": "c", "spec": "v", "status": "ok", "error": None, "params": "{}",
                "outputs": [f"{out}/videos/c.webm"]}]
    page = render_gallery(records, out)
    assert "<video src='videos/a.mp4' autoplay loop muted playsinline" in page
    assert "<video src='videos/c.webm'" in page and "<img loading='lazy' src='videos/b.gif'" in page
    assert "<script>" not in page and "aria-label='&#x27;&gt;&lt;script&gt;" in page
    assert is_film("x/a.MP4") and is_film("t.tar#a.webm") and not is_film("a.gif")


@pytest.mark.parametrize("fmt", ["gif", "mp4", "webm"])
def test_previews_see_a_clip_by_its_first_frame(fmt):
    frames = moving_frames(4, 64, 48)
    data = encode_video(frames, fmt, 8, {"id": "a"})
    first = first_frame(data, f"videos/a.{fmt}")
    assert first.size == (64, 48) and first.mode == "RGB"
    assert np.abs(np.asarray(first, dtype=int) - np.asarray(frames[0].convert("RGB"), dtype=int)).mean() < 12
