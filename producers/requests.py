"""Building ImageRequests for the SDK: fresh ids and times, the rest as given; ``validate_request`` checks them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

from pixelpipe.core.clock import utc_now
from pixelpipe.core.events import ImageRequest
from pixelpipe.core.ids import new_event_id


def new_request(
    *,
    prompt: str,
    model: str,
    user_id: str,
    kind: str = "GENERATE",
    request_id: str | None = None,
    negative_prompt: str | None = None,
    n: int = 1,
    width: int = 512,
    height: int = 512,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    source_image_uri: str | None = None,
    reference_image_uris: Sequence[str] = (),
    mask_uri: str | None = None,
    strength: float | None = None,
    experiments: Mapping[str, str] | None = None,
    priority: str = "BATCH",
    deadline: dt.datetime | None = None,
    reply_topic: str | None = None,
) -> ImageRequest:
    """An ImageRequest with fresh ids and times; ``Publisher.publish`` validates it before sending."""
    now = utc_now()
    return ImageRequest(
        event_id=new_event_id(),
        request_id=request_id or new_event_id(),
        event_time=now,
        kind=kind,  # type: ignore[arg-type]  # validated before sending
        user_id=user_id,
        prompt=prompt,
        negative_prompt=negative_prompt,
        n=n,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seed=seed,
        model=model,
        source_image_uri=source_image_uri,
        reference_image_uris=list(reference_image_uris),
        mask_uri=mask_uri,
        strength=strength,
        experiments=dict(experiments or {}),
        priority=priority,  # type: ignore[arg-type]
        deadline=deadline,
        created_at=now,
        reply_topic=reply_topic,
    )
