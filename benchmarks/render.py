"""Images/s of the worker's render path against raw diffusers, on the same weights, in one run.

    python benchmarks/render.py                       # full size on a GPU; tiny on a CPU (no CUDA)
    python benchmarks/render.py --tiny                # the tiny model, wherever
    python benchmarks/render.py --family flux --compile full --json out/render.json
    python benchmarks/render.py --family flux --fit   # ... then the family's compute fit on this device

The model is built from its family's config with random weights (``pixelpipe.tools.model_builders``): full size
(SD-1.5, SDXL, FLUX.1-dev, FLUX.2 klein 4B) directly on the GPU in bf16, or tiny on a CPU. Measured at batch 1
and 8, each over ``--images`` images, after one untimed round:

- **raw diffusers**: the pipeline called as its documentation shows, one call per batch with a generator per
  image (the baseline, eager; with ``--compile`` also compiled);
- **worker**: the stage code the worker runs, ``processors.takes.render_take`` on takes of
  ``PIXELPIPE_TAKE_EVENTS`` requests: ``GenerateStage.plan`` (decoding, validating, grouping), then each chunk's
  model call through ``DiffusionModels`` while the chunk before it is finished (output moderation, PNG encoding,
  object-store writes, results and metrics), on a backlog: the takes are all there from the start. Per batching
  mode (on a CPU both; on a GPU ``batched``, the default there).

Printed: images/s, the ratios worker/raw (same batch, same compile setting) and batch 8/batch 1, and the device
busy fraction of the worker path (model seconds over wall seconds under the backlog). The paths take turns; on a
CPU shared with other work, ``--rounds 3`` shows each figure's least disturbed round. With ``--fit``, then the
family's compute fit on this device, as ``benchmarks/compute_fit.py`` measures it (full size on a GPU: the fit for
``pixelpipe.core.registry.DEFAULT_COMPUTE_FITS``), checked at 2048x2048 (on a CPU at twice the grid's largest side).

On a GPU machine without the project's environment, carry wheels for diffusers, importlib_metadata, fastavro,
boto3, botocore, s3transfer and jmespath (the stage code reads and writes through ``pixelpipe.core``; no Kafka
library is imported), install them into a folder on PYTHONPATH (``pip install --no-deps --target``), and pass
``--detector none`` where nudenet and OpenCV are not installed (output moderation then passes every image; the
table says so).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from compute_fit import fit_pipeline, print_fit  # benchmarks/compute_fit.py, beside this script

from pixelpipe.core.codec import Codec
from pixelpipe.core.events import ImageRequest, ImageResult, StageMetric
from pixelpipe.core.ids import new_event_id
from pixelpipe.core.objects import open_object_store
from pixelpipe.core.registry import ModelEntry, ModelRegistry, WarmUp
from pixelpipe.core.settings import ObjectStoreSettings, RequestLimits, StageSettings, TopicSettings
from pixelpipe.processors.messages import Emission, Inbound, StageContext
from pixelpipe.processors.models import DiffusionModels
from pixelpipe.processors.moderation import ImageModerator, ModerationPolicy
from pixelpipe.processors.render import GenerateStage
from pixelpipe.processors.stamp import ModerationStamp
from pixelpipe.processors.takes import InOrderAcknowledgement, render_take
from pixelpipe.tools.calibration import default_grid
from pixelpipe.tools.model_builders import DEFAULT_GUIDANCE, build_pipeline, full_size_pipeline

MODEL = "bench"
PROMPT = "a lighthouse on a cliff at dusk, oil painting, dramatic light"
# Per family at full size: the size and steps its checkpoints are usually run at.
FULL_SIZE = {
    "stable-diffusion": (512, 20, 7.5),
    "stable-diffusion-xl": (1024, 20, 5.0),
    "flux": (1024, 28, 3.5),
    "flux2-klein": (1024, 4, 1.0),  # the distilled 4B: four steps, no guidance
}
STAMP = ModerationStamp("render-benchmark")


@dataclass
class Row:
    """One path's figures, by batch size."""

    path: str  # "raw diffusers" or "worker, <batching mode>"
    setting: str  # "eager" or "compiled <mode>"
    images_per_s: dict[int, float]
    busy: dict[int, float] = dataclasses.field(default_factory=dict)  # device seconds / wall seconds

    @property
    def label(self) -> str:
        return f"{self.path} ({self.setting})"

    def record(self, batch: int, images_per_s: float, busy: float | None = None) -> None:
        """Keep the best round: the one least disturbed by other processes."""
        if images_per_s > self.images_per_s.get(batch, 0.0):
            self.images_per_s[batch] = images_per_s
            if busy is not None:
                self.busy[batch] = busy


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type == "cpu"
    # Tiny: the demo's 64x64, 2 steps, so that a CPU run takes well under a minute.
    side, steps, guidance = (64, 2, DEFAULT_GUIDANCE[args.family]) if tiny else FULL_SIZE[args.family]
    side, steps = args.size or side, args.steps or steps
    # Two takes or more at batch 8.
    images = args.images or (16 if tiny else 32)
    # On a GPU the default batching mode is "batched"; on a CPU both are shown.
    default_modes = "batched" if device.type == "cuda" else "per-image,batched"
    modes = (args.modes or default_modes).split(",")

    started = time.perf_counter()
    pipe = build_pipeline(args.family, "tiny", device=device) if tiny else full_size_pipeline(args.family, device)
    pipe.set_progress_bar_config(disable=True)
    built_s = time.perf_counter() - started
    print(
        f"render benchmark: {args.family} {'tiny' if tiny else 'full size'}, {device.type} ({_device_name(device)}), "
        f"{pipe.dtype}, {side}x{side}, {steps} steps, guidance {guidance}, detector {args.detector}; "
        f"{images} images per figure, best of {args.rounds} rounds; built in {built_s:.1f} s"
    )
    render = Render(side, steps, guidance, device)
    # "none": the null detector, which allows every image and never imports nudenet or OpenCV.
    detector = ImageModerator(ModerationPolicy(), detector="nudenet" if args.detector == "nudenet" else "null")
    batches = [int(b) for b in args.batches.split(",")]
    entry = ModelEntry(MODEL, "(built in memory)", args.family, steps, guidance, dtype=_dtype_name(pipe.dtype))

    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as objects:
        for compile_mode in ["none"] if args.compile == "none" else ["none", args.compile]:
            setting = "eager" if compile_mode == "none" else f"compiled {compile_mode}"
            workers: dict[str, DiffusionModels] = {}
            for mode in modes:
                # The denoiser is shared and compiled in place: the raw pipeline runs compiled too.
                warm_up = WarmUp(tuple(batches), ((side, side),)) if compile_mode != "none" else None
                configured = dataclasses.replace(entry, batching=mode, compile=compile_mode, warmup=warm_up)
                workers[mode] = DiffusionModels(ModelRegistry({MODEL: configured}), pipelines={MODEL: pipe})
                ready = workers[mode].warm_up()[MODEL]
                if warm_up:
                    print(f"  warm-up ({setting}, {mode}): {ready.warm_up_seconds:.1f} s for {', '.join(ready.shapes)}")
            raw = Row("raw diffusers", setting, {})
            worker_rows = {mode: Row(f"worker, {mode}", setting, {}) for mode in modes}
            # Untimed: first-call costs (allocations, kernel choice, the detector's session) are not throughput.
            for b in batches:
                render.raw(pipe, b, images=b)
                for models in workers.values():
                    render.worker(models, detector, Path(objects), b, images=b)
            # The paths take turns in every round, so load from other processes falls on all of them alike.
            for _ in range(args.rounds):
                for b in batches:
                    raw.record(b, render.raw(pipe, b, images))
                    for mode, models in workers.items():
                        worker_rows[mode].record(b, *render.worker(models, detector, Path(objects), b, images))
            rows += [raw, *worker_rows.values()]
    print_table(rows, batches)
    if args.fit:
        grid = default_grid(device)
        check_side = 2048 if device.type == "cuda" else 2 * max(w for w, _ in grid.sizes)
        print_fit(*fit_pipeline(pipe, args.family, grid, check_side, check_steps=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([dataclasses.asdict(row) for row in rows], indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="stable-diffusion", choices=list(FULL_SIZE))
    parser.add_argument("--tiny", action="store_true", help="the tiny model (the default without CUDA)")
    parser.add_argument("--compile", default="none", choices=["none", "full", "regional"])
    parser.add_argument("--images", type=int, help="images per figure and round (default: 16 tiny, 32 full size)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; each figure is its best round's")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--modes", help="batching modes of the worker path, e.g. batched,per-image")
    parser.add_argument("--size", type=int, help="image side in pixels (default: the family's)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the family's)")
    parser.add_argument("--detector", default="nudenet", choices=["nudenet", "none"])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--fit", action="store_true", help="then the family's compute fit (benchmarks/compute_fit.py)")
    return parser.parse_args()


@dataclass
class Render:
    """The two measured paths, on the same requests: images of side ``side``, seeds 0, 1, ..."""

    side: int
    steps: int
    guidance: float
    device: torch.device

    def raw(self, pipe: Any, batch: int, images: int) -> float:
        """Images/s of the pipeline called directly, ``batch`` images per call."""
        started = time.perf_counter()
        for first_seed in range(0, images, batch):
            pipe(
                prompt=[PROMPT] * batch,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance,
                width=self.side,
                height=self.side,
                generator=[torch.Generator(self.device).manual_seed(first_seed + k) for k in range(batch)],
            )
        return images / (time.perf_counter() - started)

    def worker(
        self, models: DiffusionModels, detector: Any, objects: Path, batch: int, images: int
    ) -> tuple[float, float]:
        """Images/s of the stage's takes (plan, then each chunk of ``batch`` requests rendered while the one
        before is finished) under a backlog, and the fraction of the wall time the model was busy."""
        codec = Codec()
        context = StageContext(
            TopicSettings(),
            RequestLimits(),
            dataclasses.replace(StageSettings(), max_batch=batch),
            codec,
            "render-benchmark",
            STAMP,
        )
        store = open_object_store(ObjectStoreSettings(url=f"file://{objects}"))
        stage = GenerateStage(context, models, detector, store, {})
        messages = [self._message(codec, seed) for seed in range(images)]
        emitted: list[Emission] = []

        async def send(emissions: Sequence[Emission]) -> None:
            emitted.extend(emissions)

        async def takes(model_thread: ThreadPoolExecutor, finishing_thread: ThreadPoolExecutor) -> None:
            # As processors.app runs them, on takes of PIXELPIPE_TAKE_EVENTS requests, each take's last finish
            # beside the next take's rendering.
            size = context.stages.take_events
            acknowledgement = InOrderAcknowledgement("generate")
            for start in range(0, len(messages), size):
                take = messages[start : start + size]
                rendered = await render_take(stage, take, send, model_thread, finishing_thread)
                assert not rendered.handed_back  # nothing stops it here
                await acknowledgement.after(rendered.sent, nothing)
            await acknowledgement.close()

        with ThreadPoolExecutor(1) as model_thread, ThreadPoolExecutor(1) as finishing_thread:
            started = time.perf_counter()
            asyncio.run(takes(model_thread, finishing_thread))
            wall_s = time.perf_counter() - started
        topics = context.topics
        results = [codec.decode_as(ImageResult, e.value) for e in emitted if e.topic == topics.results]
        failed = [r for r in results if r.status == "FAILED"]
        if failed or len(results) != images:
            raise SystemExit(f"the worker path did not render every request: {failed[:1] or len(results)}")
        metrics = [codec.decode_as(StageMetric, e.value) for e in emitted if e.topic == topics.metrics]
        device_s = sum(m.device_seconds for m in metrics if m.stage == "GENERATE")
        return images / wall_s, device_s / wall_s

    def _message(self, codec: Codec, seed: int) -> Inbound:
        request = ImageRequest(
            request_id=new_event_id(),
            kind="GENERATE",
            user_id="render-benchmark",
            prompt=PROMPT,
            model=MODEL,
            width=self.side,
            height=self.side,
            steps=self.steps,
            guidance=self.guidance,
            seed=seed,
        )
        value = codec.encode(request)  # stamped as moderation would: the stage renders nothing else
        topic = TopicSettings().generate
        headers = STAMP.headers(topic, value)
        return Inbound(value, request.request_id.encode(), topic, 0, seed, time.time(), headers=headers)


def print_table(rows: list[Row], batches: list[int]) -> None:
    first, last = batches[0], batches[-1]
    header = "".join(f"{f'batch {b} img/s':>16}" for b in batches)
    busy_header = "".join(f"{f'busy b{b}':>10}" for b in batches)
    print(f"\n  {'path':<34}{header}{f'b{last}/b{first}':>9}{busy_header}")
    for row in rows:
        rates = "".join(f"{row.images_per_s[b]:>16.2f}" for b in batches)
        busy = "".join(f"{row.busy[b]:>9.0%} " for b in batches) if row.busy else ""
        print(f"  {row.label:<34}{rates}{row.images_per_s[last] / row.images_per_s[first]:>8.2f}x{busy}")
    print()
    for row in rows:
        if row.busy:
            raw = next(r for r in rows if r.path == "raw diffusers" and r.setting == row.setting)
            ratios = ", ".join(f"batch {b} {row.images_per_s[b] / raw.images_per_s[b]:.2f}x" for b in batches)
            print(f"  {row.label} / raw: {ratios}")


async def nothing() -> None:
    """No Kafka here: a take has nothing to acknowledge."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} torch threads"


if __name__ == "__main__":
    main()
