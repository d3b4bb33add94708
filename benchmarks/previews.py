"""What streaming previews cost the render: the tiny model with and without a preview hook, in turns.

    python benchmarks/previews.py [--images 12] [--size 64] [--steps 8]

Measured path: ``DiffusionModels.generate`` on the tiny SD model (CPU, one image per call), with the hook the
render stage installs for a request asking for 3 partial images (``processors/previews.py``: latents projected to
RGB, resized, JPEG-encoded, handed to a sink that only counts them). Baseline in the same run: the same calls with
no hook. Also the projection and encoding alone at SD-1.5's latent size (4x64x64 to 512x512), where the tiny
model's latents are too small to show it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pixelpipe.processors.models import DiffusionModels
from pixelpipe.processors.previews import hook_for, jpeg, latent_preview, previewing
from pixelpipe.tools.model_builders import build_tiny_models


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core, so the other's load disturbs less
    models = DiffusionModels.from_file(build_tiny_models(Path(tempfile.mkdtemp())))
    sent: list[int] = []
    in_hook = [0.0]

    def render(previews: bool, seed: int) -> float:
        headers = {"pixelpipe-partial-images": b"3"} if previews else {}
        inner = hook_for([("r", "pixelpipe.replies.x", 1, headers)], args.size, args.size, lambda *a: sent.append(1))

        def hook(*hook_args: object) -> None:  # the hook's own time on the model thread, every step included
            started = time.perf_counter()
            inner(*hook_args)  # type: ignore[misc]
            in_hook[0] += time.perf_counter() - started

        started = time.perf_counter()
        with previewing(hook if inner else None):
            models.generate("tiny-sd", ["a fox"], width=args.size, height=args.size, steps=args.steps, seeds=[seed])
        return time.perf_counter() - started

    render(False, 0)  # warm up
    plain, previewed = [], []
    for i in range(args.images):  # in turns, so load from other processes falls on both alike
        plain.append(render(False, i))
        previewed.append(render(True, i))
    p50, q50 = statistics.median(plain) * 1000, statistics.median(previewed) * 1000
    per_preview = in_hook[0] * 1000 / max(1, len(sent))
    share = in_hook[0] / sum(previewed) * 100
    print(f"tiny-sd {args.size}x{args.size}, {args.steps} steps, {args.images} images per figure")
    print(f"  no previews (baseline): {p50:7.1f} ms per image (median)")
    print(f"  3 previews:             {q50:7.1f} ms per image (median), {len(sent) / args.images:.1f} sent per image")
    print(f"  wall difference: {q50 - p50:+.1f} ms per image ({(q50 / p50 - 1) * 100:+.1f} %; noisy under load)")
    print(f"  the hook's own time: {per_preview:.2f} ms per preview, {share:.2f} % of the previewed renders' time")
    latent = torch.randn(4, 64, 64)
    times = []
    for _ in range(20):
        started = time.perf_counter()
        data = jpeg(latent_preview(latent, 512, 512))
        times.append(time.perf_counter() - started)
    print(
        f"SD-1.5 size (4x64x64 latents to a 512x512 JPEG of {len(data)} bytes): "
        f"{statistics.median(times) * 1000:.1f} ms per preview (median of 20)"
    )


if __name__ == "__main__":
    main()
