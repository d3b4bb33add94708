"""What a request renders with and what that costs: its parameters, its own, then its assigned experiment variants',
then its model's defaults (``resolve_params``, in the render stages), the compute they come to, read from the
registry's entries alone (``request_compute``, in moderation: the budgets and the long lane), and the seed its pixels
are drawn from."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pixelpipe.core.events import ImageRequest
from pixelpipe.core.experiments import Experiment
from pixelpipe.core.registry import SCHEDULERS, ModelRegistry
from pixelpipe.core.settings import RequestLimits
from pixelpipe.core.validation import InvalidRequestError, check_compute, check_guidance, check_steps, require
from pixelpipe.processors.outcomes import RenderParams

if TYPE_CHECKING:
    from pixelpipe.processors.models import DiffusionModels


def request_seed(request: ImageRequest) -> int:
    """The request's seed, or one derived from its id, so a redelivered request draws the same pixels."""
    if request.seed is not None:
        return int(request.seed)
    return int.from_bytes(hashlib.sha256(request.request_id.encode()).digest()[:4], "big")


def variant_overrides(
    request: ImageRequest, experiments: Mapping[str, Experiment]
) -> tuple[dict[str, object], dict[str, str]]:
    """The overrides of a request's assigned variants, in experiment key order (a later key wins), and which
    variant set each."""
    overrides: dict[str, object] = {}
    set_by: dict[str, str] = {}
    for key, variant in sorted(request.experiments.items()):
        if key in experiments:
            for name, value in experiments[key].overrides_for(variant).items():
                overrides[name] = value
                set_by[name] = f"experiment {key}, variant {variant}"
    return overrides, set_by


def final_model(request: ImageRequest, experiments: Mapping[str, Experiment]) -> tuple[str, str | None]:
    """The model a request renders with (its own, or its variants' override) and the variant that set it, if any."""
    overrides, set_by = variant_overrides(request, experiments)
    return str(overrides.get("model", request.model)), set_by.get("model")


def model_of_unrendered(request: ImageRequest, experiments: Mapping[str, Experiment]) -> str:
    """The model a request that ends before its render is recorded with: its final model, or its own when it names
    a variant the experiment lacks (that failure says so)."""
    try:
        return final_model(request, experiments)[0]
    except KeyError:
        return request.model


def request_compute(
    request: ImageRequest, experiments: Mapping[str, Experiment], registry: ModelRegistry, limits: RequestLimits
) -> float | None:
    """The compute a request will ask of its model (``ModelEntry.compute``), with its variants' model and steps,
    as ``resolve_params`` resolves them, read from the registry alone; None when the model is not in the registry
    or the steps are invalid: the render stage then fails the request, naming the rule and the variant that set it
    (steps out of range would otherwise be refused here for their compute, which names neither)."""
    overrides, _ = variant_overrides(request, experiments)
    model, steps = overrides.get("model", request.model), overrides.get("steps", request.steps)
    if model not in registry:
        return None
    try:
        check_steps(steps, limits)
    except InvalidRequestError:
        return None
    return registry.get(str(model)).compute(request.width, request.height, steps, request.n)


def resolve_params(
    request: ImageRequest, experiments: Mapping[str, Experiment], models: DiffusionModels, limits: RequestLimits
) -> RenderParams:
    """The parameters that will run: the request's, then the overrides of its assigned variants (in experiment key
    order, so a later key wins), then the model's defaults; validated here, once, after every override, and the
    compute they ask for checked against the per-request budget.

    Raises InvalidRequestError naming the parameter (and the variant that set it), or ModelError for a model
    the registry does not hold.
    """
    overrides, set_by = variant_overrides(request, experiments)
    if "steps" in set_by or "model" in set_by:  # what a variant set is named when the compute is over the budget
        set_by["compute"] = set_by.get("steps") or set_by["model"]
    if "model" in set_by:  # so is a variant's model that cannot take the request's images or negative prompt
        set_by["reference_image_uris"] = set_by["negative_prompt"] = set_by["model"]
    model = str(overrides.get("model", request.model))
    entry = models.registry.get(model)
    default_scheduler = models.default_scheduler(model)
    steps = overrides.get("steps", request.steps)
    guidance = overrides.get("guidance", request.guidance)
    scheduler = overrides.get("scheduler") or default_scheduler
    try:
        check_steps(steps, limits)
        check_guidance(guidance)
        require(
            scheduler in SCHEDULERS or scheduler == default_scheduler,
            "scheduler",
            f"must be one of {', '.join(sorted(SCHEDULERS))}, got {scheduler!r}",
        )
        check_compute(entry.compute(request.width, request.height, steps, request.n), limits)  # type: ignore[arg-type]
        if request.kind == "EDIT":
            images = 1 + len(request.reference_image_uris)
            require(
                images <= entry.max_source_images,
                "reference_image_uris",
                f"model {model!r} takes at most {entry.max_source_images} source image(s) per edit, got {images} "
                f"(the source and {images - 1} references)",
            )
        require(
            not (entry.edits_by_reference and request.negative_prompt),
            "negative_prompt",
            f"model {model!r} ({entry.kind}) takes no negative prompt",
        )
    except InvalidRequestError as e:
        if e.field in set_by:
            raise InvalidRequestError(e.field, f"{e.rule} (set by {set_by[e.field]})") from None
        raise
    return RenderParams(
        model=model,
        steps=entry.default_steps if steps is None else int(steps),  # type: ignore[call-overload]
        guidance=entry.default_guidance if guidance is None else float(guidance),  # type: ignore[arg-type]
        scheduler=str(scheduler),
        width=request.width,
        height=request.height,
        n=request.n,
    )
