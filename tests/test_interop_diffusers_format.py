"""diffusers <-> ldmkit layouts of the UNet and the KL autoencoder, with diffusers as the oracle.

Tiny random diffusers models in the SD 1.5, SD 2.1-v, SDXL, inpainting and class-conditional
layouts are converted (config and weights) to ldmkit and must give the same outputs; every
parameter is randomised first, since diffusers zero-initialises some layers (which would make
parity trivially true for them).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
# resolve diffusers' lazy imports (several seconds) at collection, not inside the first test
DiffusersUNet, DiffusersVAE = diffusers.UNet2DConditionModel, diffusers.AutoencoderKL

from ldmkit.autoencoders.base import AutoencoderConfig  # noqa: E402
from ldmkit.autoencoders.kl import AutoencoderKL  # noqa: E402
from ldmkit.denoisers.unet import UNet, UNetConfig  # noqa: E402
from ldmkit.interop.diffusers_format import (  # noqa: E402
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_keys_from_diffusers,
    unet_keys_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_keys_from_diffusers,
    vae_keys_to_diffusers,
)
from ldmkit.nn.embeddings import timestep_embedding  # noqa: E402

TOL = 1e-5
SDXL_TEXT = 8  # pooled text width of the tiny SDXL layout
SD15 = dict(  # CrossAttn on all levels but the last, heads as a single int (SD 1.x)
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=16,
    attention_head_dim=4,
)
LAYOUTS = {
    "sd15": SD15,
    # SD 2.1-v: linear proj_in/out, upcast attention, per-level heads of 16 channels each
    "sd21v": dict(
        SD15, attention_head_dim=[2, 4, 4], use_linear_projection=True, upcast_attention=True
    ),
    # SDXL: no attention on level 0, deeper transformers further down, text_time embedding
    "sdxl": dict(
        block_out_channels=(32, 64, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=[1, 1, 2],
        cross_attention_dim=24,
        attention_head_dim=[2, 4, 6],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=SDXL_TEXT + 6 * 256,
    ),
    "inpaint": dict(SD15, in_channels=9),
    "class": dict(SD15, num_class_embeds=5, resnet_time_scale_shift="scale_shift"),
    "per_level_blocks": dict(SD15, layers_per_block=[1, 2, 1], norm_num_groups=16),
}
VAE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Fill every parameter with scaled Gaussian noise (fixed seed), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def diffusers_unet(layout: str):
    return randomize(DiffusersUNet(sample_size=8, **LAYOUTS[layout]))


def diffusers_vae(**overrides):
    return randomize(DiffusersVAE(**{**VAE, **overrides}))


def to_ldmkit_unet(d) -> UNet:
    unet = UNet(unet_config_from_diffusers(d.config)).eval()
    unet.load_state_dict(unet_keys_from_diffusers(d.state_dict()), strict=True)
    return unet


def normalized(config) -> dict:
    """A config dict with tuples as lists and private entries dropped (JSON-like)."""
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dict(config).items()
        if not k.startswith("_")
    }


# --------------------------------------------------------------------------------- UNet
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unet_matches_diffusers(layout):
    d = diffusers_unet(layout)
    unet = to_ldmkit_unet(d)
    g = torch.Generator().manual_seed(1)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels + cfg.concat_channels, 8, 8, generator=g)
    t = torch.tensor([10.0, 737.0])
    context = torch.randn(2, 5, cfg.context_dim, generator=g)
    kwargs, y = {}, None
    if layout == "sdxl":
        text = torch.randn(2, SDXL_TEXT, generator=g)
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [96, 80, 8, 4, 64, 64]])
        kwargs["added_cond_kwargs"] = {"text_embeds": text, "time_ids": time_ids}
        # SDXL's vector: pooled text, then the 256-dim embedding of each of the 6 size ids
        y = torch.cat([text, timestep_embedding(time_ids.flatten(), 256).reshape(2, -1)], dim=1)
    if layout == "class":
        y = torch.tensor([1, 4])
        kwargs["class_labels"] = y
    with torch.no_grad():
        expected = d(x, t, encoder_hidden_states=context, **kwargs).sample
        got = unet(x, t, context=context, y=y)
    assert got.shape == expected.shape
    assert expected.std().item() > 0.01  # randomised weights: a non-trivial output to compare
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unet_keys_round_trip_keeps_tensor_objects(layout):
    d_state = diffusers_unet(layout).state_dict()
    ours = unet_keys_from_diffusers(d_state)
    back = unet_keys_to_diffusers(ours)
    assert set(back) == set(d_state)
    # no reshapes in the UNet: every tensor passes through as the same object
    assert all(back[k] is d_state[k] for k in d_state)
    assert {v.data_ptr() for v in ours.values()} == {v.data_ptr() for v in d_state.values()}
    again = unet_keys_from_diffusers(back)
    assert set(again) == set(ours) and all(again[k] is ours[k] for k in ours)


def test_unet_keys_to_diffusers_from_an_ldmkit_model():
    cfg = UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        attention_levels=(0, 1),
        num_heads=4,
        transformer_depth=(1, 2),
        context_dim=16,
        num_classes=3,
    )
    ours = UNet(cfg).state_dict()
    d = DiffusersUNet(**unet_config_to_diffusers(cfg, sample_size=8))
    state = unet_keys_to_diffusers(ours)
    d.load_state_dict(state, strict=True)
    assert set(d.state_dict()) == set(state)
    assert state["class_embedding.weight"] is ours["label_emb.weight"]
    again = unet_keys_from_diffusers(state)  # ldmkit -> diffusers -> ldmkit
    assert set(again) == set(ours) and all(again[k] is ours[k] for k in ours)


def test_unet_layout_of_known_keys():
    state = unet_keys_from_diffusers(diffusers_unet("sdxl").state_dict())
    # SDXL-style: level 0 without transformers, 2 blocks per level, add_embedding as label_emb.0
    assert "label_emb.0.0.weight" in state and "label_emb.0.2.bias" in state
    assert "input_blocks.3.0.op.weight" in state  # the first downsample
    assert "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" in state
    assert "input_blocks.7.1.transformer_blocks.1.ff.net.2.weight" in state
    assert "middle_block.1.transformer_blocks.1.norm3.bias" in state
    assert "output_blocks.2.2.conv.weight" in state  # upsample after a transformer
    assert "output_blocks.5.2.conv.weight" in state
    assert "output_blocks.8.0.skip_connection.weight" in state
    assert "out.2.bias" in state and "time_embed.2.weight" in state


def test_unet_unmappable_keys_are_named():
    state = dict(diffusers_unet("sd15").state_dict())
    extra = torch.zeros(1)
    state["down_blocks.0.attentions.0.transformer_blocks.0.attn1.norm_q.weight"] = extra
    state["encoder_hid_proj.weight"] = extra
    with pytest.raises(ValueError, match=r"2 keys cannot be mapped: .*norm_q.*encoder_hid_proj"):
        unet_keys_from_diffusers(state)
    many = {**state, **{f"junk.{i}.weight": extra for i in range(12)}}
    with pytest.raises(ValueError, match=r"14 keys cannot be mapped.*\(and 4 more\)"):
        unet_keys_from_diffusers(many)
    ours = dict(unet_keys_from_diffusers(diffusers_unet("sd15").state_dict()))
    ours["input_blocks.1.0.in_layers.1.weight"] = extra
    with pytest.raises(ValueError, match=r"in_layers\.1\.weight"):
        unet_keys_to_diffusers(ours)


def test_unet_inconsistent_layouts_are_refused():
    state = dict(diffusers_unet("sd15").state_dict())
    # an up block missing its transformer cannot mirror its down level
    trimmed = {k: v for k, v in state.items() if not k.startswith("up_blocks.2.attentions.1.")}
    with pytest.raises(ValueError, match=r"down_blocks\.0 / up_blocks\.2"):
        unet_keys_from_diffusers(trimmed)
    resample = UNetConfig(
        model_channels=32, channel_mult=(1, 2), attention_levels=(1,), resblock_updown=True
    )
    with pytest.raises(ValueError, match="resblock_updown"):
        unet_keys_to_diffusers(UNet(resample).state_dict())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unet_config_round_trips(layout):
    d = diffusers_unet(layout)
    cfg = unet_config_from_diffusers(d.config)
    out = unet_config_to_diffusers(cfg, sample_size=8)
    assert normalized(out) == normalized(d.config)
    assert unet_config_from_diffusers(out) == cfg


def test_unet_config_fields():
    sd15 = unet_config_from_diffusers(diffusers_unet("sd15").config)
    assert (sd15.num_heads, sd15.num_head_channels, sd15.attention_levels) == (4, None, (0, 1))
    sd21 = unet_config_from_diffusers(diffusers_unet("sd21v").config)
    assert sd21.num_head_channels == 16 and sd21.use_linear_in_transformer and sd21.upcast_attention
    xl = unet_config_from_diffusers(diffusers_unet("sdxl").config)
    assert xl.vector_dim == SDXL_TEXT + 1536 and xl.attention_levels == (1, 2)
    assert xl.transformer_depth == (1, 1, 2) and xl.num_res_blocks == 2
    inpaint = unet_config_from_diffusers(diffusers_unet("inpaint").config)
    assert (inpaint.in_channels, inpaint.concat_channels, inpaint.out_channels) == (4, 5, None)
    cls = unet_config_from_diffusers(diffusers_unet("class").config)
    assert cls.num_classes == 4 and cls.use_scale_shift_norm


def test_ldmkit_unet_config_round_trips():
    configs = [
        UNetConfig(model_channels=64, channel_mult=(1, 2, 4), context_dim=32),
        UNetConfig(
            in_channels=4,
            concat_channels=5,
            model_channels=32,
            channel_mult=(1, 2),
            attention_levels=(0, 1),
            num_head_channels=16,
            transformer_depth=(1, 3),
            context_dim=8,
            vector_dim=1600,
            use_linear_in_transformer=True,
            use_scale_shift_norm=True,
            norm_groups=16,
        ),
    ]
    for cfg in configs:
        out = unet_config_to_diffusers(cfg)
        assert unet_config_from_diffusers(out) == cfg
        d = DiffusersUNet.from_config(out)  # diffusers accepts the dict
        assert set(unet_keys_from_diffusers(d.state_dict())) == set(UNet(cfg).state_dict())


@pytest.mark.parametrize(
    "field, value",
    [
        ("center_input_sample", True),
        ("flip_sin_to_cos", False),
        ("freq_shift", 1),
        ("time_cond_proj_dim", 8),
        ("class_embed_type", "timestep"),
        ("encoder_hid_dim", 16),
        ("dual_cross_attention", True),
        ("conv_in_kernel", 5),
        ("norm_eps", 1e-6),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("resnet_time_scale_shift", "spatial"),
        ("time_embedding_type", "fourier"),
        ("only_cross_attention", True),
        ("addition_embed_type", "text"),
        ("attention_head_dim", [2, 3, 4]),
        ("attention_head_dim", 3),
        ("cross_attention_dim", [16, 32, 16]),
        ("transformer_layers_per_block", [[1], [1], [1]]),
        ("up_block_types", ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
        ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ("block_out_channels", [32, 48, 64]),
        ("norm_num_groups", 24),
        ("dropout", 0.1),
        ("some_future_field", 1),
    ],
)
def test_unet_config_refuses_what_ldmkit_cannot_build(field, value):
    config = {**LAYOUTS["sd15"], field: value}
    with pytest.raises(ValueError, match=field):
        unet_config_from_diffusers(config)


def test_unet_config_refuses_sdxl_time_embedding_other_than_256():
    config = {**LAYOUTS["sdxl"], "addition_time_embed_dim": 128}
    with pytest.raises(ValueError, match="addition_time_embed_dim=128"):
        unet_config_from_diffusers(config)
    with pytest.raises(ValueError, match="num_class_embeds"):
        unet_config_from_diffusers({**LAYOUTS["sdxl"], "num_class_embeds": 3})


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(dims=1), "dims"),
        (dict(resblock_updown=True), "resblock_updown"),
        (dict(attention_position_embedding=True), "attention_position_embedding"),
        (dict(context_dim=None), "context_dim"),
        (dict(channel_mult=(2, 4)), "channel_mult"),
        (dict(transformer_depth_middle=0), "transformer_depth_middle"),
        (dict(model_channels=48), "norm_groups=32 on 48 channels"),
        (dict(dropout=0.1), "dropout"),
    ],
)
def test_unet_config_to_diffusers_refuses(changes, field):
    base = dict(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), context_dim=8)
    cfg = UNetConfig(**{**base, **changes})
    with pytest.raises(ValueError, match=field):
        unet_config_to_diffusers(cfg)


# ---------------------------------------------------------------------------------- VAE
@pytest.mark.parametrize(
    "overrides", [{}, {"mid_block_add_attention": False, "layers_per_block": 2}]
)
def test_vae_matches_diffusers(overrides):
    d = diffusers_vae(**overrides)
    vae = AutoencoderKL(vae_config_from_diffusers(d.config)).eval()
    vae.load_state_dict(vae_keys_from_diffusers(d.state_dict()), strict=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 16, 16, generator=g)
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(x))
        expected = d.encode(x).latent_dist.parameters
        assert (moments - expected).abs().max().item() <= TOL
        decoded = vae.decode(z, scaled=False)
        assert expected.std().item() > 0.01 and decoded.std().item() > 0.01
        assert (decoded - d.decode(z).sample).abs().max().item() <= TOL


def test_vae_keys_round_trip_and_views():
    d_state = diffusers_vae().state_dict()
    ours = vae_keys_from_diffusers(d_state)
    back = vae_keys_to_diffusers(ours)
    assert set(back) == set(d_state)
    for key, value in d_state.items():
        assert torch.equal(back[key], value) and back[key].shape == value.shape
        assert back[key].data_ptr() == value.data_ptr()  # renamed or reshaped as a view
        if value.ndim != 2:
            assert back[key] is value
    q = ours["encoder.mid.attn_1.q.weight"]
    assert q.shape == (64, 64, 1, 1)
    assert q.data_ptr() == d_state["encoder.mid_block.attentions.0.to_q.weight"].data_ptr()
    # CompVis ``up`` runs fine to coarse, diffusers' ``up_blocks`` coarse to fine
    up = "decoder.up_blocks.0.resnets.0.conv1.weight"
    assert ours["decoder.up.1.block.0.conv1.weight"] is d_state[up]
    again = vae_keys_from_diffusers(back)
    assert set(again) == set(ours) and all(torch.equal(again[k], ours[k]) for k in ours)


def test_vae_reads_legacy_attention_names():
    state = diffusers_vae().state_dict()
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in state.items():
        for new, name in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{name}.")
        old[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old
    assert set(vae_keys_from_diffusers(old)) == set(vae_keys_from_diffusers(state))


def test_vae_unmappable_keys_are_named():
    state = {**diffusers_vae().state_dict(), "encoder.down_blocks.0.attentions.0.to_q.weight": 0}
    with pytest.raises(ValueError, match=r"1 keys cannot be mapped: encoder\.down_blocks\.0\.att"):
        vae_keys_from_diffusers(state)


def test_vae_config_round_trips():
    d = diffusers_vae(scaling_factor=0.13025, shift_factor=0.0609, mid_block_add_attention=False)
    cfg = vae_config_from_diffusers(d.config)
    assert (cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks) == (32, (1, 2), 1)
    assert (cfg.scaling_factor, cfg.shift_factor, cfg.mid_attention) == (0.13025, 0.0609, False)
    out = vae_config_to_diffusers(cfg, sample_size=d.config.sample_size)
    assert normalized(out) == normalized(d.config)
    assert vae_config_from_diffusers(out) == cfg
    assert vae_config_from_diffusers({**VAE, "shift_factor": None}).shift_factor == 0.0
    ours = AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 4), scaling_factor=0.5)
    back = vae_config_from_diffusers(vae_config_to_diffusers(ours))
    assert back == ours and vae_config_to_diffusers(ours)["shift_factor"] is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("latents_mean", [0.0] * 4),
        ("latents_std", [1.0] * 4),
        ("use_quant_conv", False),
        ("use_post_quant_conv", False),
        ("act_fn", "gelu"),
        ("norm_num_groups", 24),
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ("block_out_channels", [32, 48]),
        ("extra_field", 1),
    ],
)
def test_vae_config_refuses_what_ldmkit_cannot_build(field, value):
    overrides = {"norm_num_groups": 16} if field == "block_out_channels" else {}
    with pytest.raises(ValueError, match=field):
        vae_config_from_diffusers({**VAE, **overrides, field: value})


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(kind="vq"), "kind"),
        (dict(dims=3), "dims"),
        (dict(dropout=0.1), "dropout"),
        (dict(channel_mult=(2, 4)), "channel_mult"),
        (dict(base_channels=48), "norm_groups=32 on 48 channels"),
    ],
)
def test_vae_config_to_diffusers_refuses(changes, field):
    cfg = AutoencoderConfig(**{"base_channels": 32, "channel_mult": (1, 2), **changes})
    with pytest.raises(ValueError, match=field):
        vae_config_to_diffusers(cfg)
