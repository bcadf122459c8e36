"""CPU bf16 inference: the conv and scan kernels read and write bfloat16 (arithmetic, states and sums in
float32), checked against the float32 kernels on the same bf16-rounded inputs (the whole model under
autocast: tests/models/test_parity.py)."""
import pytest
import torch

from helpers import assert_close
from visionmamba.ops.scan import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the C++ CPU kernels do not build here")
BF16_ULP = 2.0**-8  # the spacing of bf16 relative to a value's power of two


def _inputs(batch=2, length=37, channels=40, state=16, rank=5):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = torch.nn.functional.silu(r(2, batch, length, channels)).to(torch.bfloat16)
    acts = dict(u=u, x_proj_out=(r(2, batch, length, rank + 2 * state) * 0.5).to(torch.bfloat16),
                z=r(batch, length, channels).to(torch.bfloat16))
    weights = dict(dt_weight=r(2, channels, rank) * 0.5, A=-torch.exp(r(2, channels, state) * 0.3), D=r(2, channels),
                   bias=r(2, channels) * 0.1)
    return acts, weights


def _scan_(acts, w):
    u = acts["u"].clone()
    cpu.bi_scan_(u, acts["x_proj_out"], w["dt_weight"], w["A"], w["D"], acts["z"], w["bias"])
    return u[0]


@pytest.mark.parametrize("length", [1, 37, 70])
def test_bf16_scan_equals_float32_on_the_same_inputs(length):
    acts, w = _inputs(length=length)
    got = _scan_(acts, w)
    assert got.dtype == torch.bfloat16
    want = _scan_({k: v.float() for k, v in acts.items()}, w)
    # two roundings to bf16 (the forward direction's half, then the sum) and the float32 kernel's own error
    assert_close(got.float(), want, atol=2 * BF16_ULP * want.abs().max().item(), name="bf16 bi_scan_")
    assert not torch.equal(got.float(), want)  # it did round: the test can tell the two paths apart


def test_bf16_conv_silu_equals_float32_on_the_same_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 29, 2 * 40, generator=g).to(torch.bfloat16)[..., :40]  # a strided view, as in the mixer
    w, b = torch.randn(2, 40, 4, generator=g) * 0.3, torch.randn(2, 40, generator=g) * 0.1
    got = cpu.conv_silu(x, w, b)
    want = cpu.conv_silu(x.float(), w, b)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert_close(got.float(), want, atol=BF16_ULP * want.abs().max().item(), name="bf16 conv_silu")
    assert torch.equal(got, want.to(torch.bfloat16))  # one rounding of the same float32 values


def test_bf16_is_refused_in_one_line_without_bf16_arithmetic(monkeypatch):
    import visionmamba.tools.precision as precision

    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)
    with pytest.raises(ValueError, match="needs a device with bf16 arithmetic; cpu has none"):
        precision.autocast("bf16", torch.device("cpu"))
    with precision.autocast("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
