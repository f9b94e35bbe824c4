"""Media: decoding input images the way ``diffusers.utils.load_image`` does, encoding PNG/JPEG/WebP/GIF outputs.

Outputs carry their parameters: PNG in a ``parameters`` text chunk, JPEG/WebP in the EXIF image description,
GIF in its comment. Encoding is deterministic: the same pixels and parameters give the same bytes.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from typing import Any

import PIL.Image
import PIL.ImageOps
from PIL.PngImagePlugin import PngInfo

MAX_INPUT_PIXELS = 64 * 1024 * 1024
MAX_INPUT_BYTES = 256 * 1024 * 1024


class MediaError(ValueError):
    """An input that is not a usable image."""


def decode_image(data: bytes) -> PIL.Image.Image:
    """Bytes to an RGB image, EXIF orientation applied (``diffusers.utils.load_image`` semantics).

    Raises MediaError with a one-line reason for anything that is not a whole, reasonably sized image:
    the row fails alone, with that reason, instead of a traceback ending the shard.
    """
    if not data:
        raise MediaError("empty file")
    if len(data) > MAX_INPUT_BYTES:
        raise MediaError(f"file larger than {MAX_INPUT_BYTES // (1024 * 1024)} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise MediaError(f"image of {image.width}x{image.height} pixels is too large")
            image.load()
            return PIL.ImageOps.exif_transpose(image).convert("RGB")
    except MediaError:
        raise
    except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning):
        raise MediaError("not a decodable image") from None
    except Exception as exc:  # noqa: BLE001 - truncated data, bad EXIF, ...: PIL raises many kinds
        detail = " ".join(str(exc).split())[:120] or exc.__class__.__name__
        raise MediaError(f"corrupt image ({detail})") from None


def params_text(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def encode_image(image: PIL.Image.Image, fmt: str, params: dict[str, Any], quality: int = 95) -> bytes:
    """One rendered image in the spec's format, with its parameters embedded."""
    buffer = io.BytesIO()
    text = params_text(params)
    if fmt == "png":
        info = PngInfo()
        info.add_itxt("parameters", text)
        image.save(buffer, format="PNG", pnginfo=info)
    elif fmt in ("jpeg", "webp"):
        exif = PIL.Image.Exif()
        exif[0x010E] = text  # ImageDescription
        image.save(buffer, format=fmt.upper(), quality=quality, exif=exif)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buffer.getvalue()


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


def read_parameters(data: bytes) -> dict[str, Any]:
    """The parameters embedded in an output written by ipaflow."""
    image = PIL.Image.open(io.BytesIO(data))
    if image.format == "PNG":
        return json.loads(image.text["parameters"])
    if image.format == "GIF":
        return json.loads(image.info["comment"].decode("utf-8"))
    return json.loads(image.getexif()[0x010E])
