"""The diffusers layout of ldmkit's UNet and KL autoencoder: state-dict keys and configs.

ldmkit's ``UNet`` and ``AutoencoderKL`` use the CompVis / original Stable Diffusion module
tree; diffusers (``UNet2DConditionModel``, ``AutoencoderKL``) names the same layers by block
(``down_blocks.i.resnets.j``) instead of by running index (``input_blocks.n.0``). The key maps
here are config-free: the block structure (ResBlocks per level, levels with transformers,
downsamplers) is read from the keys themselves. Tensors are passed through unchanged (same
objects) except the VAE attention projections, which are Linear in diffusers and 1x1 convs in
ldmkit and are reshaped as views.

The config maps (``diffusers_config``, re-exported here) translate diffusers' ``config.json``
dicts to ``UNetConfig`` / ``AutoencoderConfig`` and back.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

from ldmkit.interop.diffusers_config import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
)

__all__ = [
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "unet_keys_from_diffusers",
    "unet_keys_to_diffusers",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
    "vae_keys_from_diffusers",
    "vae_keys_to_diffusers",
]

_PARAMS = ("weight", "bias")
# diffusers ResnetBlock2D submodule -> CompVis ResBlock submodule (UNet)
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# inside a transformer (diffusers Transformer2DModel = CompVis SpatialTransformer) the names agree
_TRANSFORMER_INNER = re.compile(
    r"(norm|proj_in|proj_out|transformer_blocks\.\d+\."
    r"(norm[123]|attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))\.(weight|bias)"
)
_DIFFUSERS_TRANSFORMER = re.compile(
    r"((?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.0)\.(.+)"
)
_LDMKIT_TRANSFORMER = re.compile(r"((?:input|output)_blocks\.\d+\.\d+|middle_block\.\d+)\.(.+)")


# ---------------------------------------------------------------------------------------------
# key renaming
# ---------------------------------------------------------------------------------------------
def _rename(
    sd: Mapping[str, Tensor],
    modules: Mapping[str, str],
    transformers: Mapping[str, str],
    transformer_re: re.Pattern[str] | None,
    what: str,
) -> dict[str, Tensor]:
    """Rename ``module.param`` keys by a module table (plus transformer prefixes); refuse the rest."""
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module in modules and param in _PARAMS:
            new = f"{modules[module]}.{param}"
        elif (
            transformer_re is not None
            and (m := transformer_re.fullmatch(key))
            and m[1] in transformers
            and _TRANSFORMER_INNER.fullmatch(m[2])
        ):
            new = f"{transformers[m[1]]}.{m[2]}"
        else:
            unmapped.append(key)
            continue
        if new in out:
            raise ValueError(f"{what}: two keys map to {new!r} (the second is {key!r})")
        out[new] = value
    if unmapped:
        shown = ", ".join(unmapped[:10])
        more = f" (and {len(unmapped) - 10} more)" if len(unmapped) > 10 else ""
        raise ValueError(f"{what}: {len(unmapped)} keys cannot be mapped: {shown}{more}")
    return out


def _invert(table: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


@dataclass(frozen=True)
class _UNetLayout:
    """Block structure of a UNet: ResBlocks per level, levels with transformers, mid transformer."""

    res_blocks: tuple[int, ...]
    attention: tuple[bool, ...]
    mid_attention: bool


def _unet_tables(layout: _UNetLayout) -> tuple[dict[str, str], dict[str, str]]:
    """diffusers -> ldmkit module paths: (leaf modules, transformer prefixes)."""
    modules = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",  # SDXL vector embedding
        "add_embedding.linear_2": "label_emb.0.2",
        "class_embedding": "label_emb",  # nn.Embedding of class labels
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    transformers: dict[str, str] = {}

    def block(diffusers: str, ldmkit: str, attention: bool) -> None:
        """A ResBlock at ``ldmkit.0`` and, with ``attention``, its transformer at ``ldmkit.1``."""
        for d, c in _UNET_RESNET.items():
            modules[f"{diffusers}.{d}"] = f"{ldmkit}.0.{c}"
        if attention:
            transformers[diffusers.replace("resnets", "attentions")] = f"{ldmkit}.1"

    # input blocks: stem conv, then per level its ResBlock(+transformer) blocks and a downsample
    levels, n = len(layout.res_blocks), 1
    for level, (count, attention) in enumerate(
        zip(layout.res_blocks, layout.attention, strict=True)
    ):
        for j in range(count):
            block(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{n}", attention)
            n += 1
        if level < levels - 1:
            modules[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    # middle block: ResBlock, transformer, ResBlock
    for d, c in _UNET_RESNET.items():
        modules[f"mid_block.resnets.0.{d}"] = f"middle_block.0.{c}"
        modules[f"mid_block.resnets.1.{d}"] = f"middle_block.{1 + layout.mid_attention}.{c}"
    if layout.mid_attention:
        transformers["mid_block.attentions.0"] = "middle_block.1"
    # output blocks: up_blocks[i] is level L-1-i, with one more ResBlock and a final upsample
    n = 0
    for i, level in enumerate(reversed(range(levels))):
        attention = layout.attention[level]
        for j in range(layout.res_blocks[level] + 1):
            block(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}", attention)
            if level and j == layout.res_blocks[level]:
                modules[f"up_blocks.{i}.upsamplers.0.conv"] = (
                    f"output_blocks.{n}.{1 + attention}.conv"
                )
            n += 1
    return modules, transformers


def _diffusers_unet_layout(keys: Iterable[str]) -> _UNetLayout:
    """Read the block structure from diffusers keys; refuse layouts ldmkit's UNet cannot build."""
    found: dict[tuple[str, int, str], set[int]] = defaultdict(set)
    pattern = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.")
    mid = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.")
    for key in keys:
        if m := pattern.match(key):
            found[(m[1], int(m[2]), m[3])].add(int(m[4]))
        elif m := mid.match(key):
            found[("mid_block", 0, m[1])].add(int(m[2]))
    levels = 1 + max((i for b, i, _ in found if b != "mid_block"), default=-1)
    res = tuple(len(found[("down_blocks", level, "resnets")]) for level in range(levels))
    attention = tuple(bool(found[("down_blocks", level, "attentions")]) for level in range(levels))
    for level in range(levels):
        up = levels - 1 - level
        down_res = found[("down_blocks", level, "resnets")]
        down_attn = found[("down_blocks", level, "attentions")]
        up_res = found[("up_blocks", up, "resnets")]
        up_attn = found[("up_blocks", up, "attentions")]
        if (
            down_res != set(range(res[level]))
            or down_attn not in (set(), down_res)
            or up_res != set(range(res[level] + 1))
            or up_attn != (up_res if attention[level] else set())
        ):
            raise ValueError(
                f"diffusers UNet: down_blocks.{level} / up_blocks.{up} do not form an ldmkit level "
                f"(down resnets {sorted(down_res)}, attentions {sorted(down_attn)}; "
                f"up resnets {sorted(up_res)}, attentions {sorted(up_attn)})"
            )
    mid_res, mid_attn = found[("mid_block", 0, "resnets")], found[("mid_block", 0, "attentions")]
    if mid_res != {0, 1} or mid_attn not in (set(), {0}):
        raise ValueError(
            f"diffusers UNet: mid_block needs resnets 0, 1 and at most attention 0, got resnets "
            f"{sorted(mid_res)}, attentions {sorted(mid_attn)}"
        )
    return _UNetLayout(res, attention, bool(mid_attn))


def _ldmkit_unet_layout(keys: Iterable[str]) -> _UNetLayout:
    """Read the block structure from ldmkit (CompVis) keys."""
    parts: dict[tuple[str, int], dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    pattern = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.([^.]+)")
    mid = re.compile(r"middle_block\.(\d+)\.")
    mid_positions: set[int] = set()
    for key in keys:
        if m := pattern.match(key):
            parts[(m[1], int(m[2]))][int(m[3])].add(m[4])
        elif m := mid.match(key):
            mid_positions.add(int(m[1]))
    # input side: a downsample block (``op``) closes a level
    levels: list[list[bool]] = [[]]
    for (section, n), positions in sorted(parts.items()):
        if section == "input_blocks" and n > 0:
            if "op" in positions.get(0, ()):
                levels.append([])
            else:
                levels[-1].append(1 in positions)
    # output side: an upsample (a bare ``conv`` after the ResBlock) closes a level
    groups: list[list[bool]] = [[]]
    for (section, _), positions in sorted(parts.items()):
        if section != "output_blocks":
            continue
        if any(p > 0 and "in_layers" in names for p, names in positions.items()):
            raise ValueError("ldmkit UNet with resblock_updown has no diffusers layout")
        groups[-1].append(any(p > 0 and names != {"conv"} for p, names in positions.items()))
        if any(p > 0 and names == {"conv"} for p, names in positions.items()):
            groups.append([])
    if not groups[-1] and len(groups) > 1:
        groups.pop()
    res = tuple(len(level) for level in levels)
    attention = tuple(any(level) for level in levels)
    expected = [[attention[lv]] * (res[lv] + 1) for lv in reversed(range(len(levels)))]
    if any(any(level) != all(level) for level in levels) or groups != expected:
        raise ValueError(
            f"ldmkit UNet keys do not form a UNet layout (input levels {levels}, output {groups})"
        )
    if mid_positions not in ({0, 1}, {0, 1, 2}):
        raise ValueError(f"ldmkit UNet middle_block has blocks {sorted(mid_positions)}")
    return _UNetLayout(res, attention, len(mid_positions) == 3)


def unet_keys_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict -> ldmkit ``UNet`` (CompVis) keys."""
    modules, transformers = _unet_tables(_diffusers_unet_layout(sd))
    return _rename(sd, modules, transformers, _DIFFUSERS_TRANSFORMER, "diffusers UNet")


def unet_keys_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ldmkit ``UNet`` (CompVis) state dict -> diffusers ``UNet2DConditionModel`` keys."""
    modules, transformers = _unet_tables(_ldmkit_unet_layout(sd))
    return _rename(sd, _invert(modules), _invert(transformers), _LDMKIT_TRANSFORMER, "ldmkit UNet")


# VAE: diffusers ResnetBlock2D / mid attention submodule -> CompVis ResnetBlock / AttnBlock
_VAE_RESNET = {n: n for n in ("norm1", "conv1", "norm2", "conv2")} | {
    "conv_shortcut": "nin_shortcut"
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_VAE_ATTENTION_LEGACY = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def _vae_tables(encoder: list[int], decoder: list[int]) -> tuple[dict[str, str], set[str]]:
    """diffusers -> ldmkit module paths of a VAE with these ResnetBlocks per level (CompVis order),
    and the ldmkit modules whose weights are Linear in diffusers and 1x1 convs in ldmkit."""
    modules = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    linear: set[str] = set()

    def resnet(diffusers: str, ldmkit: str) -> None:
        modules.update({f"{diffusers}.{d}": f"{ldmkit}.{c}" for d, c in _VAE_RESNET.items()})

    for side in ("encoder", "decoder"):
        modules[f"{side}.conv_in"] = f"{side}.conv_in"
        modules[f"{side}.conv_norm_out"] = f"{side}.norm_out"
        modules[f"{side}.conv_out"] = f"{side}.conv_out"
        resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1")
        resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2")
        for d, c in _VAE_ATTENTION.items():
            modules[f"{side}.mid_block.attentions.0.{d}"] = f"{side}.mid.attn_1.{c}"
        linear.update(f"{side}.mid.attn_1.{c}" for c in ("q", "k", "v", "proj_out"))
    for i, count in enumerate(encoder):
        for j in range(count):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i < len(encoder) - 1:
            modules[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (
                f"encoder.down.{i}.downsample.conv"
            )
    # the decoder's up_blocks run coarse to fine; CompVis ``up[0]`` is the finest level
    for level, count in enumerate(decoder):
        i = len(decoder) - 1 - level
        for j in range(count):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}")
        if level > 0:
            modules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (
                f"decoder.up.{level}.upsample.conv"
            )
    return modules, linear


def _count_blocks(keys: Iterable[str], pattern: str) -> list[int]:
    """Blocks per level (``pattern`` captures level and block index)."""
    found: dict[int, set[int]] = defaultdict(set)
    for key in keys:
        if m := re.match(pattern, key):
            found[int(m[1])].add(int(m[2]))
    return [len(found[i]) for i in range(1 + max(found, default=-1))]


def vae_keys_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> ldmkit ``AutoencoderKL`` (CompVis) keys.

    Reads both current (``to_q``/``to_out.0``) and legacy (``query``/``proj_attn``) attention names.
    """
    encoder = _count_blocks(sd, r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.")
    decoder = _count_blocks(sd, r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.")[::-1]
    modules, linear = _vae_tables(encoder, decoder)
    for side in ("encoder", "decoder"):
        for d, c in _VAE_ATTENTION_LEGACY.items():
            modules[f"{side}.mid_block.attentions.0.{d}"] = f"{side}.mid.attn_1.{c}"
    out = _rename(sd, modules, {}, None, "diffusers VAE")
    for key, value in out.items():
        if key.rpartition(".")[0] in linear and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1] (a view)
    return out


def vae_keys_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ldmkit ``AutoencoderKL`` (CompVis) state dict -> diffusers ``AutoencoderKL`` keys."""
    encoder = _count_blocks(sd, r"encoder\.down\.(\d+)\.block\.(\d+)\.")
    decoder = _count_blocks(sd, r"decoder\.up\.(\d+)\.block\.(\d+)\.")
    modules, linear = _vae_tables(encoder, decoder)
    inverse = _invert(modules)
    out = _rename(sd, inverse, {}, None, "ldmkit VAE")
    for key, value in sd.items():
        module = key.rpartition(".")[0]
        if module in linear and key.endswith(".weight") and value.ndim > 2:
            out[f"{inverse[module]}.weight"] = value.flatten(1)  # 1x1 conv -> Linear (a view)
    return out
