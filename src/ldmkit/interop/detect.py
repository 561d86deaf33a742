"""Recognise Stable Diffusion checkpoints and infer ldmkit configs from their keys and shapes.

Only names and shapes are read (values only for one optional SD 2 heuristic), so detection
works on a safetensors header or a meta-device model and never needs the weights in memory.
The family signatures follow what diffusers (``infer_diffusers_model_type``) and ComfyUI
(``model_detection``/``supported_models``) look at: the UNet's input channels, cross-attention
width and vector (``adm_in_channels``) width, plus the text encoders' layout. Every inferred
config is checked by building the ldmkit network on the meta device and comparing key sets and
shapes, so a config that loads is one that matches the file exactly.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ldmkit.autoencoders.base import AutoencoderConfig
from ldmkit.autoencoders.kl import AutoencoderKL
from ldmkit.denoisers.unet import UNet, UNetConfig
from ldmkit.interop.families import (  # re-exported: the family table is part of this API
    FAMILIES,
    Family,
    SchedulerSpec,
    TextEncoderSpec,
    family_for_diffusers,
    family_for_prediction,
    family_unet_config,
    family_vae_config,
    fit_family,
    match_family,
    unet_mismatch,
)
from ldmkit.interop.modules import shape_of

__all__ = [
    "COMPONENTS", "FAMILIES", "UNET_PREFIX", "VAE_PREFIX", "ComponentSplit", "Detection",
    "Family", "SchedulerSpec", "TextEncoderSpec", "detect", "family_for_diffusers", "family_for_prediction",
    "family_unet_config", "family_vae_config", "fit_family", "guess_unet_heads",
    "infer_unet_config", "infer_vae_config", "match_family", "split_single_file", "unet_mismatch",
]  # fmt: skip

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
ComponentSplit = dict[str, dict[str, Any]]
"""``split_single_file``'s result: component name -> {key without prefix: value}."""


# -- splitting a single file ------------------------------------------------------------------
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."  # original layout
_PREFIXES = (  # (prefix, component); openclip visual tower and logit_scale stay in "extra"
    (UNET_PREFIX, "unet"),
    (VAE_PREFIX, "vae"),
    ("cond_stage_model.transformer.", "text_encoder"),
    ("cond_stage_model.model.", "text_encoder"),
    ("conditioner.embedders.0.transformer.", "text_encoder"),
    ("conditioner.embedders.0.model.", "text_encoder"),
    ("conditioner.embedders.1.transformer.", "text_encoder_2"),
    ("conditioner.embedders.1.model.", "text_encoder_2"),
)
_UNET_ROOTS = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.", "output_blocks.")
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def split_single_file(state: Mapping[str, Any]) -> ComponentSplit:
    """Split a flat original-layout checkpoint into components, prefixes stripped.

    Returns the non-empty ones of "unet", "vae", "text_encoder", "text_encoder_2" (text encoders
    in their raw HF or OpenCLIP layout) and "extra" (everything else, keys unchanged: EMA
    copies, schedule buffers, markers such as ``v_pred``). A lone CompVis UNet or VAE file (no
    prefixes) comes back as just "unet" or "vae" (plus "extra" for stray keys).
    """
    out: ComponentSplit = {}
    for key, value in state.items():
        target, name = "extra", key
        for prefix, component in _PREFIXES:
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                if not (rest.startswith("visual.") or rest == "logit_scale"):
                    target, name = component, rest
                break
        out.setdefault(target, {})[name] = value
    extra = out.get("extra", {})
    if len(out) == 1 and extra:  # no prefixes: maybe a lone UNet or VAE file
        for component, roots, probe in (
            ("unet", _UNET_ROOTS + ("out.",), "input_blocks.0.0.weight"),
            ("vae", _VAE_ROOTS, "decoder.conv_in.weight"),
        ):
            if probe in extra:
                own = {k: v for k, v in extra.items() if k.startswith(roots)}
                rest = {k: v for k, v in extra.items() if k not in own}
                return {component: own, **({"extra": rest} if rest else {})}
    return out


# -- inferring network configs ----------------------------------------------------------------
def _need(shapes: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"not a CompVis/ldmkit {what} state dict: missing {key!r}")
    return shape_of(shapes[key])


def _indices(shapes: Mapping[str, Any], prefix: str) -> list[int]:
    """Sorted distinct N of keys ``{prefix}N.…``."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pat.match(k))})


def _check_fit(shapes: Mapping[str, Any], model: torch.nn.Module, what: str, cfg: Any) -> None:
    """Raise unless ``shapes`` has exactly the model's keys with the model's shapes."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: shape_of(v) for k, v in shapes.items()}
    missing = sorted(want.keys() - have.keys())
    unexpected = sorted(have.keys() - want.keys())
    wrong = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {label} keys (e.g. {', '.join(keys[:4])})")
    if wrong:
        shown = ", ".join(f"{k}: file {have[k]} vs model {want[k]}" for k in wrong[:4])
        parts.append(f"{len(wrong)} shape mismatches ({shown})")
        if any(have[k] + (1,) * (len(want[k]) - len(have[k])) == want[k] for k in wrong):
            parts.append("hint: Linear-stored 1x1 conv weights need a reshape to [out, in, 1, 1]")
    raise ValueError(f"{what} weights do not fit the inferred {cfg}: " + "; ".join(parts))


def _default_heads(cfg: UNetConfig) -> int:
    """Heads leave no trace in the weights; 8 when it divides every attention width, else 1."""
    widths = [cfg.model_channels * cfg.channel_mult[i] for i in cfg.attention_levels]
    widths.append(cfg.model_channels * cfg.channel_mult[-1])
    return 8 if all(w % 8 == 0 for w in widths) else 1


def infer_unet_config(
    shapes: Mapping[str, Sequence[int]],
    *,
    num_heads: int | None = None,
    num_head_channels: int | None = None,
) -> UNetConfig:
    """The ``UNetConfig`` whose ``UNet`` has exactly these CompVis keys and shapes.

    ``shapes`` maps keys (prefix stripped) to shapes or tensors. Heads are not in the weights:
    pass ``num_heads`` or ``num_head_channels`` (default 8 heads, or 1 if 8 does not divide).
    Canonical forms: ``num_res_blocks``/``transformer_depth`` are ints when uniform (depths of
    levels without attention are 0 in a tuple), ``transformer_depth_middle`` and
    ``out_channels`` are ``None`` when they equal their defaults, ``norm_groups`` is 32, and
    ``concat_channels`` is the stem's input channels beyond ``out_channels`` (inpainting 9 = 4+5).
    Raises ``ValueError`` naming missing/unexpected/mismatched keys if no config fits.
    """
    stem = _need(shapes, "input_blocks.0.0.weight", "UNet")
    out = _need(shapes, "out.2.weight", "UNet")
    model_channels, total_in, out_ch = stem[0], stem[1], out[0]
    in_ch = out_ch if total_in > out_ch else total_in

    # output side: per level num_res_blocks + 1 blocks, the last one ending with an upsampler
    groups: list[list[int]] = [[]]
    updown = False
    for b in _indices(shapes, "output_blocks."):
        groups[-1].append(b)
        for j in _indices(shapes, f"output_blocks.{b}.")[1:]:  # layers after the ResBlock
            p = f"output_blocks.{b}.{j}."
            if f"{p}conv.weight" in shapes or f"{p}in_layers.2.weight" in shapes:
                updown = f"{p}in_layers.2.weight" in shapes
                groups.append([])
    if not groups[-1] or not groups[0]:
        raise ValueError("UNet output_blocks do not form levels (upsampler misplaced or missing)")
    groups.reverse()  # groups[level]
    mult, n_res, depths = [], [], []
    for level, blocks in enumerate(groups):
        ch = _need(shapes, f"output_blocks.{blocks[0]}.0.out_layers.3.weight", "UNet")[0]
        if ch % model_channels:
            raise ValueError(f"level {level} width {ch} is not a multiple of {model_channels}")
        mult.append(ch // model_channels)
        n_res.append(len(blocks) - 1)
        attn = f"output_blocks.{blocks[0]}.1."
        has_attn = f"{attn}proj_in.weight" in shapes
        depths.append(len(_indices(shapes, f"{attn}transformer_blocks.")) if has_attn else 0)
    attention_levels = tuple(i for i, d in enumerate(depths) if d)
    used = sorted({depths[i] for i in attention_levels})
    depth: int | tuple[int, ...] = tuple(depths) if len(used) > 1 else (used or [1])[0]
    mid = (
        len(_indices(shapes, "middle_block.1.transformer_blocks."))
        if "middle_block.1.proj_in.weight" in shapes
        else 0
    )
    default_mid = depth if isinstance(depth, int) else depth[-1]

    proj = sorted(k for k in shapes if k.endswith("proj_in.weight"))
    k_proj = sorted(k for k in shapes if k.endswith("attn2.to_k.weight"))
    emb = _need(shapes, "output_blocks.0.0.emb_layers.1.weight", "UNet")[0]
    res_out = _need(shapes, "output_blocks.0.0.out_layers.3.weight", "UNet")[0]
    cfg = UNetConfig(
        in_channels=in_ch,
        out_channels=None if out_ch == in_ch else out_ch,
        model_channels=model_channels,
        channel_mult=tuple(mult),
        num_res_blocks=n_res[0] if len(set(n_res)) == 1 else tuple(n_res),
        attention_levels=attention_levels,
        transformer_depth=depth,
        transformer_depth_middle=None if mid == default_mid else mid,
        context_dim=shape_of(shapes[k_proj[0]])[1] if k_proj else None,
        use_linear_in_transformer=bool(proj) and len(shape_of(shapes[proj[0]])) == 2,
        use_scale_shift_norm=emb == 2 * res_out,
        resblock_updown=updown,
        num_classes=shape_of(shapes["label_emb.weight"])[0] - 1
        if "label_emb.weight" in shapes
        else None,
        vector_dim=shape_of(shapes["label_emb.0.0.weight"])[1]
        if "label_emb.0.0.weight" in shapes
        else None,
        concat_channels=total_in - in_ch,
        dims=len(stem) - 2,
    )
    if num_head_channels is not None:
        cfg.num_head_channels = num_head_channels
    else:
        cfg.num_heads = num_heads if num_heads is not None else _default_heads(cfg)
    with torch.device("meta"):
        model = UNet(cfg)
    _check_fit(shapes, model, "UNet", cfg)
    return cfg


def infer_vae_config(
    shapes: Mapping[str, Sequence[int]], *, scaling_factor: float
) -> AutoencoderConfig:
    """The KL ``AutoencoderConfig`` whose ``AutoencoderKL`` has exactly these keys and shapes.

    ``scaling_factor`` is not in the weights (0.18215 for SD 1.x/2.x, 0.13025 for SDXL).
    """
    conv_in = _need(shapes, "encoder.conv_in.weight", "VAE")
    latent = _need(shapes, "decoder.conv_in.weight", "VAE")[1]
    moments = _need(shapes, "quant_conv.weight", "VAE")[0]
    if moments != 2 * latent:
        raise ValueError(
            f"quant_conv has {moments} channels for {latent} latent channels: not a KL "
            "autoencoder (a VQ model has as many as the latent)"
        )
    levels = _indices(shapes, "encoder.down.")
    if not levels:
        raise ValueError("not a CompVis/ldmkit VAE state dict: no encoder.down.N keys")
    base = conv_in[0]
    mult = tuple(
        _need(shapes, f"encoder.down.{i}.block.0.conv1.weight", "VAE")[0] // base for i in levels
    )
    cfg = AutoencoderConfig(
        kind="kl",
        in_channels=conv_in[1],
        out_channels=_need(shapes, "decoder.conv_out.weight", "VAE")[0],
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=len(_indices(shapes, "encoder.down.0.block.")),
        latent_channels=latent,
        mid_attention="encoder.mid.attn_1.q.weight" in shapes,
        dims=len(conv_in) - 2,
        scaling_factor=scaling_factor,
    )
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    _check_fit(shapes, model, "VAE", cfg)
    return cfg


# -- detecting the family ---------------------------------------------------------------------
@dataclass
class Detection:
    """What ``detect`` found: the family, the configs to build, and how it decided (``notes``)."""

    family: Family
    unet: UNetConfig | None
    vae: AutoencoderConfig | None
    components: tuple[str, ...]
    notes: list[str] = field(default_factory=list)


def _as_split(state: Mapping[str, Any]) -> ComponentSplit:
    """A ``split_single_file`` result passes through; a flat checkpoint is split."""
    names = (*COMPONENTS, "extra")
    if state and all(k in names and isinstance(v, Mapping) for k, v in state.items()):
        return {k: dict(v) for k, v in state.items()}
    return split_single_file(state)


def _te_info(sd: Mapping[str, Any]) -> tuple[str, int | None, int]:
    """(layout, width, layers) of a raw text-encoder state dict."""
    tok = next((k for k in sd if k.endswith("embeddings.token_embedding.weight")), None)
    if tok is not None:
        layers = _indices(sd, tok.replace("embeddings.token_embedding.weight", "encoder.layers."))
        return "hf", shape_of(sd[tok])[1], len(layers)
    if "token_embedding.weight" in sd or any(k.startswith("transformer.resblocks.") for k in sd):
        width = (
            shape_of(sd["token_embedding.weight"])[1] if "token_embedding.weight" in sd else None
        )
        return "openclip", width, len(_indices(sd, "transformer.resblocks."))
    return "unknown", None, 0


def _describe(parts: ComponentSplit, cfg: UNetConfig | None) -> str:
    """One line on what the file holds, for error messages."""
    text = "components: " + (", ".join(c for c in COMPONENTS if parts.get(c)) or "none")
    if cfg is not None:
        text += (
            f"; UNet: {cfg.in_channels}+{cfg.concat_channels} input channels, "
            f"{cfg.out_channels or cfg.in_channels} output, model_channels {cfg.model_channels}, "
            f"channel_mult {cfg.channel_mult}, context_dim {cfg.context_dim}, "
            f"vector_dim {cfg.vector_dim}"
        )
    for name in ("text_encoder", "text_encoder_2"):
        if parts.get(name):
            layout, width, layers = _te_info(parts[name])
            text += f"; {name}: {layout}, width {width}, {layers} layers"
    return text


def _signal(parts: ComponentSplit, global_step: int | None, sd2: bool) -> tuple[str | None, str]:
    """(prediction, reason) from markers in the file, or (None, "") without any.

    ``v_pred`` is ComfyUI's marker key. diffusers reads SD 2 .ckpt files' top-level
    ``global_step``: 875000 is the 512-px eps base, anything else v (110000 is SD 2.1-v).
    ComfyUI's fallback for SD 2 looks at the spread of one LayerNorm bias (values needed).
    """
    extra = parts.get("extra", {})
    if "v_pred" in extra:
        return "v", "the file has a 'v_pred' key (ComfyUI's v-prediction marker)"
    if not sd2:
        return None, ""
    step = global_step if global_step is not None else extra.get("global_step")
    if step is not None:
        step = int(step)
        if step == 875000:
            return "eps", "global_step 875000 (SD 2.0-base, 512 px; diffusers' rule)"
        known = " (SD 2.1-v)" if step == 110000 else ""
        return "v", f"global_step {step}{known} is not 875000 (diffusers' rule: v)"
    bias = parts.get("unet", {}).get("output_blocks.11.1.transformer_blocks.0.norm1.bias")
    if isinstance(bias, torch.Tensor) and bias.device.type != "meta":
        std = float(bias.float().std(unbiased=False))
        pred = "v" if std > 0.09 else "eps"
        return pred, f"ComfyUI's heuristic: std of output_blocks.11 norm1.bias = {std:.3f}"
    return None, ""


def _with_prediction(family: Family, prediction: str, notes: list[str]) -> Family:
    """``family_for_prediction``, noting when the result is no release configuration."""
    new = family_for_prediction(family, prediction)
    if new.name == family.name and new is not family:
        notes.append(
            f"{family.name} with {prediction}-prediction is not a release configuration (e.g. "
            "a v-prediction fine-tune); the family's other defaults are kept"
        )
    return new


def _guess(
    cfg: UNetConfig, parts: ComponentSplit, global_step: int | None, prediction: str | None,
    notes: list[str],
) -> Family:  # fmt: skip
    """The family whose reference UNet matches ``cfg``; sd2 vs sd2-v from the file's markers."""
    family = match_family(cfg, _describe(parts, cfg))
    if prediction is not None:
        return _with_prediction(family, prediction, notes)
    pred, reason = _signal(parts, global_step, sd2=family.name in ("sd2", "sd2-v"))
    if family.name in ("sd2", "sd2-v"):
        if pred is None:
            notes.append(
                "SD 2.x prediction type guessed: v (768-px sd2-v); a safetensors file does not "
                "record it. For eps models (SD 2.0/2.1-base, 512 px) pass prediction='eps' "
                "or family='sd2'"
            )
            return FAMILIES["sd2-v"]
        notes.append(f"SD 2.x prediction {pred} from {reason}; override with prediction=")
        return FAMILIES["sd2-v" if pred == "v" else "sd2"]
    if pred is not None:
        notes.append(f"prediction {pred} from {reason}")
        family = _with_prediction(family, pred, notes)
    return family


def _check_text_encoders(
    family: Family, parts: ComponentSplit, context_dim: int | None, release: bool,
    notes: list[str],
) -> None:  # fmt: skip
    """The file's text encoders must be the family's: layout, and widths that are the release's
    (``release``) or at least add up to the UNet's ``context_dim``. Missing ones are noted."""
    specs = {s.name: s for s in family.text_encoders}
    widths = []
    for name in ("text_encoder", "text_encoder_2"):
        spec = specs.get(name)
        if not parts.get(name):
            if spec is not None:
                notes.append(f"no {name} weights in the file; load {spec.layout} width "
                             f"{spec.width} separately")  # fmt: skip
            continue
        layout, width, layers = _te_info(parts[name])
        widths.append(width)
        if spec is None or layout != spec.layout or (release and width != spec.width):
            want = f"{spec.layout} width {spec.width}" if spec else "no such encoder"
            raise ValueError(
                f"{name} is {layout} width {width} ({layers} layers) but family "
                f"{family.name!r} expects {want} ({_describe(parts, None)})"
            )
    if context_dim is not None and len(widths) == len(specs) and sum(widths) != context_dim:
        raise ValueError(
            f"the text encoders' widths {widths} do not add up to the UNet's context_dim "
            f"{context_dim} ({_describe(parts, None)})"
        )


def detect(
    state: Mapping[str, Any],
    *,
    family: str | None = None,
    prediction: Literal["eps", "v"] | None = None,
    global_step: int | None = None,
) -> Detection:
    """Find the Stable Diffusion family of a checkpoint and the ldmkit configs for its parts.

    Args:
        state: a flat original-layout checkpoint (``state_dict`` already unwrapped; values
            tensors, anything with ``.shape``, or shapes) or a ``split_single_file`` result.
        family: skip guessing; the UNet, VAE and text encoders must still fit this family.
        prediction: "eps" or "v", overriding any marker (maps sd2 <-> sd2-v).
        global_step: a .ckpt file's top-level ``global_step`` (outside ``state_dict``), the
            signal diffusers uses for SD 2 (875000 = 512-px eps base, anything else v).

    Raises ``ValueError`` saying what was found when the layout is unknown or unsupported
    (e.g. the SDXL refiner) or does not fit a forced family.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if prediction not in (None, "eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    parts = _as_split(state)
    components = tuple(c for c in COMPONENTS if parts.get(c))
    extra = parts.get("extra", {})
    notes: list[str] = []
    for key, what in (("edm_mean", "EDM (Playground v2.5)"), ("edm_vpred.sigma_max", "EDM-v")):
        if key in extra:
            raise ValueError(f"{what} parameterization ({key!r} key) is not supported")
    cfg = infer_unet_config(parts["unet"]) if "unet" in components else None
    if family is None:
        if cfg is None:
            hint = " (diffusers-format keys: convert first)" if "conv_in.weight" in extra else ""
            raise ValueError(
                f"cannot tell the family without CompVis UNet weights{hint}; pass family= "
                f"({_describe(parts, None)})"
            )
        chosen = _guess(cfg, parts, global_step, prediction, notes)
    else:
        chosen = FAMILIES[family] if cfg is None else fit_family(cfg, family, _describe(parts, cfg))
        if cfg is not None and (sizes := unet_mismatch(cfg, chosen)):
            notes.append(
                f"the UNet has {family}'s structure but not the release's sizes "
                f"({'; '.join(sizes[:3])}{'; ...' if len(sizes) > 3 else ''})"
            )
        pred, reason = _signal(parts, global_step, sd2=family in ("sd2", "sd2-v"))
        if prediction is not None:
            chosen = _with_prediction(chosen, prediction, notes)
        elif pred is not None and pred != chosen.prediction:
            notes.append(f"{reason} suggests {pred}, but family={family!r} was forced")
    if "ztsnr" in extra:
        notes.append("the file has a 'ztsnr' key: trained with zero terminal SNR (sample with a "
                     "rescaled schedule and 'trailing' spacing)")  # fmt: skip
    release = cfg is None or not unet_mismatch(cfg, chosen)
    _check_text_encoders(chosen, parts, cfg.context_dim if cfg else None, release, notes)
    if cfg is not None:
        cfg = dataclasses.replace(cfg, upcast_attention=chosen.upcast_attention)
        heads = dict(num_heads=chosen.num_heads or 8, num_head_channels=chosen.num_head_channels)
        try:
            dataclasses.replace(cfg, **heads).validate()
            cfg = dataclasses.replace(cfg, **heads)
        except ValueError:  # heads are not in the weights: keep the divisible default
            notes.append(f"{chosen.name}'s heads {heads} do not divide this UNet's widths; "
                         f"{cfg.num_heads} heads assumed (set them from the model's config)")  # fmt: skip
    vae = None
    if "vae" in components:
        vae = infer_vae_config(parts["vae"], scaling_factor=chosen.vae_scaling_factor)
        got = (vae.in_channels, vae.out_channels, vae.latent_channels, vae.downsampling_factor)
        if got != (3, 3, 4, 8):
            raise ValueError(
                f"the VAE does not fit family {chosen.name!r}: (in, out, latent channels, "
                f"factor) = {got}, expected (3, 3, 4, 8)"
            )
        if vae != family_vae_config(chosen):
            notes.append(
                "the VAE's sizes are not the release's (its latent space is the same shape)"
            )
    else:
        notes.append("no VAE weights in the file; load the family's VAE separately")
    return Detection(chosen, cfg, vae, components, notes)


# -- helpers for other layouts ----------------------------------------------------------------
def guess_unet_heads(shapes: Mapping[str, Sequence[int]]) -> dict[str, int | None]:
    """Heads for a UNet without a family, by the releases' convention: 64 channels per head
    with Linear projections and a context other than 768 (SD 2.x, XL), else 8 heads (SD 1.x);
    ``None`` (``infer_unet_config``'s default) where the widths do not divide."""
    proj = [shape_of(v) for k, v in shapes.items() if k.endswith("proj_in.weight")]
    ctx = [shape_of(v)[1] for k, v in sorted(shapes.items()) if k.endswith("attn2.to_k.weight")]
    widths = {s[0] for s in proj}
    if proj and len(proj[0]) == 2 and ctx[:1] != [768] and all(w % 64 == 0 for w in widths):
        return {"num_heads": None, "num_head_channels": 64}
    return {"num_heads": 8 if all(w % 8 == 0 for w in widths) else None, "num_head_channels": None}
