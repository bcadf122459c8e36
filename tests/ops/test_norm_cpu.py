"""The CPU kernels of the fused residual add + RMSNorm against the formula, forward and every gradient, and
the model using them on the ``cpu`` scan path (eagerly; traced, compiled and exported graphs keep plain
operators, tests/models/test_vim.py)."""
import pytest
import torch

from helpers import assert_close, check_pre_norm_step, tiny_vim
from visionmamba.ops import norm, norm_cpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, with_residual", [((2, 5, 24), True), ((1, 1, 24), False), ((3, 70, 40), True),
                                                  ((2, 33, 192), False)])  # 210 and 66 rows: past one block of 64
def test_fused_add_rms_norm_matches_the_formula_forward_and_backward(dtype, shape, with_residual):
    check_pre_norm_step(dtype, shape, with_residual, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_for_an_owned_residual_gives_the_same_rows_and_residual(dtype):
    g = torch.Generator().manual_seed(1)
    hidden, residual = torch.randn(3, 70, 40, generator=g).to(dtype), torch.randn(3, 70, 40, generator=g)
    weight = 1 + 0.1 * torch.randn(40, generator=g)
    want_y, want_out = norm.fused(hidden, residual, weight, 1e-5)
    owned = residual.clone()
    with torch.no_grad():
        y, out = norm.fused(hidden, owned, weight, 1e-5, inplace=True)
    assert out is owned and torch.equal(out, want_out) and torch.equal(y, want_y)
    first = hidden.float()  # the first block: a float32 hidden is the new residual as it is
    with torch.no_grad():
        y, out = norm.fused(first, None, weight, 1e-5, inplace=True)
    assert out is first and torch.equal(y, norm.fused(first, None, weight, 1e-5)[0])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_model_runs_the_fused_step_and_matches_the_plain_one(monkeypatch, precision):
    calls = []
    for name in ("add_rms_norm", "add_rms_norm_", "rms_norm"):
        real = getattr(norm_cpu, name)
        monkeypatch.setattr(norm_cpu, name, lambda *a, name=name, real=real: calls.append(name) or real(*a))
    torch.manual_seed(0)
    model = tiny_vim(depth=3, scan_backend="cpu")
    plain = tiny_vim(depth=3, scan_backend="reference")  # no fused pre-norm step on this path
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    tol = 1e-5 if precision == "fp32" else 3e-2
    with torch.no_grad(), cast:
        out, ref = model.eval()(x), plain.eval()(x)
    assert calls == ["rms_norm", "add_rms_norm_", "add_rms_norm_", "add_rms_norm"]  # the first block adopts its hidden
    assert_close(out, ref, rtol_max=tol, name="logits")
    calls.clear()
    with cast:
        loss, ref_loss = model.train()(x).float().square().sum(), plain.train()(x).float().square().sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_grads = torch.autograd.grad(ref_loss, list(plain.parameters()))
    assert calls == ["add_rms_norm"] * 4
    for (name, _), got, want in zip(model.named_parameters(), grads, ref_grads):
        assert_close(got, want, rtol_max=tol * 10, atol=1e-6, name=f"grad {name}")
