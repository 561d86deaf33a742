"""diffusers ``config.json`` dicts <-> ldmkit ``UNetConfig`` / ``AutoencoderConfig``.

The counterpart of the key maps in ``diffusers_format`` (which re-exports these functions).
Anything diffusers can express that ldmkit's UNet or AutoencoderKL cannot build is refused with
a ValueError naming the field and value, never ignored; likewise ldmkit options diffusers lacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ldmkit.autoencoders.base import AutoencoderConfig
from ldmkit.denoisers.unet import UNetConfig
from ldmkit.nn.layers import group_norm

__all__ = [
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
]
# UNet2DConditionModel's constructor defaults (a config.json may omit any field)
_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
# fields whose only values ldmkit's UNet implements (dropout: diffusers drops out in ResBlocks
# only, ldmkit also in the transformers, so a non-zero rate would train a different network)
_UNET_ACCEPTED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "dropout": (0,),
    "act_fn": ("silu",),
    "norm_eps": (1e-5,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "use_linear_projection": (False, True),
    "class_embed_type": (None,),
    "addition_embed_type": (None, "text_time"),
    "upcast_attention": (False, True),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
_SDXL_TIME_EMBED_DIM = 256  # SDXL's size/crop conditioning: 6 ids x 256-dim sinusoidal embedding


def _refuse(model: str, field: str, value: Any, why: str = "") -> ValueError:
    reason = f": {why}" if why else ""
    return ValueError(
        f"diffusers {model} config {field}={value!r} is not supported by ldmkit{reason}"
    )


def _read_config(config: Mapping[str, Any], defaults: Mapping[str, Any], model: str) -> dict:
    """The config with defaults filled in; private ``_*`` entries dropped, unknown fields refused."""
    unknown = [k for k in config if not k.startswith("_") and k not in defaults]
    if unknown:
        raise ValueError(f"diffusers {model} config has fields ldmkit does not know: {unknown}")
    return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}


def _check_accepted(c: Mapping[str, Any], accepted: Mapping[str, tuple], model: str) -> None:
    """Refuse fields set to values ldmkit does not implement (bools compared as bools: 1 != True)."""
    for field, values in accepted.items():
        value = c[field]
        if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in values):
            raise _refuse(model, field, value, f"supported: {list(values)}")


def _per_level(value: Any, levels: int, field: str, model: str) -> list:
    """An int (or other scalar) or a per-level list as one value per level."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise _refuse(model, field, value, f"needs one entry per level ({levels})")
        return list(value)
    return [value] * levels


def _check_groups(channels: Iterable[int], groups: int | None, where: str) -> None:
    """Refuse group counts where ldmkit's ``group_norm`` (largest count <= groups dividing the
    channels) would differ from diffusers' GroupNorm (always ``groups``)."""
    for ch in sorted(set(channels)):
        used = None if groups is None else group_norm(ch, groups).num_groups
        if used != groups:
            raise ValueError(
                f"{where}={groups} on {ch} channels: ldmkit's group_norm would use {used} groups, "
                f"diffusers exactly {groups}"
            )


def _channel_mult(block_out_channels: list[int], model: str) -> tuple[int, ...]:
    """ldmkit's levels have ``base * mult`` channels with level 0 at ``base`` (conv_in's width)."""
    base = block_out_channels[0]
    if any(ch % base for ch in block_out_channels):
        raise _refuse(model, "block_out_channels", block_out_channels, "not multiples of the first")
    return tuple(ch // base for ch in block_out_channels)


def _simplify(values: list[int]) -> int | tuple[int, ...]:
    return values[0] if len(set(values)) == 1 else tuple(values)


def _unsupported(cls: str, field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{cls} {field}={value!r} has no diffusers equivalent: {why}")


def _heads_from_diffusers(
    value: Any, channels: list[int], levels: list[int], model: str
) -> tuple[int, int | None]:
    """(num_heads, num_head_channels) from diffusers' ``attention_head_dim``.

    diffusers' ``attention_head_dim`` is really the number of heads per level (diffusers itself
    uses ``num_attention_heads = num_attention_heads or attention_head_dim``). ldmkit has one
    head count, or one head width, for all levels with a transformer (``levels``).
    """
    heads = _per_level(value, len(channels), "attention_head_dim", model)
    used = [(heads[level], channels[level]) for level in levels]
    if any(not isinstance(h, int) or isinstance(h, bool) or h < 1 or ch % h for h, ch in used):
        raise _refuse(model, "attention_head_dim", value, "heads must divide each level's channels")
    if not isinstance(value, (list, tuple)):
        return value, None
    widths = {ch // h for h, ch in used}
    if len(widths) == 1:  # SD 2.x / XL style: [5, 10, 20] on 320/640/1280 channels = 64 per head
        return UNetConfig.num_heads, widths.pop()
    if len({h for h, _ in used}) == 1:
        return used[0][0], None
    raise _refuse(
        model, "attention_head_dim", value, "ldmkit needs one head count or one head width"
    )


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """diffusers ``UNet2DConditionModel`` ``config.json`` dict -> ``UNetConfig``.

    Raises ValueError naming the field for anything ldmkit's UNet cannot express.
    ``sample_size`` and private ``_*`` entries are metadata and are not used.
    """
    m = "UNet2DConditionModel"
    c = _read_config(config, _UNET_DEFAULTS, m)
    _check_accepted(c, _UNET_ACCEPTED, m)
    boc = [int(ch) for ch in c["block_out_channels"]]
    levels = len(boc)
    mult = _channel_mult(boc, m)
    # block types -> levels with transformers; the up blocks must mirror the down blocks
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if len(down) != levels or len(up) != levels:
        raise _refuse(m, "down_block_types", down, "need one down and one up block per level")
    for field, types in (("down_block_types", down), ("up_block_types", up)):
        kind = field.split("_")[0].capitalize()
        bad = [t for t in types if t not in (f"CrossAttn{kind}Block2D", f"{kind}Block2D")]
        if bad:
            raise _refuse(m, field, types, f"unsupported block types {bad}")
    attention_levels = [lv for lv, t in enumerate(down) if t.startswith("CrossAttn")]
    if [lv for lv, t in enumerate(reversed(up)) if t.startswith("CrossAttn")] != attention_levels:
        raise _refuse(m, "up_block_types", up, "must mirror down_block_types")
    if any(_per_level(c["only_cross_attention"], levels, "only_cross_attention", m)):
        raise _refuse(m, "only_cross_attention", c["only_cross_attention"])
    # one cross-attention width; the mid block always cross-attends
    cross = _per_level(c["cross_attention_dim"], levels, "cross_attention_dim", m)
    if len(set(cross)) != 1 or not isinstance(cross[0], int):
        raise _refuse(m, "cross_attention_dim", c["cross_attention_dim"], "one int for all levels")
    # blocks per level and transformer depths (the mid block uses the last level's depth)
    layers = _per_level(c["layers_per_block"], levels, "layers_per_block", m)
    depths = _per_level(
        c["transformer_layers_per_block"], levels, "transformer_layers_per_block", m
    )
    for field, values in (("layers_per_block", layers), ("transformer_layers_per_block", depths)):
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
            raise _refuse(m, field, c[field], "one int >= 1 per level")
    num_heads, head_channels = _heads_from_diffusers(
        c["attention_head_dim"], boc, sorted(set(attention_levels) | {levels - 1}), m
    )
    if c["time_embedding_dim"] not in (None, 4 * boc[0]):
        raise _refuse(m, "time_embedding_dim", c["time_embedding_dim"], "ldmkit uses 4 x channels")
    # class labels (nn.Embedding) or SDXL's vector (text_time) embedding
    num_classes = vector_dim = None
    if c["num_class_embeds"] is not None:
        if c["num_class_embeds"] < 1 or c["addition_embed_type"] is not None:
            raise _refuse(m, "num_class_embeds", c["num_class_embeds"], "one label embedding only")
        num_classes = c["num_class_embeds"] - 1  # ldmkit counts the extra "null" row itself
    if c["addition_embed_type"] == "text_time":
        if c["addition_time_embed_dim"] != _SDXL_TIME_EMBED_DIM:
            raise _refuse(m, "addition_time_embed_dim", c["addition_time_embed_dim"], "must be 256")
        if c["projection_class_embeddings_input_dim"] is None:
            raise _refuse(m, "projection_class_embeddings_input_dim", None, "text_time needs it")
        vector_dim = c["projection_class_embeddings_input_dim"]
    else:
        for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if c[field] is not None:
                raise _refuse(m, field, c[field], "only used with addition_embed_type='text_time'")
    _check_groups(boc, c["norm_num_groups"], f"diffusers {m} config norm_num_groups")
    # inpainting / upscaling: the extra input channels are ldmkit's concat channels
    concat = max(c["in_channels"] - c["out_channels"], 0)
    in_channels = c["in_channels"] - concat
    cfg = UNetConfig(
        in_channels=in_channels,
        out_channels=None if c["out_channels"] == in_channels else c["out_channels"],
        model_channels=boc[0],
        channel_mult=mult,
        num_res_blocks=_simplify(layers),
        attention_levels=tuple(attention_levels),
        num_heads=num_heads,
        num_head_channels=head_channels,
        transformer_depth=_simplify(depths),
        context_dim=cross[0],
        use_linear_in_transformer=bool(c["use_linear_projection"]),
        upcast_attention=bool(c["upcast_attention"]),
        use_scale_shift_norm=c["resnet_time_scale_shift"] == "scale_shift",
        num_classes=num_classes,
        vector_dim=vector_dim,
        concat_channels=concat,
        norm_groups=c["norm_num_groups"],
    )
    cfg.validate()
    return cfg


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int | None = None) -> dict[str, Any]:
    """``UNetConfig`` -> a complete diffusers ``UNet2DConditionModel`` config dict.

    Raises ValueError for ldmkit options diffusers cannot express (``dims != 2``,
    ``resblock_updown``, ``attention_position_embedding``, no cross-attention, ...).
    """
    cfg.validate()
    n = "UNetConfig"
    for field, bad, why in (
        ("dims", cfg.dims != 2, "diffusers' UNet2DConditionModel is 2-D"),
        ("resblock_updown", cfg.resblock_updown, "no cross-attention block resamples by ResBlock"),
        ("attention_position_embedding", cfg.attention_position_embedding, "not in diffusers"),
        ("context_dim", cfg.context_dim is None, "diffusers' transformers need cross-attention"),
        ("dropout", cfg.dropout != 0, "diffusers has no dropout in the transformers"),
        ("channel_mult", cfg.channel_mult[0] != 1, "conv_in must output level 0's channels"),
    ):
        if bad:
            raise _unsupported(n, field, getattr(cfg, field), why)
    levels = len(cfg.channel_mult)
    boc = [cfg.model_channels * mult for mult in cfg.channel_mult]
    attention = set(cfg.attention_levels)
    # transformer depths: diffusers' mid block takes the last level's depth
    depths = list(cfg.per_level(cfg.transformer_depth))
    mid = depths[-1] if cfg.transformer_depth_middle is None else cfg.transformer_depth_middle
    if mid < 1 or (levels - 1 in attention and depths[-1] != mid):
        why = "the mid block always has a transformer as deep as the last level's"
        raise _unsupported(n, "transformer_depth_middle", cfg.transformer_depth_middle, why)
    depths = [d if level in attention else 1 for level, d in enumerate(depths)][:-1] + [mid]
    _check_groups(boc, cfg.norm_groups, f"{n} norm_groups")
    # diffusers' attention_head_dim = heads: one int, or per level (unused where no attention)
    if cfg.num_head_channels is not None:
        heads: int | list[int] = [max(ch // cfg.num_head_channels, 1) for ch in boc]
    else:
        heads = cfg.num_heads
    out = dict(_UNET_DEFAULTS, _class_name="UNet2DConditionModel")
    out.update(
        sample_size=sample_size,
        in_channels=cfg.in_channels + cfg.concat_channels,
        out_channels=cfg.out_channels or cfg.in_channels,
        down_block_types=[
            "CrossAttnDownBlock2D" if lv in attention else "DownBlock2D" for lv in range(levels)
        ],
        up_block_types=[
            "CrossAttnUpBlock2D" if lv in attention else "UpBlock2D"
            for lv in reversed(range(levels))
        ],
        block_out_channels=boc,
        layers_per_block=_as_json(cfg.num_res_blocks),
        norm_num_groups=cfg.norm_groups,
        cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=_as_json(_simplify(depths)),
        attention_head_dim=heads,
        use_linear_projection=cfg.use_linear_in_transformer,
        upcast_attention=cfg.upcast_attention,
        resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
        num_class_embeds=None if cfg.num_classes is None else cfg.num_classes + 1,
    )
    if cfg.vector_dim is not None:
        out.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=cfg.vector_dim,
        )
    return out


def _as_json(value: int | tuple[int, ...]) -> int | list[int]:
    return value if isinstance(value, int) else list(value)


# AutoencoderKL's constructor defaults, and the values ldmkit's AutoencoderKL implements
_VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# force_upcast is a precision hint, not architecture: ldmkit keeps the VAE in fp32 by default
_VAE_ACCEPTED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "latents_mean": (None,),
    "latents_std": (None,),
    "force_upcast": (True, False),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True, False),
}


def vae_config_from_diffusers(config: Mapping[str, Any]) -> AutoencoderConfig:
    """diffusers ``AutoencoderKL`` ``config.json`` dict -> ``AutoencoderConfig`` (kind "kl").

    Raises ValueError naming the field for anything ldmkit's AutoencoderKL cannot express.
    """
    m = "AutoencoderKL"
    c = _read_config(config, _VAE_DEFAULTS, m)
    _check_accepted(c, _VAE_ACCEPTED, m)
    boc = [int(ch) for ch in c["block_out_channels"]]
    for field, block in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        if list(c[field]) != [block] * len(boc):
            raise _refuse(m, field, c[field], f"needs {block} for each of {len(boc)} levels")
    layers = c["layers_per_block"]
    if not isinstance(layers, int) or isinstance(layers, bool):
        raise _refuse(m, "layers_per_block", layers, "one int")
    _check_groups(boc, c["norm_num_groups"], f"diffusers {m} config norm_num_groups")
    cfg = AutoencoderConfig(
        kind="kl",
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        base_channels=boc[0],
        channel_mult=_channel_mult(boc, m),
        num_res_blocks=layers,
        latent_channels=c["latent_channels"],
        mid_attention=bool(c["mid_block_add_attention"]),
        norm_groups=c["norm_num_groups"],
        scaling_factor=float(c["scaling_factor"]),
        shift_factor=0.0 if c["shift_factor"] is None else float(c["shift_factor"]),
    )
    cfg.validate()
    return cfg


def vae_config_to_diffusers(
    cfg: AutoencoderConfig, sample_size: int | None = None
) -> dict[str, Any]:
    """``AutoencoderConfig`` (kind "kl") -> a complete diffusers ``AutoencoderKL`` config dict."""
    cfg.validate()
    n = "AutoencoderConfig"
    for field, bad, why in (
        ("kind", cfg.kind != "kl", "diffusers' AutoencoderKL is the KL autoencoder"),
        ("dims", cfg.dims != 2, "diffusers' AutoencoderKL is 2-D"),
        ("dropout", cfg.dropout != 0, "diffusers' AutoencoderKL has no dropout"),
        ("channel_mult", cfg.channel_mult[0] != 1, "conv_in must output level 0's channels"),
    ):
        if bad:
            raise _unsupported(n, field, getattr(cfg, field), why)
    boc = [cfg.base_channels * mult for mult in cfg.channel_mult]
    _check_groups(boc, cfg.norm_groups, f"{n} norm_groups")
    out = dict(_VAE_DEFAULTS, _class_name="AutoencoderKL")
    out.update(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=["DownEncoderBlock2D"] * len(boc),
        up_block_types=["UpDecoderBlock2D"] * len(boc),
        block_out_channels=boc,
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor or None,  # diffusers writes "no shift" as None
        mid_block_add_attention=cfg.mid_attention,
    )
    if sample_size is not None:
        out["sample_size"] = sample_size
    return out
