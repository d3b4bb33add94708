"""An edit's images, read from the object store and decoded safely: its source, its references and its mask.
Moderation checks them before it forwards the edit; the edit stage reads them again to render."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from pixelpipe.core.events import ImageRequest
from pixelpipe.core.objects import ObjectStore, ObjectStoreError
from pixelpipe.processors.imaging import ImageError, decode_image, decode_mask
from pixelpipe.processors.messages import StageContext, StageFailure, is_transient, with_retries


@dataclass(frozen=True)
class EditInputs:
    """An edit's images, decoded: the source, the references some models take beside it, and the mask."""

    source: Image.Image
    references: list[Image.Image]
    mask: Image.Image | None

    @property
    def images(self) -> list[Image.Image]:
        """The source, then the references: every picture the model is given."""
        return [self.source, *self.references]


def load_edit_inputs(request: ImageRequest, store: ObjectStore, context: StageContext) -> EditInputs:
    """The edit's source image, references and mask, read from the configured store and decoded safely."""
    source_uri, mask_uri = request.source_image_uri, request.mask_uri
    assert source_uri is not None  # validated: an EDIT has a source
    max_pixels, max_bytes = context.limits.max_source_pixels, context.limits.max_source_bytes

    def read(uri: str, what: str) -> bytes:
        return with_retries(lambda: store.get(uri, max_bytes), context.stages, f"read {what}", request.deadline)

    def reference(index: int, uri: str) -> Image.Image:
        try:
            return decode_image(read(uri, "reference image"), max_pixels=max_pixels)
        except (ObjectStoreError, ImageError) as e:  # named, as the source is by being the only other one
            raise StageFailure("INVALID_SOURCE", f"reference image {index} ({uri}): {e}") from e

    try:
        source = decode_image(read(source_uri, "source"), max_pixels=max_pixels)
        references = [reference(index, uri) for index, uri in enumerate(request.reference_image_uris, 1)]
        mask = decode_mask(read(mask_uri, "mask"), source, max_pixels=max_pixels) if mask_uri else None
    except (ObjectStoreError, ImageError) as e:
        raise StageFailure("INVALID_SOURCE", str(e)) from e
    except Exception as e:
        if is_transient(e):
            raise StageFailure("STORAGE_UNAVAILABLE", f"reading the edit inputs failed: {e}") from e
        raise
    return EditInputs(source, references, mask)
