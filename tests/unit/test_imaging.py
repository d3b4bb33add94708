"""PNG encoding of outputs: metadata never rides along, whichever way an image carries it."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pixelpipe.processors.imaging import encode_png


def test_a_plain_image_is_encoded_losslessly() -> None:
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    reread = Image.open(io.BytesIO(encode_png(image)))
    assert reread.info == {} and np.array_equal(np.asarray(reread), np.asarray(image))


def test_metadata_set_on_the_image_for_the_writer_is_left_out() -> None:
    image = Image.new("RGB", (16, 8), (10, 20, 30))
    image.encoderinfo = {"exif": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00", "icc_profile": b"not a profile"}
    image.info["transparency"] = (10, 20, 30)
    reread = Image.open(io.BytesIO(encode_png(image)))
    assert "exif" not in reread.info and "icc_profile" not in reread.info and "transparency" not in reread.info
    assert np.array_equal(np.asarray(reread), np.asarray(image))
