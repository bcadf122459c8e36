"""The fused ops: one declaration each, a CPU and a CUDA kernel against the same schema, one dispatch table."""
import importlib

import pytest
import torch

import visionmamba
from helpers import assert_close
from visionmamba.ops import library, scan

SCAN_OPS = ["selective_scan", "selective_scan_backward", "conv_silu", "conv_silu_backward", "bi_scan",
            "bi_scan_backward", "bi_scan_", "bi_scan_inference", "mixer_core"]
CPU_ONLY = ["mixer_core"]  # the CPU's fused inference core (the CUDA path composes the other ops)
NORM_OPS = ["add_rms_norm", "add_rms_norm_backward", "add_rms_norm_", "rms_norm"]


def test_the_ops_and_the_device_kernels_the_dispatcher_has():
    kernels = library.dispatcher_kernels()
    assert list(kernels) == SCAN_OPS + NORM_OPS and len(kernels) <= 13
    assert kernels == {name: ["cpu"] if name in CPU_ONLY else ["cpu", "cuda"] for name in SCAN_OPS + NORM_OPS}
    for name in NORM_OPS:
        assert library.KERNELS[name] == {"cpu": "visionmamba.ops.norm_cpu", "cuda": "visionmamba.ops.norm_triton"}
    for name, schema in library.SCHEMAS.items():
        assert str(getattr(torch.ops.visionmamba, name).default._schema) == f"visionmamba::{name}{schema}"


def test_every_kernel_module_defines_the_kernel_of_each_op_it_claims():
    for name, kernels in library.KERNELS.items():
        for device_type, module in kernels.items():
            if device_type == "cuda":
                pytest.importorskip("triton")
            assert callable(getattr(importlib.import_module(module), name)), (name, device_type)


def test_an_op_without_a_kernel_for_the_device_says_so_in_one_line():
    with pytest.raises(NotImplementedError, match="visionmamba::rms_norm has no kernel for xpu tensors"):
        library._run("rms_norm", "xpu", torch.ones(2, 4), torch.ones(4), 1e-5)


def test_the_route_to_the_cuda_kernels_is_undone_on_leaving():
    assert not library.routed_to_cuda("cpu")
    with pytest.raises(RuntimeError), library.cuda_kernels_on_cpu():
        assert library.routed_to_cuda("cpu") and library.kernel_module("cpu") == "visionmamba.ops.scan.triton"
        raise RuntimeError("inside")
    assert not library.routed_to_cuda("cpu") and library.kernel_module("cpu") == "visionmamba.ops.scan.cpu"


def test_a_backend_for_another_device_is_one_clear_error():
    with pytest.raises(ValueError, match="'triton' scan backend runs on cuda tensors, got cpu"):
        scan.resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"expected 'auto' or one of \['reference', 'cpu', 'chunked', 'triton', 'loop'"):
        scan.resolve_backend("fast", torch.device("cpu"))
    import visionmamba.deploy.onnx_nodes  # noqa: F401  (registers the fused nodes' backend, as an export does)

    with pytest.raises(ValueError, match="'onnx' scan backend is what torch.onnx.export writes; it does not run eagerly"):
        scan.resolve_backend("onnx", torch.device("cpu"))


def test_meta_tensors_take_the_fused_ops_fakes_one_call_per_op(monkeypatch):
    """A model on the meta device (shapes only) runs each layer's core as the fused ops' fakes, not as a
    per-chunk loop of meta operators (seconds per stride-8 model), and needs no kernel build."""
    assert scan.resolve_backend("auto", torch.device("meta")) == "cpu"
    monkeypatch.setattr(scan, "cpu_available", lambda: pytest.fail("a meta forward built the CPU kernels"))
    model = visionmamba.create_model("vim_tiny_patch16_224", depth=2, device="meta")
    calls = []
    monkeypatch.setattr(scan.chunked, "bidirectional", lambda *a: calls.append(a))
    x = torch.randn(2, 3, 64, 48, device="meta", requires_grad=True)
    out = model(x)
    out.sum().backward()
    assert out.shape == (2, 1000) and out.device.type == "meta" and x.grad.shape == x.shape and not calls


def _bi_inputs(dtype, batch=2, length=23, channels=20, state=4, rank=3):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    u = torch.nn.functional.silu(r(2, batch, length, channels))
    return [u, r(2, batch, length, rank + 2 * state) * 0.5, r(2, channels, rank) * 0.5,
            -torch.exp(r(2, channels, state) * 0.3), r(2, channels), r(batch, length, channels), r(2, channels) * 0.1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_inference_in_place_equals_the_functional_op(dtype):
    u, *rest = _bi_inputs(dtype)
    out, checkpoints = torch.ops.visionmamba.bi_scan(u, *rest, 0)
    assert checkpoints.shape == (2, 2, 0, 4, 20)
    owned = u.clone()
    torch.ops.visionmamba.bi_scan_(owned, *rest)
    assert torch.equal(owned[0], out)
    strided = u.transpose(2, 3).contiguous().transpose(2, 3)  # not contiguous: computed aside, then copied
    torch.ops.visionmamba.bi_scan_(strided, *rest)
    assert torch.equal(strided[0], out)
    assert torch.equal(torch.ops.visionmamba.bi_scan_inference(u, *rest), out)  # the graphs' op; u untouched
    assert torch.equal(u, _bi_inputs(dtype)[0])


def test_cpu_kernels_keep_a_checkpoint_every_32_steps():
    inputs = _bi_inputs(torch.float64, length=70)
    out, states = torch.ops.visionmamba.bi_scan(*inputs, 32)
    assert states.shape == (2, 2, 3, 4, 20) and states.dtype == torch.float64  # 70 steps: chunks at 0, 32, 64
    assert torch.equal(states[:, :, 0], torch.zeros_like(states[:, :, 0]))  # before the first step
    assert states[:, :, 1:].abs().min() > 0
    assert torch.equal(out, torch.ops.visionmamba.bi_scan(*inputs, 0)[0])
    with pytest.raises(ValueError, match="a checkpoint every 32 steps or none"):
        torch.ops.visionmamba.bi_scan(*inputs, 64)
    with pytest.raises(ValueError, match="restarts from the states bi_scan saved every 32 steps"):
        torch.ops.visionmamba.bi_scan_backward(torch.ones_like(out), *inputs, 32, states[:, :, :2].contiguous())


def test_cpu_and_cuda_kernels_compute_the_same_op():
    """The same op, inputs and schema through both devices' kernels (Triton in its interpreter here)."""
    pytest.importorskip("triton")
    if not scan.triton_available():
        pytest.skip("Triton cannot run here")
    inputs = _bi_inputs(torch.float32)
    cpu_out = torch.ops.visionmamba.bi_scan(*inputs, 0)[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with library.cuda_kernels_on_cpu():
        cuda_out, states = torch.ops.visionmamba.bi_scan(*[t.to(device) for t in inputs], 16)
    assert states.shape == (2, 2, 2, 4, 20)  # 23 steps: a checkpoint every 16
    assert_close(cuda_out.cpu(), cpu_out, rtol_max=2e-5, name="bi_scan")
    with library.cuda_kernels_on_cpu():
        cuda_inference = torch.ops.visionmamba.bi_scan_inference(*[t.to(device) for t in inputs])
    assert_close(cuda_inference.cpu(), cpu_out, rtol_max=2e-5, name="bi_scan_inference")
