"""Family detection and config inference from Stable Diffusion checkpoint keys and shapes.

Shape dicts come from ldmkit networks built on the meta device (no memory) in the real
full-size layouts, plus a handful of fake text-encoder keys with the right shapes.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import pytest
import torch

from ldmkit.autoencoders.base import AutoencoderConfig
from ldmkit.autoencoders.kl import AutoencoderKL
from ldmkit.denoisers.unet import UNet, UNetConfig
from ldmkit.interop.detect import (
    FAMILIES,
    Detection,
    detect,
    family_for_diffusers,
    family_for_prediction,
    family_unet_config,
    family_vae_config,
    guess_unet_heads,
    infer_unet_config,
    infer_vae_config,
    split_single_file,
)

# -- the real layouts, written out independently of the family table -------------------------
SD15 = dict(
    model_channels=320, channel_mult=(1, 2, 4, 4), attention_levels=(0, 1, 2), num_heads=8,
    context_dim=768,
)  # fmt: skip
SD21 = dict(
    model_channels=320, channel_mult=(1, 2, 4, 4), attention_levels=(0, 1, 2),
    num_head_channels=64, context_dim=1024, use_linear_in_transformer=True,
)  # fmt: skip
SDXL = dict(
    model_channels=320, channel_mult=(1, 2, 4), attention_levels=(1, 2),
    transformer_depth=(0, 2, 10), num_head_channels=64, context_dim=2048,
    use_linear_in_transformer=True, vector_dim=2816,
)  # fmt: skip
REFINER = dict(
    model_channels=384, channel_mult=(1, 2, 4, 4), attention_levels=(1, 2), transformer_depth=4,
    num_head_channels=64, context_dim=1280, use_linear_in_transformer=True, vector_dim=2560,
)  # fmt: skip
ORIGINALS = {
    "sd1": UNetConfig(**SD15),
    "sd1-inpaint": UNetConfig(**SD15, concat_channels=5),
    "sd2": UNetConfig(**SD21),
    "sd2-inpaint": UNetConfig(**SD21, concat_channels=5),
    "sdxl": UNetConfig(**SDXL),
    "sdxl-inpaint": UNetConfig(**SDXL, concat_channels=5),
    "refiner": UNetConfig(**REFINER),
}
SD_VAE = dict(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4)


@cache
def unet_shapes(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = UNet(ORIGINALS[name])
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def model_shapes(model_cls: type, cfg: object) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = model_cls(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@cache
def vae_shapes() -> dict[str, tuple[int, ...]]:
    return model_shapes(AutoencoderKL, AutoencoderConfig(**SD_VAE))


def hf_clip(width: int) -> dict[str, tuple[int, ...]]:
    p = "text_model."
    return {
        f"{p}embeddings.token_embedding.weight": (49408, width),
        f"{p}embeddings.position_embedding.weight": (77, width),
        f"{p}embeddings.position_ids": (1, 77),
        f"{p}encoder.layers.0.self_attn.q_proj.weight": (width, width),
        f"{p}encoder.layers.0.mlp.fc1.weight": (4 * width, width),
        f"{p}encoder.layers.11.mlp.fc2.weight": (width, 4 * width),
        f"{p}final_layer_norm.weight": (width,),
    }


def open_clip(width: int, layers: int) -> dict[str, tuple[int, ...]]:
    return {
        "token_embedding.weight": (49408, width),
        "positional_embedding": (77, width),
        "transformer.resblocks.0.attn.in_proj_weight": (3 * width, width),
        "transformer.resblocks.9.mlp.c_proj.bias": (width,),
        f"transformer.resblocks.{layers - 1}.mlp.c_proj.bias": (width,),
        "ln_final.weight": (width,),
        "text_projection": (width, width),
    }


TEXT = {  # family base -> {single-file prefix: raw text-encoder keys}
    "sd1": {"cond_stage_model.transformer.": hf_clip(768)},
    "sd2": {"cond_stage_model.model.": open_clip(1024, 24)},
    "sdxl": {
        "conditioner.embedders.0.transformer.": hf_clip(768),
        "conditioner.embedders.1.model.": open_clip(1280, 32),
    },
    "refiner": {"conditioner.embedders.0.model.": open_clip(1280, 32)},
}
EXTRA = {"model_ema.decay": (), "betas": (1000,), "alphas_cumprod": (1000,)}


def single_file(name: str, *, vae: bool = True, text: bool = True, **extra) -> dict:
    """A flat original-layout checkpoint of UNet ``name`` (shapes as values)."""
    state = {f"model.diffusion_model.{k}": v for k, v in unet_shapes(name).items()}
    if vae:
        state.update({f"first_stage_model.{k}": v for k, v in vae_shapes().items()})
    base = name.split("-")[0]
    for prefix, keys in (TEXT[base] if text else {}).items():
        state.update({prefix + k: v for k, v in keys.items()})
    return {**state, **EXTRA, **extra}


def expected_unet(name: str, family: str) -> UNetConfig:
    """The original config as ``detect`` returns it (SD 2.x attention upcast to fp32)."""
    return dataclasses.replace(ORIGINALS[name], upcast_attention=family.startswith("sd2"))


# -- the family table --------------------------------------------------------------------------
def test_family_table():
    assert list(FAMILIES) == [
        "sd1", "sd1-inpaint", "sd2", "sd2-v", "sd2-inpaint", "sdxl", "sdxl-inpaint",
    ]  # fmt: skip
    facts = {
        name: (f.prediction, f.image_size, f.vae_scaling_factor, f.num_heads, f.num_head_channels,
               f.size_conditioning, f.concat_channels, f.downsample)
        for name, f in FAMILIES.items()
    }  # fmt: skip
    assert facts["sd1"] == ("eps", 512, 0.18215, 8, None, False, 0, 8)
    assert facts["sd1-inpaint"] == ("eps", 512, 0.18215, 8, None, False, 5, 8)
    assert facts["sd2"] == ("eps", 512, 0.18215, None, 64, False, 0, 8)
    assert facts["sd2-v"] == ("v", 768, 0.18215, None, 64, False, 0, 8)
    assert facts["sdxl"] == ("eps", 1024, 0.13025, None, 64, True, 0, 8)
    assert facts["sdxl-inpaint"][-2] == facts["sd2-inpaint"][-2] == 5
    for f in FAMILIES.values():
        assert dataclasses.astuple(f.scheduler) == (
            1000, 0.00085, 0.012, "scaled_linear", "leading", 1,
        )  # fmt: skip
    eos = "<|endoftext|>"
    specs = {
        name: [(s.name, s.prefix, s.layout, s.hidden_act, s.layer, s.final_norm,
                s.with_projection, s.pad_token) for s in FAMILIES[name].text_encoders]
        for name in ("sd1", "sd2", "sdxl")
    }  # fmt: skip
    assert specs["sd1"] == [
        ("text_encoder", "cond_stage_model.transformer.", "hf", "quick_gelu", "last", True,
         False, eos),
    ]  # fmt: skip
    assert specs["sd2"] == [
        ("text_encoder", "cond_stage_model.model.", "openclip", "gelu", "penultimate", True,
         False, "!"),
    ]  # fmt: skip
    assert specs["sdxl"] == [
        ("text_encoder", "conditioner.embedders.0.transformer.", "hf", "quick_gelu",
         "penultimate", False, False, eos),
        ("text_encoder_2", "conditioner.embedders.1.model.", "openclip", "gelu", "penultimate",
         False, True, "!"),
    ]  # fmt: skip


def test_downsample_is_the_vae_factor_only():
    """A 4-level UNet (as SD 1.x/2.x) runs on latents that are no multiple of 8 (72 x 104 px)."""
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), attention_levels=(1,),
                     num_res_blocks=1, context_dim=8)  # fmt: skip
    out = UNet(cfg)(torch.randn(1, 4, 9, 13), torch.tensor([10]), context=torch.randn(1, 2, 8))
    assert out.shape == (1, 4, 9, 13)


@pytest.mark.parametrize("name", ["sd1", "sd1-inpaint", "sd2", "sd2-inpaint", "sdxl"])
def test_reference_configs_are_the_real_layouts(name):
    assert family_unet_config(name) == expected_unet(name, name)
    with torch.device("meta"):
        model = UNet(family_unet_config(name))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == unet_shapes(name)
    assert family_vae_config(name) == AutoencoderConfig(
        **SD_VAE, scaling_factor=FAMILIES[name].vae_scaling_factor
    )


# -- splitting ---------------------------------------------------------------------------------
def test_split_sd2_single_file():
    visual = {"cond_stage_model.model.visual.proj": (1280, 1024)}
    state = single_file("sd2", **visual, **{"cond_stage_model.model.logit_scale": ()})
    parts = split_single_file(state)
    assert set(parts) == {"unet", "vae", "text_encoder", "extra"}
    assert parts["unet"] == unet_shapes("sd2")
    assert parts["vae"] == vae_shapes()
    assert parts["text_encoder"] == open_clip(1024, 24)  # raw OpenCLIP layout
    assert parts["extra"] == {
        **EXTRA, **visual, "cond_stage_model.model.logit_scale": (),
    }  # fmt: skip


def test_split_sdxl_and_sd1_text_encoders():
    parts = split_single_file(single_file("sdxl", vae=False))
    assert set(parts) == {"unet", "text_encoder", "text_encoder_2", "extra"}
    assert parts["text_encoder"] == hf_clip(768)
    assert parts["text_encoder_2"] == open_clip(1280, 32)
    parts = split_single_file(single_file("sd1", vae=False))
    assert parts["text_encoder"] == hf_clip(768)


def test_split_lone_unet_and_vae_files():
    assert split_single_file(unet_shapes("sd1")) == {"unet": unet_shapes("sd1")}
    assert split_single_file(vae_shapes()) == {"vae": vae_shapes()}
    with_loss = {**vae_shapes(), "loss.logvar": ()}
    assert split_single_file(with_loss) == {"vae": vae_shapes(), "extra": {"loss.logvar": ()}}
    assert split_single_file({"foo.weight": (3,)}) == {"extra": {"foo.weight": (3,)}}


# -- detection of every family -----------------------------------------------------------------
@pytest.mark.parametrize(
    "name, family",
    [
        ("sd1", "sd1"),
        ("sd1-inpaint", "sd1-inpaint"),
        ("sd2", "sd2-v"),  # prediction unknown from the shapes: guessed v
        ("sd2-inpaint", "sd2-inpaint"),
        ("sdxl", "sdxl"),
        ("sdxl-inpaint", "sdxl-inpaint"),
    ],
)
def test_detect_full_size_families(name, family):
    found = detect(single_file(name))
    assert isinstance(found, Detection)
    assert found.family is FAMILIES[family]
    assert found.unet == expected_unet(name, family)
    assert found.vae == AutoencoderConfig(
        **SD_VAE, scaling_factor=FAMILIES[family].vae_scaling_factor
    )
    te = ("text_encoder", "text_encoder_2") if name.startswith("sdxl") else ("text_encoder",)
    assert found.components == ("unet", "vae", *te)
    guessed = any("prediction type guessed" in n for n in found.notes)
    assert guessed == (family == "sd2-v")
    if guessed:
        assert "prediction='eps'" in " ".join(found.notes)


def test_detect_accepts_split_and_tensors():
    parts = split_single_file(single_file("sd1"))
    assert detect(parts).family.name == "sd1"
    with torch.device("meta"):  # values with .shape work as well as shapes
        tensors = {k: torch.empty(v) for k, v in single_file("sd1", text=False).items()}
    assert detect(tensors).unet == ORIGINALS["sd1"]


def test_detect_lone_files():
    found = detect(unet_shapes("sdxl"))
    assert (found.family.name, found.vae, found.components) == ("sdxl", None, ("unet",))
    assert any("no VAE" in n for n in found.notes)
    assert any("no text_encoder_2" in n for n in found.notes)
    with pytest.raises(ValueError, match="cannot tell the family.*pass family=.*components: vae"):
        detect(vae_shapes())
    found = detect(vae_shapes(), family="sdxl")
    assert found.unet is None and found.vae.scaling_factor == 0.13025


# -- prediction type ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, extra, family",
    [
        ({}, {"v_pred": ()}, "sd2-v"),
        ({"global_step": 875000}, {}, "sd2"),
        ({}, {"global_step": 875000}, "sd2"),
        ({"global_step": 110000}, {}, "sd2-v"),
        ({"prediction": "eps"}, {}, "sd2"),
        ({"prediction": "v", "global_step": 875000}, {}, "sd2-v"),
        ({"family": "sd2"}, {}, "sd2"),
        ({"family": "sd2", "prediction": "v"}, {}, "sd2-v"),
        ({"family": "sd2-v", "prediction": "eps"}, {}, "sd2"),
    ],
)
def test_sd2_prediction_signals(kwargs, extra, family):
    found = detect(single_file("sd2", **extra), **kwargs)
    assert found.family is FAMILIES[family]
    assert not any("guessed" in n for n in found.notes)
    assert found.unet == expected_unet("sd2", "sd2")


@pytest.mark.parametrize("std, family", [(0.2, "sd2-v"), (0.01, "sd2")])
def test_sd2_comfyui_heuristic_with_values(std, family):
    key = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    bias = torch.randn(320, generator=torch.Generator().manual_seed(0)) * std
    state = single_file("sd2", **{f"model.diffusion_model.{key}": bias})
    found = detect(state)
    assert found.family is FAMILIES[family]
    assert any("ComfyUI's heuristic" in n for n in found.notes)


def test_v_prediction_of_other_families_and_forced_family_notes():
    found = detect(single_file("sdxl", v_pred=(), ztsnr=()))
    assert (found.family.name, found.family.prediction) == ("sdxl", "v")
    assert found.family.image_size == 1024
    notes = " ".join(found.notes)
    assert "v_pred" in notes and "not a release configuration" in notes and "ztsnr" in notes
    found = detect(single_file("sd1"), prediction="v")
    assert (found.family.name, found.family.prediction) == ("sd1", "v")
    found = detect(single_file("sd2", v_pred=()), family="sd2")
    assert found.family is FAMILIES["sd2"]
    assert any("suggests v" in n for n in found.notes)
    # inpainting models ignore the SD 2 step rule
    assert detect(single_file("sd2-inpaint"), global_step=110000).family.name == "sd2-inpaint"


# -- errors ------------------------------------------------------------------------------------
def test_refiner_is_rejected_with_what_was_found():
    with pytest.raises(ValueError) as err:
        detect(single_file("refiner", vae=True))
    msg = str(err.value)
    for part in ("SDXL refiner", "not supported", "context_dim 1280", "vector_dim 2560",
                 "model_channels 384", "text_encoder: openclip, width 1280"):  # fmt: skip
        assert part in msg


def test_unknown_layout():
    tiny = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), context_dim=64)
    state = {f"model.diffusion_model.{k}": v for k, v in model_shapes(UNet, tiny).items()}
    with pytest.raises(ValueError, match="unknown or unsupported UNet layout") as err:
        detect(state)
    assert "model_channels 32 (expected 320)" in str(err.value)
    assert "context_dim 64" in str(err.value)
    pix2pix = {  # instruct-pix2pix: 8 input channels = 4 + 4
        **single_file("sd1"),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3),
    }
    with pytest.raises(ValueError, match=r"concat_channels 4 \(expected 0\)"):
        detect(pix2pix)


@pytest.mark.parametrize(
    "name, family, message",
    [
        ("sd2", "sd1", r"not fit family 'sd1'.*use_linear_in_transformer True \(expected False"),
        ("sd1", "sdxl", r"does not fit family 'sdxl'.*vector_conditioning False \(expected True"),
        ("sd1", "sd1-inpaint", r"concat_channels 0 \(expected 5\)"),
    ],
)
def test_forced_family_must_fit(name, family, message):
    with pytest.raises(ValueError, match=message):
        detect(single_file(name), family=family)


def test_bad_arguments_and_markers():
    with pytest.raises(ValueError, match="unknown family 'sd3'; known: sd1"):
        detect(single_file("sd1"), family="sd3")
    with pytest.raises(ValueError, match="prediction must be 'eps' or 'v'"):
        detect(single_file("sd1"), prediction="x0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"EDM \(Playground v2.5\).*not supported"):
        detect(single_file("sdxl", edm_mean=(3,)))
    with pytest.raises(ValueError, match="diffusers-format keys: convert first"):
        detect({"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (1,)})


def test_text_encoders_must_match_the_family():
    state = single_file("sd1", text=False)
    state.update({f"cond_stage_model.model.{k}": v for k, v in open_clip(1024, 24).items()})
    with pytest.raises(
        ValueError, match="text_encoder is openclip width 1024.*expects hf width 768"
    ):
        detect(state)
    state = single_file("sd1")
    state.update({f"conditioner.embedders.1.model.{k}": v for k, v in open_clip(1280, 32).items()})
    with pytest.raises(ValueError, match="text_encoder_2 is openclip.*no such encoder"):
        detect(state)


def test_vae_must_match_the_family():
    small = AutoencoderConfig(base_channels=32, channel_mult=(1, 2), latent_channels=4)
    state = single_file("sd1", vae=False)
    state.update(
        {f"first_stage_model.{k}": v for k, v in model_shapes(AutoencoderKL, small).items()}
    )
    with pytest.raises(ValueError, match="the VAE does not fit family 'sd1'"):
        detect(state)


def test_shape_errors_name_the_keys():
    shapes = dict(unet_shapes("sd1"))
    shapes["output_blocks.11.1.proj_in.weight"] = (320, 320)  # linear where a 1x1 conv is
    shapes["stray.weight"] = (1,)
    del shapes["middle_block.2.out_layers.3.bias"]
    with pytest.raises(ValueError) as err:
        infer_unet_config(shapes, num_heads=8)
    msg = str(err.value)
    assert "1 missing keys (e.g. middle_block.2.out_layers.3.bias)" in msg
    assert "1 unexpected keys (e.g. stray.weight)" in msg
    assert "1 shape mismatches (output_blocks.11.1.proj_in.weight: file (320, 320) vs model" in msg
    with pytest.raises(ValueError, match="missing 'input_blocks.0.0.weight'"):
        infer_unet_config({"conv_in.weight": (320, 4, 3, 3)})
    vae = dict(vae_shapes())
    vae["encoder.mid.attn_1.q.weight"] = (512, 512)  # attention stored as Linear
    with pytest.raises(ValueError, match=r"hint: Linear-stored 1x1 conv weights"):
        infer_vae_config(vae, scaling_factor=0.18215)
    vq = dict(vae_shapes(), **{"quant_conv.weight": (4, 8, 1, 1)})
    with pytest.raises(ValueError, match="not a KL autoencoder"):
        infer_vae_config(vq, scaling_factor=1.0)


# -- inference is general (tiny layouts) -------------------------------------------------------
TINY = dict(model_channels=32, channel_mult=(1, 2), norm_groups=32)


@pytest.mark.parametrize(
    "cfg",
    [
        UNetConfig(**TINY, attention_levels=(1,), context_dim=16),
        UNetConfig(
            **TINY, attention_levels=(0, 1), transformer_depth=(1, 2), num_res_blocks=(1, 3)
        ),
        UNetConfig(**TINY, attention_levels=(), transformer_depth_middle=0, num_classes=10),
        UNetConfig(**TINY, attention_levels=(0,), use_scale_shift_norm=True, resblock_updown=True),
        UNetConfig(**TINY, attention_levels=(1,), transformer_depth_middle=3, vector_dim=12),
        UNetConfig(**TINY, attention_levels=(1,), use_linear_in_transformer=True, context_dim=8),
        UNetConfig(in_channels=3, out_channels=6, model_channels=16, channel_mult=(1, 2, 3)),
        UNetConfig(**TINY, in_channels=4, concat_channels=5, attention_levels=(), dims=1),
        UNetConfig(**TINY, attention_levels=(1,), dims=3, transformer_depth_middle=0),
    ],
)
def test_infer_tiny_unet_layouts(cfg):
    assert infer_unet_config(model_shapes(UNet, cfg), num_heads=cfg.num_heads) == cfg


def test_infer_unet_heads():
    cfg = UNetConfig(model_channels=20, channel_mult=(1, 3), attention_levels=(1,), num_heads=4)
    got = infer_unet_config(model_shapes(UNet, cfg))  # heads are not in the weights
    assert got.num_heads == 1 and dataclasses.replace(got, num_heads=4) == cfg
    got = infer_unet_config(unet_shapes("sd2"), num_head_channels=64)
    assert got == ORIGINALS["sd2"]


@pytest.mark.parametrize(
    "cfg",
    [
        AutoencoderConfig(**SD_VAE, scaling_factor=0.18215),
        AutoencoderConfig(
            base_channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=3
        ),
        AutoencoderConfig(
            base_channels=16,
            channel_mult=(1, 1, 2),
            latent_channels=16,
            mid_attention=False,
            in_channels=1,
            out_channels=1,
            dims=1,
        ),  # fmt: skip
    ],
)
def test_infer_vae_layouts(cfg):
    shapes = model_shapes(AutoencoderKL, cfg)
    assert infer_vae_config(shapes, scaling_factor=cfg.scaling_factor) == cfg


# -- helpers the loader uses, and diffusers as an oracle ---------------------------------------
def test_family_helpers():
    assert FAMILIES["sd1"].unet_heads() == {"num_heads": 8, "num_head_channels": None}
    assert FAMILIES["sdxl"].unet_heads() == {"num_heads": None, "num_head_channels": 64}
    for name in ("sd1", "sd2", "sdxl"):
        assert guess_unet_heads(unet_shapes(name)) == FAMILIES[name].unet_heads()
    tiny = UNetConfig(model_channels=20, channel_mult=(1, 3), attention_levels=(1,), num_heads=4)
    assert guess_unet_heads(model_shapes(UNet, tiny))["num_heads"] is None
    v = FAMILIES["sd2-v"].scheduler_config()
    assert (v["prediction_type"], v["timestep_spacing"], v["steps_offset"]) == (
        "v_prediction", "leading", 1,
    )  # fmt: skip
    assert FAMILIES["sdxl"].scheduler_config()["prediction_type"] == "epsilon"
    assert family_for_prediction(FAMILIES["sd2"], "v") is FAMILIES["sd2-v"]
    assert family_for_prediction(FAMILIES["sdxl"], "eps") is FAMILIES["sdxl"]
    assert family_for_prediction(FAMILIES["sdxl"], "v").prediction == "v"
    with pytest.raises(ValueError, match="prediction must be"):
        family_for_prediction(FAMILIES["sd1"], "x0")


def test_family_for_diffusers():
    sd2 = ORIGINALS["sd2"]
    fam = family_for_diffusers(sd2, two_encoders=False, prediction="v", hidden_act="gelu")
    assert fam is FAMILIES["sd2-v"]
    fam = family_for_diffusers(sd2, two_encoders=False, prediction="eps", image_size=96)
    assert (fam.name, fam.prediction, fam.image_size) == ("sd2", "eps", 768)
    fam = family_for_diffusers(ORIGINALS["sdxl"], two_encoders=True, image_size=128)
    assert fam is FAMILIES["sdxl"]
    inpaint = family_for_diffusers(ORIGINALS["sd2-inpaint"], two_encoders=False, hidden_act="gelu")
    assert inpaint is FAMILIES["sd2-inpaint"]
    # sizes are free (a diffusers folder's configs hold them): tiny models in each layout
    tiny = dict(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), context_dim=64)
    sd1 = UNetConfig(**tiny)
    assert family_for_diffusers(sd1, two_encoders=False, hidden_act="quick_gelu").name == "sd1"
    tiny_v = UNetConfig(**tiny, use_linear_in_transformer=True)
    assert family_for_diffusers(tiny_v, two_encoders=False, prediction="v").name == "sd2-v"
    tiny_xl = UNetConfig(**tiny, use_linear_in_transformer=True, vector_dim=1568)
    assert family_for_diffusers(tiny_xl, two_encoders=True).name == "sdxl"
    with pytest.raises(ValueError, match="has 1 text encoder.*has text_encoder_2"):
        family_for_diffusers(ORIGINALS["sd1"], two_encoders=True, name="sd1")
    with pytest.raises(ValueError, match="hidden_act 'gelu'; sd1 uses 'quick_gelu'"):
        family_for_diffusers(ORIGINALS["sd1"], two_encoders=False, hidden_act="gelu", name="sd1")
    with pytest.raises(ValueError, match=r"not fit family 'sd1'.*use_linear_in_transformer True"):
        family_for_diffusers(sd2, two_encoders=False, name="sd1")
    with pytest.raises(ValueError, match="SDXL refiner layout, not supported"):
        family_for_diffusers(ORIGINALS["refiner"], two_encoders=False)
    pix2pix = dataclasses.replace(ORIGINALS["sd1"], concat_channels=4)
    with pytest.raises(ValueError, match=r"concat_channels 4 \(expected 5\)"):
        family_for_diffusers(pix2pix, two_encoders=False)


def test_forced_family_accepts_other_sizes_in_its_layout():
    """A small model trained in SD 2.x's layout loads with family='sd2' (sizes noted)."""
    cfg = UNetConfig(
        model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), num_head_channels=16,
        context_dim=64, use_linear_in_transformer=True,
    )  # fmt: skip
    vae = AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1)
    state = {f"model.diffusion_model.{k}": v for k, v in model_shapes(UNet, cfg).items()}
    state.update({f"first_stage_model.{k}": v for k, v in model_shapes(AutoencoderKL, vae).items()})
    te = {f"cond_stage_model.model.{k}": v for k, v in open_clip(64, 2).items()}
    with pytest.raises(ValueError, match="unknown or unsupported UNet layout.*family="):
        detect({**state, **te})
    found = detect({**state, **te}, family="sd2")
    assert found.family is FAMILIES["sd2"]
    assert found.unet == dataclasses.replace(cfg, num_head_channels=None, upcast_attention=True)
    assert found.vae == dataclasses.replace(vae, scaling_factor=0.18215)
    notes = " ".join(found.notes)
    assert "structure but not the release's sizes (model_channels 32 (expected 320)" in notes
    assert "heads" in notes and "VAE's sizes are not the release's" in notes
    wide = {f"cond_stage_model.model.{k}": v for k, v in open_clip(96, 2).items()}
    with pytest.raises(
        ValueError, match=r"widths \[96\] do not add up to the UNet's context_dim 64"
    ):
        detect({**state, **wide}, family="sd2")


@pytest.mark.parametrize(
    "name, diffusers_type",
    [
        ("sd1", "v1"),
        ("sd1-inpaint", "inpainting"),
        ("sd2", "v2"),
        ("sd2-inpaint", "inpainting_v2"),
        ("sdxl", "xl_base"),
        ("sdxl-inpaint", "xl_inpaint"),
        ("refiner", "xl_refiner"),
    ],
)
def test_fake_files_are_what_diffusers_detects(name, diffusers_type):
    """diffusers' own detector agrees on every fake single file used above."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    with torch.device("meta"):
        state = {k: torch.empty(v) for k, v in single_file(name).items()}
    assert sfu.infer_diffusers_model_type(state) == diffusers_type
