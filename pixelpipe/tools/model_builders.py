"""Diffusion pipelines built from configs with seeded random weights: every family, tiny or full size.

No model hub is needed. Tiny pipelines (a few megabytes, built in about a second on a CPU) let tests, the embedded
demo and CI run the real diffusers code paths (text-to-image, image-to-image, inpainting, edits from several
reference images); their images are noise, not pictures, and only the plumbing is real. Full-size pipelines have the
real architectures (SD-1.5, SDXL, FLUX.1-dev, FLUX.2 klein 4B) with random weights, for benchmarks on a GPU:
``full_size_pipeline`` builds them on the device in the target dtype, in seconds. Tokenizers are written
locally: a byte-level CLIP vocabulary, a character-level T5 (Unigram) vocabulary and a byte-level Qwen vocabulary
with its chat template, so every prompt tokenizes without downloading anything.
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from pixelpipe.core.registry import FAMILIES, ComputeFit, Family

T = TypeVar("T")
Size = Literal["tiny", "full"]

# The two tiny models A/B experiments compare; same architecture, different random weights.
TINY_MODELS: dict[str, int] = {"tiny-sd": 0, "tiny-sd-b": 1}
# The tiny model of each other family, built on request (`pixelpipe models init-tiny --family ...`).
TINY_FAMILY_MODELS: dict[Family, str] = {
    "stable-diffusion-xl": "tiny-sdxl",
    "flux": "tiny-flux",
    "flux2-klein": "tiny-flux2-klein",
}
# What each tiny model's renders cost on the reference CPU, this repository's 2-core development machine, in one torch
# thread (as the fault tests run it; least disturbed by other work): `OMP_NUM_THREADS=1 pixelpipe models calibrate
# --repeats 2` on its CPU grid, 64 to 256 pixels a side at 1 and 4 steps (largest error on the grid: 0.7 to 2.8 %).
# The cost depends on the machine: `pixelpipe models calibrate` refits them for another; tests calibrate for
# themselves and compare relative figures.
_REFERENCE_CPU, _MEASURED = "AMD EPYC, 1 torch threads", "2026-12-06"
TINY_COMPUTE_FITS: dict[Family, ComputeFit] = {
    "stable-diffusion": ComputeFit(
        0.01189, 0.0, 0.004015, 7.279, 549.0, 3.954, 289.9, False, _REFERENCE_CPU, _MEASURED
    ),
    "stable-diffusion-xl": ComputeFit(
        0.01388, 0.01136, 0.0, 5.311, 200.7, 3.863, 292.9, False, _REFERENCE_CPU, _MEASURED
    ),
    "flux": ComputeFit(0.04817, 0.003918, 0.0, 0.9573, 16.42, 3.894, 266.3, False, _REFERENCE_CPU, _MEASURED),
    "flux2-klein": ComputeFit(0.06914, 0.005759, 0.0, 0.6014, 21.65, 1.559, 139.5, False, _REFERENCE_CPU, _MEASURED),
}
# Registry defaults per family: the guidance each family's real checkpoints are run with (klein's distilled
# checkpoints run without classifier-free guidance).
DEFAULT_GUIDANCE: dict[Family, float] = {
    "stable-diffusion": 5.0,
    "stable-diffusion-xl": 5.0,
    "flux": 3.5,
    "flux2-klein": 1.0,
}

# -- component configs: tiny (tests, demo) and full size (SD-1.5, SDXL base, FLUX.1-dev, FLUX.2 klein 4B) -------
_TINY_VAE: dict[str, Any] = {
    "sample_size": 64,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
_SD_VAE: dict[str, Any] = {
    "sample_size": 512,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
}
# Flux's VAE has no quant convolutions and shifts its latents.
_FLUX_VAE_EXTRA: dict[str, Any] = {"use_quant_conv": False, "use_post_quant_conv": False}
VAES: dict[tuple[Family, Size], dict[str, Any]] = {
    ("stable-diffusion", "tiny"): _TINY_VAE,
    ("stable-diffusion", "full"): _SD_VAE,
    ("stable-diffusion-xl", "tiny"): _TINY_VAE,
    ("stable-diffusion-xl", "full"): _SD_VAE | {"sample_size": 1024, "scaling_factor": 0.13025},
    ("flux", "tiny"): _TINY_VAE | _FLUX_VAE_EXTRA | {"scaling_factor": 1.5035, "shift_factor": 0.0609},
    ("flux", "full"): _SD_VAE
    | _FLUX_VAE_EXTRA
    | {"sample_size": 1024, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    # AutoencoderKLFlux2: FLUX.2's VAE (dev's and klein's alike) has SD's blocks, quant convolutions and 32 latent
    # channels, batch-normed (running statistics in the VAE) and patchified 2x2 by the pipeline.
    ("flux2-klein", "tiny"): {
        "block_out_channels": (16, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
    ("flux2-klein", "full"): _SD_VAE | {"sample_size": 1024, "latent_channels": 32},
}

_TINY_CLIP: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
_CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_OPEN_CLIP_BIG_G: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
CLIP_TEXT = {"tiny": _TINY_CLIP, "full": _CLIP_L}  # SD's encoder, SDXL's first and flux's pooled one
SDXL_SECOND_TEXT = {"tiny": _TINY_CLIP, "full": _OPEN_CLIP_BIG_G}
T5_TEXT: dict[Size, dict[str, Any]] = {
    "tiny": {"d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4},
    "full": {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64},
}

_TINY_UNET: dict[str, Any] = {
    "sample_size": 32,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 32,
}
UNETS: dict[tuple[Family, Size], dict[str, Any]] = {
    ("stable-diffusion", "tiny"): _TINY_UNET | {"cross_attention_dim": 32, "attention_head_dim": 8},
    # UNet2DConditionModel's default blocks are SD-1.x's: 859.5 M parameters.
    ("stable-diffusion", "full"): {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
    # SDXL conditions on both text encoders' hidden states (concatenated) and on the pooled text embedding plus
    # six size and crop numbers (projection input: 6 x time embedding + pooled width).
    ("stable-diffusion-xl", "tiny"): _TINY_UNET
    | {
        "cross_attention_dim": 64,
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,
    },
    ("stable-diffusion-xl", "full"): {
        "sample_size": 128,
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048,
        "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 6 * 256 + 1280,
    },
}
# Flux packs 2x2 latent patches into one token: in_channels = 4 x the VAE's latent channels.
FLUX_TRANSFORMERS: dict[Size, dict[str, Any]] = {
    "tiny": {
        "in_channels": 16,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,  # the T5 width
        "pooled_projection_dim": 32,  # the CLIP width
        "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim
        "guidance_embeds": True,
    },
    # FluxTransformer2DModel's defaults are FLUX.1's (11.9 B parameters); dev embeds the guidance.
    "full": {"guidance_embeds": True},
}

# FLUX.2 klein: a transformer on 2x2-patchified latents of a VAE with batch-normed latents, conditioned on three
# hidden layers of a Qwen3 text encoder (the pipeline reads layers 9, 18 and 27, so the tiny encoder has 27). Full
# size is klein 4B: Qwen3-4B (tied embeddings: 4.02 B parameters) and a 3.88 B-parameter transformer.
QWEN3_TEXT: dict[Size, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 27,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 512,
    },
    "full": {
        "vocab_size": 151936,
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "tie_word_embeddings": True,
    },
}
KLEIN_TRANSFORMERS: dict[Size, dict[str, Any]] = {
    "tiny": {
        "in_channels": 4 * VAES["flux2-klein", "tiny"]["latent_channels"],  # one 2x2 patch of latents per token
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 3 * QWEN3_TEXT["tiny"]["hidden_size"],  # the three text-encoder layers, side by side
        "timestep_guidance_channels": 32,
        "axes_dims_rope": (4, 4, 4, 4),  # sums to attention_head_dim
        "guidance_embeds": False,
    },
    # Flux2Transformer2DModel's defaults are FLUX.2-dev's (128 channels in, heads of 128, RoPE on four axes of 32);
    # klein 4B has fewer and narrower blocks and no guidance embedding (its distilled checkpoint runs without).
    "full": {
        "num_layers": 5,
        "num_single_layers": 20,
        "num_attention_heads": 24,
        "joint_attention_dim": 3 * QWEN3_TEXT["full"]["hidden_size"],
        "guidance_embeds": False,
    },
}

# -- tokenizers -------------------------------------------------------------------------------------------------
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters GPT-2 and CLIP's byte-level BPE use for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            # Bytes without a printable character are mapped past 255, in byte order.
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer (no merges): every word becomes one token per byte."""
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [_BOS, _EOS]
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
        merges.write_text("#version: 0.2\n")
        # CLIP's text model has 77 positions; the pipeline pads every prompt to model_max_length.
        return CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """A character-level T5 tokenizer (Unigram, SentencePiece's word marker ▁): every printable ASCII character
    is a token, with and without the marker; anything else is <unk>."""
    chars = [c for c in string.printable if not c.isspace()]
    # T5's special tokens come first (pad 0, eos 1, unk 2); longer pieces score higher, as a trained model's do.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -2.0) for c in chars] + [("▁" + c, -1.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


# Qwen's chat format, which the klein pipeline wraps each prompt in (apply_chat_template) before encoding it.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen tokenizer (no merges: one token per byte) with Qwen's chat markers and template."""
    vocab = {char: index for index, char in enumerate(_bytes_to_unicode())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=512, chat_template=_QWEN_CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def _clip_text_config(tokenizer: CLIPTokenizer, dims: Mapping[str, Any]) -> CLIPTextConfig:
    return CLIPTextConfig(
        **({"vocab_size": len(tokenizer)} | dict(dims)),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# -- pipelines --------------------------------------------------------------------------------------------------
def build_pipeline(
    family: Family,
    size: Size = "tiny",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiffusionPipeline:
    """A text-to-image pipeline of ``family`` at ``size`` with random weights drawn from ``seed``, its networks
    built directly on ``device`` in ``dtype`` (no copy through host memory; seconds on a GPU at full size)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    builders = {
        "stable-diffusion": _stable_diffusion,
        "stable-diffusion-xl": _stable_diffusion_xl,
        "flux": _flux,
        "flux2-klein": _flux2_klein,
    }
    return builders[family](size, _Networks(seed, torch.device(device), dtype))


def full_size_pipeline(
    family: Family, device: str | torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> DiffusionPipeline:
    """``family`` at its real size with random weights on ``device``, for benchmarks. Weights are halved: random
    full-size networks otherwise grow their activations past bf16's range over the layers, and an image of NaNs
    measures nothing."""
    pipe = build_pipeline(family, "full", seed, device, dtype)
    with torch.no_grad():
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for parameter in component.parameters():
                    parameter.mul_(0.5)
    return pipe


@dataclass(frozen=True)
class _Networks:
    """Builds a pipeline's networks with seeded weights on one device, in one dtype (tokenizers and schedulers
    are built outside: a scheduler's tables stay float32 on the CPU)."""

    seed: int
    device: torch.device
    dtype: torch.dtype

    def build(self, network: type[T], *args: Any, seed_offset: int = 0, **kwargs: Any) -> T:
        # Weights come from the global torch RNG; seed it per network so each is reproducible on its own.
        torch.manual_seed(self.seed + seed_offset)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with self.device:
                return network(*args, **kwargs)
        finally:
            torch.set_default_dtype(previous)


def _stable_diffusion(size: Size, networks: _Networks) -> StableDiffusionPipeline:
    tokenizer = clip_tokenizer()
    return StableDiffusionPipeline(
        unet=networks.build(UNet2DConditionModel, **UNETS["stable-diffusion", size]),
        vae=networks.build(AutoencoderKL, **VAES["stable-diffusion", size]),
        text_encoder=networks.build(CLIPTextModel, _clip_text_config(tokenizer, CLIP_TEXT[size])),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _stable_diffusion_xl(size: Size, networks: _Networks) -> StableDiffusionXLPipeline:
    tokenizer = clip_tokenizer()
    return StableDiffusionXLPipeline(
        unet=networks.build(UNet2DConditionModel, **UNETS["stable-diffusion-xl", size]),
        vae=networks.build(AutoencoderKL, **VAES["stable-diffusion-xl", size]),
        text_encoder=networks.build(CLIPTextModel, _clip_text_config(tokenizer, CLIP_TEXT[size])),
        text_encoder_2=networks.build(
            CLIPTextModelWithProjection, _clip_text_config(tokenizer, SDXL_SECOND_TEXT[size]), seed_offset=1
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
    )


def _flux(size: Size, networks: _Networks) -> FluxPipeline:
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    return FluxPipeline(
        transformer=networks.build(FluxTransformer2DModel, **FLUX_TRANSFORMERS[size]),
        vae=networks.build(AutoencoderKL, **VAES["flux", size]),
        text_encoder=networks.build(CLIPTextModel, _clip_text_config(clip, CLIP_TEXT[size])),
        text_encoder_2=networks.build(
            T5EncoderModel,
            T5Config(
                **({"vocab_size": len(t5)} | T5_TEXT[size]),
                feed_forward_proj="gated-gelu",
                pad_token_id=t5.pad_token_id,
                eos_token_id=t5.eos_token_id,
            ),
        ),
        tokenizer=clip,
        tokenizer_2=t5,
        # FLUX.1-dev's schedule: the shift grows with the image's token count.
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    )


def _flux2_klein(size: Size, networks: _Networks) -> Flux2KleinPipeline:
    tokenizer = qwen_tokenizer()
    dims = {"vocab_size": len(tokenizer)} | QWEN3_TEXT[size]  # full size: Qwen's own vocabulary (embedding rows)
    text_encoder = Qwen3Config(**dims, pad_token_id=tokenizer.pad_token_id)
    return Flux2KleinPipeline(
        transformer=networks.build(Flux2Transformer2DModel, **KLEIN_TRANSFORMERS[size]),
        vae=networks.build(AutoencoderKLFlux2, **VAES["flux2-klein", size]),
        text_encoder=networks.build(Qwen3ForCausalLM, text_encoder),
        tokenizer=tokenizer,
        # FLUX.2's schedule: the pipeline computes its shift (mu) from the image's token count and the steps, which
        # the scheduler applies only with dynamic shifting on (else the shift stays 1: sigmas unshifted).
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        is_distilled=True,
    )


# -- tiny models on disk and their registry ---------------------------------------------------------------------
def build_tiny_pipeline(out_dir: str | Path, family: Family = "stable-diffusion", seed: int = 0) -> Path:
    """Build a tiny ``family`` pipeline with weights drawn from ``seed`` and save it to ``out_dir``.

    The latent space is 2x smaller than the image (one VAE downsampling). Returns ``out_dir``, loadable with
    ``from_pretrained``.
    """
    out = Path(out_dir)
    build_pipeline(family, "tiny", seed).save_pretrained(out)
    return out


def registry_entry(model_dir: str | Path, family: Family = "stable-diffusion", **fields: Any) -> dict[str, Any]:
    """A registry entry (see ``pixelpipe.core.registry``) for the tiny model in ``model_dir``, with the demo's
    defaults (4 steps, the family's guidance) and the family's tiny compute fit under ``fields``."""
    defaults = {"kind": family, "default_steps": 4, "default_guidance": DEFAULT_GUIDANCE[family]}
    local = {"dtype": "auto", "device": "auto", "compute_fit": TINY_COMPUTE_FITS[family].to_json()}
    return {"path": str(Path(model_dir).resolve())} | defaults | local | fields


def write_registry(path: str | Path, entries: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write a model registry JSON (see ``pixelpipe.core.registry``) of ``entries`` by name."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entries, indent=2) + "\n")
    return out


def build_tiny_models(out_dir: str | Path, families: Sequence[Family] = ("stable-diffusion",)) -> Path:
    """Build the tiny models of ``families`` under ``out_dir`` (Stable Diffusion: both ``TINY_MODELS``; the
    others: ``TINY_FAMILY_MODELS``) and write ``out_dir/registry.json`` for them."""
    out = Path(out_dir)
    entries: dict[str, dict[str, Any]] = {}
    if "stable-diffusion" in families:
        for name, seed in TINY_MODELS.items():
            entries[name] = registry_entry(build_tiny_pipeline(out / name, "stable-diffusion", seed))
    for family, name in TINY_FAMILY_MODELS.items():
        if family in families:
            entries[name] = registry_entry(build_tiny_pipeline(out / name, family), family)
    return write_registry(out / "registry.json", entries)
