"""Load Stable Diffusion checkpoints offline: single files, diffusers folders, ldmkit exports.

``load_stable_diffusion(path)`` returns a :class:`StableDiffusionPipeline`. The layout is found
from the path (a file, a folder with ``model_index.json``, a folder with ldmkit's
``sd_model.json``), the family from the keys and shapes (:mod:`ldmkit.interop.detect`) unless
the user names it, and every part is checked against the weights before anything is built,
so bad input fails with the keys and shapes named and nothing half-loaded.

Single files keep what has no place in the pipeline (EMA copies, schedule buffers, SD 2.x's
unused last OpenCLIP block and projection) in ``pipe.extras``, so writing the file back gives
the same tensors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ldmkit.autoencoders.base import AutoencoderConfig
from ldmkit.autoencoders.kl import AutoencoderKL
from ldmkit.config import from_dict, to_dict
from ldmkit.denoisers.unet import UNet, UNetConfig
from ldmkit.interop import clip, detect
from ldmkit.interop.diffusers_format import (
    unet_config_from_diffusers,
    unet_keys_from_diffusers,
    vae_config_from_diffusers,
    vae_keys_from_diffusers,
)
from ldmkit.interop.files import CheckpointFormatError, read_sharded, read_weights
from ldmkit.interop.modules import build_from_state_dict
from ldmkit.interop.pipeline import StableDiffusionPipeline
from ldmkit.interop.schedulers import SchedulerConfig

logger = logging.getLogger(__name__)

LDMKIT_META = "ldmkit"  # safetensors metadata key holding ldmkit's description of the file
LDMKIT_MANIFEST = "sd_model.json"  # an ldmkit-format export folder
# SD 2.x keeps OpenCLIP-H's 24 blocks but encodes with the 23rd (Rombach et al., "penultimate")
OPENCLIP_H_LAYERS = 24


def is_stable_diffusion_path(path: str | Path) -> bool:
    """True for paths ``load_stable_diffusion`` handles (not an ldmkit training run)."""
    p = Path(path).expanduser()
    if p.is_file():
        return True
    return (p / "model_index.json").is_file() or (p / LDMKIT_MANIFEST).is_file()


def load_stable_diffusion(
    path: str | Path,
    *,
    family: str | None = None,
    prediction: str | None = None,
    dtype: torch.dtype | None = torch.float32,
    vae_dtype: torch.dtype | None = torch.float32,
    allow_pickle: bool = False,
) -> StableDiffusionPipeline:
    """A text-to-image pipeline from a Stable Diffusion 1.x / 2.x / XL checkpoint.

    Args:
        path: a single ``.safetensors`` file (``.ckpt``/``.pt`` with ``allow_pickle``), a
            diffusers folder (``model_index.json``) or a folder written by
            ``ldmkit convert --to ldmkit``.
        family: force the family ("sd1", "sd2", "sd2-v", "sd1-inpaint", "sd2-inpaint",
            "sdxl") instead of detecting it; the weights must still fit it.
        prediction: "eps" or "v", overriding the detected or configured prediction type.
        dtype: UNet and text encoder dtype (float32, bfloat16 or float16); ``None`` keeps
            the dtypes stored in the file (what ``convert`` does).
        vae_dtype: VAE dtype; float32 by default (the SD VAE overflows in fp16); ``None``
            keeps the stored one.
        allow_pickle: permit ``.ckpt``/``.pt``/``.bin`` files (read with weights_only=True).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / LDMKIT_MANIFEST).is_file():
            pipe = _load_ldmkit_folder(p)
        elif (p / "model_index.json").is_file():
            pipe = _load_diffusers_folder(p, family, dtype, allow_pickle)
        else:
            raise CheckpointFormatError(
                f"{p} is a folder without model_index.json (diffusers) or {LDMKIT_MANIFEST} "
                "(ldmkit export); pass a single checkpoint file or one of those folders"
            )
    else:
        pipe = _load_single_file(p, family, allow_pickle)
    if prediction is not None:
        _set_prediction(pipe, prediction)
    for note in pipe.notes:
        logger.warning("%s: %s", p.name, note)
    return pipe.to(dtype, vae_dtype=vae_dtype)


def _set_prediction(pipe: StableDiffusionPipeline, prediction: str) -> None:
    names = {"eps": "epsilon", "v": "v_prediction"}
    if prediction not in names:
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    scheduler = dataclasses.replace(pipe.scheduler, prediction_type=names[prediction])
    pipe.set_scheduler(scheduler, detect.family_for_prediction(pipe.family, prediction))


# -- single files ---------------------------------------------------------------------------
def _load_single_file(
    path: Path, family: str | None, allow_pickle: bool
) -> StableDiffusionPipeline:
    # as stored: the VAE must not round-trip through the UNet's dtype (pipe.to casts by part)
    state, metadata = read_weights(path, allow_pickle=allow_pickle)
    described = json.loads(metadata[LDMKIT_META]) if LDMKIT_META in metadata else None
    parts = detect.split_single_file(state)
    if set(parts) - {"extra"} in ({"unet"}, {"vae"}):
        only = "UNet" if "unet" in parts else "VAE"
        raise CheckpointFormatError(
            f"{path} holds only a {only}; a pipeline also needs the other parts. Load it with "
            f"ldmkit.interop.load_{only.lower()}({str(path)!r})"
        )
    if described is not None and family is None:
        family = described["family"]
    step = metadata.get("global_step")
    found = detect.detect(
        state, family=family, global_step=int(step) if step and step.isdigit() else None
    )
    if described is not None:  # ldmkit wrote this file: its exact configs win over inference
        unet_cfg = from_dict(UNetConfig, described["unet"])
        vae_cfg = from_dict(AutoencoderConfig, described["vae"])
        sched = SchedulerConfig.from_diffusers(described["scheduler"])
    else:
        unet_cfg, vae_cfg = found.unet, found.vae
        sched = SchedulerConfig.from_diffusers(found.family.scheduler_config())
    for part, prefix in (("unet", detect.UNET_PREFIX), ("vae", detect.VAE_PREFIX)):
        if part not in parts:
            raise CheckpointFormatError(f"{path}: no {part.upper()} weights ({prefix}*)")
    extras = dict(parts.get("extra", {}))
    encoders, tokenizers, specs = [], [], []
    for spec in found.family.text_encoders:
        te_state = parts.get(spec.name)
        if te_state is None:
            raise CheckpointFormatError(
                f"{path}: no weights for {spec.name} (prefix {spec.prefix})"
            )
        model, spec, leftover = _text_encoder_from_single(te_state, spec)
        extras.update({spec.prefix + k: v for k, v in leftover.items()})
        encoders.append(model)
        tokenizers.append(clip.clip_tokenizer(pad_token=spec.pad_token))
        specs.append(spec)
    unet = build_from_state_dict(lambda: UNet(unet_cfg), parts["unet"], "UNet")
    vae = build_from_state_dict(lambda: AutoencoderKL(vae_cfg), parts["vae"], "VAE")
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers, encoder_specs=specs,
        family=found.family, scheduler=sched, extras=extras, source=str(path),
    )  # fmt: skip
    pipe.notes = list(found.notes) if described is None else []
    return pipe


def _text_encoder_from_single(
    state: dict[str, torch.Tensor], spec: Any
) -> tuple[torch.nn.Module, Any, dict[str, torch.Tensor]]:
    """(CLIP model, the spec as used, leftover tensors under their source keys)."""
    leftover: dict[str, torch.Tensor] = {}
    num_layers = None
    if spec.layout == "openclip":
        hf, leftover = clip.openclip_to_hf(state)
        layers = clip.layer_count(hf)
        if spec.layer == "penultimate" and spec.final_norm and layers == OPENCLIP_H_LAYERS:
            # SD 2.x: the last block and the projection are never used. Build the 23 blocks
            # diffusers builds and encode with the last of them; keep the unused tensors
            # under their original keys so that writing the file back loses nothing.
            num_layers = layers - 1
            spec = dataclasses.replace(spec, layer="last")
            unused = f"transformer.resblocks.{num_layers}."
            leftover.update({k: v for k, v in state.items() if k.startswith(unused)})
            if "text_projection" in state and not spec.with_projection:
                leftover["text_projection"] = state["text_projection"]
    else:
        hf = clip.hf_state(state)
        leftover = {k: v for k, v in state.items() if k.endswith("position_ids")}
    return _build_text_encoder(hf, spec, num_layers), spec, leftover


def _build_text_encoder(
    hf: dict[str, torch.Tensor], spec: Any, num_layers: int | None = None, head_dim: int = 64
) -> torch.nn.Module:
    pad_id = 0 if spec.pad_token == "!" else 49407
    config = clip.clip_text_config(
        hf, hidden_act=spec.hidden_act, pad_token_id=pad_id, head_dim=head_dim
    )
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    dtype = next(v.dtype for v in hf.values() if v.is_floating_point())
    return clip.build_clip_text_model(
        hf, config, with_projection=spec.with_projection, dtype=dtype, num_layers=num_layers
    )


# -- diffusers folders -----------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointFormatError(f"missing {path}")
    return json.loads(path.read_text())


def _load_diffusers_folder(
    folder: Path, family: str | None, dtype: torch.dtype, allow_pickle: bool
) -> StableDiffusionPipeline:
    index = _read_json(folder / "model_index.json")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if part not in index or not (folder / part).is_dir():
            raise CheckpointFormatError(f"{folder}: the diffusers folder has no {part}/")
    unet_json = _read_json(folder / "unet" / "config.json")
    unet_cfg = unet_config_from_diffusers(unet_json)
    vae_cfg = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"))
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = SchedulerConfig.from_diffusers(_read_json(sched_path))
    unet_state = unet_keys_from_diffusers(
        read_sharded(
            folder / "unet", "diffusion_pytorch_model", allow_pickle=allow_pickle, dtype=dtype
        )
    )
    vae_state = vae_keys_from_diffusers(
        read_sharded(folder / "vae", "diffusion_pytorch_model", allow_pickle=allow_pickle)
    )
    two = "text_encoder_2" in index and (folder / "text_encoder_2").is_dir()
    fam = detect.family_for_diffusers(
        unet_cfg, two_encoders=two, prediction=sched.prediction,
        hidden_act=_read_json(folder / "text_encoder" / "config.json").get("hidden_act"),
        image_size=unet_json.get("sample_size"),
        name=family,
    )  # fmt: skip
    encoders, tokenizers, specs = [], [], []
    for spec in fam.text_encoders:
        if spec.layer == "penultimate" and spec.final_norm:  # SD 2.x, trimmed to 23 blocks
            spec = dataclasses.replace(spec, layer="last")
        te_config = _read_json(folder / spec.name / "config.json")
        te_state = read_sharded(folder / spec.name, "model", allow_pickle=allow_pickle, dtype=dtype)
        head_dim = te_config["hidden_size"] // te_config["num_attention_heads"]
        encoders.append(_build_text_encoder(clip.hf_state(te_state), spec, head_dim=head_dim))
        tok = "tokenizer" if spec.name == "text_encoder" else "tokenizer_2"
        tokenizers.append(clip.load_clip_tokenizer(folder / tok))
        specs.append(spec)
    extras = {}
    if (folder / "ldmkit_extra.safetensors").is_file():
        extras = read_weights(folder / "ldmkit_extra.safetensors")[0]
    return StableDiffusionPipeline(
        unet=build_from_state_dict(lambda: UNet(unet_cfg), unet_state, "UNet"),
        vae=build_from_state_dict(lambda: AutoencoderKL(vae_cfg), vae_state, "VAE"),
        text_encoders=encoders, tokenizers=tokenizers, encoder_specs=specs, family=fam,
        scheduler=sched, force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt"),
        extras=extras, source=str(folder),
    )  # fmt: skip


# -- ldmkit export folders ------------------------------------------------------------------
def _load_ldmkit_folder(folder: Path) -> StableDiffusionPipeline:
    manifest = _read_json(folder / LDMKIT_MANIFEST)
    state, _ = read_weights(folder / "model.safetensors")  # as stored; cast by part later
    fam = detect.FAMILIES[manifest["family"]]
    unet_cfg = from_dict(UNetConfig, manifest["unet"])
    vae_cfg = from_dict(AutoencoderConfig, manifest["vae"])

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    encoders, tokenizers, specs = [], [], []
    for raw in manifest["text_encoders"]:
        spec = detect.TextEncoderSpec(**raw)
        encoders.append(_build_text_encoder(part(spec.name + "."), spec))
        tok = "tokenizer" if spec.name == "text_encoder" else "tokenizer_2"
        tokenizers.append(clip.load_clip_tokenizer(folder / tok))
        specs.append(spec)
    return StableDiffusionPipeline(
        unet=build_from_state_dict(lambda: UNet(unet_cfg), part("unet."), "UNet"),
        vae=build_from_state_dict(lambda: AutoencoderKL(vae_cfg), part("vae."), "VAE"),
        text_encoders=encoders, tokenizers=tokenizers, encoder_specs=specs, family=fam,
        scheduler=SchedulerConfig.from_diffusers(manifest["scheduler"]),
        force_zeros_for_empty_prompt=manifest.get("force_zeros_for_empty_prompt"),
        extras=part("extra."), source=str(folder),
    )  # fmt: skip


def describe(pipe: StableDiffusionPipeline) -> dict[str, Any]:
    """The JSON description ldmkit writes next to (or into) an exported checkpoint."""
    return {
        "family": pipe.family.name,
        "unet": to_dict(pipe.unet.config),
        "vae": to_dict(pipe.vae.config),
        "scheduler": pipe.scheduler.to_diffusers(),
        "text_encoders": [dataclasses.asdict(s) for s in pipe.encoder_specs],
        "force_zeros_for_empty_prompt": pipe.force_zeros_for_empty_prompt,
    }


# -- lone parts --------------------------------------------------------------------------------
def load_unet(
    path: str | Path,
    *,
    family: str | None = None,
    num_heads: int | None = None,
    num_head_channels: int | None = None,
    allow_pickle: bool = False,
) -> UNet:
    """An ldmkit ``UNet`` from a lone UNet: a file (original/CompVis or diffusers keys) or a
    diffusers ``unet/`` folder (its ``config.json`` then decides everything).

    Attention heads are not in the weights: they come from ``num_heads`` /
    ``num_head_channels``, else the ``family``'s convention, else the releases' (64 channels
    per head where that divides the widths).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        cfg = unet_config_from_diffusers(_read_json(p / "config.json"))
        weights = read_sharded(p, "diffusion_pytorch_model", allow_pickle=allow_pickle)
        return build_from_state_dict(lambda: UNet(cfg), unet_keys_from_diffusers(weights), "UNet")
    state, _ = read_weights(p, allow_pickle=allow_pickle)
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in state):
        state = unet_keys_from_diffusers(state)
    parts = detect.split_single_file(state)
    if "unet" not in parts:
        raise CheckpointFormatError(f"{p}: no UNet weights found")
    shapes = {k: tuple(v.shape) for k, v in parts["unet"].items()}
    if num_heads is not None or num_head_channels is not None:
        heads = {"num_heads": num_heads, "num_head_channels": num_head_channels}
    else:
        heads = detect.FAMILIES[family].unet_heads() if family else detect.guess_unet_heads(shapes)
    cfg = detect.infer_unet_config(shapes, **heads)
    return build_from_state_dict(lambda: UNet(cfg), parts["unet"], "UNet")


def load_vae(path: str | Path, *, scaling_factor: float = 0.18215, allow_pickle: bool = False):
    """An ldmkit ``AutoencoderKL`` from a lone VAE file (original or diffusers keys)."""
    state, _ = read_weights(path, allow_pickle=allow_pickle)
    if any(k.startswith("encoder.down_blocks.") for k in state):
        state = vae_keys_from_diffusers(state)
    parts = detect.split_single_file(state)
    if "vae" not in parts:
        raise CheckpointFormatError(f"{path}: no VAE weights found")
    shapes = {k: tuple(v.shape) for k, v in parts["vae"].items()}
    cfg = detect.infer_vae_config(shapes, scaling_factor=scaling_factor)
    return build_from_state_dict(lambda: AutoencoderKL(cfg), parts["vae"], "VAE")
