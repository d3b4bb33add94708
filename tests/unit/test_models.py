"""The model registry, the diffusion models (on tiny random-weight pipelines) and the image helpers."""

from __future__ import annotations

import io
import json
import logging
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from pixelpipe.core.registry import DEFAULT_COMPUTE_FITS, ComputeFit, ModelEntry, ModelError, ModelRegistry
from pixelpipe.processors.imaging import ImageError, decode_image, decode_mask, encode_png
from pixelpipe.processors.models import (
    BatchOutput,
    DiffusionModels,
    NullModel,
    resolve_device_dtype,
    scheduler_name,
    seed_colour,
)
from pixelpipe.tools.model_builders import (
    TINY_COMPUTE_FITS,
    build_pipeline,
    build_tiny_models,
    full_size_pipeline,
    registry_entry,
    write_registry,
)

STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def _offline(monkeypatch_module: pytest.MonkeyPatch) -> None:
    # Nothing here may reach a model hub.
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def registry_path(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def models(registry_path):
    return DiffusionModels.from_file(registry_path)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# -- text to image -------------------------------------------------------------------------------------------
def test_generate_returns_images_of_the_requested_size(models):
    out = models.generate("tiny-sd", ["a cat", "a dog"], width=64, height=48, steps=STEPS, n_per_prompt=2)
    assert [len(row) for row in out.images] == [2, 2]
    assert all(im.size == (64, 48) and im.mode == "RGB" for row in out.images for im in row)
    assert out.device_seconds > 0
    assert len(out.seeds) == 2


def test_same_seed_same_bytes_and_different_seed_different_bytes(models):
    def png(seed: int, model: str = "tiny-sd") -> bytes:
        out = models.generate(model, ["a red fox"], width=64, height=64, steps=STEPS, seeds=[seed])
        return encode_png(out.images[0][0])

    assert png(11) == png(11)
    assert png(11) != png(12)
    # A/B: the second tiny model has other weights, so the same seed gives another image.
    assert png(11) != png(11, model="tiny-sd-b")


def test_a_scheduler_can_be_chosen_per_call_and_the_configured_one_comes_back(models):
    def png(scheduler=None) -> bytes:
        out = models.generate(
            "tiny-sd", ["a red fox"], width=64, height=64, steps=STEPS, seeds=[3], scheduler=scheduler
        )
        return encode_png(out.images[0][0])

    default = png()
    assert png("euler") != default
    assert png("lcm") != default
    assert png() == default  # the override lasted one call
    assert type(models.load("tiny-sd").text2image.scheduler).__name__ == "DDIMScheduler"
    with pytest.raises(ModelError, match="unknown scheduler 'warp'; known: ddim, dpm-solver"):
        png("warp")


def test_batch_composition_does_not_change_an_image(models):
    alone = models.generate("tiny-sd", ["a cat"], width=64, height=64, steps=STEPS, seeds=[7])
    batch = models.generate("tiny-sd", ["a dog", "a cat", "a bird"], width=64, height=64, steps=STEPS, seeds=[1, 7, 3])
    assert np.array_equal(pixels(alone.images[0][0]), pixels(batch.images[1][0]))
    # Image k of a prompt is seeded seed + k, so it equals a lone request with that seed.
    several = models.generate("tiny-sd", ["a cat"], width=64, height=64, steps=STEPS, seeds=[6], n_per_prompt=2)
    assert np.array_equal(pixels(alone.images[0][0]), pixels(several.images[0][1]))


@pytest.fixture(scope="module")
def batched(registry_path, tmp_path_factory) -> DiffusionModels:
    """The tiny models in batched mode: one pipeline call per batch, even on a CPU."""
    raw = json.loads(registry_path.read_text())
    path = tmp_path_factory.mktemp("batched") / "registry.json"
    path.write_text(json.dumps({name: entry | {"batching": "batched"} for name, entry in raw.items()}))
    return DiffusionModels.from_file(path)


class CountingPipeline:
    """Wraps a pipeline and counts its calls."""

    def __init__(self, pipe) -> None:
        self.pipe, self.calls = pipe, 0

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)

    def __call__(self, **arguments):
        self.calls += 1
        return self.pipe(**arguments)


def count_calls(models: DiffusionModels, model: str, render) -> int:
    loaded = models.load(model)
    counting = CountingPipeline(loaded.text2image)
    loaded.text2image = counting
    try:
        render()
    finally:
        loaded.text2image = counting.pipe
    return counting.calls


def test_batching_mode_decides_the_number_of_pipeline_calls(models, batched):
    def render(m: DiffusionModels) -> BatchOutput:
        return m.generate("tiny-sd", ["a", "b", "c"], width=64, height=64, steps=1, n_per_prompt=2)

    assert models.load("tiny-sd").batched is False  # auto on a CPU
    assert count_calls(models, "tiny-sd", lambda: render(models)) == 6
    assert count_calls(batched, "tiny-sd", lambda: render(batched)) == 1


# Measured on the tiny model, 48 images: at most 1 level apart, 0.0003 levels on average.
BATCHED_MAX_LEVELS = 2
BATCHED_MEAN_LEVELS = 0.05


def test_batched_mode_keeps_an_images_pixels_to_its_seed_whatever_its_batch_position(models, batched):
    def lone(seed: int) -> Image.Image:
        return models.generate("tiny-sd", ["a cat"], width=64, height=64, steps=STEPS, seeds=[seed]).images[0][0]

    alone = {seed: lone(seed) for seed in (6, 7)}
    for seeds in ([7, 1, 3], [1, 7, 3], [1, 3, 7]):
        batch = batched.generate("tiny-sd", ["a cat"] * 3, width=64, height=64, steps=STEPS, seeds=seeds)
        image = batch.images[seeds.index(7)][0]
        diff = np.abs(pixels(alone[7]) - pixels(image))
        assert diff.max() <= BATCHED_MAX_LEVELS and diff.mean() <= BATCHED_MEAN_LEVELS, seeds
        other_seed = np.abs(pixels(batch.images[seeds.index(1)][0]) - pixels(image)).mean()
        assert other_seed > 10
    # Image k of a prompt is seeded seed + k in a batch too.
    several = batched.generate("tiny-sd", ["a cat"], width=64, height=64, steps=STEPS, seeds=[6], n_per_prompt=2)
    for k, seed in enumerate((6, 7)):
        diff = np.abs(pixels(alone[seed]) - pixels(several.images[0][k]))
        assert diff.max() <= BATCHED_MAX_LEVELS and diff.mean() <= BATCHED_MEAN_LEVELS


# -- image to image and inpainting ---------------------------------------------------------------------------
def test_edit_pipelines_share_the_loaded_weights(models):
    loaded = models.load("tiny-sd")
    assert loaded.image2image.unet is loaded.text2image.unet
    assert loaded.inpaint.unet is loaded.text2image.unet
    assert loaded.inpaint.vae is loaded.text2image.vae
    assert models.load("tiny-sd") is loaded


def test_image_to_image_outputs_the_requested_size(models):
    source = Image.new("RGB", (80, 72), "red")
    out = models.edit("tiny-sd", ["paint it blue"], [source], width=64, height=64, steps=STEPS, seeds=[3])
    assert out.images[0][0].size == (64, 64)
    again = models.edit("tiny-sd", ["paint it blue"], [source], width=64, height=64, steps=STEPS, seeds=[3])
    assert np.array_equal(pixels(out.images[0][0]), pixels(again.images[0][0]))
    # Without a size, the output has the source's size.
    assert models.edit("tiny-sd", ["x"], [source], steps=STEPS).images[0][0].size == (80, 72)


def test_inpainting_outputs_the_requested_size_and_is_batch_invariant(models):
    sources = [Image.new("RGB", (64, 64), c) for c in ("red", "green")]
    masks = [Image.new("L", (64, 64), 255), Image.new("L", (64, 64), 0)]
    out = models.edit(
        "tiny-sd", ["a", "b"], sources, masks=masks, width=64, height=48, steps=STEPS, seeds=[1, 2], n_per_prompt=2
    )
    assert [[im.size for im in row] for row in out.images] == [[(64, 48)] * 2] * 2
    alone = models.edit("tiny-sd", ["b"], sources[1:], masks=masks[1:], width=64, height=48, steps=STEPS, seeds=[2])
    assert np.array_equal(pixels(alone.images[0][0]), pixels(out.images[1][0]))


def test_edit_argument_errors(models):
    source = Image.new("RGB", (64, 64))
    with pytest.raises(ModelError, match="2 prompts but 1 source images"):
        models.edit("tiny-sd", ["a", "b"], [source])
    with pytest.raises(ModelError, match="1 prompts but 2 masks"):
        models.edit("tiny-sd", ["a"], [source], masks=[source, source])
    with pytest.raises(ModelError, match="strength"):
        models.edit("tiny-sd", ["a"], [source], strength=0)
    with pytest.raises(ModelError, match="multiples of 8"):
        models.generate("tiny-sd", ["a"], width=60, height=64)
    with pytest.raises(ModelError, match="non-empty list of strings"):
        models.generate("tiny-sd", "a cat", width=64, height=64)
    with pytest.raises(ModelError, match="non-empty list of strings"):
        models.edit("tiny-sd", [], [])
    with pytest.raises(ModelError, match="one per prompt"):
        models.generate("tiny-sd", ["a", "b"], width=64, height=64, seeds=[1])


def test_concurrent_loads_load_once(registry_path):
    fresh = DiffusionModels.from_file(registry_path)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(fresh.load("tiny-sd-b"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(g is got[0] for g in got)
    assert fresh.loaded() == ["tiny-sd-b"]


# -- the null model ------------------------------------------------------------------------------------------
@pytest.fixture
def null_models(tmp_path) -> DiffusionModels:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"null": {"kind": "null"}, "slow-null": {"kind": "null", "seconds_per_image": 0.02}}))
    return DiffusionModels.from_file(path)


def test_null_model_returns_plain_images_of_the_requested_size_coloured_by_seed(null_models):
    out = null_models.generate("null", ["a", "b"], width=48, height=32, seeds=[5, 9], n_per_prompt=2)
    assert [[im.size for im in row] for row in out.images] == [[(48, 32)] * 2] * 2
    colours = [[im.getpixel((0, 0)) for im in row] for row in out.images]
    assert colours == [[seed_colour(5), seed_colour(6)], [seed_colour(9), seed_colour(10)]]
    assert all(im.getextrema() == tuple((c, c) for c in im.getpixel((0, 0))) for row in out.images for im in row)
    assert len({c for row in colours for c in row}) == 4
    assert (out.device_seconds, out.seeds) == (0.0, [5, 9])
    loaded = null_models.load("null")
    assert isinstance(loaded, NullModel) and str(loaded.device) == "cpu"
    assert null_models.default_scheduler("null") == "none"


def test_null_model_edits_at_the_requested_or_source_size(null_models):
    source = Image.new("RGB", (40, 24), "red")
    same_size = null_models.edit("null", ["x"], [source], seeds=[1])
    assert same_size.images[0][0].size == (40, 24) and same_size.images[0][0].getpixel((0, 0)) == seed_colour(1)
    mask = Image.new("L", (40, 24), 255)
    inpainted = null_models.edit("null", ["x"], [source], masks=[mask], width=16, height=16, seeds=[1])
    assert inpainted.images[0][0].size == (16, 16)


def test_null_model_takes_its_simulated_time_per_image_as_device_time(null_models):
    started = time.perf_counter()
    out = null_models.generate("slow-null", ["a", "b"], width=8, height=8, n_per_prompt=2, scheduler="euler")
    assert out.device_seconds == pytest.approx(4 * 0.02)
    assert time.perf_counter() - started >= 4 * 0.02
    with pytest.raises(ModelError, match="unknown scheduler 'warp'"):
        null_models.generate("null", ["a"], width=8, height=8, scheduler="warp")


# -- speed-ups, compilation and warm-up ---------------------------------------------------------------------------
def with_fields(registry_path, tmp_path, **fields) -> DiffusionModels:
    """The tiny models with extra registry fields."""
    raw = json.loads(registry_path.read_text())
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({name: entry | fields for name, entry in raw.items()}))
    return DiffusionModels.from_file(path)


def test_fused_qkv_and_channels_last_change_the_layout_not_the_pixels(registry_path, tmp_path, models):
    fast = with_fields(registry_path, tmp_path, fuse_qkv=True, channels_last=True)
    unet = fast.load("tiny-sd").text2image.unet
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.load("tiny-sd").inpaint.unet is unet

    def render(m: DiffusionModels) -> np.ndarray:
        return pixels(m.generate("tiny-sd", ["a cat"], width=64, height=64, steps=STEPS, seeds=[4]).images[0][0])

    assert np.abs(render(fast) - render(models)).max() <= BATCHED_MAX_LEVELS


def test_full_compilation_compiles_the_shared_denoiser_in_place(registry_path, tmp_path):
    # Compiling the whole tiny UNet takes minutes on two cores; this checks the wiring only, the next test renders.
    compiled = with_fields(registry_path, tmp_path, compile="full").load("tiny-sd")
    assert compiled.text2image.unet._compiled_call_impl is not None
    assert compiled.image2image.unet is compiled.text2image.unet


def test_warm_up_loads_every_model_and_compiles_its_shapes_before_work_arrives(registry_path, tmp_path, models, caplog):
    warm_up = {"batch_sizes": [1, 4], "sizes": ["64x64"], "steps": 1}
    registry = json.loads(registry_path.read_text())
    registry["tiny-sd"] |= {"compile": "regional", "warmup": warm_up}
    registry["null"] = {"kind": "null"}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    compiled = DiffusionModels.from_file(tmp_path / "registry.json")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    with caplog.at_level(logging.INFO, logger="pixelpipe.processors.models"):
        ready = compiled.warm_up()

    assert compiled.loaded() == ["null", "tiny-sd", "tiny-sd-b"]
    # Per-image on a CPU: every call renders one image, so one shape per size is warmed.
    assert ready["tiny-sd"].shapes == ["1x64x64"] and ready["tiny-sd"].warm_up_seconds > 0
    assert ready["tiny-sd-b"].shapes == [] and ready["null"].shapes == []
    assert all(r.load_seconds >= 0 for r in ready.values())
    logged = {r.model: r for r in caplog.records if r.getMessage() == "model ready"}
    assert sorted(logged) == ["null", "tiny-sd", "tiny-sd-b"] and logged["tiny-sd"].shapes == ["1x64x64"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs

    # A request of a warmed shape compiles nothing more, and renders what the eager model renders.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out = compiled.generate("tiny-sd", ["a cat"], width=64, height=64, steps=STEPS, seeds=[4])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    eager = models.generate("tiny-sd", ["a cat"], width=64, height=64, steps=STEPS, seeds=[4])
    assert np.abs(pixels(out.images[0][0]) - pixels(eager.images[0][0])).max() <= BATCHED_MAX_LEVELS


# -- other families: SDXL and Flux ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> DiffusionModels:
    return DiffusionModels.from_file(
        build_tiny_models(tmp_path_factory.mktemp("families"), ("stable-diffusion-xl", "flux"))
    )


@pytest.mark.parametrize(
    ("model", "pipeline", "denoiser"),
    [("tiny-sdxl", "StableDiffusionXL", "unet"), ("tiny-flux", "Flux", "transformer")],
)
def test_sdxl_and_flux_generate_and_edit_through_the_same_api(family_models, model, pipeline, denoiser):
    loaded = family_models.load(model)
    assert [type(p).__name__ for p in (loaded.text2image, loaded.image2image, loaded.inpaint)] == [
        f"{pipeline}Pipeline",
        f"{pipeline}Img2ImgPipeline",
        f"{pipeline}InpaintPipeline",
    ]
    assert (
        getattr(loaded.image2image, denoiser)
        is getattr(loaded.inpaint, denoiser)
        is getattr(loaded.text2image, denoiser)
    )

    out = family_models.generate(
        model, ["a cat", "a dog"], width=64, height=48, steps=STEPS, seeds=[1, 2], n_per_prompt=2
    )
    assert [[im.size for im in row] for row in out.images] == [[(64, 48)] * 2] * 2
    alone = family_models.generate(model, ["a dog"], width=64, height=48, steps=STEPS, seeds=[2])
    assert encode_png(alone.images[0][0]) == encode_png(out.images[1][0])
    assert encode_png(out.images[1][0]) != encode_png(out.images[1][1])  # seed 2 and seed 3

    source, mask = Image.new("RGB", (80, 72), "red"), Image.new("L", (80, 72), 255)
    edited = family_models.edit(model, ["blue"], [source], width=64, height=48, steps=STEPS, seeds=[3])
    inpainted = family_models.edit(model, ["blue"], [source], masks=[mask], width=64, height=48, steps=STEPS, seeds=[3])
    for result in (edited, inpainted):
        image = result.images[0][0]
        assert image.size == (64, 48) and pixels(image).std() > 1


def test_a_model_runs_only_schedulers_made_for_its_objective(family_models, models):
    assert family_models.default_scheduler("tiny-flux") == "flow-match-euler"
    assert family_models.default_scheduler("tiny-sdxl") == "euler"
    with pytest.raises(ModelError, match=r"'tiny-flux' \(flux\) cannot run scheduler 'ddim'; it runs flow-match-euler"):
        family_models.generate("tiny-flux", ["a"], width=64, height=64, steps=1, scheduler="ddim")
    with pytest.raises(ModelError, match=r"'tiny-sd' .* cannot run scheduler 'flow-match-euler'"):
        models.generate("tiny-sd", ["a"], width=64, height=64, steps=1, scheduler="flow-match-euler")
    out = family_models.generate("tiny-sdxl", ["a"], width=64, height=64, steps=1, scheduler="ddim")
    assert out.images[0][0].size == (64, 64)


# -- several images: FLUX.2 klein --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def klein_models(tmp_path_factory) -> DiffusionModels:
    return DiffusionModels.from_file(build_tiny_models(tmp_path_factory.mktemp("klein"), ("flux2-klein",)))


def test_klein_edits_from_a_source_and_references(klein_models):
    loaded = klein_models.load("tiny-flux2-klein")
    assert loaded.entry.max_source_images == 4 and loaded.inpaint is None
    assert loaded.size_multiple == 4  # its VAE halves the size, and 2x2 latent patches make one token
    source, reference = Image.new("RGB", (80, 72), "red"), Image.new("RGB", (64, 96), "blue")
    edited = klein_models.edit(
        "tiny-flux2-klein", ["a"], [source], strength=None, width=64, height=48, steps=1, seeds=[3],
        references=[[reference]],
    )  # fmt: skip
    assert edited.images[0][0].size == (64, 48) and pixels(edited.images[0][0]).std() > 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"references": [[Image.new("RGB", (64, 64))] * 4]},
            r"'tiny-flux2-klein' takes at most 4 source image\(s\) per edit, got 5",
        ),
        ({"masks": [Image.new("L", (64, 64))]}, r"\(flux2-klein\) edits from reference images: no mask, no strength"),
        ({"strength": 0.5}, r"\(flux2-klein\) edits from reference images: no mask, no strength"),
        ({"negative_prompts": ["blurry"]}, r"'tiny-flux2-klein' \(flux2-klein\) takes no negative prompt"),
        ({"references": [[Image.new("RGB", (64, 32))]]}, r"takes images of at least 64x64 pixels, got 64x32"),
    ],
)
def test_klein_refuses_what_it_cannot_take_before_rendering(klein_models, arguments, message):
    edit = {"strength": None, "width": 64, "height": 64, "steps": STEPS} | arguments
    with pytest.raises(ModelError, match=message):
        klein_models.edit("tiny-flux2-klein", ["a"], [Image.new("RGB", (64, 64))], **edit)


def test_families_that_take_one_source_image_refuse_more(tmp_path, models):
    with pytest.raises(ModelError, match=r"'tiny-sd' takes at most 1 source image\(s\) per edit, got 2"):
        models.edit("tiny-sd", ["a"], [Image.new("RGB", (64, 64))], references=[[Image.new("RGB", (64, 64))]])
    entry = {"path": "/models/sd", "max_source_images": 2}
    with pytest.raises(ModelError, match=r"'max_source_images' 2 is for the families that take several images"):
        ModelEntry.from_json("sd", entry)
    assert (
        ModelEntry.from_json("klein", {"path": "/m", "kind": "flux2-klein", "max_source_images": 2}).max_source_images
        == 2
    )
    assert ModelEntry.from_json("null", {"kind": "null", "max_source_images": 16}).max_source_images == 16


def test_a_model_registered_under_another_family_is_refused(tmp_path, registry_path):
    write_registry(tmp_path / "r.json", {"m": registry_entry(registry_path.parent / "tiny-sd", "flux")})
    with pytest.raises(
        ModelError, match=r"'m' is registered as 'flux' \(FluxPipeline\), but .* holds a StableDiffusionPipeline"
    ):
        DiffusionModels.from_file(tmp_path / "r.json").load("m")


def test_full_size_builders_have_the_real_architectures():
    # Built on the meta device: shapes without memory, so this checks SD-1.5, SDXL and FLUX.1 in a second.
    def millions(module: torch.nn.Module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)

    sd = full_size_pipeline("stable-diffusion", "meta")
    assert (millions(sd.unet), millions(sd.text_encoder), millions(sd.vae)) == (859.5, 123.1, 83.7)
    assert sd.unet.dtype == torch.bfloat16 and sd.scheduler.alphas_cumprod.dtype == torch.float32
    sdxl = full_size_pipeline("stable-diffusion-xl", "meta")
    assert (millions(sdxl.unet), millions(sdxl.text_encoder_2)) == (2567.5, 694.7)
    flux = full_size_pipeline("flux", "meta")
    assert (millions(flux.transformer), millions(flux.text_encoder_2)) == (11901.4, 4762.3)
    # FLUX.2 klein 4B: the published checkpoint's counts, to the parameter (transformer 3,875,544,576; Qwen3-4B
    # 4,022,468,096 with its embeddings tied to its head; the VAE 84,046,115 besides its batch norm's statistics).
    klein = full_size_pipeline("flux2-klein", "meta")
    counts = [sum(p.numel() for p in m.parameters()) for m in (klein.transformer, klein.text_encoder, klein.vae)]
    assert counts == [3_875_544_576, 4_022_468_096, 84_046_115]
    assert klein.transformer.dtype == torch.bfloat16 and klein.vae.config.latent_channels == 32
    with pytest.raises(ValueError, match="unknown family 'gan'"):
        build_pipeline("gan")  # type: ignore[arg-type]


# -- registry ------------------------------------------------------------------------------------------------
def test_registry_round_trip_and_unknown_name(registry_path):
    registry = ModelRegistry.load(registry_path)
    assert registry.names() == ["tiny-sd", "tiny-sd-b"]
    entry = registry.get("tiny-sd")
    assert (entry.kind, entry.dtype, entry.device) == ("stable-diffusion", "auto", "auto")
    with pytest.raises(ModelError, match=r"unknown model 'sd-xl'; the registry has \['tiny-sd', 'tiny-sd-b'\]"):
        registry.get("sd-xl")


def test_a_models_max_batch_caps_the_stages(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"big": {"path": "x", "max_batch": 4}, "small": {"path": "y"}}))
    registry = ModelRegistry.load(tmp_path / "r.json")
    assert [registry.get("big").batch_limit(stage) for stage in (2, 8)] == [2, 4]
    assert registry.get("small").max_batch is None and registry.get("small").batch_limit(8) == 8


def fit_json(batched: bool = True, **coefficients: float) -> dict:
    """A compute_fit as the registry holds it: the coefficients given, the others 0."""
    zeros = dict.fromkeys(ComputeFit.COEFFICIENTS, 0.0)
    return zeros | coefficients | {"batched": batched, "device": "test bench", "measured": "2026-11-26"}


def charged(tmp_path, fit: dict, **entry) -> ModelEntry:
    (tmp_path / "r.json").write_text(json.dumps({"m": {"path": "x", "compute_fit": fit} | entry}))
    return ModelRegistry.load(tmp_path / "r.json").get("m")


def test_compute_is_device_seconds_by_the_models_fit_term_by_term(tmp_path):
    # Each term alone, against its meaning: per step and image, linear and quadratic in the pixels ...
    assert charged(tmp_path, fit_json(seconds_per_megapixel_step=2.0)).compute(1000, 1000, 10, 3) == pytest.approx(60)
    attention = charged(tmp_path, fit_json(seconds_per_megapixel_squared_step=1.0))
    assert attention.compute(2000, 2000, 5, 1) == pytest.approx(16 * attention.compute(1000, 1000, 5, 1))
    assert charged(tmp_path, fit_json(seconds_per_image_step=0.5)).compute(64, 64, 4, 3) == pytest.approx(6)
    # ... per image once, whatever the steps (the VAE's decode) ...
    decode = charged(tmp_path, fit_json(seconds_per_megapixel=1.0, seconds_per_megapixel_squared=1.0))
    assert decode.compute(1000, 1000, 50, 2) == decode.compute(1000, 1000, 1, 2) == pytest.approx(4)
    # ... and per call and per step of a call, once for a batched model, once per image for a per-image one.
    overheads = {"seconds_per_call": 1.0, "seconds_per_step": 0.5}
    assert charged(tmp_path, fit_json(**overheads)).compute(64, 64, 4, 3) == pytest.approx(3)
    assert charged(tmp_path, fit_json(**overheads, batched=False)).compute(64, 64, 4, 3) == pytest.approx(9)
    # The model's default steps when the request names none.
    per_step = charged(tmp_path, fit_json(seconds_per_step=1.0), default_steps=25)
    assert per_step.compute(512, 512, None, 1) == pytest.approx(25)


def test_a_model_without_a_fit_is_charged_its_familys_default_and_a_null_model_its_seconds_per_image(tmp_path):
    (tmp_path / "r.json").write_text(
        json.dumps(
            {
                "sd": {"path": "x"},
                "flux": {"path": "y", "kind": "flux"},
                "null": {"kind": "null", "seconds_per_image": 0.25},
            }
        )
    )
    registry = ModelRegistry.load(tmp_path / "r.json")
    sd, flux, null = registry.get("sd"), registry.get("flux"), registry.get("null")
    assert sd.compute_fit is None and sd.compute(1024, 1024, 30, 2) == DEFAULT_COMPUTE_FITS["stable-diffusion"].seconds(
        1024, 1024, 30, 2
    )
    assert null.compute(2048, 2048, 150, 4) == pytest.approx(1.0)
    # The defaults reproduce the H100 figures they are anchored on (images/s of raw diffusers; models.py says where).
    assert sd.compute(512, 512, 20, 1) == pytest.approx(1 / 1.56, rel=0.01)
    assert sd.compute(512, 512, 20, 8) == pytest.approx(8 / 6.49, rel=0.01)
    assert flux.compute(1024, 1024, 28, 1) == pytest.approx(1 / 0.193, rel=0.01)
    assert flux.compute(1024, 1024, 28, 4) == pytest.approx(4 / 0.197, rel=0.01)
    # Attention: at 2048x2048 a flux step costs more than 16 times a 512x512 one, the pixels' ratio.
    assert flux.compute(2048, 2048, 2, 1) - flux.compute(2048, 2048, 1, 1) > 16 * (
        flux.compute(512, 512, 2, 1) - flux.compute(512, 512, 1, 1)
    )


def test_the_tiny_models_carry_their_fit_measured_on_the_reference_cpu(registry_path):
    entry = ModelRegistry.load(registry_path).get("tiny-sd")
    assert entry.compute_fit == TINY_COMPUTE_FITS["stable-diffusion"] and not entry.compute_fit.batched
    # At 1024x1024 far dearer on a CPU than the full-size model on an H100: attention over a latent grid the tiny
    # VAE makes 2x (rather than 8x) smaller than the image, on one CPU thread.
    full_size = DEFAULT_COMPUTE_FITS["stable-diffusion"]
    assert entry.compute(1024, 1024, 4, 1) > 100 * full_size.seconds(1024, 1024, 4, 1)


def test_a_registry_entry_with_compute_weight_says_how_to_migrate(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"sd": {"path": "x", "compute_weight": 1.5}}))
    with pytest.raises(ModelError) as caught:
        ModelRegistry.load(tmp_path / "r.json")
    message = str(caught.value)
    assert "model 'sd': 'compute_weight' is gone: the compute budgets count device seconds now" in message
    assert "`pixelpipe models calibrate --registry REGISTRY --model sd`" in message


@pytest.mark.parametrize(
    ("fit", "message"),
    [
        ("fast", "'compute_fit' must be an object of seconds_per_call, .* got str"),
        ({"seconds_per_call": 1.0}, r"'compute_fit' must be an object of .*, got \['seconds_per_call'\]"),
        (fit_json() | {"seconds_per_pixel": 1.0}, "'compute_fit' must be an object of"),
        (fit_json(seconds_per_step=-0.1), "'compute_fit': 'seconds_per_step' must be a finite number >= 0, got -0.1"),
        (
            fit_json(seconds_per_step=float("nan")),
            "'compute_fit': 'seconds_per_step' must be a finite number >= 0, got nan",
        ),
        (fit_json(seconds_per_call=True), "'compute_fit': 'seconds_per_call' must be a finite number >= 0, got True"),
        (fit_json(), "'compute_fit': every coefficient is 0, so every render would be free"),
        (
            fit_json(seconds_per_call=1.0) | {"batched": "yes"},
            "'compute_fit': 'batched' must be true or false, got 'yes'",
        ),
        (
            fit_json(seconds_per_call=1.0) | {"device": " "},
            "'compute_fit': 'device' must name the device it was measured on",
        ),
        (fit_json(seconds_per_call=1.0) | {"measured": "last week"}, "'compute_fit': 'measured' must be an ISO date"),
    ],
)
def test_malformed_compute_fits(tmp_path, fit, message):
    (tmp_path / "r.json").write_text(json.dumps({"bad": {"path": "x", "compute_fit": fit}}))
    with pytest.raises(ModelError, match=rf"registry .*model 'bad': {message}"):
        ModelRegistry.load(tmp_path / "r.json")


def test_a_lane_shares_the_weights_and_runs_beside_the_models(models):
    lane = models.lane()
    assert lane.loaded() == models.loaded()
    ours, theirs = models.load("tiny-sd"), lane.load("tiny-sd")
    assert theirs.text2image.unet is ours.text2image.unet and theirs.inpaint.vae is ours.text2image.vae  # one copy
    assert theirs.text2image is not ours.text2image and theirs.image2image is not ours.image2image
    assert theirs.text2image.scheduler is not ours.text2image.scheduler
    assert theirs.image2image.scheduler is theirs.text2image.scheduler  # the lane's pipelines share its copy
    assert theirs.run_lock is not ours.run_lock
    # While a call holds the models' lock, the lane renders, and the same pixels as the models do.
    with ours.run_lock, ThreadPoolExecutor(1) as other_thread:
        call = other_thread.submit(lane.generate, "tiny-sd", ["a cat"], width=64, height=64, steps=STEPS, seeds=[5])
        alone = call.result(timeout=120)
    here = models.generate("tiny-sd", ["a cat"], width=64, height=64, steps=STEPS, seeds=[5])
    assert np.array_equal(pixels(alone.images[0][0]), pixels(here.images[0][0]))
    # A scheduler a call swaps in on the lane leaves the models' own alone.
    lane.generate("tiny-sd", ["a cat"], width=64, height=64, steps=STEPS, seeds=[5], scheduler="euler")
    assert ours.default_scheduler == lane.default_scheduler("tiny-sd")
    assert scheduler_name(ours.text2image.scheduler) == ours.default_scheduler


def test_write_registry_with_relative_paths(tmp_path, registry_path):
    write_registry(tmp_path / "r.json", {"m": registry_entry(registry_path.parent / "tiny-sd", max_batch=2)})
    entry = ModelRegistry.load(tmp_path / "r.json").get("m")
    assert (entry.path, entry.max_batch) == (str(registry_path.parent / "tiny-sd"), 2)
    # A relative path is relative to the registry file.
    (tmp_path / "rel.json").write_text(json.dumps({"m": {"path": "models/tiny-sd"}}))
    (tmp_path / "models" / "tiny-sd").mkdir(parents=True)
    assert ModelRegistry.load(tmp_path / "rel.json").get("m").path == str(tmp_path / "models" / "tiny-sd")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({}, "'path' must be"),
        ({"path": "x", "kind": "gan"}, "'kind' must be one of"),
        ({"path": "x", "dtype": "float8"}, "'dtype' must be one of"),
        ({"path": "x", "device": "tpu"}, "'device' must be one of"),
        ({"path": "x", "default_steps": 0}, "'default_steps' must be a positive integer"),
        ({"path": "x", "default_guidance": "high"}, "'default_guidance' must be a finite number"),
        ({"path": "x", "stepz": 4}, r"unknown keys \['stepz'\]"),
        ({"path": "x", "batching": "sometimes"}, "'batching' must be one of \\['auto', 'batched', 'per-image'\\]"),
        ({"path": "x", "max_batch": 0}, "'max_batch' must be a positive integer"),
        ({"kind": "null", "seconds_per_image": -1}, "'seconds_per_image' must be a finite number >= 0"),
        ({"path": "x", "seconds_per_image": 0.5}, "'seconds_per_image' is for null models only"),
        ({"kind": "null", "compute_fit": {}}, r"\['compute_fit'\] do not apply to a null model"),
        ("x", "expected an object"),
    ],
)
def test_malformed_registry_entries(tmp_path, entry, message):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"bad": entry}))
    with pytest.raises(ModelError, match=rf"registry .*model 'bad': {message}"):
        ModelRegistry.load(path)


def test_unreadable_registry_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        ModelRegistry.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelRegistry.load(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ModelError, match="non-empty object"):
        ModelRegistry.load(tmp_path / "empty.json")


def test_a_model_that_cannot_load_says_which(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"ghost": {"path": str(tmp_path / "nowhere")}}))
    with pytest.raises(ModelError, match="cannot load model 'ghost'"):
        DiffusionModels.from_file(tmp_path / "r.json").load("ghost")


def test_resolve_device_dtype():
    assert resolve_device_dtype(ModelEntry("m", "p", device="cpu")) == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype(ModelEntry("m", "p", device="cpu", dtype="bfloat16"))[1] == torch.bfloat16
    device, dtype = resolve_device_dtype(ModelEntry("m", "p"))
    if torch.cuda.is_available():
        assert device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    else:
        assert (device, dtype) == (torch.device("cpu"), torch.float32)
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device_dtype(ModelEntry("m", "p", device="cuda"))


# -- imaging -------------------------------------------------------------------------------------------------
def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width x height, with almost no data behind it."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_decode_accepts_allowed_formats_and_converts_to_rgb():
    for fmt in ("PNG", "JPEG", "WEBP"):
        image = decode_image(encoded(Image.new("RGB", (20, 10), "blue"), fmt))
        assert image.size == (20, 10) and image.mode == "RGB"
    assert decode_image(encoded(Image.new("RGBA", (4, 4)), "PNG")).mode == "RGB"
    assert decode_image(encoded(Image.new("P", (4, 4)), "PNG")).mode == "RGB"


def test_decode_refuses_decompression_bombs():
    # Over our limit: refused from the header, before any pixel is decoded.
    with pytest.raises(ImageError, match="decompression bomb: 2000x2000 = 4000000 pixels"):
        decode_image(png_claiming_size(2000, 2000), max_pixels=1_000_000)
    # Past Pillow's own global limit: refused by Image.open, still as an ImageError.
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(png_claiming_size(100_000, 100_000), max_pixels=10**12)
    # A real image exactly at the limit is fine.
    assert decode_image(encoded(Image.new("RGB", (100, 10)), "PNG"), max_pixels=1000).size == (100, 10)


def test_decode_refuses_other_formats_and_garbage():
    for fmt in ("GIF", "BMP", "TIFF"):
        with pytest.raises(ImageError, match=rf"^{fmt} is not an allowed image format \(JPEG, PNG, WEBP\)"):
            decode_image(encoded(Image.new("RGB", (8, 8)), fmt))
    with pytest.raises(ImageError, match=r"^not an image \(allowed formats: JPEG, PNG, WEBP\)"):
        decode_image(b"not an image at all")
    with pytest.raises(ImageError, match="empty image"):
        decode_image(b"")
    truncated = encoded(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")[:-200]
    with pytest.raises(ImageError, match="corrupt PNG image"):
        decode_image(truncated)


def test_decode_mask_checks_mode_and_size():
    image = Image.new("RGB", (64, 48))
    mask = decode_mask(encoded(Image.new("RGB", (64, 48), "white"), "PNG"), image)
    assert mask.mode == "L" and mask.size == (64, 48)
    with pytest.raises(ImageError, match="mask is 32x32 but the image is 64x48"):
        decode_mask(encoded(Image.new("L", (32, 32)), "PNG"), image)


def test_encode_png_strips_metadata():
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # camera make
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "user@example.com")
    source = Image.open(io.BytesIO(encoded(Image.new("RGB", (16, 16), "red"), "PNG", exif=exif, pnginfo=info)))
    assert source.info.get("Comment") and source.getexif()

    data = encode_png(source)
    reread = Image.open(io.BytesIO(data))
    assert not reread.getexif() and "exif" not in reread.info and "Comment" not in reread.info
    assert _png_chunk_types(data) == ["IHDR", "IDAT", "IEND"]
    assert np.array_equal(pixels(reread), pixels(source))


def _png_chunk_types(data: bytes) -> list[str]:
    types, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8].decode("ascii")
        if kind not in types:
            types.append(kind)
        pos += 12 + length
    return types
