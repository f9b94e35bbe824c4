"""Video outputs: a video row's frames as GIF, MP4 (H.264) or WebM (VP9), chosen by the spec's ``output.format``.

``encode_video`` is the one way to encode them. Every format carries the row's parameters, as the same JSON
text an image's metadata holds: GIF in its comment (as ``diffusers.utils.export_to_gif`` writes the frames),
MP4 and WebM in the container's ``comment`` tag. MP4 and WebM are encoded by FFmpeg through PyAV (its wheels
bundle FFmpeg with libx264 and libvpx), at the spec's fps (one frame per tick of a 1/fps time base):

- MP4: H.264 (libx264), yuv420p (what every browser and player decodes), constant quality ``crf`` 18, preset
  ``medium``, without the macroblock tree (``mbtree=0``: see ``CODECS``). 4:2:0 needs an even width and
  height: ipaflow's sizes are multiples of 8 (``Params`` refuses others), and ``encode_video`` refuses an odd
  size rather than pad or crop the frames.
- WebM: VP9 (libvpx-vp9), yuv420p, constant quality ``crf`` 31 (``b:v`` 0), ``deadline`` good, ``cpu-used`` 2.

Encoding is deterministic (the same frames and parameters give the same bytes): one encoder thread, and the
muxers in FFmpeg's bit-exact mode, which writes no version string, no random Matroska segment id and no clock
time. An MP4's index (the ``moov`` box) comes before its frames (FFmpeg's ``faststart``, which rewrites the
file once it is complete, so clips are encoded into a temporary file): a player or browser starts playing from
the first bytes it receives instead of seeking to the end of the file first.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import PIL.Image

from ipaflow.specs.outputs import EXTENSIONS
from ipaflow.tasks.media import params_text


@dataclass(frozen=True)
class Codec:
    """How one FFmpeg-encoded format is written: the muxer, the encoder and its options."""

    muxer: str
    encoder: str
    options: dict[str, str]
    muxer_options: dict[str, str] = field(default_factory=dict)


CODECS = {
    # mbtree=0: x264's macroblock tree, with one thread, still gave different bytes run to run at some small
    # sizes (64x48, 96x64: 4 outcomes in 10 encodes of the same frames; none at 64x64 or 512x512). Without it the
    # 512x512 clip of benchmarks/video_formats.py takes 142 kB instead of 67 kB at crf 18 (40.4 dB PSNR, not 40.1).
    "mp4": Codec("mp4", "libx264", {"crf": "18", "preset": "medium", "x264-params": "mbtree=0"},
                 muxer_options={"movflags": "+faststart"}),
    "webm": Codec("webm", "libvpx-vp9", {"crf": "31", "b": "0", "deadline": "good", "cpu-used": "2", "row-mt": "0"}),
}
# The outputs that are films rather than pictures: a browser shows them in <video>, Hugging Face datasets as a
# Video feature, and an image viewer (Pillow) cannot open them.
FILM_SUFFIXES = tuple(EXTENSIONS[fmt] for fmt in CODECS)
METADATA_TAG = "comment"  # the container tag holding the parameters (Matroska writes it as COMMENT)
PIXEL_FORMAT = "yuv420p"


@dataclass(frozen=True)
class VideoInfo:
    """What a decoded video holds (``read_video``)."""

    frames: int
    fps: Fraction
    width: int
    height: int
    codec: str
    params: dict[str, Any]


def encode_video(frames: Sequence[PIL.Image.Image], fmt: str, fps: int, params: dict[str, Any]) -> bytes:
    """A video row's frames in ``fmt`` (gif, mp4 or webm) at ``fps`` frames per second, ``params`` embedded."""
    if not frames:
        raise ValueError("a video needs at least one frame")
    if fmt == "gif":
        return encode_gif(frames, fps, params)
    if fmt not in CODECS:
        raise ValueError(f"unknown video format {fmt!r} (one of gif, {', '.join(CODECS)})")
    return _encode_ffmpeg(frames, CODECS[fmt], fps, params_text(params))


def is_film(name: str) -> bool:
    """Whether an output (a file name, a URI, a container member) is an MP4 or WebM."""
    return name.lower().endswith(FILM_SUFFIXES)


def first_frame(data: bytes, name: str) -> PIL.Image.Image:
    """An output's first frame as an RGB image: decoded with PyAV for an mp4/webm, with Pillow otherwise (a GIF
    opens on its first frame)."""
    if is_film(name):
        import av

        with av.open(io.BytesIO(data)) as container:
            return next(container.decode(video=0)).to_image().convert("RGB")
    with PIL.Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def encode_gif(frames: Sequence[PIL.Image.Image], fps: int, params: dict[str, Any]) -> bytes:
    """Frames to an animated GIF as ``diffusers.utils.export_to_gif`` writes it, parameters in the comment."""
    buffer = io.BytesIO()
    frames[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=list(frames[1:]),
        optimize=False,
        duration=1000 // fps,
        loop=0,
        comment=params_text(params).encode("utf-8"),
    )
    return buffer.getvalue()


def _encode_ffmpeg(frames: Sequence[PIL.Image.Image], codec: Codec, fps: int, comment: str) -> bytes:
    import av  # imported here: only video rows pay for loading FFmpeg

    width, height = frames[0].size
    if width % 2 or height % 2:
        raise ValueError(f"{codec.encoder} with {PIXEL_FORMAT} needs an even width and height, got {width}x{height}")
    with tempfile.TemporaryDirectory(prefix="ipaflow-video-") as folder:
        path = os.path.join(folder, f"clip.{codec.muxer}")  # a file: faststart rewrites it once it is complete
        options = {"fflags": "+bitexact", **codec.muxer_options}
        with av.open(path, "w", format=codec.muxer, options=options) as container:
            container.metadata[METADATA_TAG] = comment
            stream = container.add_stream(codec.encoder, rate=fps, options=codec.options)
            stream.width, stream.height, stream.pix_fmt = width, height, PIXEL_FORMAT
            stream.time_base = Fraction(1, fps)
            stream.codec_context.thread_count = 1  # one thread: the same bytes on every machine
            stream.codec_context.flags |= av.codec.context.Flags.bitexact
            for number, image in enumerate(frames):
                if image.size != (width, height):
                    raise ValueError(f"frame {number} is {image.width}x{image.height}, the first {width}x{height}")
                frame = av.VideoFrame.from_ndarray(np.asarray(image.convert("RGB")), format="rgb24")
                frame.pts = number
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        with open(path, "rb") as clip:
            return clip.read()


def read_video(data: bytes) -> VideoInfo:
    """Decode a video ipaflow wrote (any of its formats): frame count, frame rate, size, codec and the embedded
    parameters. A GIF's frame rate is what its 10 ms delays give (8 fps is stored as 120 ms: 25/3). For
    ipaflow's own outputs (tests, checks), not for untrusted input: it decodes every frame."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        tags = {key.lower(): value for key, value in container.metadata.items()}
        width, height, codec = stream.codec_context.width, stream.codec_context.height, stream.codec_context.name
        fps = stream.average_rate
    return VideoInfo(frames=frames, fps=Fraction(fps), width=width, height=height, codec=codec,
                     params=json.loads(tags[METADATA_TAG]))
