"""What a model's renders cost in device seconds, measured: ``pixelpipe models calibrate``.

``calibrate`` renders a grid of sizes, step counts and batch sizes with the worker's own model code
(``DiffusionModels``, on the device and in the batching mode the registry entry resolves to) and fits a
``ComputeFit`` to the device seconds each call took, by non-negative least squares on relative residuals: every
cost term is a cost, so none may be negative, and a 64x64 call counts as much as a 2048x2048 one.
``write_compute_fits`` puts the fits into the registry file, where ``ModelEntry.compute`` charges them against the
compute budgets. The fit is the measuring device's: calibrate on the hardware the workers run on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from pixelpipe.core.clock import utc_now
from pixelpipe.core.registry import ComputeFit, ModelError, ModelRegistry, read_registry_json
from pixelpipe.processors.models import DiffusionModels, NullModel
from pixelpipe.tools.model_builders import write_registry

SIGNIFICANT_DIGITS = 4  # of each coefficient written: far finer than two measurements of one render agree


@dataclass(frozen=True)
class Grid:
    """The renders a calibration times: every size at every step count and batch size, each ``repeats`` times
    (the fastest counts: the one least disturbed by other work on the machine)."""

    sizes: tuple[tuple[int, int], ...]
    steps: tuple[int, ...]
    batch_sizes: tuple[int, ...] = (1, 2)
    repeats: int = 1

    def __post_init__(self) -> None:
        # Linear plus quadratic per pixel and a fixed part: three sizes at least; per step or per image: two counts.
        if len({w * h for w, h in self.sizes}) < 3:
            raise ModelError(f"a fit needs at least three sizes of different areas, got {self.sizes}")
        if len(set(self.steps)) < 2 or min(self.steps) < 1:
            raise ModelError(f"a fit needs at least two step counts of 1 or more, got {self.steps}")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.repeats < 1:
            raise ModelError(f"batch sizes and repeats must be 1 or more, got {self.batch_sizes}, {self.repeats}")


# The largest side requests may ask for (PIXELPIPE_MAX_IMAGE_SIDE's default) is measured, not extrapolated to:
# attention's quadratic term is small at small sizes and dominant there.
GPU_GRID = Grid(sizes=((512, 512), (1024, 1024), (1536, 1536), (2048, 2048)), steps=(1, 4))
# A CPU renders a tiny model at 512x512 in tens of seconds a step: small sizes, and no batches (per-image mode).
CPU_GRID = Grid(sizes=((64, 64), (128, 128), (192, 192), (256, 256)), steps=(1, 4), batch_sizes=(1,))


def default_grid(device: torch.device) -> Grid:
    return GPU_GRID if device.type == "cuda" else CPU_GRID


@dataclass(frozen=True)
class Sample:
    """One timed model call: ``images`` images of ``width`` x ``height`` in ``steps`` steps took ``seconds``."""

    width: int
    height: int
    steps: int
    images: int
    seconds: float


@dataclass(frozen=True)
class Calibration:
    """A model's fit and the samples it was fitted to."""

    model: str
    fit: ComputeFit
    samples: list[Sample]

    def predicted(self, sample: Sample) -> float:
        return self.fit.seconds(sample.width, sample.height, sample.steps, sample.images)

    @property
    def max_relative_error(self) -> float:
        """The largest |predicted - measured| / measured on the grid."""
        return max(abs(self.predicted(s) - s.seconds) / s.seconds for s in self.samples)

    def report(self) -> list[str]:
        """The fit's coefficients, then each sample measured against predicted: lines to print."""
        fit = self.fit
        mode = "one call per batch" if fit.batched else "one call per image"
        lines = [f"{self.model}: measured on {fit.device} on {fit.measured} ({mode})"]
        lines += [f"  {name:<36} {value:.4g}" for name, value in zip(fit.COEFFICIENTS, fit.coefficients, strict=True)]
        lines.append(f"  {'size':>11} {'steps':>5} {'images':>6} {'measured s':>11} {'predicted s':>11} {'error':>7}")
        for s in self.samples:
            predicted = self.predicted(s)
            lines.append(
                f"  {f'{s.width}x{s.height}':>11} {s.steps:>5} {s.images:>6} {s.seconds:>11.3f} {predicted:>11.3f} "
                f"{(predicted - s.seconds) / s.seconds:>+7.1%}"
            )
        lines.append(f"  max relative error on the grid: {self.max_relative_error:.1%}")
        return lines


def fit_compute(samples: Sequence[Sample], batched: bool, device: str, measured: str) -> ComputeFit:
    """The ComputeFit of ``samples`` (calls of one image each unless ``batched``): non-negative least squares on
    relative residuals, coefficients rounded to SIGNIFICANT_DIGITS."""
    _require_enough(len(samples))
    terms = np.array([ComputeFit.terms(s.width, s.height, s.steps, s.images, batched) for s in samples])
    seconds = np.array([s.seconds for s in samples])
    if not np.all(seconds > 0):
        raise ModelError("every sample must have taken some time")
    # Each row divided by its measured seconds: the residuals are relative, so small calls are fitted as well.
    coefficients, _ = nnls(terms / seconds[:, None], np.ones(len(samples)))
    rounded = [float(f"{c:.{SIGNIFICANT_DIGITS}g}") for c in coefficients]
    return ComputeFit(*rounded, batched=batched, device=device, measured=measured)


def _require_enough(renders: int) -> None:
    if renders < len(ComputeFit.COEFFICIENTS):
        raise ModelError(
            f"a fit of {len(ComputeFit.COEFFICIENTS)} coefficients needs at least as many renders, got {renders}: "
            "add a size or a step count"
        )


def calibrate(
    models: DiffusionModels, name: str, grid: Grid | None = None, progress: Callable[[str], None] = print
) -> Calibration:
    """Render ``grid`` (by default its device's, ``default_grid``) with model ``name`` on its device, one untimed
    call per shape first (allocation, kernel choice, compilation), and fit its device seconds."""
    model = models.load(name)
    if isinstance(model, NullModel):
        raise ModelError(f"model {name!r} is a null model: it is charged its 'seconds_per_image', nothing to measure")
    grid = grid or default_grid(model.device)
    if odd := [f"{w}x{h}" for w, h in grid.sizes if w % model.size_multiple or h % model.size_multiple]:
        raise ModelError(f"model {name!r} renders sizes in multiples of {model.size_multiple}, got {', '.join(odd)}")
    # A model that renders per image makes one call per image whatever the batch: batches would add nothing.
    batch_sizes = grid.batch_sizes if model.batched else (1,)
    shapes = [(w, h, b) for w, h in grid.sizes for b in batch_sizes]
    points = [(w, h, s, b) for w, h, b in shapes for s in grid.steps]
    _require_enough(len(points))  # before the renders, which take minutes
    started = time.perf_counter()
    for width, height, images in shapes:
        render_seconds(models, name, width, height, 1, images)
    progress(f"{name}: {len(points)} renders, {grid.repeats} each, after {len(shapes)} untimed first calls")
    samples = []
    for index, (width, height, steps, images) in enumerate(points, 1):
        seconds = min(render_seconds(models, name, width, height, steps, images) for _ in range(grid.repeats))
        samples.append(Sample(width, height, steps, images, seconds))
        progress(
            f"  [{index}/{len(points)}] {width}x{height}, {steps} steps, {images} image(s): {seconds:.3f} s "
            f"({time.perf_counter() - started:.0f} s so far)"
        )
    fit = fit_compute(samples, model.batched, device_name(model.device), utc_now().date().isoformat())
    return Calibration(name, fit, samples)


def render_seconds(models: DiffusionModels, name: str, width: int, height: int, steps: int, images: int) -> float:
    """The device seconds of one text-to-image call of ``images`` images, as the render stages measure them."""
    prompts = ["calibration"] * images
    output = models.generate(name, prompts, width=width, height=height, steps=steps, seeds=[0] * images)
    return output.device_seconds


def device_name(device: torch.device) -> str:
    """The device as a fit records it: the GPU's name, or the CPU's model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {torch.get_num_threads()} torch threads"


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "CPU"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "CPU")


def registry_to_calibrate(path: Path, names: Sequence[str] = ()) -> ModelRegistry:
    """The models of the registry at ``path`` to calibrate: ``names``, or every model but the null ones. Their
    fits are what is measured, so an old ``compute_fit`` or ``compute_weight`` (the unit before device seconds) is
    set aside rather than refused."""
    raw = read_registry_json(path)
    if unknown := sorted(set(names) - set(raw)):
        raise ModelError(f"model registry {path} has no model {', '.join(map(repr, unknown))}; it has {sorted(raw)}")
    chosen = names or [n for n, entry in raw.items() if not (isinstance(entry, dict) and entry.get("kind") == "null")]
    if not chosen:
        raise ModelError(f"model registry {path} has only null models: nothing to calibrate")
    return ModelRegistry.parse({name: _without_fit(raw[name]) for name in chosen}, path)


def _without_fit(entry: Any) -> Any:
    if not isinstance(entry, dict):
        return entry  # parse says what is wrong with it
    return {key: value for key, value in entry.items() if key not in ("compute_fit", "compute_weight")}


def write_compute_fits(path: Path, fits: Mapping[str, ComputeFit]) -> None:
    """Write each model's fit into its entry of the registry at ``path`` (replacing ``compute_weight``), keeping
    the other entries and fields as they are, in their order."""
    raw = read_registry_json(path)
    for name, fit in fits.items():
        entry = {key: value for key, value in raw[name].items() if key != "compute_weight"}
        raw[name] = entry | {"compute_fit": fit.to_json()}
    write_registry(path, raw)
