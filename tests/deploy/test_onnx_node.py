"""The ONNX node visionmamba.BiSelectiveScan: what torch.onnx.export writes for Vim, our ONNX Runtime kernel of
it, its stock-operator body (the model-local function) and the Scan bodies other runtimes can read."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import visionmamba  # noqa: F401  (registers the models and the ops)
from visionmamba.deploy import onnx_graph, runtime_kernels
from visionmamba.deploy import onnx_nodes as onnx_node
from visionmamba.deploy.export import onnx_session
from visionmamba.ops.scan import loop

onnxruntime = pytest.importorskip("onnxruntime")

TINY = dict(depth=2, embed_dim=32, num_classes=10, patch_size=8, stride=8)
RANK, STATE = 2, 16  # the dt rank and state size of TINY's mixers


def scan_args(batch: int, length: int, channels: int = 24, rank: int = 3, state: int = 4, dtype=torch.float32):
    g = torch.Generator().manual_seed(batch * 100 + length)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return (r(2, batch, length, channels), r(2, batch, length, rank + 2 * state), r(2, channels, rank) / 2,
            -torch.rand(2, channels, state, generator=g, dtype=dtype) * 2, r(2, channels), r(batch, length, channels),
            r(2, channels))


@pytest.mark.parametrize("batch, length", [(1, 1), (2, 13), (1, 40)])
def test_the_nodes_stock_body_is_the_op_bi_scan(batch, length):
    args = scan_args(batch, length, dtype=torch.float64)
    expected = torch.ops.visionmamba.bi_scan(*args, 0)[0]
    torch.testing.assert_close(loop.bi_scan(*args), expected, rtol=1e-12, atol=1e-12)


def test_the_onnx_conv_is_the_op_conv_silu():
    x, w, b = torch.randn(2, 9, 12, dtype=torch.float64), torch.randn(2, 12, 4, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
    torch.testing.assert_close(onnx_node.conv_silu_stock(x, w, b), torch.ops.visionmamba.conv_silu(x, w, b), rtol=1e-12, atol=1e-12)


def close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)  # float32, sums in another order


def one_node_model(function: onnx.FunctionProto) -> bytes:
    """A model of one BiSelectiveScan node whose local function is ``function``."""
    names = onnx_graph.INPUTS
    node = helper.make_node(onnx_node.OP_TYPE, list(names), ["y"], domain=onnx_node.DOMAIN)
    shapes = {"u": [2, "b", "L", "E"], "x_proj_out": [2, "b", "L", RANK + 2 * STATE], "dt_weight": [2, "E", RANK],
              "A": [2, "E", STATE], "D": [2, "E"], "z": ["b", "L", "E"], "bias": [2, "E"]}  # OpenVINO wants ranks
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in names]
    graph = helper.make_graph([node], "one_node", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "L", "E"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(onnx_node.DOMAIN, 1)],
                              functions=[function])
    return model.SerializeToString()


def run(model: bytes, args, fused: bool) -> np.ndarray:
    session = onnx_session(model, fused=fused)
    return session.run(None, {n: a.numpy() for n, a in zip(onnx_graph.INPUTS, args)})[0]


@pytest.mark.parametrize("batch, length", [(1, 1), (3, 37)])
def test_onnx_runtime_runs_our_kernel_when_registered_and_the_body_otherwise(batch, length):
    args = scan_args(batch, length, rank=RANK, state=STATE)
    expected = torch.ops.visionmamba.bi_scan(*args, 0)[0].numpy()
    real = one_node_model(onnx_graph.bi_scan_function(RANK, STATE))
    close(run(real, args, fused=True), expected)
    close(run(real, args, fused=False), expected)
    # a body that returns z: with the library registered the runtime must not run it
    wrong = helper.make_function(onnx_node.DOMAIN, onnx_node.OP_TYPE, list(onnx_graph.INPUTS), ["y"],
                                 [helper.make_node("Identity", ["z"], ["y"])], [helper.make_opsetid("", 20)])
    close(run(one_node_model(wrong), args, fused=True), expected)
    np.testing.assert_array_equal(run(one_node_model(wrong), args, fused=False), args[5].numpy())


def conv_model(function: onnx.FunctionProto) -> bytes:
    """A model of one ConvSiLU node whose local function is ``function``."""
    node = helper.make_node(onnx_node.CONV_OP_TYPE, list(onnx_graph.CONV_INPUTS), ["u"], domain=onnx_node.DOMAIN)
    shapes = {"x": ["b", "L", 40], "weight": [2, 40, 4], "bias": [2, 40]}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in onnx_graph.CONV_INPUTS]
    graph = helper.make_graph([node], "conv", inputs, [helper.make_tensor_value_info("u", TensorProto.FLOAT, [2, "b", "L", 40])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(onnx_node.DOMAIN, 1)],
                              functions=[function])
    return model.SerializeToString()


@pytest.mark.parametrize("length", [1, 3, 29])
def test_the_conv_node_runs_our_kernel_in_both_runtimes_and_its_body_otherwise(length, tmp_path):
    g = torch.Generator().manual_seed(length)
    x, w, b = torch.randn(2, length, 40, generator=g), torch.randn(2, 40, 4, generator=g), torch.randn(2, 40, generator=g)
    feed = {"x": x.numpy(), "weight": w.numpy(), "bias": b.numpy()}
    expected = torch.ops.visionmamba.conv_silu(x, w, b).numpy()
    real = conv_model(onnx_graph.function_of(onnx_node.CONV_OP_TYPE, 4, 40))
    axes = helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", TensorProto.INT64, [1], [0]))
    stacked = [axes, helper.make_node("Unsqueeze", ["x", "axes"], ["x2"]), helper.make_node("Concat", ["x2", "x2"], ["u"], axis=0)]
    wrong = conv_model(helper.make_function(onnx_node.DOMAIN, onnx_node.CONV_OP_TYPE, list(onnx_graph.CONV_INPUTS), ["u"],
                                            stacked, [helper.make_opsetid("", 20)]))
    close(onnx_session(wrong, fused=True).run(None, feed)[0], expected)  # the kernel, not the body
    np.testing.assert_array_equal(onnx_session(wrong, fused=False).run(None, feed)[0], np.stack([x.numpy()] * 2))
    for fused in (True, False):
        out = onnx_session(real, fused=fused).run(None, feed)[0]
        close(out, expected)
    pytest.importorskip("openvino")
    from visionmamba.deploy.export import openvino_model

    (tmp_path / "conv.onnx").write_bytes(real)
    for fused in (True, False):
        close(openvino_model(tmp_path / "conv.onnx", fused=fused)(feed)[0], expected)


def test_the_kernel_refuses_mismatched_shapes_in_one_line():
    args = list(scan_args(2, 5, rank=RANK, state=STATE))
    args[5] = torch.randn(2, 6, 24)  # z one step longer than u
    with pytest.raises(Exception, match="BiSelectiveScan: z does not match"):
        run(one_node_model(onnx_graph.bi_scan_function(RANK, STATE)), args, fused=True)


def test_scan_bodies_take_every_value_they_read_as_an_input():
    function = onnx_graph.bi_scan_function(RANK, STATE)
    scans = [n for n in function.node if n.op_type == "Scan"]
    assert scans, "the body is a Scan loop"
    for node in scans:
        body = next(a.g for a in node.attribute if a.name == "body")
        assert onnx_graph.free_names(body) == []


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_corrupt_library_in_the_cache_is_rebuilt(tmp_path, monkeypatch, runtime):
    pytest.importorskip(runtime)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    kind = runtime_kernels.ONNXRUNTIME if runtime == "onnxruntime" else runtime_kernels.OPENVINO
    path = runtime_kernels.library_path(kind)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a shared library")
    args = scan_args(2, 9, rank=RANK, state=STATE)
    feed = {n: a.numpy() for n, a in zip(onnx_graph.INPUTS, args)}
    model = one_node_model(onnx_graph.bi_scan_function(RANK, STATE))
    if runtime == "onnxruntime":
        options = onnxruntime.SessionOptions()
        assert runtime_kernels.register_onnxruntime(options) == path
        out = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    else:
        import openvino

        core = openvino.Core()
        assert runtime_kernels.add_to_openvino(core) == path
        out = core.compile_model(core.read_model(model), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feed)[0]
    assert path.stat().st_size > 10_000
    close(out, torch.ops.visionmamba.bi_scan(*args, 0)[0].numpy())


@pytest.mark.parametrize("batch, length", [(1, 1), (3, 37)])
def test_openvino_runs_our_kernel_with_the_extension_and_the_inlined_body_without(batch, length, tmp_path):
    pytest.importorskip("openvino")
    from visionmamba.deploy.export import openvino_model

    args = scan_args(batch, length, rank=RANK, state=STATE)
    feed = {n: a.numpy() for n, a in zip(onnx_graph.INPUTS, args)}
    expected = torch.ops.visionmamba.bi_scan(*args, 0)[0].numpy()
    (tmp_path / "real.onnx").write_bytes(one_node_model(onnx_graph.bi_scan_function(RANK, STATE)))
    close(openvino_model(tmp_path / "real.onnx", fused=True)(feed)[0], expected)
    close(openvino_model(tmp_path / "real.onnx", fused=False)(feed)[0], expected)
    wrong = helper.make_function(onnx_node.DOMAIN, onnx_node.OP_TYPE, list(onnx_graph.INPUTS), ["y"],
                                 [helper.make_node("Identity", ["z"], ["y"])], [helper.make_opsetid("", 20)])
    (tmp_path / "wrong.onnx").write_bytes(one_node_model(wrong))
    close(openvino_model(tmp_path / "wrong.onnx", fused=True)(feed)[0], expected)  # the kernel, not the body


def test_an_old_onnx_runtime_is_one_line():
    class Old:
        __version__ = "1.16.3"

    with pytest.raises(RuntimeError, match="need onnxruntime >= 1.21, found 1.16.3"):
        runtime_kernels.check_onnxruntime(Old)


def test_without_a_compiler_the_sessions_warn_once_and_run_the_bodies(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime_kernels, "available", lambda runtime: (False, "RuntimeError: no C++ compiler found"))
    args = scan_args(2, 7, rank=RANK, state=STATE)
    model = one_node_model(onnx_graph.bi_scan_function(RANK, STATE))
    expected = torch.ops.visionmamba.bi_scan(*args, 0)[0].numpy()
    with pytest.warns(UserWarning, match="onnxruntime kernels are unavailable .*no C\\+\\+ compiler"):
        close(run(model, args, fused=True), expected)
    pytest.importorskip("openvino")
    from visionmamba.deploy.export import openvino_model

    (tmp_path / "m.onnx").write_bytes(model)
    with pytest.warns(UserWarning, match="openvino kernels are unavailable"):
        out = openvino_model(tmp_path / "m.onnx")({n: a.numpy() for n, a in zip(onnx_graph.INPUTS, args)})[0]
    close(out, expected)
