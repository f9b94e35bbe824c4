"""Decoding is bounded and faithful: a too-large image is refused from its header and said to be too large,
16-bit and float images are scaled to 8 bits (never clipped), out-of-range floats are refused with a reason,
and JPEG/WebP outputs keep non-ASCII parameters."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
from util import header_only_png

from ipaflow.tasks.media import MAX_INPUT_PIXELS, MediaError, decode_image, encode_image, probe_image, read_parameters


def encoded(image: PIL.Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(30000, 30000), (9000, 9000)])  # past Pillow's own bomb limit, and below it
def test_too_large_is_said_from_the_header(size):
    data = header_only_png(*size)
    assert probe_image(header_only_png(8192, 8192)).pixels == MAX_INPUT_PIXELS  # the largest allowed
    with pytest.raises(MediaError) as caught:
        probe_image(data)
    assert str(caught.value) == (f"too large: an image of {size[0]}x{size[1]} pixels, more than the "
                                 f"{MAX_INPUT_PIXELS} an input may have")
    with pytest.raises(MediaError, match="too large"):
        decode_image(data)


def test_sixteen_bit_images_are_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)  # a depth map's range
    image = decode_image(encoded(PIL.Image.fromarray(ramp)))
    assert image.mode == "RGB"
    values = np.asarray(image)[..., 0].astype(int)
    expected = np.rint(ramp / 257).astype(int)
    assert np.abs(values - expected).max() <= 1
    assert values.min() == 0 and values.max() == 255 and len(np.unique(values)) > 200  # clipped: almost all 255


def test_float_images_in_zero_one_are_scaled_others_refused():
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    values = np.asarray(decode_image(encoded(PIL.Image.fromarray(ramp), "TIFF")))[..., 0].astype(int)
    assert values.min() == 0 and values.max() == 255 and len(np.unique(values)) > 200  # clipped: almost all 0

    with pytest.raises(MediaError, match=r"a float image with values from 0 to 1000; ipaflow reads float images "
                                         r"with values in \[0, 1\]"):
        decode_image(encoded(PIL.Image.fromarray(ramp * 1000), "TIFF"))
    wide = np.linspace(0, 100_000, 64, dtype=np.int32).reshape(8, 8)
    with pytest.raises(MediaError, match="32-bit integer image with values from 0 to 100000"):
        decode_image(encoded(PIL.Image.fromarray(wide), "TIFF"))


def test_eight_bit_images_decode_as_diffusers_load_image_does():
    import PIL.ImageOps

    rgba = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 4), dtype=np.uint8), "RGBA")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotated, as phone photos are
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG", exif=exif)
    ours = decode_image(buffer.getvalue())
    # diffusers.utils.load_image's own steps (importing diffusers costs seconds)
    theirs = PIL.ImageOps.exif_transpose(PIL.Image.open(io.BytesIO(buffer.getvalue()))).convert("RGB")
    assert ours.size == theirs.size == (32, 48) and np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "png"])
def test_embedded_parameters_keep_non_ascii_text(fmt):
    params = {"prompt": "café au lait, 東京の夜, ünïcödé ✓", "seed": 7}
    data = encode_image(PIL.Image.new("RGB", (16, 16)), fmt, params)
    assert read_parameters(data) == params
    assert data == encode_image(PIL.Image.new("RGB", (16, 16)), fmt, params)  # still deterministic
