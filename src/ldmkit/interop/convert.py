"""Write a loaded Stable Diffusion pipeline as a diffusers folder, a single file or an ldmkit export.

``convert(src, dst, to=...)`` reads any format :func:`load_stable_diffusion` reads and writes
one of three:

* ``diffusers``: ``model_index.json`` + ``unet/``, ``vae/``, ``text_encoder(_2)/``,
  ``tokenizer(_2)/``, ``scheduler/``, loadable by diffusers' ``from_pretrained``; tensors with
  no place in that format (EMA weights, SD 2.x's unused last text block) go to
  ``ldmkit_extra.safetensors`` so a later conversion back loses nothing;
* ``single-file``: one ``.safetensors`` with the original Stable Diffusion key layout
  (``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.``/``conditioner.``),
  plus ldmkit's description of the parts in the file's metadata;
* ``ldmkit``: ``model.safetensors`` with ldmkit's own keys + ``sd_model.json`` + tokenizers.

Weights are written as they are held (no dtype change unless ``dtype`` is given), every file
atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ldmkit.interop import clip
from ldmkit.interop.detect import UNET_PREFIX, VAE_PREFIX
from ldmkit.interop.diffusers_format import (
    unet_config_to_diffusers,
    unet_keys_to_diffusers,
    vae_config_to_diffusers,
    vae_keys_to_diffusers,
)
from ldmkit.interop.files import write_safetensors
from ldmkit.interop.load import (
    LDMKIT_MANIFEST,
    LDMKIT_META,
    describe,
    is_stable_diffusion_path,
    load_stable_diffusion,
)
from ldmkit.interop.pipeline import StableDiffusionPipeline
from ldmkit.utils.io import atomic_write_dir, atomic_write_json

FORMATS = ("diffusers", "single-file", "ldmkit")


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _text_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The canonical HF keys (``text_model.``-prefixed), without ``position_ids``."""
    return clip.hf_state(model.state_dict())


def single_file_state(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """All tensors under their original Stable Diffusion single-file keys."""
    out = {UNET_PREFIX + k: v for k, v in pipe.unet.state_dict().items()}
    out.update({VAE_PREFIX + k: v for k, v in pipe.vae.state_dict().items()})
    for model, spec in zip(pipe.text_encoders, pipe.encoder_specs, strict=True):
        hf = _text_state(model)
        if spec.layout == "openclip":
            converted, extra = clip.hf_to_openclip(hf)
            out.update({spec.prefix + k: v for k, v in {**converted, **extra}.items()})
        else:
            out.update({spec.prefix + k: v for k, v in hf.items()})
    out.update(pipe.extras)
    return out


def save_single_file(
    pipe: StableDiffusionPipeline, path: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """One ``.safetensors`` file in the original layout, ldmkit's description in its metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a single-file checkpoint is written as .safetensors, got {path.name}")
    meta = {LDMKIT_META: json.dumps(describe(pipe)), "format": "pt"}
    write_safetensors(_cast(single_file_state(pipe), dtype), path, metadata=meta)
    return path


def _pipeline_class(pipe: StableDiffusionPipeline) -> str:
    return (
        "StableDiffusionXLPipeline" if len(pipe.text_encoders) == 2 else "StableDiffusionPipeline"
    )


def save_diffusers(
    pipe: StableDiffusionPipeline, folder: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """A diffusers folder (written to a temporary sibling, then renamed into place)."""
    return atomic_write_dir(folder, lambda tmp: _write_diffusers(pipe, tmp, dtype))


def _write_diffusers(pipe: StableDiffusionPipeline, root: Path, dtype: torch.dtype | None) -> None:
    size = pipe.family.image_size // pipe.vae.downsampling_factor
    unet_cfg = unet_config_to_diffusers(pipe.unet.config, sample_size=size)
    atomic_write_json(root / "unet" / "config.json", unet_cfg)
    write_safetensors(
        _cast(unet_keys_to_diffusers(pipe.unet.state_dict()), dtype),
        root / "unet" / "diffusion_pytorch_model.safetensors",
        metadata={"format": "pt"},
    )
    vae_cfg = vae_config_to_diffusers(pipe.vae.config, sample_size=pipe.family.image_size)
    atomic_write_json(root / "vae" / "config.json", vae_cfg)
    write_safetensors(
        _cast(vae_keys_to_diffusers(pipe.vae.state_dict()), dtype),
        root / "vae" / "diffusion_pytorch_model.safetensors",
        metadata={"format": "pt"},
    )
    index: dict[str, Any] = {
        "_class_name": _pipeline_class(pipe),
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    for i, (model, tok) in enumerate(zip(pipe.text_encoders, pipe.tokenizers, strict=True)):
        suffix = "" if i == 0 else f"_{i + 1}"
        if dtype is not None:
            model = model.to(dtype)
        model.save_pretrained(root / f"text_encoder{suffix}", safe_serialization=True)
        tok.save_pretrained(root / f"tokenizer{suffix}")
        index[f"text_encoder{suffix}"] = ["transformers", type(model).__name__]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    if len(pipe.text_encoders) == 2:
        index["force_zeros_for_empty_prompt"] = pipe.force_zeros_for_empty_prompt
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None],
                     requires_safety_checker=False)  # fmt: skip
    sched = pipe.scheduler.to_diffusers("DDIMScheduler")
    atomic_write_json(root / "scheduler" / "scheduler_config.json", sched)
    atomic_write_json(root / "model_index.json", index)
    if pipe.extras:
        write_safetensors(_cast(pipe.extras, dtype), root / "ldmkit_extra.safetensors")


def save_ldmkit(
    pipe: StableDiffusionPipeline, folder: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """ldmkit's own format: ``model.safetensors`` (ldmkit keys) + ``sd_model.json`` + tokenizers."""

    def write(tmp: Path) -> None:
        state = {"unet." + k: v for k, v in pipe.unet.state_dict().items()}
        state.update({"vae." + k: v for k, v in pipe.vae.state_dict().items()})
        parts = zip(pipe.text_encoders, pipe.encoder_specs, pipe.tokenizers, strict=True)
        for model, spec, tok in parts:
            state.update({f"{spec.name}.{k}": v for k, v in _text_state(model).items()})
            tok.save_pretrained(
                tmp / ("tokenizer" if spec.name == "text_encoder" else "tokenizer_2")
            )
        state.update({"extra." + k: v for k, v in pipe.extras.items()})
        write_safetensors(_cast(state, dtype), tmp / "model.safetensors")
        atomic_write_json(tmp / LDMKIT_MANIFEST, describe(pipe))

    return atomic_write_dir(folder, write)


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    to: str,
    family: str | None = None,
    prediction: str | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Read ``src`` (any supported format) and write it to ``dst`` in format ``to``.

    An ldmkit training run as ``src`` exports its UNet, VAE and scheduler
    (:func:`ldmkit.interop.export_run.export_run`).
    """
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; choose from {', '.join(FORMATS)}")
    if not is_stable_diffusion_path(src):
        from ldmkit.interop.export_run import export_run

        return export_run(src, dst, to)
    if to != "single-file" and Path(dst).exists():  # fail before the (long) load
        raise FileExistsError(f"{dst} exists; choose a new folder (nothing was written)")
    pipe = load_stable_diffusion(  # dtype None: tensors stay as stored
        src, family=family, prediction=prediction, allow_pickle=allow_pickle,
        dtype=dtype, vae_dtype=dtype,
    )  # fmt: skip
    if to == "diffusers":
        return save_diffusers(pipe, dst)
    if to == "single-file":
        return save_single_file(pipe, dst)
    return save_ldmkit(pipe, dst)
