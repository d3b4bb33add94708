"""The diffusion models the generation and editing stages run, loaded from the model registry
(``pixelpipe.core.registry``: its entries, their defaults and what their renders cost, read without torch).

``DiffusionModels`` loads each model once with ``AutoPipelineForText2Image`` (Stable Diffusion, SDXL, Flux, FLUX.2
klein) and derives the image-to-image and inpainting pipelines from it with ``from_pipe``, so the three share one
copy of the weights; klein edits with its own pipeline, conditioned on the source and the request's reference images
(up to the entry's ``max_source_images``), and has no inpainting. ``DiffusionModels.warm_up`` loads every model and
renders its warm-up shapes, so compilation happens before a worker takes work. ``DiffusionModels.lane`` gives a
second set of pipelines on the same weights, with their own scheduler and lock, for work that runs beside the first
(the long lane). A ``null`` model has no weights: it returns plain images after a simulated time, for capacity tests
of the pipeline without diffusion. The methods block for seconds: call them from an executor thread, never on the
event loop.

One job: running batches on diffusers pipelines. Loading a model, its three pipelines, batching, seeding and the
per-call scheduler are one piece: each is how a batch reaches the pipelines and comes back as images.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import diffusers
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
    Flux2KleinPipeline,
)
from PIL import Image

from pixelpipe.core.registry import (
    ATTENTION,
    DTYPES,
    FAMILY_PIPELINES,
    SCHEDULERS,
    UNET_FAMILIES,
    ModelEntry,
    ModelError,
    ModelRegistry,
)
from pixelpipe.processors.previews import Unpack, step_callback, stop_after_step

log = logging.getLogger(__name__)

# The registry's names bound to what they are in diffusers and torch.
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    family: getattr(diffusers, name) for family, name in FAMILY_PIPELINES.items()
}
SCHEDULER_CLASSES: dict[str, Any] = {name: getattr(diffusers, cls) for name, cls in SCHEDULERS.items()}
TORCH_DTYPES: dict[str, torch.dtype | None] = {
    name: None if name == "auto" else getattr(torch, name) for name in DTYPES
}
# Families that pack 2x2 latent patches into one token: sizes in multiples of twice the VAE's factor. Both are
# unpacked for previews (LoadedModel._unpack).
PACKED_FAMILIES = ("flux", "flux2-klein")
# REFERENCE_FAMILIES (pixelpipe.core.registry) edit by conditioning on reference images (a list, one for the whole
# call: one call per request) rather than by noising a source: no mask, no strength, no negative prompt.
MIN_REFERENCE_SIDE = 64  # pixels: FLUX.2's image processor refuses smaller images
NULL_SCHEDULER = "none"  # what a null model reports as its scheduler: it runs none
# A flow-matching model (flux) runs only flow-matching schedulers, and a noise-predicting one only the others.
FLOW_MATCHING_SCHEDULERS = frozenset({"flow-match-euler"})


def scheduler_name(scheduler: Any) -> str:
    """Our name for a scheduler object (e.g. "ddim"), or its class name for one a request cannot pick."""
    return next((name for name, cls in SCHEDULER_CLASSES.items() if type(scheduler) is cls), type(scheduler).__name__)


def resolve_device_dtype(entry: ModelEntry) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run ``entry`` with: on CUDA bf16 (fp16 where bf16 is unsupported), on CPU fp32."""
    if entry.device == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model {entry.name!r} asks for device 'cuda', but CUDA is not available here")
    use_cuda = entry.device == "cuda" or (entry.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = TORCH_DTYPES[entry.dtype]
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
                pipe.scheduler = SCHEDULER_CLASSES[scheduler].from_config(configured.config)
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
    time), spread over the call's steps with the stop check asked after each, as a diffusers pipeline does; a
    ``failure_rate`` share of its calls then fail (a bad candidate for rollout drills). No torch work is done."""

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
        if self.entry.failure_rate and _share_of(batch.row_seeds) < self.entry.failure_rate:
            raise ModelError(f"model {self.entry.name!r} failed by design (failure_rate {self.entry.failure_rate:g})")
        images = [Image.new("RGB", (batch.width, batch.height), seed_colour(seed)) for seed in batch.row_seeds]
        return batch.output(images, seconds)


def _share_of(seeds: Sequence[int]) -> float:
    """A point in [0, 1) drawn from a call's seeds: a call delivered again fails (or not) again."""
    digest = hashlib.sha256(",".join(map(str, seeds)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


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

    def warm_up(self, names: Sequence[str] | None = None) -> dict[str, Readiness]:
        """Load the named models (by default every registry model) and render each of its warm-up shapes once (the
        entry's ``warmup``), so that loading and compiling are done before the worker takes work; returns the
        seconds each model took.

        In per-image mode every call renders one image, so a size is warmed once, whatever the batch sizes.
        """
        readiness: dict[str, Readiness] = {}
        for name in self.registry.names() if names is None else names:
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
        expected = PIPELINE_CLASSES[entry.kind]
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
