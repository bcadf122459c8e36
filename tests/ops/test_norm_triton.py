"""The fused residual add + RMSNorm kernel against its formula, forward and every gradient (Triton's CPU
interpreter without a GPU), and the blocks using it on the Triton path."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py switches the interpreter on before triton is imported"
pytest.importorskip("triton")

from helpers import assert_close, check_pre_norm_step  # noqa: E402
from visionmamba.ops import norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("cuda_kernels")  # conftest.py: CPU tensors run the Triton kernels too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, with_residual", [((2, 5, 24), True), ((1, 1, 24), False), ((3, 7, 40), True)])
def test_fused_add_rms_norm_matches_the_formula_forward_and_backward(dtype, shape, with_residual):
    check_pre_norm_step(dtype, shape, with_residual, DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_for_an_owned_residual_gives_the_same_rows_and_residual(dtype):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 7, 40, generator=g).to(dtype).to(DEVICE)
    residual = torch.randn(3, 7, 40, generator=g).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(40, generator=g)).to(DEVICE)
    want_y, want_out = norm.fused(hidden, residual, weight, 1e-5)
    owned = residual.clone()
    with torch.no_grad():
        y, out = norm.fused(hidden, owned, weight, 1e-5, inplace=True)
    assert out is owned and torch.equal(out, want_out) and torch.equal(y, want_y)
    # the first block: a float32 hidden is the new residual as it is (no copy)
    first = hidden.float()
    with torch.no_grad():
        y, out = norm.fused(first, None, weight, 1e-5, inplace=True)
    assert out is first and torch.equal(y, norm.fused(first, None, weight, 1e-5)[0])


def test_no_residual_changes_in_place_when_a_gradient_is_needed_or_the_caller_keeps_it():
    from helpers import tiny_vim

    torch.manual_seed(0)
    weight = torch.ones(8, device=DEVICE, requires_grad=True)
    hidden, residual = torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 3, 8, device=DEVICE)
    kept = residual.clone()
    _, out = norm.fused(hidden, residual, weight, 1e-5, inplace=True)  # the weight wants a gradient
    assert out is not residual and torch.equal(residual, kept)
    block = tiny_vim(depth=1, scan_backend="triton").to(DEVICE).eval().layers[0]
    with torch.no_grad():
        block(torch.randn(2, 17, 32, device=DEVICE), residual := torch.randn(2, 17, 32, device=DEVICE))
        kept = residual.clone()
        _, new = block(torch.randn(2, 17, 32, device=DEVICE), residual)  # a user's own call: not handed over
    assert new is not residual and torch.equal(residual, kept)


def test_the_model_hands_its_residual_stream_over_in_inference(monkeypatch):
    from helpers import tiny_vim
    from visionmamba.ops import norm_triton

    calls = []
    for name in ("rms_norm", "add_rms_norm_"):
        real = getattr(norm_triton, name)
        monkeypatch.setattr(norm_triton, name, lambda *a, name=name, real=real: calls.append(name) or real(*a))
    torch.manual_seed(0)
    model = tiny_vim(depth=3, scan_backend="triton").to(DEVICE).eval()
    ref_model = tiny_vim(depth=3, scan_backend="reference").to(DEVICE).eval()
    ref_model.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        out, ref = model(x), ref_model(x)
        feats = model.forward_intermediates(x, indices=[0, 1], norm=True, intermediates_only=True)
        ref_feats = ref_model.forward_intermediates(x, indices=[0, 1], norm=True, intermediates_only=True)
    assert calls == ["rms_norm", "add_rms_norm_", "add_rms_norm_"] * 2  # the first block adopts its hidden
    assert_close(out, ref, atol=1e-5, name="logits")
    for got, want in zip(feats, ref_feats):
        assert_close(got, want, atol=1e-5, name="intermediates")
