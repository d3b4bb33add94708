"""The model registry: which models pixelpipe may run, how to run each, and what its renders cost; read by the
gateway, the moderation stage and the render stages, none of which needs torch to read it.

The registry is a JSON file mapping a model name to where its weights are and how to run it
(``docs/operators/models.md`` describes every field)::

    {"sd15": {"path": "/models/sd15", "kind": "stable-diffusion", "default_steps": 25, "default_guidance": 7.5,
              "max_batch": 8, "compile": "full", "channels_last": true, "fuse_qkv": true,
              "warmup": {"batch_sizes": [1, 8], "sizes": ["512x512"]}},
     "null": {"kind": "null", "seconds_per_image": 0.05}}

``ModelRegistry.load`` reads and checks it, entry by entry (``ModelEntry``), with the defaults of every field. A
registry entry's ``compute_fit`` says what its renders cost in device seconds, for the compute budgets
(``ModelEntry.compute``, ``ComputeFit``; ``pixelpipe models calibrate`` measures it); an entry without one is charged
its family's ``DEFAULT_COMPUTE_FITS``. The names here are strings: ``processors.models`` binds them to torch and
diffusers (pipeline and scheduler classes, dtypes) and loads the weights.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pixelpipe.core.config_files import read_json_file

Family = Literal["stable-diffusion", "stable-diffusion-xl", "flux", "flux2-klein"]
# The diffusion families and the diffusers text-to-image pipeline class each loads as; "null" renders without a model.
FAMILY_PIPELINES: dict[Family, str] = {
    "stable-diffusion": "StableDiffusionPipeline",
    "stable-diffusion-xl": "StableDiffusionXLPipeline",
    "flux": "FluxPipeline",
    "flux2-klein": "Flux2KleinPipeline",
}
FAMILIES: tuple[Family, ...] = tuple(FAMILY_PIPELINES)
KINDS = (*FAMILIES, "null")
UNET_FAMILIES = ("stable-diffusion", "stable-diffusion-xl")  # the others have a transformer as denoiser
# Families that edit by conditioning on several images (the source and its references: a list, one for the whole
# call, so one call per request) rather than by noising a source (no mask, no strength, no negative prompt), with how
# many images they take by default (an entry's max_source_images); every other family takes one.
REFERENCE_FAMILIES: dict[str, int] = {"flux2-klein": 4}
DTYPES = ("auto", "float32", "float16", "bfloat16")  # torch's names; auto: bf16 on CUDA (or fp16), fp32 on CPU
DEVICES = ("auto", "cpu", "cuda")
BATCHING = ("auto", "batched", "per-image")  # see processors.models.DiffusionModels
COMPILE = ("none", "full", "regional")  # torch.compile of the denoiser: all of it, or its repeated blocks
# Attention backends by our name -> diffusers' name; all are torch's own SDPA kernels, nothing to install.
# Only flux's attention goes through diffusers' dispatcher; the UNet families run SDPA (AttnProcessor2_0).
ATTENTION = {
    "sdpa": "native",
    "sdpa-flash": "_native_flash",
    "sdpa-efficient": "_native_efficient",
    "sdpa-cudnn": "_native_cudnn",
}


# Schedulers a request (an experiment's variant) may pick by name, with their diffusers class; each is built from the
# model's own config.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm-solver++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "flow-match-euler": "FlowMatchEulerDiscreteScheduler",
    "lcm": "LCMScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def default_max_source_images(kind: str) -> int:
    """How many images one edit may give a model of ``kind`` unless its registry entry says otherwise."""
    return REFERENCE_FAMILIES.get(kind, 1)


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
# `python benchmarks/compute_fit.py` on a GPU measures all four; docs/operators/models.md, "Compute fits".
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
    """One model of the registry (docs/operators/models.md says what each field means)."""

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
    failure_rate: float = 0.0  # null models only: the share of calls that fail (a bad candidate in a rollout drill)
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
                f"default fit (docs/operators/models.md)"
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
        for simulated in ("seconds_per_image", "failure_rate"):
            if simulated in raw and kind != "null":
                raise ModelError(f"{where}: {simulated!r} is for null models only")
        failure_rate = read.number("failure_rate", cls.failure_rate)
        if not 0.0 <= failure_rate <= 1.0:
            raise ModelError(f"{where}: 'failure_rate' must be between 0 and 1, got {failure_rate}")
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
            failure_rate=failure_rate,
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
    raw = read_json_file(path, "model registry", ModelError, " (set PIXELPIPE_MODEL_REGISTRY)")
    if not isinstance(raw, dict) or not raw:
        raise ModelError(f"model registry {path}: expected a non-empty object of name -> model")
    return raw
