"""The reference scan and the dispatch point against an independent float64 loop."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from visionmamba import scan


def independent_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
    """Element-wise float64 recurrence written from the paper's equations, not from the reference."""
    batch, channels, length = u.shape
    state = A.shape[1]
    d = delta + delta_bias[:, None] if delta_bias is not None else delta
    if softplus:
        d = torch.log1p(torch.exp(d))
    out = []
    for b in range(batch):
        rows = []
        for c in range(channels):
            h = [torch.zeros((), dtype=torch.float64) for _ in range(state)]
            ys = []
            for t in range(length):
                acc = torch.zeros((), dtype=torch.float64)
                for n in range(state):
                    h[n] = torch.exp(d[b, c, t] * A[c, n]) * h[n] + d[b, c, t] * B[b, n, t] * u[b, c, t]
                    acc = acc + C[b, n, t] * h[n]
                y = acc + (D[c] * u[b, c, t] if D is not None else 0)
                if z is not None:
                    y = y * z[b, c, t] * torch.sigmoid(z[b, c, t])
                ys.append(y)
            rows.append(torch.stack(ys))
        out.append(torch.stack(rows))
    return torch.stack(out)


def make_inputs(batch, channels, length, state, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(
        u=r(batch, channels, length),
        delta=r(batch, channels, length) * 0.5,
        A=-torch.exp(r(channels, state) * 0.5),
        B=r(batch, state, length),
        C=r(batch, state, length),
        D=r(channels),
        z=r(batch, channels, length),
        delta_bias=r(channels) * 0.1,
    )


@pytest.mark.parametrize("length", [1, 7, 20])
@pytest.mark.parametrize("optional", ["all", "none"])
def test_reference_matches_independent_loop_forward_and_gradients(length, optional):
    inputs = make_inputs(2, 3, length, 4)
    if optional == "none":
        inputs.update(D=None, z=None, delta_bias=None)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    ours = scan.selective_scan(**args, delta_softplus=optional == "all", backend="reference")
    theirs = independent_scan(*(args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), optional == "all")
    assert ours.dtype == torch.float64
    assert_close(ours, theirs, atol=1e-12, name="forward")
    cot = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, list(leaves.values()), cot)
    g_theirs = torch.autograd.grad(theirs, list(leaves.values()), cot)
    for name, a, b in zip(leaves, g_ours, g_theirs):
        assert_close(a, b, atol=1e-10, rtol_max=1e-10, name=f"grad {name}")


def test_reduced_precision_in_gives_same_dtype_out_computed_in_float32():
    inputs = make_inputs(1, 4, 9, 3)
    bf16 = {k: v.to(torch.bfloat16) if k in ("u", "delta", "z", "B", "C") else v.float() for k, v in inputs.items()}
    out = scan.selective_scan(**bf16, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    expected = scan.selective_scan(**{k: v.double() for k, v in bf16.items()}, delta_softplus=True)
    assert_close(out, expected, rtol_max=1e-2, name="bf16 output")


def test_shape_errors_name_the_argument():
    inputs = make_inputs(1, 4, 5, 3)
    inputs["B"] = inputs["B"][:, :2]
    with pytest.raises(ValueError, match=r"B must have shape \(1, 3, 5\)"):
        scan.selective_scan(**inputs)


def test_unknown_backend_and_environment_override(monkeypatch):
    inputs = make_inputs(1, 2, 3, 2)
    with pytest.raises(ValueError, match="unknown selective-scan backend 'nope'"):
        scan.selective_scan(**inputs, backend="nope")
    monkeypatch.setenv(scan.BACKEND_ENV, "missing")
    with pytest.raises(ValueError, match=scan.BACKEND_ENV):
        scan.selective_scan(**inputs)
    monkeypatch.setenv(scan.BACKEND_ENV, "reference")
    assert scan.resolve_backend("auto", torch.device("cpu")) == "reference"
    assert "reference" in scan.available_backends()
