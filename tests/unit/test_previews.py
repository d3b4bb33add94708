"""Previews of images in progress: which steps, which rows, what is sent, what output moderation withholds, what
moderation passes on, and the packed latents of Flux and FLUX.2 klein."""

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image
from prometheus_client import REGISTRY

from pixelpipe.core.codec import Codec
from pixelpipe.core.settings import RequestLimits, StageSettings, TopicSettings
from pixelpipe.core.topics import PARTIAL_IMAGES_HEADER, PREVIEW_HEADER
from pixelpipe.processors.messages import Inbound, StageContext, partial_images, passed_on
from pixelpipe.processors.models import DiffusionModels, unpack_klein_latents
from pixelpipe.processors.moderation import IMAGE_DETECTORS, ImageModerator
from pixelpipe.processors.previews import (
    hook_for,
    latent_preview,
    preview_steps,
    previewing,
    step_callback,
)
from pixelpipe.processors.render import GenerateStage
from pixelpipe.processors.stamp import ModerationStamp
from pixelpipe.processors.telemetry import TELEMETRY
from pixelpipe.producers import new_request
from pixelpipe.tools.model_builders import build_tiny_models

ALLOW_ALL = ImageModerator(detector="null")
REPLIES = "pixelpipe.replies.x"
PREVIEW_THREAD = ThreadPoolExecutor(1, thread_name_prefix="previews")


class Recorder:
    """A preview sink that keeps what it is given: (topic, key, JPEG, headers) per preview."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes, dict[str, bytes]]] = []

    def __call__(self, topic, key, value, headers) -> None:
        self.sent.append((topic, key, value, dict(headers)))

    @property
    def indices(self) -> list[bytes]:
        return [headers[PREVIEW_HEADER] for *_, headers in self.sent]


class ExposedBodyDetector:
    """nudenet's answer (the detector boundary) for the previews from the ``flag_from``-th call on (0-based): an
    exposed breast, which the default policy maps to ``sexual``. Keeps the images it was shown, and the threads."""

    flag_from = 0

    def __init__(self) -> None:
        self.shown: list[Image.Image] = []
        self.threads: set[str] = set()

    def detect(self, images, batch_size):
        self.threads.add(threading.current_thread().name)
        found = []
        for image in images:
            flagged = len(self.shown) >= self.flag_from
            self.shown.append(image)
            found.append([{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 8, 8]}] if flagged else [])
        return found


@pytest.fixture
def flagging(monkeypatch):
    """An ImageModerator (the default policy) over ExposedBodyDetector; telemetry on for the test."""
    monkeypatch.setitem(IMAGE_DETECTORS, "exposed-body", ExposedBodyDetector)
    monkeypatch.setattr(TELEMETRY, "enabled", True)
    return ImageModerator(detector="exposed-body")


def withheld_count(category: str) -> float:
    return REGISTRY.get_sample_value("pixelpipe_previews_withheld_total", {"category": category}) or 0.0


def test_previews_are_evenly_spaced_before_the_last_step():
    assert preview_steps(8, 2) == {1, 4}
    assert preview_steps(4, 3) == {0, 1, 2}
    assert preview_steps(2, 3) == {0}  # fewer steps than asked: fewer previews
    assert preview_steps(1, 1) == set()


def test_only_a_valid_count_is_read_and_passed_on():
    assert partial_images({PARTIAL_IMAGES_HEADER: b"2"}) == 2
    for bad in (b"4", b"-1", b"x", b""):
        assert partial_images({PARTIAL_IMAGES_HEADER: bad}) == 0
    assert passed_on({PARTIAL_IMAGES_HEADER: b"3", "other": b"y"}) == {PARTIAL_IMAGES_HEADER: b"3"}
    assert passed_on({}) == {}


def test_the_hook_sends_each_asking_requests_first_image_to_its_reply_topic():
    sent = []
    requests = [
        ("a", "pixelpipe.replies.x", 2, {}),  # asked for none
        ("b", "pixelpipe.replies.x", 2, {PARTIAL_IMAGES_HEADER: b"2"}),
        ("c", None, 2, {PARTIAL_IMAGES_HEADER: b"2"}),  # nowhere to send them
    ]
    hook = hook_for(requests, 64, 32, lambda *args: sent.append(args), ALLOW_ALL, PREVIEW_THREAD)
    latents = torch.randn(6, 4, 4, 8)
    for step in range(8):
        hook(step, 8, 0, latents)
    hook.wait()
    assert [(topic, key, headers[PREVIEW_HEADER]) for topic, key, _, headers in sent] == [
        ("pixelpipe.replies.x", b"b", b"0"),
        ("pixelpipe.replies.x", b"b", b"1"),
    ]
    assert Image.open(io.BytesIO(sent[0][2])).size == (64, 32)
    assert hook_for(requests[:1], 64, 32, lambda *args: None, ALLOW_ALL, PREVIEW_THREAD) is None


def test_the_step_callback_exists_only_inside_previewing():
    assert step_callback(0) == {}
    calls = []
    with previewing(lambda *args: calls.append(args)):
        callback = step_callback(3)["callback_on_step_end"]
    assert step_callback(0) == {}
    kwargs = {"latents": torch.zeros(1, 4, 2, 2)}
    assert callback(type("Pipe", (), {"num_timesteps": 5})(), 1, None, kwargs) is kwargs
    assert calls[0][:3] == (1, 5, 3)


def test_a_latent_preview_is_an_rgb_image_of_the_output_size():
    assert latent_preview(torch.randn(4, 8, 8), 64, 64).size == (64, 64)
    assert latent_preview(torch.randn(16, 8, 8), 64, 48).mode == "RGB"
    assert latent_preview(torch.randn(8, 8, 8), 16, 16).mode == "RGB"  # no map for 8 channels: still an image


def test_sixteen_and_thirty_two_channels_go_through_fluxs_and_kleins_maps_with_their_bias():
    # A zero latent is the map's bias: mid-grey for SD's (no bias), the bias colour FLUX.1 and FLUX.2 share for 16
    # and 32 channels.
    assert latent_preview(torch.zeros(4, 2, 2), 2, 2).getpixel((0, 0)) == (127, 127, 127)
    assert latent_preview(torch.zeros(16, 2, 2), 2, 2).getpixel((0, 0)) == (123, 118, 116)
    assert latent_preview(torch.zeros(32, 2, 2), 2, 2).getpixel((0, 0)) == (123, 118, 116)
    # FLUX.2's fourth channel is its brightest: (0.2144, 0.3009, 0.3652) plus the bias.
    assert latent_preview(torch.eye(32)[3][:, None, None].expand(32, 2, 2), 2, 2).getpixel((0, 0)) == (150, 156, 163)


# -- output moderation of previews ----------------------------------------------------------------------------
def test_a_preview_output_moderation_flags_is_never_sent(flagging):
    sent = Recorder()
    hook = hook_for([("b", REPLIES, 1, {PARTIAL_IMAGES_HEADER: b"3"})], 64, 32, sent, flagging, PREVIEW_THREAD)
    before = withheld_count("sexual")
    for step in range(8):
        hook(step, 8, 0, torch.randn(1, 4, 4, 8))
    hook.wait()
    assert sent.sent == []
    assert withheld_count("sexual") == before + 1  # the request's later previews are not even checked
    assert [image.size for image in flagging._detector.shown] == [(64, 32)]  # the check saw the preview itself


def test_previews_are_sent_until_one_is_flagged_and_numbered_as_sent(flagging):
    flagging._detector.flag_from = 1  # the first preview is allowed, the second flagged
    sent = Recorder()
    hook = hook_for([("b", REPLIES, 1, {PARTIAL_IMAGES_HEADER: b"3"})], 64, 32, sent, flagging, PREVIEW_THREAD)
    for step in range(8):
        hook(step, 8, 0, torch.randn(1, 4, 4, 8))
    hook.wait()
    assert [(topic, key) for topic, key, _, _ in sent.sent] == [(REPLIES, b"b")]
    assert sent.indices == [b"0"]
    assert Image.open(io.BytesIO(sent.sent[0][2])).size == (64, 32)
    assert len(flagging._detector.shown) == 2  # the third was withheld unchecked
    assert flagging._detector.threads == {"previews_0"}  # not on the model thread: the device does not wait


def test_the_render_stage_checks_previews_with_its_own_image_moderator(tmp_path, flagging):
    registry = tmp_path / "registry.json"
    registry.write_text('{"null": {"kind": "null"}}')
    stamp = ModerationStamp("key")
    context = StageContext(TopicSettings(), RequestLimits(), StageSettings(), Codec(), "worker", stamp)
    request = new_request(prompt="p", model="null", user_id="u", width=64, height=64, seed=1, reply_topic=REPLIES)
    value = context.codec.encode(request)
    headers = stamp.headers("t", value) | {PARTIAL_IMAGES_HEADER: b"2"}
    message = Inbound(value, request.request_id.encode(), "t", 0, 0, time.time(), headers=headers)
    for moderator, expected in ((flagging, []), (ALLOW_ALL, [b"0", b"1"])):
        sent = Recorder()
        stage = GenerateStage(context, DiffusionModels.from_file(registry), moderator, None, {})
        stage.preview_sink = sent
        (chunk,) = stage.plan([message]).chunks
        hook = stage.preview_hook(chunk.params, chunk.items)
        for step in range(4):
            hook(step, 4, 0, torch.randn(1, 4, 8, 8))
        hook.wait()
        assert sent.indices == expected


# -- Flux and FLUX.2 klein: packed latents ---------------------------------------------------------------------
def test_kleins_tokens_unpack_to_the_latents_they_were_packed_from():
    # klein 4B's layout for a 512x384 image: 32 VAE channels at 1/8 size, packed as prepare_latents packs them
    # (2x2 patches of 128 channels, one token per patch, in rows).
    latents = torch.randn(2, 32, 48, 64)
    tokens = Flux2KleinPipeline._pack_latents(Flux2KleinPipeline._patchify_latents(latents))
    assert tokens.shape == (2, 24 * 32, 128)
    assert torch.equal(unpack_klein_latents(tokens, height=384, width=512, vae_scale_factor=8), latents)


@pytest.fixture(scope="module")
def packed_models(tmp_path_factory) -> DiffusionModels:
    """The tiny models of the families whose latents are packed into tokens: Flux and FLUX.2 klein."""
    return DiffusionModels.from_file(build_tiny_models(tmp_path_factory.mktemp("packed"), ("flux", "flux2-klein")))


@pytest.mark.parametrize(
    ("model", "task"),
    [
        ("tiny-flux", "generate"),
        ("tiny-flux", "image2image"),
        ("tiny-flux", "inpaint"),
        ("tiny-flux2-klein", "generate"),
        ("tiny-flux2-klein", "references"),
    ],
)
def test_packed_families_previews_come_from_their_unpacked_latents(packed_models, model, task):
    seen: list[tuple[int, ...]] = []
    sent = Recorder()
    hook = hook_for([("f", REPLIES, 1, {PARTIAL_IMAGES_HEADER: b"2"})], 64, 48, sent, ALLOW_ALL, PREVIEW_THREAD)

    def recording(step, steps, row, latents):
        seen.append(tuple(latents.shape))
        hook(step, steps, row, latents)

    source, call = Image.new("RGB", (64, 48), "red"), {"width": 64, "height": 48, "steps": 6, "seeds": [1]}
    with previewing(recording):
        if task == "generate":
            packed_models.generate(model, ["a fox"], **call)
        elif task == "references":  # klein conditions on its source and references: no mask, no strength
            source, references = Image.new("RGB", (80, 64), "red"), [[Image.new("RGB", (64, 64), "blue")]]
            packed_models.edit(model, ["a fox"], [source], strength=None, references=references, **call)
        else:
            masks = [Image.new("L", (64, 48), 255)] if task == "inpaint" else None
            packed_models.edit(model, ["a fox"], [source], masks=masks, **call)
    hook.wait()
    pipe = packed_models.load(model).text2image
    scale, channels = pipe.vae_scale_factor, pipe.vae.config.latent_channels
    assert seen and set(seen) == {(1, channels, 48 // scale, 64 // scale)}  # images' layout, not tokens
    assert sent.indices == [b"0", b"1"]
    assert all(Image.open(io.BytesIO(jpeg)).size == (64, 48) for _, _, jpeg, _ in sent.sent)
