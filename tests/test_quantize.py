import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ldmkit.autoencoders.quantize import VectorQuantizer


def _vq(num_codes=8, dim=4, **kw) -> VectorQuantizer:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes, dim, **kw)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(num_codes, dim))
        if vq.ema:
            vq.embed_sum.copy_(vq.codebook)
    return vq


@pytest.mark.parametrize("spatial", [(5,), (3, 5), (2, 3, 2)])
def test_shapes_and_lookup(spatial):
    vq = _vq().eval()
    z = torch.randn(2, 4, *spatial)
    z_q, loss, info = vq(z)
    assert z_q.shape == z.shape and loss.ndim == 0
    assert info["indices"].shape == (2, *spatial) and info["indices"].dtype == torch.long
    torch.testing.assert_close(vq.lookup(info["indices"]), z_q)
    assert 1.0 <= info["perplexity"].item() <= 8.0
    assert 0.0 < info["usage"].item() <= 1.0


def test_wrong_channels_rejected():
    with pytest.raises(ValueError):
        _vq()(torch.randn(2, 3, 4))


def test_nearest_codes_and_straight_through():
    vq = _vq(num_codes=16, dim=3).eval()
    z = torch.randn(4, 3, 6, 6, requires_grad=True)
    z_q, _, info = vq(z)
    flat = z.detach().movedim(1, -1).reshape(-1, 3)
    brute = torch.cdist(flat, vq.codebook.detach()).argmin(1)
    assert torch.equal(info["indices"].flatten(), brute)
    assert torch.equal(z_q.detach().movedim(1, -1).reshape(-1, 3), vq.codebook.detach()[brute])
    w = torch.randn_like(z)
    (z_q * w).sum().backward()
    torch.testing.assert_close(z.grad, w)


def test_loss_formula_and_gradients():
    vq = _vq(beta=0.25).eval()
    z = torch.randn(2, 4, 5, requires_grad=True)
    z_q, loss, _ = vq(z)
    mse = (z_q.detach() - z.detach()).pow(2).mean()
    torch.testing.assert_close(loss, 1.25 * mse)
    loss.backward()
    # Commitment gradient reaches z (beta * d/dz mse), codebook term reaches the codebook.
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z - z_q).detach() / z.numel())
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0

    ema = _vq(beta=0.25, ema=True).eval()
    _, loss_ema, _ = ema(z.detach())
    torch.testing.assert_close(loss_ema, 0.25 * mse)
    assert not any(p.requires_grad for p in ema.parameters())


def test_ema_moves_codes_to_cluster_means():
    vq = _vq(num_codes=4, dim=2, ema=True, decay=0.5, restart_dead_codes=False)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0], [5.0, 5.0], [9.0, -9.0]]))
        vq.embed_sum.copy_(vq.codebook)
    centres = torch.tensor([[2.0, 0.5], [-0.5, -2.0]])
    g = torch.Generator().manual_seed(0)
    z = (centres.repeat(8, 1) + 0.1 * torch.randn(16, 2, generator=g)).T.reshape(1, 2, 16)
    means = z[0].T.reshape(8, 2, 2).mean(0)
    before = (vq.codebook[:2] - means).norm(dim=1)
    vq(z)
    after = (vq.codebook[:2] - means).norm(dim=1)
    assert (after < before).all()
    # Unused codes barely move (EMA sum and size decay together; only smoothing shifts them).
    far = torch.tensor([[5.0, 5.0], [9.0, -9.0]])
    torch.testing.assert_close(vq.codebook[2:], far, atol=1e-3, rtol=0)
    for _ in range(30):
        vq(z)
    torch.testing.assert_close(vq.codebook[:2], means, atol=1e-3, rtol=0)


def _far_codes_vq(**kw) -> VectorQuantizer:
    vq = _vq(num_codes=6, dim=2, restart_every=2, dead_code_threshold=0.5, **kw)
    with torch.no_grad():
        vq.codebook[2:] = 1e3
        if vq.ema:
            vq.embed_sum.copy_(vq.codebook)
    return vq


@pytest.mark.parametrize("ema", [False, True])
def test_dead_code_restart(ema):
    vq = _far_codes_vq(ema=ema)
    z = torch.randn(2, 2, 8, requires_grad=True)
    flat = z.detach().movedim(1, -1).reshape(-1, 2)
    g = torch.Generator().manual_seed(1)
    z_q, loss, _ = vq(z, generator=g)  # step 1: no check yet
    assert (vq.codebook[2:] > 999.0).all()
    z_q, loss, _ = vq(z, generator=g)  # step 2: restart
    (loss + z_q.sum()).backward()  # in-place restart must not break the graph
    revived = vq.codebook[2:].detach()
    assert (revived.abs() < 1e3).all()
    for row in revived:
        assert (flat == row).all(1).any(), "restarted code must be an encoder output"
    assert len({tuple(r.tolist()) for r in revived}) == 4, "distinct picks"
    assert vq.codebook_usage()["dead_fraction"] < 1.0

    # Deterministic given the generator; another seed gives another pick.
    again = _far_codes_vq(ema=ema)
    g2 = torch.Generator().manual_seed(1)
    again(z, generator=g2)
    again(z, generator=g2)
    assert torch.equal(again.codebook, vq.codebook) and z.grad is not None
    other = _far_codes_vq(ema=ema)
    g3 = torch.Generator().manual_seed(2)
    other(z, generator=g3)
    other(z, generator=g3)
    assert not torch.equal(other.codebook, vq.codebook)


def test_eval_mode_leaves_state_untouched():
    vq = _far_codes_vq(ema=True).eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    for _ in range(3):
        vq(torch.randn(2, 2, 8))
    assert all(torch.equal(state[k], v) for k, v in vq.state_dict().items())


def test_codebook_usage_and_l2():
    vq = _vq(num_codes=4, dim=2, restart_dead_codes=False)
    assert vq.codebook_usage() == {"perplexity": 1.0, "dead_fraction": 1.0}
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 50.0], [0.0, -50.0]]))
    z = torch.tensor([[1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.1, 0.1]])[None]
    for _ in range(5):
        vq(z)
    usage = vq.codebook_usage()
    assert usage["dead_fraction"] == 0.5
    assert usage["perplexity"] == pytest.approx(2.0, rel=1e-4)

    vq_l2 = _vq(num_codes=8, dim=4, l2_normalize=True)
    z_q, _, info = vq_l2(torch.randn(2, 4, 3, 3) * 7)
    torch.testing.assert_close(z_q.norm(dim=1), torch.ones(2, 3, 3))
    torch.testing.assert_close(vq_l2.lookup(info["indices"]), z_q)


@pytest.mark.parametrize("ema", [False, True])
def test_state_dict_round_trip_resumes_exactly(tmp_path, ema):
    vq = _far_codes_vq(ema=ema)
    g = torch.Generator().manual_seed(3)
    zs = [torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    vq(zs[0], generator=g)
    save_file(vq.state_dict(), str(tmp_path / "vq.safetensors"))
    g_state = g.get_state()

    resumed = VectorQuantizer(6, 2, restart_every=2, dead_code_threshold=0.5, ema=ema)
    resumed.load_state_dict(load_file(str(tmp_path / "vq.safetensors")))
    assert int(resumed.step) == 1
    g2 = torch.Generator()
    g2.set_state(g_state)
    for z in zs[1:]:
        a, la, _ = vq(z, generator=g)
        b, lb, _ = resumed(z, generator=g2)
        assert torch.equal(a, b) and torch.equal(la, lb)
    for k, v in vq.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert F.mse_loss(vq.codebook, resumed.codebook) == 0
