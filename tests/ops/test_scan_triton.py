"""Triton kernels against the reference: on a GPU when there is one, else in Triton's CPU interpreter.

Outputs are poisoned (NaN-filled) before every kernel launch, so an element a kernel fails to write
shows up as a failure. Shapes are tiny: the interpreter runs each program in Python.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py switches the interpreter on before triton is imported"
triton = pytest.importorskip("triton")

from helpers import assert_close  # noqa: E402
from scan_cases import check_against_reference, scan_inputs  # noqa: E402
from visionmamba.ops import scan  # noqa: E402
from visionmamba.ops.scan import triton as triton_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _PoisonedTorch:
    """``torch`` as the launchers see it, except that new float buffers start as NaN, not garbage."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def poisoned_outputs_and_short_chunks(monkeypatch):
    monkeypatch.setattr(triton_backend, "torch", _PoisonedTorch())
    monkeypatch.setattr(triton_backend, "CHECKPOINT_STEPS", 16)  # several chunks, and a partial one, at interpreter-friendly lengths


def on_device(inputs):
    return {k: v.to(DEVICE) for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 37: 2 chunks + 5; state 20: the backward's 2N sums over channels take two reduce-scatters, the second part-filled
@pytest.mark.parametrize("batch, length, state", [(3, 1, 16), (1, 63, 16), (3, 37, 5), (1, 19, 20)])
def test_single_direction_matches_reference(dtype, batch, length, state):
    inputs = on_device(scan_inputs(batch, 37, length, state, dtype))  # 37 channels: not a multiple of any block
    run = lambda **kw: scan.selective_scan(**kw, backend="triton")  # noqa: E731
    check_against_reference(run, inputs, dtype)


def test_single_direction_without_optional_inputs():
    inputs = on_device(scan_inputs(2, 5, 20, 4, torch.float32))
    for absent in ("D", "z", "delta_bias"):
        inputs.pop(absent)
    inputs["delta"] = inputs["delta"].abs()
    out = scan.selective_scan(**inputs, backend="triton")
    ref = scan.selective_scan(**{k: v.double() for k, v in inputs.items()}, backend="reference")
    assert_close(out, ref, rtol_max=2e-5, name="forward")


def bidirectional_inputs(batch, channels, length, state=4, rank=3, taps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, z = r(batch, length, 2 * channels).chunk(2, dim=-1)  # (b, L, E) strided views, as in the mixer
    params = [r(2, channels, taps) * 0.3, r(2, channels) * 0.1, r(2, rank + 2 * state, channels) / channels**0.5,
              r(2, channels, rank) / rank**0.5, r(2, channels) * 0.1, -torch.exp(r(2, channels, state) * 0.3),
              1 + 0.1 * r(2, channels)]
    return [t.to(DEVICE) for t in [x, z, *params]]


@pytest.mark.parametrize("batch, channels, length", [(3, 37, 1), (1, 70, 63), (2, 37, 37)])  # 70: 2 and 3 blocks
def test_fused_bidirectional_matches_the_flip_composition_forward_and_every_gradient(batch, channels, length):
    check_bidirectional(batch, channels, length)


def test_backward_with_one_channel_per_thread(monkeypatch):
    """The interpreter runs the first backward config (two channels a thread, 64 a program); the GPU's
    autotuner may pick one channel a thread, forced here."""
    assert triton_backend.scan_configs(backward=True)[0].kwargs["BLOCK_E"] == 64
    monkeypatch.setattr(triton_backend._scan_bwd_kernel, "configs", [triton.Config({"BLOCK_E": 32}, num_warps=1)])
    check_bidirectional(2, 37, 37)


def check_bidirectional(batch, channels, length):
    inputs = bidirectional_inputs(batch, channels, length)
    dout = torch.randn(batch, length, channels, generator=torch.Generator().manual_seed(5)).to(DEVICE)

    def run(backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = scan.bidirectional(*leaves, backend=backend)
        return out, torch.autograd.grad(out, leaves, dout)

    out, grads = run("triton")
    ref, ref_grads = run("reference")
    assert_close(out, ref, rtol_max=2e-5, name="forward")
    names = ["x", "z", "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A", "D"]
    for name, got, want in zip(names, grads, ref_grads):
        assert_close(got, want, rtol_max=1e-4, name=f"grad {name}")


def test_fused_bidirectional_is_deterministic():
    inputs = bidirectional_inputs(2, 20, 21)

    def grads():
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = scan.bidirectional(*leaves, backend="triton")
        return [out, *torch.autograd.grad(out.square().sum(), leaves)]

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_model_with_triton_backend_matches_reference_model():
    from helpers import tiny_vim

    torch.manual_seed(0)
    model = tiny_vim(scan_backend="triton").to(DEVICE)
    ref_model = tiny_vim(scan_backend="reference").to(DEVICE)
    ref_model.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 40, device=DEVICE)
    out, ref = model(x), ref_model(x)
    assert_close(out, ref, atol=1e-5, name="logits")
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    ref_grads = torch.autograd.grad(ref.square().sum(), list(ref_model.parameters()))
    for (name, _), got, want in zip(model.named_parameters(), grads, ref_grads):
        assert_close(got, want, rtol_max=1e-4, atol=1e-7, name=name)


def test_compile_fullgraph_and_export_see_the_kernels_as_ops():
    from helpers import tiny_vim

    torch.manual_seed(0)
    model = tiny_vim(depth=1, scan_backend="triton").to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    out, ref = torch.compile(model, fullgraph=True)(x), model(x)
    assert_close(out, ref, atol=1e-5, name="compiled")
    for got, want in zip(torch.autograd.grad(out.sum(), list(model.parameters())),
                         torch.autograd.grad(ref.sum(), list(model.parameters()))):
        assert_close(got, want, rtol_max=1e-4, atol=1e-7, name="compiled gradient")
    program = torch.export.export(model.eval(), (x,))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"visionmamba.triton_conv_silu.default", "visionmamba.triton_bi_scan.default",
            "visionmamba.triton_add_rms_norm.default"} <= ops


def test_bf16_autocast_end_to_end_keeps_state_and_residual_in_float32():
    from helpers import tiny_vim

    torch.manual_seed(0)
    model = tiny_vim(scan_backend="triton").to(DEVICE).eval()
    residual_dtypes = []
    for block in model.layers:
        block.register_forward_hook(lambda module, args, output: residual_dtypes.append(output[1].dtype))
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = model(x)
    assert residual_dtypes[len(model.layers):] == [torch.float32] * len(model.layers)
    assert_close(out.float(), ref, rtol_max=5e-2, name="bf16 autocast logits")


# dt_proj fused into the scan up to rank 16 (4: dt, B and C read two per 64-bit load; 3: one), written out above
@pytest.mark.parametrize("rank", [3, 4, 17])
def test_inference_writes_over_u_saves_no_states_and_gives_the_training_output(monkeypatch, rank):
    calls = []
    real = triton_backend._scan_fwd

    def spy(u, *args, **kwargs):
        states = real(u, *args, **kwargs)
        ys = args[8]
        calls.append((states.shape[2], ys.data_ptr() == u.data_ptr(), kwargs.get("dt_weight") is not None))
        return states

    monkeypatch.setattr(triton_backend, "_scan_fwd", spy)
    inputs = bidirectional_inputs(2, 20, 21, rank=rank)
    with torch.no_grad():
        inferred = scan.bidirectional(*inputs, backend="triton")
    trained = scan.bidirectional(*[t.detach().requires_grad_(True) for t in inputs], backend="triton")
    # inference: over u, no states, delta from dt in the kernel at small ranks; training: 21 steps in chunks of 16
    assert calls == [(0, True, rank <= triton_backend.FUSED_DT_RANK), (2, False, False)]
    assert_close(inferred, trained.detach(), rtol_max=1e-6, name="inference against training")
    ref = scan.bidirectional(*[t.double() for t in inputs], backend="reference")
    assert_close(inferred, ref, rtol_max=2e-5, name="inference")


def test_inference_matches_the_reference_model_eager_and_compiled():
    from helpers import tiny_vim

    torch.manual_seed(0)
    model = tiny_vim(depth=2, scan_backend="triton").to(DEVICE).eval()  # 2: the residual stream updated in place
    ref_model = tiny_vim(depth=2, scan_backend="reference").to(DEVICE).eval()
    ref_model.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        out, compiled, ref = model(x), torch.compile(model, fullgraph=True)(x), ref_model(x)
    assert_close(out, ref, atol=1e-5, name="inference")
    assert_close(compiled, out, atol=1e-5, name="compiled inference")


def test_autotuning_prunes_channel_blocks_with_the_arguments_as_the_launches_pass_them():
    """Triton's autotuner calls the prune function with the positional arguments (none: the launches pass
    keywords) and the keywords apart; on a GPU, where there are several configs, this runs at first launch."""
    configs = [triton.Config({"BLOCK_E": block}, num_warps=1) for block in (64, 128, 256)]
    inputs = bidirectional_inputs(1, 40, 5)
    u = torch.zeros(2, 1, 5, 40)
    B = torch.zeros(2, 1, 5, 4)
    _, _, args = triton_backend.scan_fwd_launch(u, u, inputs[7].transpose(1, 2), B, B, None, None, None, True,
                                                u, torch.empty(2, 1, 1, 4, 40), 16)
    kept = triton_backend._fitting_configs(configs, {}, **args)
    assert [c.kwargs["BLOCK_E"] for c in kept] == [64]
    assert [c.kwargs["BLOCK_E"] for c in triton_backend._fitting_configs(configs, {}, **dict(args, E=200))] == [64, 128, 256]
