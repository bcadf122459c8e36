"""visionmamba.ops.linear: the oneDNN route for float32 CPU linears must compute F.linear, forward and backward."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from visionmamba.models.mixer import BiMambaMixer
from visionmamba.ops import linear as vl

needs_onednn = pytest.mark.skipif(not vl._op_works(), reason="this torch has no usable oneDNN linear op")


def _inputs(shape, out_features=24, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(out_features, shape[-1], generator=g) / shape[-1] ** 0.5
    b = torch.randn(out_features, generator=g) if bias else None
    return x, w, b


@needs_onednn
@pytest.mark.parametrize("shape", [(300, 40), (2, 150, 40), (3, 5, 20, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_every_gradient_match_f_linear(shape, bias):
    x, w, b = _inputs(shape, bias=bias)
    assert vl.onednn_applies(x, w)
    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    out = vl.linear(*leaves)
    ref = F.linear(*ref_leaves)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_strided_input_rows():
    """Column slices of a wider tensor (as x_proj's dt columns) are read correctly."""
    wide, w, b = _inputs((400, 64))
    x = wide[:, 10:50]
    w = w[:, :40].contiguous()
    torch.testing.assert_close(vl.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_falls_back_where_onednn_does_not_apply(monkeypatch):
    x, w, b = _inputs((300, 40))
    assert not vl.onednn_applies(x.double(), w.double())  # float64: F.linear
    assert not vl.onednn_applies(x[0], w)  # a single vector
    monkeypatch.setenv(vl.ENV, "0")
    assert not vl.onednn_applies(x, w)
    torch.testing.assert_close(vl.linear(x, w, b), F.linear(x, w, b))


def test_first_use_leaves_the_global_rng_alone():
    """The one-time check of the op must not draw from the global RNG (resumed runs must replay it exactly)."""
    vl._op_works.cache_clear()
    state = torch.get_rng_state()
    vl._op_works()
    assert torch.equal(torch.get_rng_state(), state)


def test_flop_counter_sees_the_products():
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b = _inputs((300, 40))
    with FlopCounterMode(display=False) as counter:
        vl.linear(x, w, b)
    assert counter.get_total_flops() == 2 * 300 * 40 * 24


def test_autocast_keeps_f_linear_semantics():
    x, w, b = _inputs((300, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not vl.onednn_applies(x, w)
        out = vl.linear(x, w, b)
        ref = F.linear(x, w, b)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)


def test_linear_module_is_a_drop_in_nn_linear():
    torch.manual_seed(0)
    plain = nn.Linear(40, 24)
    torch.manual_seed(0)
    ours = vl.Linear(40, 24)
    assert isinstance(ours, nn.Linear) and list(ours.state_dict()) == list(plain.state_dict())
    torch.testing.assert_close(ours.weight, plain.weight)  # same initialisation, draw for draw
    x = torch.randn(2, 300, 40)
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)


def test_use_onednn_linears_converts_plain_linears_only():
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(40, 40), nn.GELU(), Custom(40, 8))
    x = torch.randn(300, 40)
    ref = model(x)
    vl.use_onednn_linears(model)
    assert type(model[0]) is vl.Linear and type(model[2]) is Custom
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_mixer_projections_take_the_route():
    mixer = BiMambaMixer(32)
    for name in ("in_proj", "x_proj", "dt_proj", "x_proj_b", "dt_proj_b", "out_proj"):
        assert type(getattr(mixer, name)) is vl.Linear, name
