"""Denoiser networks: shapes, conditioning paths, masks, init, checkpointing, SD layouts."""

from __future__ import annotations

import math

import pytest
import torch

from ldmkit.denoisers.dit import DiT, DiTConfig
from ldmkit.denoisers.unet import UNet, UNetConfig, Upsample
from ldmkit.nn.attention import Attention
from ldmkit.nn.embeddings import sincos_2d_position_embedding, timestep_embedding

CTX = 6  # context channels of the tiny cross-attention models


def tiny_unet(**overrides) -> UNet:
    torch.manual_seed(0)
    kw = dict(
        in_channels=3,
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=2,
        norm_groups=4,
    )
    return UNet(UNetConfig(**{**kw, **overrides}))


def tiny_dit(**overrides) -> DiT:
    torch.manual_seed(0)
    kw = dict(in_channels=3, patch_size=2, hidden_size=16, depth=2, num_heads=2, sample_size=8)
    return DiT(DiTConfig(**{**kw, **overrides}))


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every parameter: zero-initialised outputs would hide conditioning effects."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def inputs(*shape: int, ctx: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g)
    t = torch.tensor([10.0, 500.0])[: shape[0]]
    return (x, t, torch.randn(shape[0], 5, CTX, generator=g)) if ctx else (x, t)


# -- embeddings ----------------------------------------------------------------------------


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    expected = torch.cat([torch.cos(5 * freqs), torch.sin(5 * freqs)])
    torch.testing.assert_close(emb[1], expected)
    flipped = timestep_embedding(torch.tensor([5.0]), 8, flip_sin_to_cos=False)
    torch.testing.assert_close(flipped[0], torch.cat([expected[4:], expected[:4]]))
    assert timestep_embedding(torch.tensor([1.0]), 7).shape == (1, 7)


def test_sincos_2d_first_half_is_column_second_half_row():
    emb = sincos_2d_position_embedding(16, 3, 5).reshape(3, 5, 16)
    assert torch.equal(emb[0, :, :8], emb[2, :, :8])  # column part: same in every row
    assert torch.equal(emb[:, 0, 8:], emb[:, 4, 8:])  # row part: same in every column
    assert torch.equal(emb[0, 0], torch.tensor(([0.0] * 4 + [1.0] * 4) * 2))


# -- UNet ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (12, 20)])
def test_unet_shapes(size):
    model = tiny_unet(context_dim=CTX)
    x, t, ctx = inputs(2, 3, *size, ctx=True)
    assert model(x, t, ctx).shape == x.shape


def test_unet_any_size_upsamples_to_the_skip_size():
    # 10 -> 5 -> 3 on the way down; the decoder upsamples 3 -> 5 -> 10 to match the skips
    model = randomize(tiny_unet(channel_mult=(1, 2, 2)))
    x = inputs(1, 3, 8, 10)[0]
    assert model(x, torch.tensor([3.0])).shape == x.shape
    # for multiples of 4 the explicit size is exactly scale-factor-2 upsampling
    up = next(m for m in model.modules() if isinstance(m, Upsample))
    h = torch.randn(1, up.conv.in_channels, 3, 4)
    assert torch.equal(up(h), up(h, (6, 8)))


def test_unet_resblock_updown_rejects_sizes_not_multiple_of_downsampling():
    model = tiny_unet(channel_mult=(1, 2, 2), resblock_updown=True)
    with pytest.raises(ValueError, match="multiple of 4"):
        model(*inputs(1, 3, 8, 10))


@pytest.mark.parametrize("shape", [(2, 3, 16), (1, 3, 3, 8, 8)])
def test_unet_1d_and_3d(shape):
    model = randomize(tiny_unet(dims=len(shape) - 2, context_dim=CTX))
    x, t, ctx = inputs(*shape, ctx=True)
    out = model(x, t, ctx)
    assert out.shape == x.shape and out.abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 3, 16), (2, 3, 8, 12), (1, 3, 3, 8, 8)])
def test_unet_resblock_updown_and_scale_shift_norm(shape):
    model = randomize(
        tiny_unet(dims=len(shape) - 2, resblock_updown=True, use_scale_shift_norm=True)
    )
    x, t = inputs(*shape)
    out = model(x, t)
    assert out.shape == x.shape and out.abs().sum() > 0


def test_unet_concat_channels_and_out_channels():
    model = tiny_unet(concat_channels=2, out_channels=1, attention_levels=())
    x, t = inputs(2, 5, 8, 8)
    assert model(x, t).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="concat_channels"):
        model(x[:, :3], t)


def test_unet_class_conditioning_with_null_class():
    model = randomize(tiny_unet(num_classes=3, attention_levels=()))
    assert model.label_emb.weight.shape[0] == 4  # + the null class
    x, t = inputs(2, 3, 8, 8)
    out0, out1 = model(x, t, y=torch.tensor([0, 0])), model(x, t, y=torch.tensor([1, 1]))
    assert not torch.allclose(out0, out1)
    torch.testing.assert_close(model(x, t), model(x, t, y=torch.tensor([3, 3])))


def test_unet_vector_conditioning():
    model = randomize(tiny_unet(vector_dim=5, attention_levels=()))
    x, t = inputs(2, 3, 8, 8)
    y = torch.randn(2, 5)
    assert not torch.allclose(model(x, t, y=y), model(x, t, y=y + 1))
    with pytest.raises(ValueError, match="vector"):
        model(x, t)


def test_unet_cross_attention_and_context_mask():
    model = randomize(tiny_unet(context_dim=CTX))
    x, t, ctx = inputs(2, 3, 8, 8, ctx=True)
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 4 + [False]])
    changed = ctx.clone()
    changed[0, 3:], changed[1, 4:] = 5.0, -5.0  # only padded tokens change
    assert not torch.allclose(model(x, t, ctx), model(x, t, changed))
    torch.testing.assert_close(
        model(x, t, ctx, context_mask=mask), model(x, t, changed, context_mask=mask)
    )
    assert not torch.allclose(model(x, t, ctx), model(x, t, ctx + 1))


def test_unet_linear_proj_matches_conv_proj_and_upcast_runs():
    conv = randomize(tiny_unet(context_dim=CTX))
    linear = tiny_unet(context_dim=CTX, use_linear_in_transformer=True, upcast_attention=True)
    state = {k: v.reshape(linear.state_dict()[k].shape) for k, v in conv.state_dict().items()}
    linear.load_state_dict(state)
    x, t, ctx = inputs(2, 3, 8, 8, ctx=True)
    torch.testing.assert_close(linear(x, t, ctx), conv(x, t, ctx), rtol=1e-4, atol=1e-5)
    out = linear.to(torch.bfloat16)(x.bfloat16(), t, ctx.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_attention_upcast_in_bf16_is_close_to_fp32():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, upcast=True)
    x = torch.randn(2, 7, 16)
    ref = attn(x)
    out = attn.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def grads(model: torch.nn.Module, *args, **kwargs) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(*args, **kwargs).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_attention_position_embedding_tells_tokens_apart_without_new_weights():
    from ldmkit.nn.attention import SpatialTransformer

    torch.manual_seed(0)
    plain = SpatialTransformer(16, 2, 8, norm_groups=4)
    placed = SpatialTransformer(16, 2, 8, norm_groups=4, position_embedding=True)
    assert plain.state_dict().keys() == placed.state_dict().keys()  # SD weights still fit
    placed.load_state_dict(plain.state_dict())
    for block in (plain, placed):
        torch.nn.init.normal_(block.proj_out.weight)  # not the identity any more
    x = torch.randn(1, 16, 1, 1).expand(1, 16, 4, 6).contiguous()  # the same vector everywhere
    x = x + 0.01 * torch.randn(1, 16, 4, 6)  # (GroupNorm needs some variance)
    same = plain(x) - x
    where = placed(x) - x
    # self-attention of near-identical tokens gives near-identical outputs, unless positioned
    assert same.std(dim=(2, 3)).max() < 0.2 * where.std(dim=(2, 3)).max()
    with pytest.raises(ValueError, match="2-D"):
        SpatialTransformer(16, 2, 8, dims=1, norm_groups=4, position_embedding=True)


@pytest.mark.parametrize("tokens", [8, 300])  # the math kernel (training) and the default one
def test_sdpa_kernel_choice_does_not_change_outputs_or_gradients(tokens):
    from ldmkit.nn.layers import sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, tokens, 16, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 1, tokens, generator=g) > 0.3
    mask[..., 0] = True
    out = sdpa(q, k, v, attn_mask=mask)
    (grad_q,) = torch.autograd.grad(out.square().sum(), q)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (ref_grad_q,) = torch.autograd.grad(ref.square().sum(), q)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_q, ref_grad_q, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unmasked_training_attention_matches_sdpa(dtype):
    from ldmkit.nn.layers import sdpa

    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(2, 3, 40, 16, generator=g, dtype=dtype, requires_grad=True) for _ in "qkv"
    )
    out = sdpa(q, k, v)  # short sequence with gradients: ldmkit's written-out attention
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol)


def test_training_attention_under_autocast_is_as_accurate_as_pytorchs_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ldmkit.nn.layers import sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 4, 200, 32, generator=g) * 2 for _ in "qkv")  # peaked softmax
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = sdpa(q.requires_grad_(), k, v)
        with sdpa_kernel(SDPBackend.MATH):
            theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert ours.dtype == theirs.dtype == torch.bfloat16

    def err(t: torch.Tensor) -> float:
        return float((t.detach().double() - exact).norm() / exact.norm())

    assert err(ours) <= 1.1 * err(theirs) and err(ours) < 1e-2


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit])
def test_gradient_checkpointing_gives_identical_gradients(make):
    model = randomize(make(context_dim=CTX, num_classes=3))
    x, t, ctx = inputs(2, 3, 8, 8, ctx=True)
    y = torch.tensor([0, 2])
    plain = grads(model, x, t, ctx, y)
    model.gradient_checkpointing = True
    checkpointed = grads(model, x, t, ctx, y)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, msg=name)


# -- DiT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(8, 8), (16, 12)])
@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_dit_shapes(size, pos_embed):
    model = randomize(tiny_dit(pos_embed=pos_embed, context_dim=CTX))
    x, t, ctx = inputs(2, 3, *size, ctx=True)
    out = model(x, t, ctx)
    assert out.shape == x.shape and out.abs().sum() > 0


def test_dit_rejects_sizes_not_divisible_by_patch():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        tiny_dit()(*inputs(1, 3, 9, 8))


def test_dit_zero_init_output_is_exactly_zero_and_blocks_are_identity():
    model = tiny_dit(num_classes=3, context_dim=CTX)
    x, t, ctx = inputs(2, 3, 8, 8, ctx=True)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append(torch.equal(out, args[0])))
    out = model(x, t, ctx, torch.tensor([0, 1]))
    assert torch.equal(out, torch.zeros_like(out))
    assert seen == [True, True]


def test_dit_class_vector_and_cross_attention_conditioning():
    model = randomize(tiny_dit(num_classes=3, vector_dim=5, context_dim=CTX))
    x, t, ctx = inputs(2, 3, 8, 8, ctx=True)
    by_class = model(x, t, ctx, torch.tensor([0, 0]))
    assert not torch.allclose(by_class, model(x, t, ctx, torch.tensor([1, 1])))
    torch.testing.assert_close(model(x, t, ctx), model(x, t, ctx, torch.tensor([3, 3])))
    vec = torch.randn(2, 5)
    assert not torch.allclose(model(x, t, ctx, vec), model(x, t, ctx, vec + 1))
    assert not torch.allclose(by_class, model(x, t, ctx + 1, torch.tensor([0, 0])))


def test_dit_context_mask():
    model = randomize(tiny_dit(context_dim=CTX))
    x, t, ctx = inputs(2, 3, 8, 8, ctx=True)
    mask = torch.tensor([[True] * 2 + [False] * 3, [True] * 5])
    changed = ctx.clone()
    changed[0, 2:] = 3.0
    torch.testing.assert_close(
        model(x, t, ctx, context_mask=mask), model(x, t, changed, context_mask=mask)
    )
    assert not torch.allclose(model(x, t, ctx), model(x, t, changed))


# -- Stable Diffusion layouts (meta device: no memory) --------------------------------------

SD15_KEYS = {
    "time_embed.0.weight": (1280, 320),
    "time_embed.0.bias": (1280,),
    "time_embed.2.weight": (1280, 1280),
    "input_blocks.0.0.weight": (320, 4, 3, 3),
    "input_blocks.1.0.in_layers.0.weight": (320,),
    "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
    "input_blocks.1.1.norm.weight": (320,),
    "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight": (320, 768),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": (320,),
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
    "input_blocks.1.1.transformer_blocks.0.norm1.weight": (320,),
    "input_blocks.1.1.transformer_blocks.0.norm3.bias": (320,),
    "input_blocks.1.1.proj_out.weight": (320, 320, 1, 1),
    "input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "input_blocks.4.0.in_layers.2.weight": (640, 320, 3, 3),
    "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
    "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "middle_block.0.in_layers.2.weight": (1280, 1280, 3, 3),
    "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
    "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "middle_block.2.emb_layers.1.weight": (1280, 1280),
    "output_blocks.0.0.in_layers.0.weight": (2560,),
    "output_blocks.0.0.in_layers.2.weight": (1280, 2560, 3, 3),
    "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight": (1280, 1280),
    "output_blocks.5.0.in_layers.2.weight": (1280, 1920, 3, 3),
    "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.8.0.skip_connection.weight": (640, 960, 1, 1),
    "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "output_blocks.9.0.in_layers.2.weight": (320, 960, 3, 3),
    "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "out.0.weight": (320,),
    "out.2.weight": (4, 320, 3, 3),
    "out.2.bias": (4,),
}

SDXL_KEYS = {
    "label_emb.0.0.weight": (1280, 2816),
    "label_emb.0.2.weight": (1280, 1280),
    "input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "input_blocks.4.1.proj_in.weight": (640, 640),
    "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
    "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    "middle_block.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
    "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "output_blocks.8.0.in_layers.2.weight": (320, 640, 3, 3),
    "out.2.weight": (4, 320, 3, 3),
}


def meta_unet(**config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = UNet(UNetConfig(in_channels=4, model_channels=320, num_res_blocks=2, **config))
    return {k: v.shape for k, v in model.state_dict().items()}


def test_sd15_layout_keys_and_parameter_count():
    shapes = meta_unet(
        channel_mult=(1, 2, 4, 4), attention_levels=(0, 1, 2), num_heads=8, context_dim=768
    )
    for key, shape in SD15_KEYS.items():
        assert shapes.get(key) == shape, key
    assert sum(s.numel() for s in shapes.values()) == 859_520_964


def test_sdxl_layout_keys_and_parameter_count():
    shapes = meta_unet(
        channel_mult=(1, 2, 4),
        attention_levels=(1, 2),
        transformer_depth=(0, 2, 10),
        num_head_channels=64,
        context_dim=2048,
        vector_dim=2816,
        use_linear_in_transformer=True,
    )
    for key, shape in SDXL_KEYS.items():
        assert shapes.get(key) == shape, key
    assert "input_blocks.1.1.norm.weight" not in shapes  # no attention at level 0
    assert sum(s.numel() for s in shapes.values()) == 2_567_463_684
