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
pytestmark = pytest.mark.usefixtures("cuda_kernels")  # conftest.py: CPU tensors run the Triton kernels too


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
    assert {"visionmamba.conv_silu.default", "visionmamba.bi_scan.default", "visionmamba.add_rms_norm.default"} <= ops


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


# --------------------------------------------------------------- autotuning as a GPU does it, in the interpreter
# The interpreter has one config and nothing to time; a GPU has the whole list (scan_configs), sizes the
# buffers for all of it, and the autotuner runs every config that survives pruning into the same buffers
# before the one it picks. Each config is run here alone (pruning left it only) and after the others
# (every trial, Triton's reset and restore hooks included, then the pick), against the reference.
def _config_of(kernel_call) -> triton.Config:
    """The config a Triton autotuner trial runs (a free variable of its ``kernel_call`` closure)."""
    cells = dict(zip(kernel_call.__code__.co_freevars, kernel_call.__closure__))
    return cells["config"].cell_contents


def autotune_like_a_gpu(monkeypatch, kernel, pick: int, alone: bool):
    """``kernel`` holds the GPU's config list; its pruning keeps config ``pick`` alone, or keeps all and the
    timer makes that one the fastest. Returns the config and the list of those the trials run, in order."""
    configs = triton_backend.scan_configs(backward=kernel is triton_backend._scan_bwd_kernel, interpreter=False)
    pick = configs[pick]
    trials = []

    def bench(kernel_call, quantiles):
        trials.append(_config_of(kernel_call))
        kernel_call()
        return [0.0 if trials[-1] is pick else 1.0] * len(quantiles)

    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setitem(kernel.__dict__, "do_bench", bench)  # a cached_property: the instance attribute wins
    if alone:
        monkeypatch.setattr(kernel, "early_config_prune", lambda configs, named_args, **kwargs: [pick])
    return pick, trials


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "after-the-others"])
@pytest.mark.parametrize("pick", range(2), ids=lambda i: "BLOCK_E %d" % (64 // (i + 1)))
def test_every_gpu_backward_config_gives_every_gradient(monkeypatch, pick, alone):
    kernel = triton_backend._scan_bwd_kernel
    config, trials = autotune_like_a_gpu(monkeypatch, kernel, pick, alone)
    check_bidirectional(1, 70, 9)  # 70 channels: 2 programs of 64, 3 of 32
    assert kernel.best_config is config
    # alone: Triton 3.8 skips timing a single survivor of the pruning, 3.6 still times it
    assert [c.kwargs["BLOCK_E"] for c in trials] == [64, 32] if not alone else all(c is config for c in trials)


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "after-the-others"])
@pytest.mark.parametrize("pick", range(4))
def test_every_gpu_forward_config_in_training_and_in_place_inference(monkeypatch, pick, alone):
    kernel = triton_backend._scan_fwd_kernel
    config, trials = autotune_like_a_gpu(monkeypatch, kernel, pick, alone)
    inputs = bidirectional_inputs(1, 130, 5, rank=20)  # 130 channels: every block fits; rank 20: delta written out
    ref = scan.bidirectional(*[t.double() for t in inputs], backend="reference")
    with torch.no_grad():  # in place over u: every trial must leave u as it found it
        assert_close(scan.bidirectional(*inputs, backend="triton"), ref, rtol_max=2e-5, name="inference")
    assert kernel.best_config is config and (len(trials) == 4 if not alone else all(c is config for c in trials))
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = scan.bidirectional(*leaves, backend="triton")
    assert_close(out, ref, rtol_max=2e-5, name="training forward")
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref = scan.bidirectional(*ref_leaves, backend="reference")
    for got, want in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(ref.sum(), ref_leaves)):
        assert_close(got, want, rtol_max=1e-4, name="gradient after the forward's states")
