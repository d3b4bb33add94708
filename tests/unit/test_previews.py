"""Previews of images in progress: which steps, which rows, what is sent, and what moderation passes on."""

import io

import torch
from PIL import Image

from pixelpipe.core.topics import PARTIAL_IMAGES_HEADER, PREVIEW_HEADER
from pixelpipe.processors.previews import (
    hook_for,
    latent_preview,
    partial_images,
    passed_on,
    preview_steps,
    previewing,
    step_callback,
)


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
    hook = hook_for(requests, 64, 32, lambda *args: sent.append(args))
    latents = torch.randn(6, 4, 4, 8)
    for step in range(8):
        hook(step, 8, 0, latents)
    assert [(topic, key, headers[PREVIEW_HEADER]) for topic, key, _, headers in sent] == [
        ("pixelpipe.replies.x", b"b", b"0"),
        ("pixelpipe.replies.x", b"b", b"1"),
    ]
    assert Image.open(io.BytesIO(sent[0][2])).size == (64, 32)
    assert hook_for(requests[:1], 64, 32, lambda *args: None) is None


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
