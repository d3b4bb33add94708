"""Uploaded edit images (the source and its references) and masks, checked before anything is stored: like every
other source, a bounded number of bytes, an allowed format (PNG, JPEG, WEBP), a pixel count read from the header
before any pixel is decoded (a decompression bomb is refused unopened), and a structure that verifies. The pipeline
checks the stored copies again when it moderates and edits them."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from pixelpipe.core.validation import SIDE_MULTIPLE
from pixelpipe.gateway.errors import invalid

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def check_image(param: str, data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """The decoded upload, or a 400 naming ``param`` and saying what is wrong."""
    if not data:
        raise invalid(param, f"'{param}' is empty")
    if len(data) > max_bytes:
        raise invalid(param, f"'{param}' is {len(data)} bytes, over the {max_bytes} accepted")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            probe = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
        except Image.DecompressionBombError:
            raise invalid(param, f"'{param}' was refused as a decompression bomb") from None
        except (OSError, ValueError, SyntaxError):
            raise invalid(param, f"'{param}' is not a PNG, JPEG or WEBP image") from None
        width, height = probe.size
        if width * height > max_pixels:
            raise invalid(
                param,
                f"'{param}' is {width}x{height} = {width * height} pixels, over the {max_pixels} accepted "
                "(a possible decompression bomb)",
            )
        try:
            probe.verify()
            image = Image.open(io.BytesIO(data), formats=[probe.format])
            image.load()
        except (OSError, ValueError, SyntaxError) as e:
            raise invalid(param, f"'{param}' is a corrupt {probe.format} image: {e}") from None
    return image


def png_bytes(image: Image.Image) -> bytes:
    """PNG bytes of the pixels alone: no metadata travels from an upload into the store."""
    clean = Image.frombytes(image.mode, image.size, image.tobytes())
    out = io.BytesIO()
    clean.save(out, format="PNG")
    return out.getvalue()


def source_png(image: Image.Image) -> bytes:
    """An edit's source (or reference) as RGB PNG, sides cut down to multiples of 8 (what the models take)."""
    if min(image.size) < SIDE_MULTIPLE:
        raise invalid(
            "image", f"'image' is {image.width}x{image.height}; each side must be {SIDE_MULTIPLE} pixels or more"
        )
    rgb = image.convert("RGB")
    width, height = rgb.width - rgb.width % 8, rgb.height - rgb.height % 8
    if (width, height) != rgb.size:
        rgb = rgb.crop((0, 0, width, height))
    return png_bytes(rgb)


def mask_png(mask: Image.Image, size: tuple[int, int]) -> bytes:
    """OpenAI's mask (transparent where the image is to be edited) as the pipeline's (white where repainted).

    A mask with an alpha channel repaints where alpha is below half; one without is taken as the pipeline's own
    (white repainted). It must have the source's size."""
    if mask.size[0] - mask.size[0] % 8 != size[0] or mask.size[1] - mask.size[1] % 8 != size[1]:
        raise invalid("mask", f"'mask' is {mask.width}x{mask.height}; it must have the image's size")
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        alpha = mask.convert("RGBA").getchannel("A")
        converted = alpha.point(lambda a: 255 if a < 128 else 0)
    else:
        converted = mask.convert("L")
    return png_bytes(converted.crop((0, 0, *size)))
