"""Media: decoding input images the way ``diffusers.utils.load_image`` does, encoding PNG/JPEG/WebP outputs
(videos: ``tasks/video.py``).

Decoding is bounded: an image's header is read first (``probe_image``), so a too-large image is refused by
its size before any pixel is decoded, and a row's images can be counted against the row's pixel budget
(``tasks/inputs.py``). Images of more than 8 bits per channel are scaled to 8 bits, never clipped: 16-bit
(depth maps) by 65535 -> 255, float ones from [0, 1]; float values outside [0, 1] are refused with a reason.

Outputs carry their parameters: PNG in a ``parameters`` text chunk, JPEG/WebP in the EXIF image description
(JSON with non-ASCII text escaped: EXIF text is ASCII; a JPEG's texts shortened to fit its 64 KiB EXIF
segment), GIF in its comment (``tasks/video.py`` writes it). Encoding is deterministic: the same pixels and
parameters give the same bytes.
"""

from __future__ import annotations

import io
import json
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
from PIL.PngImagePlugin import PngInfo

from ipaflow.core.input_reads import MAX_INPUT_BYTES  # the byte limit of inputs, defined with the reads

MAX_INPUT_PIXELS = 64 * 1024 * 1024  # one image: 8192 x 8192
# Pillow warns from 89 Mpx on and refuses from 179 Mpx on, before ipaflow could say "too large": ipaflow's own
# limit is lower and checked right after the header is read, so the warning says nothing more.
warnings.filterwarnings("ignore", category=PIL.Image.DecompressionBombWarning)

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class MediaError(ValueError):
    """An input that is not a usable image."""


@dataclass(frozen=True)
class Probe:
    """What an image's header says, before any pixel is decoded."""

    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _bomb_size(data: bytes | bytearray, message: str) -> str:
    """An image Pillow refused as a decompression bomb: its size, as WxH where the header says it simply
    (PNG), else as Pillow's pixel count."""
    if bytes(data[:8]) == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", bytes(data[16:24]))
        return f"{width}x{height}"
    found = re.search(r"\((\d+) pixels\)", message)
    return found.group(1) if found else "more than 178956970"


def _open(data: bytes | bytearray) -> PIL.Image.Image:
    """The image opened (header read, pixels not decoded); MediaError for what is not a usable image."""
    if not data:
        raise MediaError("empty file")
    if len(data) > MAX_INPUT_BYTES:
        raise MediaError(f"file larger than {MAX_INPUT_BYTES // (1024 * 1024)} MiB")
    try:
        image = PIL.Image.open(io.BytesIO(data))
    except PIL.Image.DecompressionBombError as exc:
        raise MediaError(f"too large: an image of {_bomb_size(data, str(exc))} pixels, more than the "
                         f"{MAX_INPUT_PIXELS} an input may have") from None
    except PIL.UnidentifiedImageError:
        raise MediaError("not a decodable image") from None
    except Exception as exc:  # noqa: BLE001 - a damaged header: PIL raises many kinds
        raise MediaError(_corrupt(exc)) from None
    if image.width * image.height > MAX_INPUT_PIXELS:
        raise MediaError(f"too large: an image of {image.width}x{image.height} pixels, more than the "
                         f"{MAX_INPUT_PIXELS} an input may have")
    return image


def _corrupt(exc: Exception) -> str:
    detail = " ".join(str(exc).split())[:120] or exc.__class__.__name__
    return f"corrupt image ({detail})"


def probe_image(data: bytes | bytearray) -> Probe:
    """The size and mode of an image from its header; MediaError as ``decode_image`` would raise it for an
    empty file, a file that is no image, or one too large."""
    image = _open(data)
    return Probe(image.width, image.height)


def decode_image(data: bytes | bytearray) -> PIL.Image.Image:
    """Bytes to an RGB image, EXIF orientation applied (``diffusers.utils.load_image`` semantics), deeper
    images scaled to 8 bits.

    Raises MediaError with a one-line reason for anything that is not a whole, reasonably sized image:
    the row fails alone, with that reason, instead of a traceback ending the shard.
    """
    image = _open(data)
    try:
        image.load()
        PIL.ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)
    except MediaError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated data, bad EXIF, ...: PIL raises many kinds
        raise MediaError(_corrupt(exc)) from None


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB with 8 bits per channel. ``convert("RGB")`` clips deeper images (16-bit depth maps turn white,
    float ones black), so those are scaled first."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        values = np.asarray(image)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:
            raise MediaError(f"a 32-bit integer image with values from {low} to {high}; ipaflow reads integer "
                             "images of up to 16 bits (0-65535): save it as 8 or 16 bits")
        scaled = (values.astype(np.uint32) * 255 + 32767) // 65535
        return PIL.Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image)
        if values.size and not np.isfinite(values).all():
            raise MediaError("a float image with values that are not finite (nan or inf)")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0 or high > 1:
            raise MediaError(f"a float image with values from {low:g} to {high:g}; ipaflow reads float images "
                             "with values in [0, 1]: scale it, or save it as 8 or 16 bits")
        return PIL.Image.fromarray(np.rint(values * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def params_text(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# A JPEG's EXIF segment holds at most 64 KiB (its length is 16 bits); the description gets what the other
# tags leave. WebP's EXIF chunk has no such limit.
EXIF_TEXT_BYTES = 60_000
TRUNCATED = "truncated"  # the key naming the texts shortened to fit (the record keeps them whole)


def exif_description(params: dict[str, Any], limit: int | None) -> str:
    """The parameters as EXIF ImageDescription text. It is ASCII: Pillow would write "?" for every other
    character, so non-ASCII text is kept as JSON escapes, which read_parameters (any JSON reader) turns back
    into the same text. Where it would not fit ``limit`` bytes (a 100,000-character prompt in a JPEG), the
    longest texts are shortened and named under ``truncated``: an output never fails for its metadata."""
    text = json.dumps(params, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    if limit is None or len(text) <= limit:
        return text
    for keep in (4096, 1024, 256, 0):
        cut = sorted(k for k, v in params.items() if isinstance(v, str) and len(v) > keep)
        shortened = {k: (v[:keep] if k in cut else v) for k, v in params.items()}
        shortened[TRUNCATED] = cut
        text = json.dumps(shortened, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        if len(text) <= limit:
            return text
    return json.dumps({TRUNCATED: ["*"]})


def encode_image(image: PIL.Image.Image, fmt: str, params: dict[str, Any], quality: int = 95) -> bytes:
    """One rendered image in the spec's format, with its parameters embedded."""
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngInfo()
        info.add_itxt("parameters", params_text(params))
        image.save(buffer, format="PNG", pnginfo=info)
    elif fmt in ("jpeg", "webp"):
        exif = PIL.Image.Exif()
        exif[0x010E] = exif_description(params, EXIF_TEXT_BYTES if fmt == "jpeg" else None)
        image.save(buffer, format=fmt.upper(), quality=quality, exif=exif)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buffer.getvalue()


def read_parameters(data: bytes) -> dict[str, Any]:
    """The parameters embedded in an output written by ipaflow."""
    image = PIL.Image.open(io.BytesIO(data))
    if image.format == "PNG":
        return json.loads(image.text["parameters"])
    if image.format == "GIF":
        return json.loads(image.info["comment"].decode("utf-8"))
    return json.loads(image.getexif()[0x010E])
