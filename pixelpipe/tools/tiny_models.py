"""Tiny Stable Diffusion pipelines built from configs with seeded random weights.

No model hub is needed: tests, the embedded demo and CI run the real diffusers code paths (text-to-image,
image-to-image, inpainting) on models of a few megabytes that build in a second on a CPU. The images are
noise, not pictures; only the plumbing is real.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# The two tiny models A/B experiments compare; same architecture, different random weights.
TINY_MODELS: dict[str, int] = {"tiny-sd": 0, "tiny-sd-b": 1}

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


def write_tokenizer_files(out_dir: str | Path) -> Path:
    """Write a byte-level CLIP vocabulary (no merges): every word becomes one token per byte."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [_BOS, _EOS]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n")
    return out


def _tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        files = write_tokenizer_files(tmp)
        # CLIP's text model has 77 positions; the pipeline pads every prompt to model_max_length.
        return CLIPTokenizer(vocab=str(files / "vocab.json"), merges=str(files / "merges.txt"), model_max_length=77)


def build_tiny_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny Stable Diffusion pipeline with weights drawn from ``seed`` and save it to ``out_dir``.

    The latent space is 2x smaller than the image (one VAE downsampling), and the UNet's default sample size
    makes 64x64 the default image size. Returns ``out_dir``, loadable with ``from_pretrained``.
    """
    tokenizer = _tokenizer()
    # Weights come from the global torch RNG; seed it per component so each is reproducible on its own.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out)
    return out


def write_registry(path: str | Path, models: dict[str, str | Path], default_steps: int = 4) -> Path:
    """Write a model registry JSON (see ``processors.models``) that points each name at a local model dir."""
    entries = {
        name: {
            "path": str(Path(model_dir).resolve()),
            "kind": "stable-diffusion",
            "default_steps": default_steps,
            "default_guidance": 5.0,
            "dtype": "auto",
            "device": "auto",
        }
        for name, model_dir in models.items()
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entries, indent=2) + "\n")
    return out


def build_tiny_models(out_dir: str | Path) -> Path:
    """Build every model in ``TINY_MODELS`` under ``out_dir`` and write ``out_dir/registry.json`` for them."""
    out = Path(out_dir)
    dirs = {name: build_tiny_pipeline(out / name, seed=seed) for name, seed in TINY_MODELS.items()}
    return write_registry(out / "registry.json", dirs)
