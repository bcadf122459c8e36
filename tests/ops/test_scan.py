"""The reference scan and the dispatch point against an independent float64 loop."""
import pytest
import torch

from helpers import assert_close
from visionmamba.ops import scan


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


# ------------------------------------------------------------------------------------ kernel backends
from scan_cases import check_against_reference, scan_inputs  # noqa: E402

SHAPES = [(3, 1), (1, 63), (3, 70), (1, 197), (3, 1025)]  # (batch, L): length 1, odd, not a chunk multiple


@pytest.mark.parametrize("backend", ["cpu", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, length", SHAPES)
def test_backend_matches_reference_forward_and_every_gradient(backend, dtype, batch, length):
    inputs = scan_inputs(batch, 37, length, 16, dtype)  # 37 channels: not a multiple of any tile
    run = lambda **kw: scan.selective_scan(**kw, backend=backend)  # noqa: E731
    check_against_reference(run, inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch, length", [(3, 1), (1, 63), (2, 70)])  # 1 step; 7 loop iterations + 7; 9 - 2
def test_loop_backend_matches_reference_forward_and_every_gradient(dtype, batch, length):
    inputs = scan_inputs(batch, 37, length, 16, dtype)
    run = lambda **kw: scan.selective_scan(**kw, backend="loop")  # noqa: E731
    check_against_reference(run, inputs, dtype)


@pytest.mark.parametrize("backend", ["cpu", "chunked", "loop"])
def test_backend_optional_inputs_and_plain_delta(backend):
    inputs = scan_inputs(2, 5, 40, 3, torch.float64)
    for absent in ("D", "z", "delta_bias"):
        inputs.pop(absent)
    inputs["delta"] = inputs["delta"].abs()  # used as is (no softplus): a step size, so positive
    from scan_cases import NAMES
    run = lambda **kw: scan.selective_scan(**kw, backend=backend)  # noqa: E731
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out = run(**leaves, delta_softplus=False)
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    ref = scan.selective_scan(**ref_leaves, backend="reference")
    assert_close(out, ref, rtol_max=1e-12, name="forward")
    for name, a, b in zip(NAMES, torch.autograd.grad(out.sum(), list(leaves.values())),
                          torch.autograd.grad(ref.sum(), list(ref_leaves.values()))):
        assert_close(a, b, rtol_max=1e-11, name=name)


def test_chunked_is_safe_for_huge_delta():
    """sum |delta A| over a chunk far beyond exp's range: no overflow, still exact."""
    inputs = scan_inputs(1, 4, 100, 8, torch.float32, delta_scale=40.0)
    out = scan.selective_scan(**inputs, delta_softplus=True, backend="chunked")
    ref = scan.selective_scan(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True, backend="reference")
    assert torch.isfinite(out).all()
    assert_close(out, ref, rtol_max=1e-5, name="huge delta")


def test_cpu_backward_is_deterministic():
    inputs = scan_inputs(2, 70, 50, 16, torch.float32)
    def grads():
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        return torch.autograd.grad(scan.selective_scan(**leaves, delta_softplus=True, backend="cpu").sum(), list(leaves.values()))
    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_cpu_mixer_core_is_the_same_on_one_and_several_threads():
    """Tasks (batch row, 64 or 128 channels) own their outputs and partial sums: the kernels' results cannot
    change with the thread count, nor the gradients beyond the matrix products' own rounding (BLAS may split
    them by thread). Here one thread runs tasks of 128 channels, four threads tasks of 64 (lanes::task_blocks).
    The suite's workers run on one thread each (tests/conftest.py), this test on one and four."""
    batch, length, channels, state, rank, taps = 3, 70, 140, 16, 5, 4
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, z = r(batch, length, 2 * channels).chunk(2, dim=-1)
    params = [r(2, channels, taps) * 0.3, r(2, channels) * 0.1, r(2, rank + 2 * state, channels) / channels**0.5,
              r(2, channels, rank) / rank**0.5, r(2, channels) * 0.1 - 3, -torch.exp(r(2, channels, state) * 0.3),
              1 + 0.1 * r(2, channels)]

    def run(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            leaves = [t.detach().clone().requires_grad_(True) for t in [x, z, *params]]
            out = scan.bidirectional(*leaves, backend="cpu")
            return [out, *torch.autograd.grad(out.square().sum(), leaves)]
        finally:
            torch.set_num_threads(before)

    (out1, *grads1), (out4, *grads4) = run(1), run(4)
    assert torch.equal(out1, out4)
    for k, (one, several) in enumerate(zip(grads1, grads4)):
        assert_close(several, one, rtol_max=1e-6, name=f"gradient {k}")


def test_auto_picks_the_compiled_cpu_kernel_and_falls_back_with_a_warning(monkeypatch):
    from visionmamba.ops.scan import cpu

    assert scan.resolve_backend("auto", torch.device("cpu")) == "cpu"
    monkeypatch.setattr(cpu, "available", lambda: False)
    monkeypatch.setattr(cpu, "build_error", lambda: "CalledProcessError: no compiler")
    scan._warn_cpu_fallback.cache_clear()
    with pytest.warns(UserWarning, match="no compiler"):
        assert scan.resolve_backend("auto", torch.device("cpu")) == "reference"
    scan._warn_cpu_fallback.cache_clear()
    with pytest.raises(RuntimeError, match="'cpu' scan backend is unavailable"):
        scan.resolve_backend("cpu", torch.device("cpu"))


def test_model_argument_selects_the_backend(monkeypatch):
    from helpers import tiny_vim
    from visionmamba.ops.scan import chunked

    calls = []
    original = chunked.forward
    monkeypatch.setattr(chunked, "forward", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    model = tiny_vim(scan_backend="chunked").eval()
    reference_model = tiny_vim(scan_backend="reference").eval()
    reference_model.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x), reference_model(x), atol=1e-5, name="chunked model")
    assert len(calls) == 4  # 2 blocks x 2 directions


def test_torch_compile_fullgraph_with_the_custom_op():
    from helpers import tiny_vim

    torch.manual_seed(0)
    model = tiny_vim(depth=1, scan_backend="chunked")
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    eager_out = model(x)
    compiled_out = compiled(x)
    assert_close(compiled_out, eager_out, atol=1e-5, name="compiled forward")
    eager_grads = torch.autograd.grad(eager_out.sum(), list(model.parameters()))
    compiled_grads = torch.autograd.grad(compiled(x).sum(), list(model.parameters()))
    for a, b in zip(compiled_grads, eager_grads):
        assert_close(a, b, atol=1e-5, rtol_max=1e-4, name="compiled grad")


@pytest.mark.parametrize("backend", ["cpu", "loop"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch, length, steep, state",
                         [(3, 1, False, 16), (1, 63, False, 16), (2, 197, False, 16), (2, 70, True, 16), (2, 37, False, 12)])
def test_fused_bidirectional_matches_the_flip_composition(backend, dtype, batch, length, steep, state):
    """The fused mixer cores vs the reference composition: the CPU one (conv + SiLU both ways, reverse scan, no
    flips, dt_proj fused, chunks of 32 steps) and the loop one (both directions as one time-major scan). ``steep``: delta ~ 60 with |A| up to 16 * e, so most decays exp(delta A)
    underflow to 0 (the fast exp must do so as the reference does). N = 16 keeps the CPU states in registers;
    other N take the kernels' general paths."""
    channels, rank, taps = 37, 3, 4
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x, z = r(batch, length, 2 * channels).chunk(2, dim=-1)  # (b, L, E) views of in_proj's output, as in the mixer
    params = [r(2, channels, taps) * 0.3, r(2, channels) * 0.1, r(2, rank + 2 * state, channels) / channels**0.5,
              r(2, channels, rank) / rank**0.5, r(2, channels) * 0.1, -torch.exp(r(2, channels, state) * 0.3),
              1 + 0.1 * r(2, channels)]
    if steep:
        params[4] = params[4] + 60.0  # dt_proj bias
        params[5] = params[5] * torch.arange(1, state + 1, dtype=dtype)  # A
    dout = r(batch, length, channels)

    def run(backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in [x, z, *params]]
        out = scan.bidirectional(*leaves, backend=backend)
        return out, torch.autograd.grad(out, leaves, dout)

    out, grads = run(backend)
    ref, ref_grads = run("reference")
    fwd_tol, grad_tol = (1e-12, 1e-11) if dtype == torch.float64 else (2e-5, 1e-4)
    assert_close(out, ref, rtol_max=fwd_tol, name="forward")
    names = ["x", "z", "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A", "D"]
    for name, got, want in zip(names, grads, ref_grads):
        assert_close(got, want, rtol_max=grad_tol, name=f"grad {name}")


@pytest.mark.parametrize("backend", ["cpu", "chunked", "reference", "loop"])
def test_zero_size_batches_give_empty_results(backend):
    from helpers import tiny_vim

    model = tiny_vim(scan_backend=backend)
    out = model(torch.empty(0, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (0, 10)
    inputs = scan_inputs(0, 5, 7, 3, torch.float32)
    assert scan.selective_scan(**inputs, delta_softplus=True, backend=backend).shape == (0, 5, 7)
