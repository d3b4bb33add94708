"""What streaming previews cost the render: the tiny model with no previews, and with previews checked by the
null detector and by nudenet, in turns.

    python benchmarks/previews.py [--images 12] [--size 64] [--steps 8] [--family flux2-klein]

Measured path: ``DiffusionModels.generate`` on a family's tiny model (CPU, one image per call), with the hook the
render stage installs for a request asking for 3 partial images (``processors/previews.py``: latents projected to
RGB and resized on the model thread; checked by output moderation, JPEG-encoded and handed to a sink that only
counts them on the stage's preview thread, while the next steps render). A render's time runs until its previews
are sent, as the stage waits for them before its results. The null detector finds nothing and costs nothing, so
it measures previews without moderation; nudenet is what a worker runs. Baseline in the same run: the same calls
with no hook. Also a preview alone at SD-1.5's latent size
(4x64x64 to 512x512), where the tiny model's latents are too small to show it, with and without its check, and
FLUX.2 klein 4B's at 1024x1024 (4096 tokens of 128 channels unpacked to 32x128x128, then projected), without it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from pixelpipe.processors.models import DiffusionModels, unpack_klein_latents
from pixelpipe.processors.moderation import OUTPUT_IMAGE, ImageModerator
from pixelpipe.processors.previews import hook_for, jpeg, latent_preview, previewing
from pixelpipe.tools.model_builders import TINY_FAMILY_MODELS, build_tiny_models

DETECTORS = ("null", "nudenet")
PREVIEWS = 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--family", default="stable-diffusion", choices=["stable-diffusion", *TINY_FAMILY_MODELS])
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core, so the other's load disturbs less
    models = DiffusionModels.from_file(build_tiny_models(Path(tempfile.mkdtemp()), (args.family,)))
    model = TINY_FAMILY_MODELS.get(args.family, "tiny-sd")
    moderators = {name: ImageModerator(detector=name) for name in DETECTORS}
    preview_thread = ThreadPoolExecutor(1, thread_name_prefix="previews")
    sent = dict.fromkeys(DETECTORS, 0)
    in_hook = dict.fromkeys(DETECTORS, 0.0)

    def render(detector: str | None, seed: int) -> float:
        """One image's wall time: with previews checked by ``detector``, or none when it is None."""
        hook = None
        if detector is not None:

            def count(*sent_args: object) -> None:
                sent[detector] += 1

            headers = {"pixelpipe-partial-images": str(PREVIEWS).encode()}
            requests = [("r", "pixelpipe.replies.x", 1, headers)]
            previews = hook_for(requests, args.size, args.size, count, moderators[detector], preview_thread)
            assert previews is not None

            def hook(*hook_args: object) -> None:  # the hook's own time on the model thread, every step included
                started = time.perf_counter()
                previews(*hook_args)  # type: ignore[arg-type]
                in_hook[detector] += time.perf_counter() - started

        started = time.perf_counter()
        with previewing(hook):
            models.generate(model, ["a fox"], width=args.size, height=args.size, steps=args.steps, seeds=[seed])
        if detector is not None:
            previews.wait()
        return time.perf_counter() - started

    for detector in (None, *DETECTORS):  # warm up, nudenet's session included
        render(detector, 0)
    sent.update(dict.fromkeys(DETECTORS, 0))
    in_hook.update(dict.fromkeys(DETECTORS, 0.0))
    walls: dict[str | None, list[float]] = {None: [], **{d: [] for d in DETECTORS}}
    for i in range(args.images):  # in turns, so load from other processes falls on all alike
        for detector in walls:
            walls[detector].append(render(detector, i))
    baseline = statistics.median(walls[None]) * 1000
    print(f"{model} {args.size}x{args.size}, {args.steps} steps, {args.images} images per figure, {PREVIEWS} previews")
    print(f"  no previews (baseline):       {baseline:7.1f} ms per image (median)")
    for detector in DETECTORS:
        median = statistics.median(walls[detector]) * 1000
        per_preview = in_hook[detector] * 1000 / max(1, sent[detector])
        share = in_hook[detector] / sum(walls[detector]) * 100
        print(
            f"  previews, {detector + ' detector:':17s} {median:7.1f} ms per image (median; "
            f"{median - baseline:+.1f} ms, {(median / baseline - 1) * 100:+.1f} %, noisy under load), "
            f"{sent[detector] / args.images:.1f} sent per image; the hook's own time {per_preview:.2f} ms per "
            f"preview on the model thread, {share:.2f} % of these renders' time"
        )
    latent = torch.randn(4, 64, 64)
    for detector in DETECTORS:
        times = []
        for _ in range(20):
            started = time.perf_counter()
            preview = latent_preview(latent, 512, 512)
            moderators[detector].check([preview], OUTPUT_IMAGE)
            data = jpeg(preview)
            times.append(time.perf_counter() - started)
        print(
            f"SD-1.5 size (4x64x64 latents to a 512x512 JPEG of {len(data)} bytes), {detector} detector: "
            f"{statistics.median(times) * 1000:.1f} ms per preview (median of 20)"
        )
    # What the model thread does for a klein 4B preview at 1024x1024: unpack the step's tokens, project, resize.
    tokens = torch.randn(1, 64 * 64, 128)
    unpack_times, preview_times = [], []
    for _ in range(20):
        started = time.perf_counter()
        latents = unpack_klein_latents(tokens, height=1024, width=1024, vae_scale_factor=8)
        unpacked = time.perf_counter()
        latent_preview(latents[0], 1024, 1024)
        unpack_times.append(unpacked - started)
        preview_times.append(time.perf_counter() - started)
    print(
        f"FLUX.2 klein 4B size (4096 tokens of 128 to 32x128x128 latents to 1024x1024), on the model thread: "
        f"{statistics.median(preview_times) * 1000:.1f} ms per preview, of which unpacking "
        f"{statistics.median(unpack_times) * 1000:.2f} ms (medians of 20; no check, no JPEG)"
    )


if __name__ == "__main__":
    main()
