"""Device seconds per family: each family's compute fit on this device, and how well a fit predicts a larger render.

    python benchmarks/compute_fit.py                  # full size on a GPU, every family; the tiny SD on a CPU
    python benchmarks/compute_fit.py --tiny --sizes 256,512,768,1024 --check-size 2048
    python benchmarks/compute_fit.py --family flux --json out/fits.json

Each family's model is built from its config with random weights (``pixelpipe.tools.model_builders``): full size
(SD-1.5, SDXL, FLUX.1-dev, FLUX.2 klein 4B) in bf16 on a GPU, or tiny. It is calibrated as ``pixelpipe models
calibrate`` does (``pixelpipe.tools.calibration``: the worker's ``DiffusionModels``, a grid of sizes, steps and batch
sizes, a non-negative least-squares fit) and its fit and residuals are printed. Then one image at ``--check-size``
(by default larger than the grid's largest side on a CPU, the largest a request may ask for on a GPU) is rendered
and its measured device seconds set against the fit's prediction: predicted, measured and their ratio. Last, every
fit in the registry's ``compute_fit`` form (``pixelpipe.core.registry.DEFAULT_COMPUTE_FITS`` holds the full-size ones).

Imports only the model code (no Kafka, no object store): on a GPU machine without the project's environment,
carry wheels for diffusers, importlib_metadata and what ``pixelpipe.processors.models`` imports (aiokafka,
async-timeout, cramjam, confluent-kafka, pyicu-wheels), and put the repository's folders on PYTHONPATH as the
``pixelpipe.*`` packages (pyproject.toml's folder table).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from pixelpipe.core.registry import FAMILIES, Family, ModelEntry, ModelRegistry
from pixelpipe.processors.models import DiffusionModels
from pixelpipe.tools.calibration import Calibration, Grid, calibrate, default_grid, render_seconds
from pixelpipe.tools.model_builders import DEFAULT_GUIDANCE, build_pipeline, full_size_pipeline

MODEL = "fit"


@dataclass(frozen=True)
class Check:
    """One render off the grid, measured against the fit's prediction."""

    width: int
    height: int
    steps: int
    predicted_s: float
    measured_s: float

    @property
    def ratio(self) -> float:
        return self.predicted_s / self.measured_s


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type == "cpu"
    families = args.family or (["stable-diffusion"] if tiny and device.type == "cpu" else list(FAMILIES))
    default = default_grid(device)
    grid = Grid(
        args.sizes or default.sizes, args.steps or default.steps, args.batch_sizes or default.batch_sizes, args.repeats
    )
    check_side = args.check_size or (2 * max(w for w, _ in grid.sizes) if device.type == "cpu" else 2048)
    print(
        f"compute fit benchmark: {'tiny' if tiny else 'full size'} on {device.type}; grid sizes "
        f"{', '.join(f'{w}x{h}' for w, h in grid.sizes)}, steps {grid.steps}, batch sizes {grid.batch_sizes}; "
        f"check {check_side}x{check_side} at {args.check_steps} steps",
        flush=True,
    )
    fits: dict[str, Any] = {}
    checks: dict[str, Check] = {}
    for family in families:
        try:
            calibration, check = fit_family(family, tiny, device, grid, check_side, args.check_steps)
        except Exception as e:  # one family failing (memory, a kernel) leaves the others measured
            print(f"{family}: failed: {e}", flush=True)
            continue
        print_fit(calibration, check)
        fits[family] = calibration.fit.to_json()
        checks[family] = check
    print(json.dumps(fits, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        result = {family: {"compute_fit": fit, "check": vars(checks[family])} for family, fit in fits.items()}
        Path(args.json).write_text(json.dumps(result, indent=2))


def fit_family(
    family: Family, tiny: bool, device: torch.device, grid: Grid, check_side: int, check_steps: int
) -> tuple[Calibration, Check]:
    """Build ``family``'s model, calibrate it on ``grid`` and check the fit on one image of ``check_side``."""
    started = time.perf_counter()
    pipe = build_pipeline(family, "tiny", device=device) if tiny else full_size_pipeline(family, device)
    print(f"{family}: built {'tiny' if tiny else 'full size'} in {time.perf_counter() - started:.1f} s", flush=True)
    try:
        return fit_pipeline(pipe, family, grid, check_side, check_steps)
    finally:
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def fit_pipeline(
    pipe: DiffusionPipeline, family: Family, grid: Grid, check_side: int, check_steps: int
) -> tuple[Calibration, Check]:
    """Calibrate ``pipe`` (a text-to-image pipeline of ``family``, on its device and in its dtype) through the
    worker's model code, and render one image of ``check_side`` to set against the fit's prediction."""
    dtype = str(pipe.dtype).removeprefix("torch.")
    entry = ModelEntry(MODEL, "(built in memory)", family, default_guidance=DEFAULT_GUIDANCE[family], dtype=dtype)
    models = DiffusionModels(ModelRegistry({MODEL: entry}), pipelines={MODEL: pipe})
    calibration = calibrate(models, MODEL, grid, progress=lambda line: print(line, flush=True))
    render_seconds(models, MODEL, check_side, check_side, 1, 1)  # untimed, as calibrate's first calls
    measured = render_seconds(models, MODEL, check_side, check_side, check_steps, 1)
    predicted = calibration.fit.seconds(check_side, check_side, check_steps, 1)
    check = Check(check_side, check_side, check_steps, predicted, measured)
    return Calibration(family, calibration.fit, calibration.samples), check


def print_fit(calibration: Calibration, check: Check) -> None:
    print("\n".join(calibration.report()))
    print(
        f"  check {check.width}x{check.height}, {check.steps} steps, 1 image: predicted {check.predicted_s:.3f} s, "
        f"measured {check.measured_s:.3f} s, predicted/measured {check.ratio:.2f}\n",
        flush=True,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", choices=list(FAMILIES), help="repeatable (default: all)")
    parser.add_argument("--tiny", action="store_true", help="the tiny models (the default without CUDA)")
    parser.add_argument("--sizes", type=_sizes, help="grid sides, e.g. 256,512,768 (default: the device's grid)")
    parser.add_argument("--steps", type=_counts, help="grid step counts (default: 1,4)")
    parser.add_argument("--batch-sizes", type=_counts, help="grid batch sizes (default: the device's grid)")
    parser.add_argument("--repeats", type=int, default=1, help="timed renders per grid point; the fastest counts")
    parser.add_argument("--check-size", type=int, help="side of the checked image (default: see above)")
    parser.add_argument("--check-steps", type=int, default=2)
    parser.add_argument("--json", help="also write the fits and checks to this file")
    return parser.parse_args()


def _counts(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    return tuple((side, side) for side in _counts(text))


if __name__ == "__main__":
    main()
