"""Image bytes in and out: decode untrusted uploads safely, encode results as metadata-free PNG.

Source images and masks come from users; a crafted file can be a decompression bomb (a few KB that decode
to gigapixels) or a format with a history of decoder bugs. So decoding checks the declared size *before*
pixels are decoded, accepts only a few formats, and verifies the file's structure before loading it.
"""

from __future__ import annotations

import io
import warnings
import zlib

from PIL import Image

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
DEFAULT_MAX_PIXELS = 2048 * 2048


class ImageError(ValueError):
    """Image bytes that cannot or must not be decoded, or a mask that does not fit its image."""


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image`` with no metadata: no EXIF, no text chunks, no ICC profile."""
    if image.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "I;16"):
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    # The PNG writer takes metadata only from .info and .encoderinfo. A plain in-memory image with neither (what
    # the models return) is written as it is; anything else is first copied from its raw pixels, which leaves both
    # empty, so nothing (EXIF, text, ICC) can ride along.
    if type(image) is not Image.Image or image.info or getattr(image, "encoderinfo", None):
        image = Image.frombytes(image.mode, image.size, image.tobytes())
    out = io.BytesIO()
    # Run-length matching after PNG's row filters: as small as zlib's default strategy on rendered images, in
    # less than half the time.
    image.save(out, format="PNG", optimize=False, compress_type=zlib.Z_RLE)
    return out.getvalue()


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] = ALLOWED_FORMATS,
    mode: str = "RGB",
) -> Image.Image:
    """Decode untrusted image bytes into a fully loaded image in ``mode`` (RGB by default).

    Raises ``ImageError`` for unreadable bytes, a format outside ``allowed_formats``, or more than
    ``max_pixels`` pixels (checked from the header, before decoding).
    """
    if not data:
        raise ImageError("empty image")
    # Pillow warns past its global MAX_IMAGE_PIXELS (and refuses past twice that); our limit is per call.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _decode(data, max_pixels, allowed_formats).convert(mode)


def _decode(data: bytes, max_pixels: int, allowed_formats: frozenset[str]) -> Image.Image:
    # Image.open reads only the header, so the size is known before any pixel is decoded.
    try:
        probe = Image.open(io.BytesIO(data), formats=sorted(allowed_formats))
    except Image.UnidentifiedImageError:
        raise ImageError(_refusal(data, allowed_formats)) from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image refused as a decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"unreadable image: {e}") from None
    width, height = probe.size
    if width * height > max_pixels:
        raise ImageError(
            f"image refused as a possible decompression bomb: {width}x{height} = {width * height} pixels "
            f"is more than the limit of {max_pixels}"
        )
    if width < 1 or height < 1:
        raise ImageError(f"image has an empty size {width}x{height}")
    # verify() checks the structure (chunk CRCs for PNG) but leaves the image unusable: reopen to load.
    try:
        probe.verify()
        image = Image.open(io.BytesIO(data), formats=[probe.format])
        image.load()  # animated files: the first frame
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"corrupt {probe.format} image: {e}") from None
    return image


def decode_mask(data: bytes, image: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an inpainting mask (white = repaint) to mode "L"; it must have ``image``'s size."""
    mask = decode_image(data, max_pixels=max_pixels, mode="L")
    if mask.size != image.size:
        raise ImageError(
            f"mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; "
            "a mask must have the same size as its image"
        )
    return mask


def _refusal(data: bytes, allowed_formats: frozenset[str]) -> str:
    """Why bytes outside the allow-list were refused, naming the format when Pillow knows it (header only)."""
    allowed = ", ".join(sorted(allowed_formats))
    try:
        with Image.open(io.BytesIO(data)) as image:
            return f"{image.format} is not an allowed image format ({allowed})"
    except Exception:  # anything Pillow cannot open at all
        return f"not an image (allowed formats: {allowed})"
