"""The model registry and the diffusion models the generation and editing stages run.

The registry is a JSON file mapping a model name to where its weights are and how to run it (README, "The model
registry", describes every field)::

    {"sd15": {"path": "/models/sd15", "kind": "stable-diffusion", "default_steps": 25, "default_guidance": 7.5,
              "max_batch": 8, "compile": "full", "channels_last": true, "fuse_qkv": true,
              "warmup": {"batch_sizes": [1, 8], "sizes": ["512x512"]}},
     "null": {"kind": "null", "seconds_per_image": 0.05}}

``DiffusionModels`` loads each model once with ``AutoPipelineForText2Image`` (Stable Diffusion, SDXL, Flux, FLUX.2
klein) and derives the image-to-image and inpainting pipelines from it with ``from_pipe``, so the three share one
copy of the weights; klein edits with its own pipeline, conditioned on the source and the request's reference images
(up to the entry's ``max_source_images``), and has no inpainting. ``DiffusionModels.warm_up`` loads every model and
renders its warm-up shapes, so compilation happens before a worker takes work. ``DiffusionModels.lane`` gives a
second set of pipelines on the same weights, with their own scheduler and lock, for work that runs beside the first
(the long lane). A registry entry's ``compute_fit`` says what its renders cost in device seconds, for the compute
budgets (``ModelEntry.compute``, ``ComputeFit``; ``pixelpipe models calibrate`` measures it). A ``null`` model has
no weights: it returns plain images after a simulated time, for capacity tests of the pipeline without diffusion.
The methods block for seconds: call them from an executor thread, never on the event loop.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import functools
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    FluxPipeline,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image

from pixelpipe.core.families import REFERENCE_FAMILIES, default_max_source_images
from pixelpipe.processors.previews import Unpack, step_callback, stop_after_step

log = logging.getLogger(__name__)

# The diffusion families and the text-to-image pipeline class each loads as; "null" renders without a model.
FAMILIES: dict[str, type[DiffusionPipeline]] = {
    "stable-diffusion": StableDiffusionPipeline,
    "stable-diffusion-xl": StableDiffusionXLPipeline,
    "flux": FluxPipeline,
    "flux2-klein": Flux2KleinPipeline,
}
KINDS = (*FAMILIES, "null")
UNET_FAMILIES = ("stable-diffusion", "stable-diffusion-xl")  # the others have a transformer as denoiser
# Families that pack 2x2 latent patches into one token: sizes in multiples of twice the VAE's factor. Both are
# unpacked for previews (LoadedModel._unpack).
PACKED_FAMILIES = ("flux", "flux2-klein")
# REFERENCE_FAMILIES (pixelpipe.core.families) edit by conditioning on reference images (a list, one for the whole
# call: one call per request) rather than by noising a source: no mask, no strength, no negative prompt.
MIN_REFERENCE_SIDE = 64  # pixels: FLUX.2's image processor refuses smaller images
NULL_SCHEDULER = "none"  # what a null model reports as its scheduler: it runs none
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DEVICES = ("auto", "cpu", "cuda")
BATCHING = ("auto", "batched", "per-image")  # see DiffusionModels
COMPILE = ("none", "full", "regional")  # torch.compile of the denoiser: all of it, or its repeated blocks
# Attention backends by our name -> diffusers' name; all are torch's own SDPA kernels, nothing to install.
# Only flux's attention goes through diffusers' dispatcher; the UNet families run SDPA (AttnProcessor2_0).
ATTENTION = {
    "sdpa": "native",
    "sdpa-flash": "_native_flash",
    "sdpa-efficient": "_native_efficient",
    "sdpa-cudnn": "_native_cudnn",
}


# Schedulers a request (an experiment's variant) may pick by name; each is built from the model's own config.
SCHEDULERS: dict[str, Any] = {
    "ddim": DDIMScheduler,
    "dpm-solver++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "flow-match-euler": FlowMatchEulerDiscreteScheduler,
    "lcm": LCMScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
}
# A flow-matching model (flux) runs only flow-matching schedulers, and a noise-predicting one only the others.
FLOW_MATCHING_SCHEDULERS = frozenset({"flow-match-euler"})


def scheduler_name(scheduler: Any) -> str:
    """Our name for a scheduler object (e.g. "ddim"), or its class name for one a request cannot pick."""
    return next((name for name, cls in SCHEDULERS.items() if type(scheduler) is cls), type(scheduler).__name__)


class ModelError(ValueError):
    """A registry that cannot be used, a model name it does not hold, or arguments a model cannot run."""


@dataclass(frozen=True)
class WarmUp:
    """The shapes a model renders once at load (``DiffusionModels.warm_up``), so that compiling them happens
    before the worker takes work: each batch size at each size, ``steps`` steps."""

    batch_sizes: tuple[int, ...] = (1,)
    sizes: tuple[tuple[int, int], ...] = ((512, 512),)
    steps: int = 2

    @classmethod
    def from_json(cls, where: str, raw: Any) -> WarmUp:
        where = f"{where}: 'warmup'"
        if not isinstance(raw, dict) or set(raw) - {"batch_sizes", "sizes", "steps"}:
            raise ModelError(f"{where} must be an object of batch_sizes, sizes and steps, got {raw!r}")
        batch_sizes = raw.get("batch_sizes", list(cls.batch_sizes))
        if not isinstance(batch_sizes, list) or not batch_sizes or not all(map(_is_positive_int, batch_sizes)):
            raise ModelError(
                f"{where}: 'batch_sizes' must be a non-empty list of positive integers, got {batch_sizes!r}"
            )
        sizes = raw.get("sizes", [f"{w}x{h}" for w, h in cls.sizes])
        if not isinstance(sizes, list) or not sizes:
            raise ModelError(f"{where}: 'sizes' must be a non-empty list like [\"512x512\"], got {sizes!r}")
        steps = _FieldReader(where, raw).positive_int("steps", cls.steps)
        return cls(tuple(batch_sizes), tuple(_size(where, size) for size in sizes), steps)


@dataclass(frozen=True)
class ComputeFit:
    """What a model's renders cost in device seconds, fitted to renders measured on one device (``pixelpipe models
    calibrate``). One model call of ``b`` images of ``P`` megapixels each in ``s`` steps takes::

        seconds_per_call
        + s x (seconds_per_step + b x (seconds_per_image_step + seconds_per_megapixel_step x P
                                       + seconds_per_megapixel_squared_step x P^2))
        + b x (seconds_per_megapixel x P + seconds_per_megapixel_squared x P^2)

    The denoiser runs every step over every image: a part whatever its size (the text tokens flux carries beside
    the image's, the time embedding), a part linear in its pixels (convolutions, projections, MLPs) and a part
    quadratic (self-attention over the latent tokens, which outgrows the rest at large sizes). The VAE decodes each
    image once: linear, plus quadratic for its mid-block's attention over the whole latent grid. A call (text
    encoding, set-up) and each of its steps (scheduler, kernel launches) cost the same whatever the batch. A model
    that ran one image per call where it was measured (``batched`` false: DiffusionModels' per-image mode, the CPU
    default) pays a call per image. Guidance, strength and references are not terms: the fit is of text-to-image
    at the model's default guidance."""

    seconds_per_call: float
    seconds_per_step: float
    seconds_per_image_step: float
    seconds_per_megapixel_step: float
    seconds_per_megapixel_squared_step: float
    seconds_per_megapixel: float
    seconds_per_megapixel_squared: float
    batched: bool  # one call per batch where measured; else one call per image
    device: str  # where it was measured, e.g. "NVIDIA H100 80GB HBM3"
    measured: str  # when, an ISO date

    COEFFICIENTS: ClassVar[tuple[str, ...]] = (
        "seconds_per_call",
        "seconds_per_step",
        "seconds_per_image_step",
        "seconds_per_megapixel_step",
        "seconds_per_megapixel_squared_step",
        "seconds_per_megapixel",
        "seconds_per_megapixel_squared",
    )

    @property
    def coefficients(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in self.COEFFICIENTS)

    @staticmethod
    def terms(width: int, height: int, steps: int, images: int, batched: bool) -> tuple[float, ...]:
        """What each coefficient (in COEFFICIENTS order) is multiplied by for ``images`` images rendered in one call
        (``batched``) or one call each: the fit's seconds are their dot product."""
        megapixels = width * height / 1e6
        per_image = (1.0, megapixels, megapixels**2)
        b = images if batched else 1
        call = (1.0, steps, *(steps * b * term for term in per_image), *(b * term for term in per_image[1:]))
        calls = 1 if batched else images
        return tuple(calls * term for term in call)

    def seconds(self, width: int, height: int, steps: int, images: int) -> float:
        """The device seconds of ``images`` images of ``width`` x ``height`` in ``steps`` steps, alone in a call."""
        terms = self.terms(width, height, steps, images, self.batched)
        return sum(c * t for c, t in zip(self.coefficients, terms, strict=True))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, where: str, raw: Any) -> ComputeFit:
        where = f"{where}: 'compute_fit'"
        keys = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(raw, dict) or set(raw) != set(keys):
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise ModelError(
                f"{where} must be an object of {', '.join(keys)} (`pixelpipe models calibrate` writes it), got {got}"
            )
        read = _FieldReader(where, raw)
        coefficients = {name: read.number(name, 0.0) for name in cls.COEFFICIENTS}
        if not any(coefficients.values()):
            raise ModelError(f"{where}: every coefficient is 0, so every render would be free")
        device = raw["device"]
        if not isinstance(device, str) or not device.strip():
            raise ModelError(f"{where}: 'device' must name the device it was measured on, got {device!r}")
        measured = raw["measured"]
        try:
            dt.date.fromisoformat(measured)
        except (TypeError, ValueError):
            raise ModelError(f"{where}: 'measured' must be an ISO date like \"2026-11-26\", got {measured!r}") from None
        return cls(**coefficients, batched=read.flag("batched"), device=device, measured=measured)


# The charge of a model without a compute_fit of its own: its family's full-size architecture (SD-1.5, SDXL base,
# FLUX.1-dev, FLUX.2 klein 4B) on an H100, eager bf16, batched. Anchored on raw diffusers 0.39 pipelines with random
# weights measured on an H100 80GB HBM3 on 2026-11-25 (SD-1.5 at 512x512, 20 steps: 1.56 images/s at batch 1, 6.49
# at batch 8; FLUX.1-dev at 1024x1024, 28 steps: 0.193 at batch 1, 0.197 at batch 4), which give the batch-1
# overhead per step and the FLOP rate (410 and 415 TFLOP/s); each term is the architecture's FLOPs at that rate,
# counted on the meta device (torch's FlopCounterMode: denoiser and VAE decoder at 512, 1024 and 2048 pixels a
# side). SDXL and klein were not run on a GPU: SD-1.5's and FLUX.1's rate and overhead stand for theirs.
# `python benchmarks/compute_fit.py` on a GPU measures all four; README, "Compute fits".
_H100 = "NVIDIA H100 80GB HBM3"
DEFAULT_COMPUTE_FITS: dict[str, ComputeFit] = {
    "stable-diffusion": ComputeFit(
        0.0, 0.02783, 1.468e-05, 0.01261, 0.008697, 0.02308, 0.00122, True, _H100, "2026-11-25"
    ),
    "stable-diffusion-xl": ComputeFit(
        0.0, 0.02783, 0.0002563, 0.02772, 0.003335, 0.02308, 0.00122, True, f"{_H100}, estimated", "2026-11-25"
    ),
    "flux": ComputeFit(0.0, 0.00501, 0.01641, 0.1282, 0.02574, 0.02279, 0.001204, True, _H100, "2026-11-25"),
    "flux2-klein": ComputeFit(
        0.0, 0.00501, 0.007817, 0.06068, 0.01129, 0.02279, 0.001204, True, f"{_H100}, estimated", "2026-11-25"
    ),
}


def _size(where: str, text: Any) -> tuple[int, int]:
    width, _, height = str(text).partition("x")
    sides = [int(side) for side in (width, height) if side.isdigit()]
    if len(sides) != 2 or not all(side > 0 and side % 8 == 0 for side in sides):
        raise ModelError(f"{where}: size {text!r} must be WIDTHxHEIGHT in positive multiples of 8")
    return sides[0], sides[1]


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class ModelEntry:
    """One model of the registry (README, "The model registry", says what each field means)."""

    name: str
    path: str
    kind: str = "stable-diffusion"
    default_steps: int = 25
    default_guidance: float = 7.5
    dtype: str = "auto"
    device: str = "auto"
    batching: str = "auto"  # one pipeline call per batch ("batched") or per image ("per-image"); see DiffusionModels
    max_batch: int | None = None  # most requests in one model call; None: the stage's PIXELPIPE_MAX_BATCH
    compile: str = "none"  # torch.compile of the denoiser; see COMPILE
    channels_last: bool = False  # UNet families: convolutions in channels-last memory layout
    fuse_qkv: bool = False  # one projection for query, key and value in the denoiser's attention
    attention: str = "sdpa"  # see ATTENTION
    warmup: WarmUp | None = None  # shapes rendered at load; None: the model is only loaded
    seconds_per_image: float = 0.0  # null models only: the simulated render time
    compute_fit: ComputeFit | None = None  # its renders' device seconds; None: its family's DEFAULT_COMPUTE_FITS
    max_source_images: int = 1  # most images one edit may give it: the source and its references

    @property
    def edits_by_reference(self) -> bool:
        """Edits condition on the source and reference images (REFERENCE_FAMILIES) instead of noising the source."""
        return self.kind in REFERENCE_FAMILIES

    def batch_limit(self, stage_max_batch: int) -> int:
        """Most requests of this model one call may take: the smaller of its ``max_batch`` and the stage's."""
        return min(self.max_batch or stage_max_batch, stage_max_batch)

    def compute(self, width: int, height: int, steps: int | None, images: int) -> float:
        """The compute of rendering ``images`` images of ``width`` x ``height`` in ``steps`` denoising steps (the
        model's default when None), in device seconds: what the per-request and per-user budgets and the long lane
        count (PIXELPIPE_MAX_REQUEST_COMPUTE and the others). A null model is charged its ``seconds_per_image``; any
        other its ``compute_fit``, or its family's default fit (DEFAULT_COMPUTE_FITS) where it has none."""
        steps = self.default_steps if steps is None else steps
        if self.kind == "null":
            return self.seconds_per_image * images
        return (self.compute_fit or DEFAULT_COMPUTE_FITS[self.kind]).seconds(width, height, steps, images)

    @classmethod
    def from_json(cls, name: str, raw: Any) -> ModelEntry:
        where = f"model {name!r}"
        if not isinstance(raw, dict):
            raise ModelError(f"{where}: expected an object, got {type(raw).__name__}")
        if "compute_weight" in raw:  # the budgets' unit before device seconds: no conversion to seconds exists
            raise ModelError(
                f"{where}: 'compute_weight' is gone: the compute budgets count device seconds now. Run `pixelpipe "
                f"models calibrate --registry REGISTRY --model {name}` on a worker's device: it measures the model's "
                f"'compute_fit' and removes 'compute_weight'; or delete 'compute_weight' to charge the family's "
                f'default fit (README, "The model registry")'
            )
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls) if f.name != "name"})
        if unknown:
            raise ModelError(f"{where}: unknown keys {unknown}")
        read = _FieldReader(where, raw)
        kind = read.choice("kind", KINDS, cls.kind)
        path = raw.get("path", "" if kind == "null" else None)  # a null model has no weights to point at
        if not isinstance(path, str) or (not path and kind != "null"):
            raise ModelError(f"{where}: 'path' must be a local directory or a hub id, got {path!r}")
        diffusion_only = sorted(
            {"batching", "compile", "channels_last", "fuse_qkv", "attention", "warmup", "compute_fit"} & set(raw)
        )
        if kind == "null" and diffusion_only:
            raise ModelError(f"{where}: {diffusion_only} do not apply to a null model")
        if "seconds_per_image" in raw and kind != "null":
            raise ModelError(f"{where}: 'seconds_per_image' is for null models only")
        if raw.get("channels_last") and kind not in UNET_FAMILIES:
            raise ModelError(f"{where}: 'channels_last' is for the UNet families {list(UNET_FAMILIES)}")
        attention = read.choice("attention", tuple(ATTENTION), cls.attention)
        if attention != "sdpa" and kind != "flux":
            raise ModelError(f"{where}: 'attention' {attention!r} is for flux; the UNet families run 'sdpa'")
        max_batch = raw.get("max_batch")
        # The null model ignores its inputs, so it may be registered to take as many as a family it stands in for.
        max_source_images = read.positive_int("max_source_images", default_max_source_images(kind))
        if max_source_images > 1 and kind not in (*REFERENCE_FAMILIES, "null"):
            raise ModelError(
                f"{where}: 'max_source_images' {max_source_images} is for the families that take several images "
                f"{list(REFERENCE_FAMILIES)}; {kind!r} takes one"
            )
        return cls(
            name,
            path,
            kind,
            default_steps=read.positive_int("default_steps", cls.default_steps),
            default_guidance=read.number("default_guidance", cls.default_guidance),
            dtype=read.choice("dtype", tuple(DTYPES), cls.dtype),
            device=read.choice("device", DEVICES, cls.device),
            batching=read.choice("batching", BATCHING, cls.batching),
            max_batch=None if max_batch is None else read.positive_int("max_batch", 1),
            compile=read.choice("compile", COMPILE, cls.compile),
            channels_last=read.flag("channels_last"),
            fuse_qkv=read.flag("fuse_qkv"),
            attention=attention,
            warmup=None if raw.get("warmup") is None else WarmUp.from_json(where, raw["warmup"]),
            seconds_per_image=read.number("seconds_per_image", cls.seconds_per_image),
            compute_fit=None if raw.get("compute_fit") is None else ComputeFit.from_json(where, raw["compute_fit"]),
            max_source_images=max_source_images,
        )


@dataclass(frozen=True)
class _FieldReader:
    """Reads one registry entry's fields with their defaults, and says which field is wrong, and how."""

    where: str
    raw: dict[str, Any]

    def choice(self, key: str, choices: Sequence[str], default: str) -> str:
        value = self.raw.get(key, default)
        if value not in choices:
            raise ModelError(f"{self.where}: {key!r} must be one of {list(choices)}, got {value!r}")
        return value

    def positive_int(self, key: str, default: int) -> int:
        value = self.raw.get(key, default)
        if not _is_positive_int(value):
            raise ModelError(f"{self.where}: {key!r} must be a positive integer, got {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < math.inf:
            raise ModelError(f"{self.where}: {key!r} must be a finite number >= 0, got {value!r}")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.raw.get(key, False)
        if not isinstance(value, bool):
            raise ModelError(f"{self.where}: {key!r} must be true or false, got {value!r}")
        return value


@dataclass(frozen=True)
class ModelRegistry:
    """The models pixelpipe may run, by name."""

    entries: dict[str, ModelEntry]

    @classmethod
    def load(cls, path: str | Path) -> ModelRegistry:
        path = Path(path)
        return cls.parse(read_registry_json(path), path)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], path: Path) -> ModelRegistry:
        """The registry of ``raw`` (a registry file's JSON, name -> entry), read from ``path``."""
        try:
            entries = {name: ModelEntry.from_json(name, entry) for name, entry in raw.items()}
        except ModelError as e:
            raise ModelError(f"model registry {path}: {e}") from None
        # Relative model paths are relative to the registry file, so a registry can travel with its models.
        for name, entry in entries.items():
            local = path.parent / entry.path
            if entry.path and not Path(entry.path).is_absolute() and local.is_dir():
                entries[name] = dataclasses.replace(entry, path=str(local.resolve()))
        return cls(entries)

    def get(self, name: str) -> ModelEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise ModelError(f"unknown model {name!r}; the registry has {sorted(self.entries)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return sorted(self.entries)


def read_registry_json(path: Path) -> dict[str, Any]:
    """A registry file's JSON object of name -> entry, not yet checked entry by entry."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"model registry {path} does not exist (set PIXELPIPE_MODEL_REGISTRY)") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"model registry {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise ModelError(f"model registry {path}: expected a non-empty object of name -> model")
    return raw


def resolve_device_dtype(entry: ModelEntry) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run ``entry`` with: on CUDA bf16 (fp16 where bf16 is unsupported), on CPU fp32."""
    if entry.device == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model {entry.name!r} asks for device 'cuda', but CUDA is not available here")
    use_cuda = entry.device == "cuda" or (entry.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = DTYPES[entry.dtype]
    if dtype is None:
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            # Half precision on CPU is slow and poorly supported.
            dtype = torch.float32
    return device, dtype


@dataclass
class BatchOutput:
    """The images of one batch, ``images[i]`` for prompt ``i``, the device time the batch took and the seeds
    used (drawn at random when none were given)."""

    images: list[list[Image.Image]]
    device_seconds: float
    seeds: list[int]

    @classmethod
    def joined(cls, outputs: Sequence[BatchOutput]) -> BatchOutput:
        """The outputs of consecutive calls as one batch's: images and seeds in order, device time summed."""
        return cls(
            [images for output in outputs for images in output.images],
            sum(output.device_seconds for output in outputs),
            [seed for output in outputs for seed in output.seeds],
        )


Task = Literal["text2image", "image2image", "inpaint"]


@dataclass
class _Batch:
    """A batch flattened to one row per output image, prompt-major: image ``k`` of prompt ``i`` is row
    ``i * n_per_prompt + k`` and starts from seed ``seeds[i] + k``. We repeat prompts and images ourselves and
    call a pipeline with ``num_images_per_prompt=1``, so rows line up the same way in every pipeline and call."""

    per_image: dict[str, list[Any]]  # pipeline arguments with one value per row: prompt, image, mask_image ...
    seeds: list[int]
    n_per_prompt: int
    steps: int
    guidance: float
    width: int
    height: int
    strength: float | None = None  # edits that noise their source
    condition_images: list[Image.Image] | None = None  # edits by reference: the images every row is conditioned on

    @property
    def size(self) -> int:
        return len(self.per_image["prompt"])

    @property
    def row_seeds(self) -> list[int]:
        return [seed + k for seed in self.seeds for k in range(self.n_per_prompt)]

    def repeat(self, values: Sequence[Any]) -> list[Any]:
        return [v for v in values for _ in range(self.n_per_prompt)]

    def per_prompt(self) -> list[_Batch]:
        """One batch per prompt, with its rows and seed."""
        n = self.n_per_prompt
        return [
            dataclasses.replace(
                self, per_image={k: v[i * n : (i + 1) * n] for k, v in self.per_image.items()}, seeds=[seed]
            )
            for i, seed in enumerate(self.seeds)
        ]

    def output(self, rows: list[Image.Image], device_seconds: float) -> BatchOutput:
        n = self.n_per_prompt
        return BatchOutput([rows[i : i + n] for i in range(0, len(rows), n)], device_seconds, self.seeds)

    @classmethod
    def of(
        cls,
        entry: ModelEntry,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None,
        steps: int | None,
        guidance: float | None,
        seeds: Sequence[int] | None,
        n_per_prompt: int,
        width: int,
        height: int,
    ) -> _Batch:
        if isinstance(prompts, str) or not prompts:
            raise ModelError("prompts must be a non-empty list of strings")
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ModelError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
        if seeds is not None and len(seeds) != len(prompts):
            raise ModelError(f"{len(prompts)} prompts but {len(seeds)} seeds (one per prompt)")
        if n_per_prompt < 1:
            raise ModelError(f"n_per_prompt must be at least 1, got {n_per_prompt}")
        steps = entry.default_steps if steps is None else steps
        if steps < 1:
            raise ModelError(f"steps must be at least 1, got {steps}")
        if width < 8 or height < 8 or width % 8 or height % 8:
            raise ModelError(f"width and height must be positive multiples of 8, got {width}x{height}")
        if seeds is None:
            seeds = [secrets.randbelow(2**31) for _ in prompts]
        guidance = entry.default_guidance if guidance is None else guidance
        batch = cls({}, list(seeds), n_per_prompt, steps, guidance, width, height)
        batch.per_image["prompt"] = batch.repeat(prompts)
        if negative_prompts is not None:
            batch.per_image["negative_prompt"] = batch.repeat(negative_prompts)
        return batch


@dataclass
class LoadedModel:
    """A diffusion model's three pipelines, which share one set of modules (weights, tokenizers, scheduler)."""

    entry: ModelEntry
    device: torch.device
    dtype: torch.dtype
    text2image: DiffusionPipeline
    image2image: DiffusionPipeline
    inpaint: DiffusionPipeline | None  # None for the REFERENCE_FAMILIES, which take no mask
    default_scheduler: str  # the configured one, by name; a call may swap in another for itself
    batched: bool  # one pipeline call per batch, else one per image
    size_multiple: int  # width and height must be multiples of it (the latent grid, times flux's 2x2 patches)
    # diffusers pipelines keep per-call state (the scheduler's timesteps): one call at a time per model.
    run_lock: threading.Lock = field(default_factory=threading.Lock)

    def sibling(self) -> LoadedModel:
        """The same modules (weights, tokenizers) in pipeline objects of its own, with a copy of the scheduler and
        a run lock of its own: it may run while this one runs, with no second copy of the weights."""
        text2image = AutoPipelineForText2Image.from_pipe(
            self.text2image, scheduler=copy.deepcopy(self.text2image.scheduler)
        )
        image2image, inpaint = _editing_pipelines(self.entry, text2image)
        return dataclasses.replace(
            self, text2image=text2image, image2image=image2image, inpaint=inpaint, run_lock=threading.Lock()
        )

    def _unpack(self, pipe: DiffusionPipeline, batch: _Batch) -> Unpack | None:
        """How the step callback gets latents in images' layout: Flux's and klein's are packed, 2x2 patches per
        token."""
        if self.entry.kind == "flux":
            unpack = pipe._unpack_latents
        elif self.entry.kind == "flux2-klein":
            unpack = unpack_klein_latents
        else:
            return None
        return functools.partial(unpack, height=batch.height, width=batch.width, vae_scale_factor=pipe.vae_scale_factor)

    @property
    def schedulers(self) -> frozenset[str]:
        """The schedulers a call may pick for this model: those made for the objective it was trained on."""
        flow_matching = self.default_scheduler in FLOW_MATCHING_SCHEDULERS
        return frozenset(name for name in SCHEDULERS if (name in FLOW_MATCHING_SCHEDULERS) == flow_matching)

    def run(self, task: Task, batch: _Batch, scheduler: str | None) -> BatchOutput:
        if batch.width % self.size_multiple or batch.height % self.size_multiple:
            raise ModelError(
                f"model {self.entry.name!r} renders sizes in multiples of {self.size_multiple}, "
                f"got {batch.width}x{batch.height}"
            )
        if scheduler not in (None, self.default_scheduler) and scheduler not in self.schedulers:
            raise ModelError(
                f"model {self.entry.name!r} ({self.entry.kind}) cannot run scheduler {scheduler!r}; "
                f"it runs {', '.join(sorted(self.schedulers))}"
            )
        pipe = {"text2image": self.text2image, "image2image": self.image2image, "inpaint": self.inpaint}[task]
        if pipe is None:
            raise ModelError(f"model {self.entry.name!r} ({self.entry.kind}) cannot {task}")
        shared: dict[str, Any] = {
            "num_inference_steps": batch.steps,
            "guidance_scale": batch.guidance,
            "num_images_per_prompt": 1,
            "output_type": "pil",
        }
        if batch.strength is not None:
            shared["strength"] = batch.strength
        if batch.condition_images is not None:
            shared["image"] = batch.condition_images
        # SD and SDXL image-to-image render at the source's size (edit() resized it) and take no size argument.
        if task != "image2image" or self.entry.kind in PACKED_FAMILIES:
            shared |= {"width": batch.width, "height": batch.height}
        # One generator per image, seeded seed + k: its noise is the same whatever else is in the batch.
        rows = {**batch.per_image, "generator": [torch.Generator(self.device).manual_seed(s) for s in batch.row_seeds]}
        # The reference families' pipelines take no negative prompt: one is refused, never silently dropped.
        negatives = rows.pop("negative_prompt", []) if self.entry.edits_by_reference else []
        if any(negatives):
            raise ModelError(f"model {self.entry.name!r} ({self.entry.kind}) takes no negative prompt")
        # Batched kernels round differently from single ones (about 1e-6), which can flip a pixel value;
        # one image per call makes every image independent of its batch, bit for bit.
        calls = [rows] if self.batched else [{k: v[i : i + 1] for k, v in rows.items()} for i in range(batch.size)]
        images: list[Image.Image] = []
        with self.run_lock, torch.inference_mode():
            configured = pipe.scheduler
            if scheduler not in (None, self.default_scheduler):  # for this call only; the run lock hides it
                pipe.scheduler = SCHEDULERS[scheduler].from_config(configured.config)
            try:
                _synchronize(self.device)
                start = time.perf_counter()
                for index, call in enumerate(calls):
                    # Previews of images in progress and the stage's stop check (processors/previews.py).
                    previews = step_callback(0 if self.batched else index, self._unpack(pipe, batch))
                    images += pipe(**call, **shared, **previews).images
                    if pipe.interrupt:  # stopped: every request of the batch was cancelled, nobody wants the rest
                        break
                _synchronize(self.device)
                seconds = time.perf_counter() - start
            finally:
                pipe.scheduler = configured
        return batch.output(images, seconds)


def unpack_klein_latents(latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """FLUX.2 klein's latents during denoising (rows x tokens x 4 x channels: a 2x2 patch of batch-normed VAE latents
    per token) in images' layout, rows x channels x height/f x width/f, as ``Flux2KleinPipeline`` unpacks them before
    decoding: position ids scatter the tokens to their places, then each patch is spread back over 2x2 positions.
    The batch norm is not undone: the preview map reads the normalised latents, the space the transformer works in
    (as Flux's map reads its scaled and shifted ones)."""
    rows, side = latents.shape[0], vae_scale_factor * 2
    # The ids the pipeline made for these latents (prepare_latents): only the patch grid's shape matters.
    grid = torch.empty(rows, 0, height // side, width // side, device="meta")
    ids = Flux2KleinPipeline._prepare_latent_ids(grid).to(latents.device)
    patches = Flux2KleinPipeline._unpack_latents_with_ids(latents, ids, height // side, width // side)
    return Flux2KleinPipeline._unpatchify_latents(patches)


@dataclass
class NullModel:
    """A model without weights for capacity tests of the pipeline: each image is a plain colour derived from its
    seed, of the requested size, returned after ``seconds_per_image`` of simulated work (reported as device
    time), spread over the call's steps with the stop check asked after each, as a diffusers pipeline does. No
    torch work is done."""

    entry: ModelEntry
    device: ClassVar[torch.device] = torch.device("cpu")
    default_scheduler: ClassVar[str] = NULL_SCHEDULER
    batched: ClassVar[bool] = True  # a whole batch at once

    def run(self, task: Task, batch: _Batch, scheduler: str | None) -> BatchOutput:
        steps = max(1, batch.steps)
        step_s = self.entry.seconds_per_image * batch.size / steps
        seconds = 0.0
        for _ in range(steps):
            time.sleep(step_s)
            seconds += step_s
            if stop_after_step(steps):
                break
        images = [Image.new("RGB", (batch.width, batch.height), seed_colour(seed)) for seed in batch.row_seeds]
        return batch.output(images, seconds)


def seed_colour(seed: int) -> tuple[int, int, int]:
    """A null model's colour for ``seed``: spread over the RGB cube so nearby seeds look different."""
    mixed = (seed * 2654435761) & 0xFFFFFF  # Knuth's multiplicative hash
    return (mixed >> 16, (mixed >> 8) & 0xFF, mixed & 0xFF)


@dataclass(frozen=True)
class Readiness:
    """How long a model took to load and to render its warm-up shapes (``DiffusionModels.warm_up``)."""

    load_seconds: float
    warm_up_seconds: float
    shapes: list[str]  # what was rendered, e.g. "8x512x512" (batch x width x height)


class DiffusionModels:
    """Loads each registry model once and runs batches of text-to-image, image-to-image and inpainting on it.

    Seeds are per image: image ``k`` of prompt ``i`` starts from the noise of ``seeds[i] + k``, drawn by its
    own ``torch.Generator`` on the model's device, in every batching mode (the registry's ``batching``):

    - ``batched``: a batch runs as one pipeline call, which keeps a GPU busy. Batched kernels round differently
      from single ones, which moves some pixel values by a level or two: same noise, same picture, not the
      same bytes as the image rendered alone.
    - ``per-image``: each image runs in its own call, so a seed gives the same bytes whatever batch it lands in.
    - ``auto`` (the default): ``batched`` on CUDA; ``per-image`` on CPU, where tests and the demo want the same
      bytes for a redelivered request in any batch (a tiny model renders about 20 % fewer images/s that way).

    ``pipelines`` are text-to-image pipelines already built (benchmarks, tests), used instead of loading from
    their registry entry's ``path``; everything else (device, dtype, compilation, batching) follows the entry.
    """

    def __init__(self, registry: ModelRegistry, pipelines: Mapping[str, DiffusionPipeline] | None = None) -> None:
        self.registry = registry
        self._built = dict(pipelines or {})
        self._loaded: dict[str, LoadedModel | NullModel] = {}
        self._load_lock = threading.Lock()
        self._weights_of: DiffusionModels | None = None  # a lane (see lane()) takes its weights from there

    def lane(self) -> DiffusionModels:
        """Models for a second lane of work (the long lane) that run beside these: the same weights, loaded once,
        in pipeline objects of their own with their own schedulers and run locks (``LoadedModel.sibling``), so a
        call on the lane never waits for a call here. The models loaded here are built for the lane at once; others
        are loaded here, then built, on the lane's first use."""
        lane = DiffusionModels(self.registry)
        lane._weights_of = self
        for name in self.loaded():
            lane.load(name)
        return lane

    @classmethod
    def from_file(cls, path: str | Path) -> DiffusionModels:
        return cls(ModelRegistry.load(path))

    def load(self, name: str) -> LoadedModel | NullModel:
        """Load ``name`` now (or return it, when loaded); later calls reuse the same weights."""
        entry = self.registry.get(name)
        # One lock for all loads: two threads asking for the same model must not load it twice.
        with self._load_lock:
            if name not in self._loaded:
                if entry.kind == "null":
                    self._loaded[name] = NullModel(entry)
                elif self._weights_of is not None:
                    self._loaded[name] = self._weights_of.load(name).sibling()  # type: ignore[union-attr]
                else:
                    self._loaded[name] = self._load(entry)
            return self._loaded[name]

    def warm_up(self) -> dict[str, Readiness]:
        """Load every registry model and render each of its warm-up shapes once (the entry's ``warmup``), so
        that loading and compiling are done before the worker takes work; returns the seconds each model took.

        In per-image mode every call renders one image, so a size is warmed once, whatever the batch sizes.
        """
        readiness: dict[str, Readiness] = {}
        for name in self.registry.names():
            started = time.perf_counter()
            model = self.load(name)
            loaded = time.perf_counter()
            plan = model.entry.warmup
            shapes: list[str] = []
            for width, height in plan.sizes if plan else ():
                for size in plan.batch_sizes if model.batched else (1,):
                    self.generate(name, ["warm-up"] * size, width=width, height=height, steps=plan.steps)
                    shapes.append(f"{size}x{width}x{height}")
            readiness[name] = Readiness(loaded - started, time.perf_counter() - loaded, shapes)
            log.info(
                "model ready",
                extra={
                    "model": name,
                    "load_s": round(readiness[name].load_seconds, 3),
                    "warm_up_s": round(readiness[name].warm_up_seconds, 3),
                    "shapes": shapes,
                },
            )
        return readiness

    def default_scheduler(self, name: str) -> str:
        """The scheduler ``name`` runs with unless a request picks another (loads the model)."""
        return self.load(name).default_scheduler

    def loaded(self) -> list[str]:
        return sorted(self._loaded)

    def _load(self, entry: ModelEntry) -> LoadedModel:
        device, dtype = resolve_device_dtype(entry)
        if entry.name in self._built:
            text2image = self._built[entry.name]
            if text2image.dtype != dtype:
                text2image = text2image.to(dtype=dtype)
        else:
            text2image = _from_pretrained(entry, dtype)
        expected = FAMILIES[entry.kind]
        if not isinstance(text2image, expected):
            raise ModelError(
                f"model {entry.name!r} is registered as {entry.kind!r} ({expected.__name__}), "
                f"but {entry.path!r} holds a {type(text2image).__name__}"
            )
        text2image = text2image.to(device)
        _speed_up(entry, text2image)
        image2image, inpaint = _editing_pipelines(entry, text2image)
        batched = entry.batching == "batched" or (entry.batching == "auto" and device.type == "cuda")
        size_multiple = text2image.vae_scale_factor * (2 if entry.kind in PACKED_FAMILIES else 1)
        return LoadedModel(
            entry,
            device,
            dtype,
            text2image,
            image2image,
            inpaint,
            default_scheduler=scheduler_name(text2image.scheduler),
            batched=batched,
            size_multiple=size_multiple,
        )

    def generate(
        self,
        model: str,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        width: int = 512,
        height: int = 512,
        steps: int | None = None,
        guidance: float | None = None,
        seeds: Sequence[int] | None = None,
        n_per_prompt: int = 1,
        scheduler: str | None = None,
    ) -> BatchOutput:
        """Text-to-image for a batch of prompts; ``steps``, ``guidance`` and ``scheduler`` default to the model's."""
        m = self.load(model)
        batch = _Batch.of(m.entry, prompts, negative_prompts, steps, guidance, seeds, n_per_prompt, width, height)
        return m.run("text2image", batch, _checked(scheduler, m.default_scheduler))

    def edit(
        self,
        model: str,
        prompts: Sequence[str],
        images: Sequence[Image.Image],
        masks: Sequence[Image.Image] | None = None,
        strength: float | None = 0.75,
        negative_prompts: Sequence[str] | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seeds: Sequence[int] | None = None,
        n_per_prompt: int = 1,
        scheduler: str | None = None,
        references: Sequence[Sequence[Image.Image]] | None = None,
    ) -> BatchOutput:
        """Image-to-image (``masks`` None) or inpainting (white mask pixels are repainted) for a batch; for a model
        of the REFERENCE_FAMILIES, an edit conditioned on each prompt's source and ``references`` (no mask and no
        strength: ``strength`` must be None), one pipeline call per prompt.

        Each source image (and mask) is resized to ``width`` x ``height``, by default the first image's size; a
        reference family's pipeline sizes its images itself.
        """
        m = self.load(model)
        if len(images) != len(prompts):
            raise ModelError(f"{len(prompts)} prompts but {len(images)} source images")
        if masks is not None and len(masks) != len(prompts):
            raise ModelError(f"{len(prompts)} prompts but {len(masks)} masks")
        references = references if references is not None else [[] for _ in prompts]
        if len(references) != len(prompts):
            raise ModelError(f"{len(prompts)} prompts but {len(references)} lists of reference images")
        most = 1 + max((len(r) for r in references), default=0)
        if most > m.entry.max_source_images:
            raise ModelError(
                f"model {model!r} takes at most {m.entry.max_source_images} source image(s) per edit, got {most}"
            )
        width = width or (images[0].width if images else 0)
        height = height or (images[0].height if images else 0)
        batch = _Batch.of(m.entry, prompts, negative_prompts, steps, guidance, seeds, n_per_prompt, width, height)
        scheduler = _checked(scheduler, m.default_scheduler)
        if m.entry.edits_by_reference:
            if masks is not None or strength is not None:
                raise ModelError(f"model {model!r} ({m.entry.kind}) edits from reference images: no mask, no strength")
            # The images condition the whole pipeline call, so each prompt gets a call of its own; the pipeline
            # fits each image to its latent grid itself, so they keep their sizes.
            outputs = []
            for prompt_batch, source, refs in zip(batch.per_prompt(), images, references, strict=True):
                prompt_batch.condition_images = [im.convert("RGB") for im in (source, *refs)]
                if small := [
                    f"{im.width}x{im.height}"
                    for im in prompt_batch.condition_images
                    if min(im.size) < MIN_REFERENCE_SIDE
                ]:
                    raise ModelError(
                        f"model {model!r} ({m.entry.kind}) takes images of at least {MIN_REFERENCE_SIDE}x"
                        f"{MIN_REFERENCE_SIDE} pixels, got {', '.join(small)}"
                    )
                outputs.append(m.run("image2image", prompt_batch, scheduler))
            return BatchOutput.joined(outputs)
        if strength is None or not 0.0 < strength <= 1.0:
            raise ModelError(f"strength must be in (0, 1], got {strength}")
        batch.strength = strength
        # Batched images must share one size; resizing here also sets the output size for image-to-image.
        batch.per_image["image"] = batch.repeat([_resized(im.convert("RGB"), width, height) for im in images])
        if masks is not None:
            batch.per_image["mask_image"] = batch.repeat([_resized(mk.convert("L"), width, height) for mk in masks])
        task: Task = "image2image" if masks is None else "inpaint"
        return m.run(task, batch, scheduler)


def _editing_pipelines(
    entry: ModelEntry, text2image: DiffusionPipeline
) -> tuple[DiffusionPipeline, DiffusionPipeline | None]:
    """The image-to-image and inpainting pipelines of a loaded model. from_pipe builds new pipeline objects around
    the same modules: no second copy of the weights. A reference family edits with its own pipeline class (the
    images are an argument of it) and has no inpainting."""
    image2image = AutoPipelineForImage2Image.from_pipe(text2image)
    inpaint = None if entry.edits_by_reference else AutoPipelineForInpainting.from_pipe(text2image)
    for pipe in (text2image, image2image, inpaint):
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
    return image2image, inpaint


def _from_pretrained(entry: ModelEntry, dtype: torch.dtype) -> DiffusionPipeline:
    # Never the hub at run time: a local directory, or a hub id already in the local Hugging Face cache.
    try:
        return AutoPipelineForText2Image.from_pretrained(entry.path, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {entry.name!r} from {entry.path!r}: {e}") from e


def _speed_up(entry: ModelEntry, pipe: DiffusionPipeline) -> None:
    """Apply the entry's attention backend, fused QKV projections, memory layout and compilation to the denoiser
    (the UNet or the transformer: nearly all of a render's time), in place, so every pipeline sharing it gets
    them."""
    denoiser = pipe.unet if entry.kind in UNET_FAMILIES else pipe.transformer
    if entry.attention != "sdpa":
        denoiser.set_attention_backend(ATTENTION[entry.attention])
    if entry.fuse_qkv:
        denoiser.fuse_qkv_projections()
    if entry.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    # Compiled lazily, at the first call of each new shape: warm_up() makes those calls before work arrives.
    if entry.compile == "full":
        denoiser.compile()
    elif entry.compile == "regional":
        denoiser.compile_repeated_blocks()


def _checked(scheduler: str | None, default: str) -> str | None:
    # The model's own scheduler may be one a request cannot pick by name (reported by its class name).
    if scheduler is not None and scheduler != default and scheduler not in SCHEDULERS:
        raise ModelError(f"unknown scheduler {scheduler!r}; known: {', '.join(sorted(SCHEDULERS))}")
    return scheduler


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _synchronize(device: torch.device) -> None:
    # CUDA calls return before the kernels finish; wait so the clock measures the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
