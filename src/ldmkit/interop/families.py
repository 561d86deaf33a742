"""The Stable Diffusion families ldmkit loads: what each release needs around its weights.

A ``Family`` is the part of a checkpoint that its tensors do not record: prediction type,
default image size, latent scale, attention heads, how each text encoder is run, the training
noise schedule. The values follow the releases' original configs (CompVis ``v1-inference.yaml``,
Stability ``v2-inference(-v).yaml``, ``sd_xl_base.yaml``) and diffusers' model folders.
A UNet config belongs to a family when its weight-determined fields equal the family's
reference UNet (``unet_mismatch`` lists the differences).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ldmkit.autoencoders.base import AutoencoderConfig
from ldmkit.denoisers.unet import UNetConfig


@dataclass(frozen=True)
class TextEncoderSpec:
    """How a family runs one of its CLIP text encoders.

    ``layer`` is the hidden state fed to the UNet; ``final_norm`` whether the final LayerNorm is
    applied to it (SD 2 applies it to the penultimate layer, SDXL does not); ``with_projection``
    whether the pooled, projected text embedding is used (SDXL's ``vector`` conditioning).
    """

    name: Literal["text_encoder", "text_encoder_2"]
    prefix: str  # key prefix in an original single-file checkpoint
    layout: Literal["hf", "openclip"]  # HF CLIPTextModel keys or OpenCLIP text-tower keys
    hidden_act: Literal["quick_gelu", "gelu"]
    layer: Literal["last", "penultimate"]
    final_norm: bool
    with_projection: bool
    pad_token: str  # "<|endoftext|>" (OpenAI CLIP) or "!" (id 0, OpenCLIP's zero padding)
    width: int  # hidden size, checked against the token embedding


@dataclass(frozen=True)
class SchedulerSpec:
    """Discrete DDPM training schedule and inference spacing (diffusers field names).

    All SD 1.x/2.x/XL releases train with these betas. SDXL too samples with "leading" spacing
    and ``steps_offset=1``: its diffusers ``scheduler_config.json`` (EulerDiscreteScheduler) says
    so, as does the ``SCHEDULER_DEFAULT_CONFIG`` diffusers' single-file loader builds SDXL's
    Euler scheduler from.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # betas = linspace(sqrt(start), sqrt(end)) ** 2
    timestep_spacing: str = "leading"
    steps_offset: int = 1


@dataclass(frozen=True)
class Family:
    """A Stable Diffusion release family: what the weights need around them to run.

    ``downsample`` is the pixel multiple height and width need: the VAE's factor 8, as in
    diffusers' pipelines (``height % 8``). The UNet adds none: like diffusers'
    ``forward_upsample_size``, ldmkit's ``UNet`` upsamples to each skip connection's size, so
    latents need not be multiples of ``2 ** (levels - 1)`` (64 px for SD 1.x/2.x, 32 for SDXL).
    """

    name: str
    description: str
    prediction: Literal["eps", "v"]
    image_size: int
    vae_scaling_factor: float
    num_heads: int | None  # SD 1.x: 8 heads per transformer
    num_head_channels: int | None  # SD 2.x / XL: 64 channels per head
    text_encoders: tuple[TextEncoderSpec, ...]
    scheduler: SchedulerSpec = SchedulerSpec()
    size_conditioning: bool = False  # SDXL micro-conditioning (original/crop/target sizes)
    downsample: int = 8
    context_dim: int = 768
    vector_dim: int | None = None
    concat_channels: int = 0  # inpainting: mask + masked-image latent
    # fp32 attention: SD 2.x overflows in fp16 (ComfyUI upcasts all SD 2.x; diffusers' 2.1 does)
    upcast_attention: bool = False

    def unet_heads(self) -> dict[str, int | None]:
        """``num_heads``/``num_head_channels`` keywords for ``infer_unet_config``."""
        return {"num_heads": self.num_heads, "num_head_channels": self.num_head_channels}

    def scheduler_config(self) -> dict[str, Any]:
        """The schedule as a diffusers ``scheduler_config.json`` dict, prediction included."""
        out: dict[str, Any] = dataclasses.asdict(self.scheduler)
        out["prediction_type"] = {"eps": "epsilon", "v": "v_prediction"}[self.prediction]
        return {**out, "clip_sample": False, "set_alpha_to_one": False}


_CLIP_L = "<|endoftext|>"
_SD1_TE = (
    TextEncoderSpec(
        "text_encoder", "cond_stage_model.transformer.", "hf", "quick_gelu", "last", True,
        False, _CLIP_L, 768,
    ),
)  # fmt: skip
_SD2_TE = (
    TextEncoderSpec(
        "text_encoder", "cond_stage_model.model.", "openclip", "gelu", "penultimate", True,
        False, "!", 1024,
    ),
)  # fmt: skip
_SDXL_TE = (
    TextEncoderSpec(
        "text_encoder", "conditioner.embedders.0.transformer.", "hf", "quick_gelu",
        "penultimate", False, False, _CLIP_L, 768,
    ),
    TextEncoderSpec(
        "text_encoder_2", "conditioner.embedders.1.model.", "openclip", "gelu", "penultimate",
        False, True, "!", 1280,
    ),
)  # fmt: skip
_SD1 = dict(num_heads=8, num_head_channels=None, text_encoders=_SD1_TE, vae_scaling_factor=0.18215)
_SD2 = dict(
    num_heads=None, num_head_channels=64, text_encoders=_SD2_TE, vae_scaling_factor=0.18215,
    context_dim=1024, upcast_attention=True,
)  # fmt: skip
_XL = dict(
    num_heads=None, num_head_channels=64, text_encoders=_SDXL_TE, vae_scaling_factor=0.13025,
    image_size=1024, size_conditioning=True, context_dim=2048, vector_dim=2816,
)  # fmt: skip
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd1", "Stable Diffusion 1.x (CLIP ViT-L/14)", "eps", 512, **_SD1),
        Family("sd1-inpaint", "SD 1.x inpainting", "eps", 512, concat_channels=5, **_SD1),
        Family("sd2", "SD 2.x 512-px base, eps (OpenCLIP ViT-H/14)", "eps", 512, **_SD2),
        Family("sd2-v", "SD 2.x 768-px, v-prediction (OpenCLIP ViT-H/14)", "v", 768, **_SD2),
        Family("sd2-inpaint", "SD 2.x inpainting", "eps", 512, concat_channels=5, **_SD2),
        Family("sdxl", "SDXL 1.0 base (CLIP ViT-L + OpenCLIP bigG)", "eps", **_XL),
        Family("sdxl-inpaint", "SDXL inpainting", "eps", concat_channels=5, **_XL),
    )
}


def family_unet_config(family: Family | str) -> UNetConfig:
    """The reference UNet architecture of a family (heads and fp32 attention included)."""
    f = FAMILIES[family] if isinstance(family, str) else family
    levels = dict(channel_mult=(1, 2, 4, 4), attention_levels=(0, 1, 2), transformer_depth=1)
    if f.size_conditioning:
        levels = dict(channel_mult=(1, 2, 4), attention_levels=(1, 2), transformer_depth=(0, 2, 10))
    return UNetConfig(
        in_channels=4, model_channels=320, num_res_blocks=2, **levels,
        num_heads=f.num_heads or 8, num_head_channels=f.num_head_channels,
        context_dim=f.context_dim, use_linear_in_transformer=f.context_dim != 768,
        upcast_attention=f.upcast_attention, vector_dim=f.vector_dim,
        concat_channels=f.concat_channels,
    )  # fmt: skip


def family_vae_config(family: Family | str) -> AutoencoderConfig:
    """The (shared) SD VAE: f=8, 4 latent channels, with the family's latent scale."""
    f = FAMILIES[family] if isinstance(family, str) else family
    return AutoencoderConfig(
        base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4,
        scaling_factor=f.vae_scaling_factor,
    )  # fmt: skip


def family_for_prediction(family: Family, prediction: str) -> Family:
    """``family`` with ``prediction`` ("eps" or "v"): sd2 <-> sd2-v, otherwise the same family
    with only ``prediction`` changed (a v-prediction fine-tune of SD 1.x or SDXL)."""
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    if prediction == family.prediction:
        return family
    sibling = {"sd2": "sd2-v", "sd2-v": "sd2"}.get(family.name)
    if sibling is not None:
        return FAMILIES[sibling]
    return dataclasses.replace(family, prediction=prediction)  # type: ignore[arg-type]


# -- matching a UNet config to a family ------------------------------------------------------
def unet_architecture(c: UNetConfig) -> dict[str, Any]:
    """The weight-determined fields of a UNet config, in one normal form."""
    depths = c.per_level(c.transformer_depth)
    levels = tuple(sorted(c.attention_levels))
    return dict(
        in_channels=c.in_channels, concat_channels=c.concat_channels,
        out_channels=c.out_channels or c.in_channels, model_channels=c.model_channels,
        channel_mult=tuple(c.channel_mult), num_res_blocks=c.per_level(c.num_res_blocks),
        attention_levels=levels, transformer_depth=tuple(depths[i] for i in levels),
        transformer_depth_middle=depths[-1]
        if c.transformer_depth_middle is None
        else c.transformer_depth_middle,
        context_dim=c.context_dim, use_linear_in_transformer=c.use_linear_in_transformer,
        use_scale_shift_norm=c.use_scale_shift_norm, resblock_updown=c.resblock_updown,
        num_classes=c.num_classes, vector_dim=c.vector_dim, dims=c.dims,
    )  # fmt: skip


def unet_structure(c: UNetConfig) -> dict[str, Any]:
    """What a family's conventions rely on, whatever the sizes: channels, conditioning inputs."""
    return dict(
        in_channels=c.in_channels, out_channels=c.out_channels or c.in_channels,
        concat_channels=c.concat_channels, cross_attention=c.context_dim is not None,
        vector_conditioning=c.vector_dim is not None, class_labels=c.num_classes is not None,
        use_linear_in_transformer=c.use_linear_in_transformer, dims=c.dims,
    )  # fmt: skip


def unet_mismatch(cfg: UNetConfig, family: Family, *, exact: bool = True) -> list[str]:
    """How ``cfg`` differs from the family's release UNet (``exact``) or from its structure
    (``exact=False``: sizes free, e.g. a small model trained in a family's layout)."""
    view = unet_architecture if exact else unet_structure
    got, want = view(cfg), view(family_unet_config(family))
    return [f"{k} {got[k]} (expected {want[k]})" for k in want if got[k] != want[k]]


def match_family(cfg: UNetConfig, what: str) -> Family:
    """The first family whose release UNet is ``cfg``'s architecture, else a clear error."""
    matches = [f for f in FAMILIES.values() if not unet_mismatch(cfg, f)]
    if matches:
        return matches[0]
    if cfg.context_dim == 1280 and cfg.vector_dim == 2560:
        raise ValueError(
            f"SDXL refiner layout detected ({what}); the refiner is not supported: it has one "
            "OpenCLIP bigG text encoder, model_channels 384 and aesthetic-score conditioning "
            "(vector_dim 2560). Supported: " + ", ".join(FAMILIES)
        )
    closest = min(FAMILIES.values(), key=lambda f: len(unet_mismatch(cfg, f)))
    raise ValueError(
        f"unknown or unsupported UNet layout ({what}); closest family {closest.name!r} "
        f"differs in: {'; '.join(unet_mismatch(cfg, closest))}. Supported: "
        f"{', '.join(FAMILIES)}; a UNet of another size in a family's layout loads with family="
    )


def fit_family(cfg: UNetConfig, name: str, what: str) -> Family:
    """The forced family ``name`` if ``cfg`` has its structure (any sizes), else a clear error."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    if diff := unet_mismatch(cfg, FAMILIES[name], exact=False):
        raise ValueError(f"the UNet does not fit family {name!r}: {'; '.join(diff)} ({what})")
    return FAMILIES[name]


def family_for_diffusers(
    unet: UNetConfig,
    *,
    two_encoders: bool,
    prediction: str = "eps",
    hidden_act: str | None = None,
    image_size: int | None = None,
    name: str | None = None,
) -> Family:
    """The family of a diffusers folder from its UNet config (converted to ldmkit's) and facts
    of the folder: a second text encoder (SDXL), the first text encoder's ``hidden_act`` (gelu:
    SD 2.x), concat channels (inpainting), the scheduler's prediction ("eps"/"v") and the UNet's
    ``sample_size`` (``image_size``, latent pixels: times 8 it replaces the family's default
    image size when they differ). Sizes are free: the folder's configs hold them. ``name``
    forces the family (its prediction wins); the UNet must still have its structure."""
    what = f"diffusers UNet: {unet.in_channels}+{unet.concat_channels} input channels, " + (
        f"model_channels {unet.model_channels}, context_dim {unet.context_dim}, "
        f"vector_dim {unet.vector_dim}"
    )
    if name is None:
        if unet.vector_dim is not None and not two_encoders:
            raise ValueError(
                f"vector conditioning with one text encoder ({what}): an SDXL refiner layout, "
                "not supported"
            )
        linear = unet.use_linear_in_transformer
        sd2 = hidden_act == "gelu" or (hidden_act is None and linear)
        base = "sdxl" if two_encoders else "sd2" if sd2 else "sd1"
        name = base + ("-inpaint" if unet.concat_channels else "")
        family = family_for_prediction(fit_family(unet, name, what), prediction)
    else:
        family = fit_family(unet, name, what)
    if (len(family.text_encoders) == 2) != two_encoders:
        raise ValueError(
            f"family {family.name!r} has {len(family.text_encoders)} text encoder(s) but the "
            f"folder {'has' if two_encoders else 'has no'} text_encoder_2"
        )
    act = family.text_encoders[0].hidden_act
    if hidden_act is not None and hidden_act != act:
        raise ValueError(f"text_encoder hidden_act {hidden_act!r}; {family.name} uses {act!r}")
    if image_size is not None and image_size * 8 != family.image_size:
        family = dataclasses.replace(family, image_size=image_size * 8)
    return family
