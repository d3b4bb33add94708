"""Previews of images in progress, for callers streaming partial images (the gateway's ``stream: true``).

A request asks for up to ``MAX_PARTIAL_IMAGES`` previews in a Kafka header (``PARTIAL_IMAGES_HEADER``), which
moderation passes on with it. While its batch renders, the render stage installs a hook for the model call on its
thread (``previewing``); diffusers calls it after each denoising step (``callback_on_step_end``), and at evenly
spaced steps the hook projects the request's latents to RGB with a fixed linear map (no VAE: about a millisecond
for a 64x64 latent), encodes a small JPEG and sends it to the request's reply topic, keyed by request id, with its
index in ``PREVIEW_HEADER``. Previews are best effort and never awaited; they are not output-moderated (the
completed image is), so they are the latents' colours at 1/8 of the resolution, scaled up: a blur of the layout.
Flux packs its latents into tokens; its calls get no previews.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from pixelpipe.core.topics import MAX_PARTIAL_IMAGES, PARTIAL_IMAGES_HEADER, PREVIEW_HEADER

log = logging.getLogger(__name__)
# (step, steps of the call, first batch row of the call, latents after the step: rows x channels x h x w)
PreviewHook = Callable[[int, int, int, torch.Tensor], None]
# (reply topic, key, value, headers): sends without waiting
PreviewSink = Callable[[str, bytes, bytes, Mapping[str, bytes]], None]
# Stable Diffusion's four latent channels to RGB: the least-squares fit of the VAE decoder's mean colours that cheap
# previewers (A1111's "Approx cheap", ComfyUI's latent2rgb) use.
LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
PREVIEW_JPEG_QUALITY = 80
_hooks = threading.local()


def partial_images(headers: Mapping[str, bytes]) -> int:
    """How many previews a request's headers ask for (0 to MAX_PARTIAL_IMAGES; anything else is 0)."""
    raw = headers.get(PARTIAL_IMAGES_HEADER, b"")
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return int(text) if text.isdigit() and int(text) <= MAX_PARTIAL_IMAGES else 0


def passed_on(headers: Mapping[str, bytes]) -> dict[str, bytes]:
    """The headers moderation forwards with a request besides its stamp."""
    count = partial_images(headers)
    return {PARTIAL_IMAGES_HEADER: str(count).encode()} if count else {}


def preview_steps(steps: int, count: int) -> set[int]:
    """The 0-based steps after which previews are taken: ``count`` of them, evenly spaced before the last step."""
    return {max(0, (steps * (k + 1)) // (count + 1) - 1) for k in range(count)} - {steps - 1} if steps > 1 else set()


def latent_preview(latent: torch.Tensor, width: int, height: int) -> Image.Image:
    """One row's latents (channels x h x w) as a ``width`` x ``height`` RGB image: a linear projection, no VAE."""
    latent = latent.detach().float().cpu()
    if latent.shape[0] == len(LATENT_RGB):
        rgb = torch.einsum("chw,cr->rhw", latent, torch.tensor(LATENT_RGB))
    else:  # another family's channels: the first three, standardised
        rgb = latent[:3]
        rgb = (rgb - rgb.mean()) / (rgb.std() + 1e-6) * 0.5
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels, "RGB").resize((width, height), Image.Resampling.BILINEAR)


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
    return out.getvalue()


@contextlib.contextmanager
def previewing(hook: PreviewHook | None) -> Iterator[None]:
    """Install ``hook`` for the model calls made on this thread inside the block."""
    _hooks.hook = hook
    try:
        yield
    finally:
        _hooks.hook = None


def step_callback(row: int) -> dict[str, Any]:
    """The pipeline arguments that call this thread's hook after each step of a call whose first row is ``row``;
    none when no hook is installed."""
    hook: PreviewHook | None = getattr(_hooks, "hook", None)
    if hook is None:
        return {}

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            hook(step, int(getattr(pipe, "num_timesteps", 0) or 0), row, kwargs["latents"])
        except Exception:  # a preview must never fail a render
            log.exception("preview failed")
        return kwargs

    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}


def hook_for(
    requests: Sequence[tuple[str, str | None, int, Mapping[str, bytes]]],
    width: int,
    height: int,
    sink: PreviewSink | None,
) -> PreviewHook | None:
    """A hook sending the previews the batch's requests asked for, or None when none did. ``requests`` are, in
    batch order, (request id, reply topic, images per request, Kafka headers); only a request's first image is
    previewed."""
    wanted = {
        index: (request_id, reply_topic, n, count)
        for index, (request_id, reply_topic, n, headers) in enumerate(requests)
        if reply_topic and (count := partial_images(headers))
    }
    if not wanted or sink is None:
        return None
    rows = {sum(r[2] for r in requests[:index]): index for index in wanted}  # each request's first row
    sent: dict[int, int] = {}

    def hook(step: int, steps: int, first_row: int, latents: torch.Tensor) -> None:
        for b in range(latents.shape[0]):
            index = rows.get(first_row + b)
            if index is None:
                continue
            request_id, reply_topic, _, count = wanted[index]
            if step not in preview_steps(steps, count) or sent.get(index, 0) >= count:
                continue
            data = jpeg(latent_preview(latents[b], width, height))
            assert reply_topic is not None
            sink(reply_topic, request_id.encode(), data, {PREVIEW_HEADER: str(sent.get(index, 0)).encode()})
            sent[index] = sent.get(index, 0) + 1

    return hook
