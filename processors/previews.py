"""Previews of images in progress, for callers streaming partial images (the gateway's ``stream: true``).

A request asks for up to ``MAX_PARTIAL_IMAGES`` previews in a Kafka header (``PARTIAL_IMAGES_HEADER``), which
moderation passes on with it. While its batch renders, the render stage installs a hook for the model call on its
thread (``previewing``); diffusers calls it after each denoising step (``callback_on_step_end``), and at evenly
spaced steps the hook projects the request's latents to RGB with a fixed linear map per family (no VAE: about a
millisecond for a 64x64 latent; Flux's and FLUX.2 klein's latents, packed into 2x2 patches, are unpacked first),
and the preview,
as a small JPEG, goes to the request's reply topic, keyed by request id, with its index in ``PREVIEW_HEADER``.
Previews are best effort. Each first passes the output image check the completed image passes (the stage's
``ImageModerator``, ``OUTPUT_IMAGE``): one that the check flags is withheld, and so are the request's later ones.
The check, the JPEG and the send run on a thread of their own while the next steps render (``Previews``).

The same step callback asks the render stage's stop check, when one is installed, after each step: once it says
stop (every request of the call was cancelled, or the worker is stopping), the callback sets the pipeline's
``_interrupt``, which diffusers' denoising loops honour by skipping the remaining steps (the VAE still decodes what
there is, which is thrown away). A model without a diffusers pipeline (the null model) asks ``stop_after_step``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from concurrent.futures import Executor, Future
from typing import Any

import torch
from PIL import Image

from pixelpipe.core.topics import PREVIEW_HEADER
from pixelpipe.processors.messages import partial_images
from pixelpipe.processors.moderation import OUTPUT_IMAGE, ImageModerator
from pixelpipe.processors.telemetry import TELEMETRY

log = logging.getLogger(__name__)
# (step, steps of the call, first batch row of the call, latents after the step: rows x channels x h x w)
PreviewHook = Callable[[int, int, int, torch.Tensor], None]
# A pipeline's latents in its own layout (Flux, klein: rows x tokens x packed channels) to rows x channels x h x w
Unpack = Callable[[torch.Tensor], torch.Tensor]
# (reply topic, key, value, headers): sends without waiting
PreviewSink = Callable[[str, bytes, bytes, Mapping[str, bytes]], None]
# (steps of the call) -> whether to stop the call after the step just done
StopCheck = Callable[[int], bool]
# Stable Diffusion's four latent channels to RGB: the least-squares fit of the VAE decoder's mean colours that cheap
# previewers (A1111's "Approx cheap", ComfyUI's latent2rgb) use.
LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
# FLUX.1's sixteen channels to RGB, plus a bias: the same kind of map, a least-squares fit of what its VAE decodes
# (ComfyUI's Flux latent_rgb_factors). Linear, so a preview costs as little as SD's; the alternatives cost more
# for a preview shown for a second: the VAE's decoder (a full decode per preview, on the model's device) or a
# distilled decoder (TAEF1, weights to ship). It reads the transformer's (scaled, shifted) latent space, which is
# what the step callback gets.
FLUX_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)  # fmt: skip
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)
# FLUX.2's thirty-two channels (klein's VAE is FLUX.2's) to RGB, plus a bias: the same kind of fit of what the real
# VAE decodes (ComfyUI's Flux2 latent_rgb_factors, whose bias is FLUX.1's). It reads the batch-normed latents the
# transformer works in, each token's 128 channels spread back over its 2x2 patch (unpack_klein_latents in
# processors/models.py), as ComfyUI's previewer does; undoing the batch norm first would put them off this map.
KLEIN_LATENT_RGB = (
    (0.0058, 0.0113, 0.0073), (0.0495, 0.0443, 0.0836), (-0.0099, 0.0096, 0.0644), (0.2144, 0.3009, 0.3652),
    (0.0166, -0.0039, -0.0054), (0.0157, 0.0103, -0.0160), (-0.0398, 0.0902, -0.0235), (-0.0052, 0.0095, 0.0109),
    (-0.3527, -0.2712, -0.1666), (-0.0301, -0.0356, -0.0180), (-0.0107, 0.0078, 0.0013), (0.0746, 0.0090, -0.0941),
    (0.0156, 0.0169, 0.0070), (-0.0034, -0.0040, -0.0114), (0.0032, 0.0181, 0.0080), (-0.0939, -0.0008, 0.0186),
    (0.0018, 0.0043, 0.0104), (0.0284, 0.0056, -0.0127), (-0.0024, -0.0022, -0.0030), (0.1207, -0.0026, 0.0065),
    (0.0128, 0.0101, 0.0142), (0.0137, -0.0072, -0.0007), (0.0095, 0.0092, -0.0059), (0.0000, -0.0077, -0.0049),
    (-0.0465, -0.0204, -0.0312), (0.0095, 0.0012, -0.0066), (0.0290, -0.0034, 0.0025), (0.0220, 0.0169, -0.0048),
    (-0.0332, -0.0457, -0.0468), (-0.0085, 0.0389, 0.0609), (-0.0076, 0.0003, -0.0043), (-0.0111, -0.0460, -0.0614),
)  # fmt: skip
KLEIN_LATENT_RGB_BIAS = FLUX_LATENT_RGB_BIAS  # ComfyUI fitted FLUX.2 with FLUX.1's bias
# A linear map per latent channel count: (channels x RGB weights, RGB bias). The tiny Flux and klein models' VAEs
# have four channels and get SD's map (random weights: any map shows them as well).
LATENT_RGB_MAPS = {
    4: (LATENT_RGB, (0.0, 0.0, 0.0)),
    16: (FLUX_LATENT_RGB, FLUX_LATENT_RGB_BIAS),
    32: (KLEIN_LATENT_RGB, KLEIN_LATENT_RGB_BIAS),
}
PREVIEW_JPEG_QUALITY = 80
_hooks = threading.local()


def preview_steps(steps: int, count: int) -> set[int]:
    """The 0-based steps after which previews are taken: ``count`` of them, evenly spaced before the last step."""
    return {max(0, (steps * (k + 1)) // (count + 1) - 1) for k in range(count)} - {steps - 1} if steps > 1 else set()


def latent_preview(latent: torch.Tensor, width: int, height: int) -> Image.Image:
    """One row's latents (channels x h x w) as a ``width`` x ``height`` RGB image: a linear projection, no VAE."""
    latent = latent.detach().float().cpu()
    if latent.shape[0] in LATENT_RGB_MAPS:
        weights, bias = LATENT_RGB_MAPS[latent.shape[0]]
        rgb = torch.einsum("chw,cr->rhw", latent, torch.tensor(weights)) + torch.tensor(bias)[:, None, None]
    else:  # channels no map fits: the first three, standardised
        rgb = latent[:3]
        rgb = (rgb - rgb.mean()) / (rgb.std() + 1e-6) * 0.5
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels, "RGB").resize((width, height), Image.Resampling.BILINEAR)


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
    return out.getvalue()


@contextlib.contextmanager
def previewing(hook: PreviewHook | None, stop: StopCheck | None = None) -> Iterator[None]:
    """Install ``hook`` (previews) and ``stop`` (cancellation) for the model calls made on this thread inside the
    block."""
    _hooks.hook, _hooks.stop = hook, stop
    try:
        yield
    finally:
        _hooks.hook = _hooks.stop = None


def stop_after_step(steps: int) -> bool:
    """This thread's stop check after a step of a call of ``steps`` steps; False when none is installed."""
    stop: StopCheck | None = getattr(_hooks, "stop", None)
    return stop is not None and stop(steps)


def step_callback(row: int, unpack: Unpack | None = None) -> dict[str, Any]:
    """The pipeline arguments that call this thread's hook after each step of a call whose first row is ``row``,
    with the latents ``unpack`` made (rows x channels x h x w), then its stop check; none when neither is
    installed."""
    hook: PreviewHook | None = getattr(_hooks, "hook", None)
    stop: StopCheck | None = getattr(_hooks, "stop", None)
    if hook is None and stop is None:
        return {}

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        steps = int(getattr(pipe, "num_timesteps", 0) or 0)
        if hook is not None:
            try:
                latents = kwargs["latents"] if unpack is None else unpack(kwargs["latents"])
                hook(step, steps, row, latents)
            except Exception:  # a preview must never fail a render
                log.exception("preview failed")
        if stop is not None and stop(steps):
            pipe._interrupt = True  # diffusers skips the remaining steps of this call
        return kwargs

    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}


class Previews:
    """The previews of one model call's requests. Called after each denoising step on the model thread (a
    ``PreviewHook``), it only picks the due rows and projects their latents (about a millisecond); the output image
    check, the JPEG and the send run on ``executor`` while the next steps render, so the device never waits for
    nudenet. ``executor`` must have one thread: a request's previews are then checked and sent in order. ``wait``
    returns once every preview handed over is sent or withheld: the stage waits for it before a chunk's results
    go out, so each result's copy still follows its previews on the reply producer."""

    def __init__(
        self,
        wanted: Mapping[int, tuple[str, str, int]],
        rows: Mapping[int, int],
        size: tuple[int, int],
        sink: PreviewSink,
        moderator: ImageModerator,
        executor: Executor,
    ) -> None:
        self._wanted = wanted  # request index: (request id, reply topic, previews asked for)
        self._rows = rows  # a request's first batch row: its index
        self._size = size
        self._sink = sink
        self._moderator = moderator
        self._executor = executor
        self._handed: dict[int, int] = {}  # model thread only
        self._sent: dict[int, int] = {}  # executor thread only
        self._withheld: set[int] = set()  # written by the executor thread; read by both
        self._pending: list[Future[None]] = []

    def __call__(self, step: int, steps: int, first_row: int, latents: torch.Tensor) -> None:
        for b in range(latents.shape[0]):
            index = self._rows.get(first_row + b)
            if index is None or index in self._withheld:
                continue
            count = self._wanted[index][2]
            if step not in preview_steps(steps, count) or self._handed.get(index, 0) >= count:
                continue
            self._handed[index] = self._handed.get(index, 0) + 1
            preview = latent_preview(latents[b], *self._size)
            self._pending.append(self._executor.submit(self._check_and_send, index, preview))

    def _check_and_send(self, index: int, preview: Image.Image) -> None:
        request_id, reply_topic, _ = self._wanted[index]
        try:
            if index in self._withheld:
                return
            verdict = self._moderator.check([preview], OUTPUT_IMAGE)[0]
            if not verdict.allowed:
                # A preview must not show what output moderation would block in the completed image. The later
                # ones are withheld too: a score just over the threshold at one step is likely just under it at
                # the next, for the same content.
                self._withheld.add(index)
                log.warning(
                    "preview withheld by output moderation",
                    extra={"request_id": request_id, "categories": verdict.rejected_categories},
                )
                TELEMETRY.preview_withheld(verdict.rejected_categories)
                return
            number = self._sent.get(index, 0)
            self._sink(reply_topic, request_id.encode(), jpeg(preview), {PREVIEW_HEADER: str(number).encode()})
            self._sent[index] = number + 1
        except Exception:  # a preview must never fail a render; one that cannot be checked is not sent
            log.exception("preview failed", extra={"request_id": request_id})

    def wait(self) -> None:
        """Until every preview handed over so far is sent or withheld."""
        futures.wait(self._pending)


def hook_for(
    requests: Sequence[tuple[str, str | None, int, Mapping[str, bytes]]],
    width: int,
    height: int,
    sink: PreviewSink | None,
    moderator: ImageModerator,
    executor: Executor,
) -> Previews | None:
    """The previews the batch's requests asked for, or None when none did. ``requests`` are, in batch order,
    (request id, reply topic, images per request, Kafka headers); only a request's first image is previewed, and
    only the previews ``moderator`` allows are sent (numbered 0, 1, ... as sent), from ``executor``."""
    wanted = {
        index: (request_id, reply_topic, count)
        for index, (request_id, reply_topic, _, headers) in enumerate(requests)
        if reply_topic and (count := partial_images(headers))
    }
    if not wanted or sink is None:
        return None
    rows = {sum(r[2] for r in requests[:index]): index for index in wanted}  # each request's first row
    return Previews(wanted, rows, (width, height), sink, moderator, executor)
