"""The exporter's work on ONNX graphs: the stock-operator bodies of the nodes ``visionmamba.BiSelectiveScan``
and ``visionmamba.ConvSiLU`` as model-local functions, and ``Scan`` bodies that take every value they read as an input.

Why a function: a runtime with our kernel (ONNX Runtime with the library of :mod:`.runtime_kernels`, OpenVINO
with its extension) runs the node; any other runtime finds the node's body in the file and runs that, so one
file serves both. :func:`standard_operators` inlines the bodies: a file of standard operators only. Why explicit inputs: ONNX lets a ``Scan`` body read values of the
enclosing graph by name; OpenVINO reads only the values passed to the node ("Number of Scan node inputs is
less than required"), so every such value is passed as a loop-carried state that the body hands back.
"""
import functools
import hashlib
import sys
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Set, Tuple

import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import helper
from torch import nn

from visionmamba.deploy import onnx_nodes as onnx_node
from visionmamba.deploy.runtime_kernels import cache_dir
from visionmamba.files import atomic_write
from visionmamba.ops.scan import loop

INPUTS = ("u", "x_proj_out", "dt_weight", "A", "D", "z", "bias")  # BiSelectiveScan's
CONV_INPUTS = ("x", "weight", "bias")  # ConvSiLU's


class _BiScan(nn.Module):
    def forward(self, u, x_proj_out, dt_weight, A, D, z, bias) -> torch.Tensor:
        return loop.bi_scan(u, x_proj_out, dt_weight, A, D, z, bias)


class _ConvSiLU(nn.Module):
    def forward(self, x, weight, bias) -> torch.Tensor:
        return onnx_node.conv_silu_stock(x, weight, bias)


@functools.cache
def _function_bytes(op_type: str, sizes: Tuple[int, ...]) -> bytes:
    """The serialized function of ``op_type`` for the static ``sizes``, cached on disk (the scan's export
    takes ~20 s) by the sources and versions it comes from; a cached file that does not parse is made anew."""
    digest = hashlib.sha1(f"{torch.__version__} {onnx.__version__} {op_type} {sizes}".encode())
    for module in (loop, onnx_node, sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    path = cache_dir() / f"{op_type}_function_{digest.hexdigest()[:12]}.onnxfn"
    try:
        onnx.FunctionProto().ParseFromString(path.read_bytes())
        return path.read_bytes()
    except (OSError, DecodeError):
        data = _export_function(op_type, sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return data


def _example(op_type: str, sizes: Tuple[int, ...]):
    """(module, example inputs, dynamic shapes, input names) of ``op_type``'s body."""
    from torch.export import Dim

    batch, length, channels = (Dim(n, min=2) for n in ("batch", "length", "channels"))
    b, L, E = 2, 11, 8
    if op_type == onnx_node.CONV_OP_TYPE:  # ONNX's Conv takes its groups, the channels, as a constant
        K, E = sizes
        args = (torch.randn(b, L, E), torch.randn(2, E, K), torch.randn(2, E))
        return _ConvSiLU(), args, ({0: batch, 1: length}, None, None), CONV_INPUTS
    R, N = sizes
    args = (torch.randn(2, b, L, E), torch.randn(2, b, L, R + 2 * N), torch.randn(2, E, R), -torch.rand(2, E, N),
            torch.randn(2, E), torch.randn(b, L, E), torch.randn(2, E))
    dims = ({1: batch, 2: length, 3: channels}, {1: batch, 2: length}, {1: channels}, {1: channels}, {1: channels},
            {0: batch, 1: length, 2: channels}, {1: channels})
    return _BiScan(), args, dims, INPUTS


def _export_function(op_type: str, sizes: Tuple[int, ...]) -> bytes:
    module, args, dims, names = _example(op_type, sizes)
    with warnings.catch_warnings():  # torch.onnx notes each axis that shares another's constraints
        warnings.simplefilter("ignore", UserWarning)
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dims, input_names=list(names),
                                    output_names=["y"], external_data=False, verbose=False)
    model = onnx.shape_inference.infer_shapes(program.model_proto)
    graph = model.graph
    explicit_scan_inputs(graph, _types(graph))
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]
    function = helper.make_function(onnx_node.DOMAIN, op_type, [i.name for i in graph.input],
                                    [o.name for o in graph.output], constants + list(graph.node),
                                    [o for o in model.opset_import if o.domain == ""])
    return function.SerializeToString()


def function_of(op_type: str, *sizes: int) -> onnx.FunctionProto:
    """The body of the node ``op_type`` in stock operators for its static sizes (BiSelectiveScan: dt rank and
    state size, for any model width; ConvSiLU: taps and channels): any batch and length."""
    function = onnx.FunctionProto()
    function.ParseFromString(_function_bytes(op_type, sizes))
    return function


def bi_scan_function(rank: int, state: int) -> onnx.FunctionProto:
    """``visionmamba.BiSelectiveScan`` in stock operators (the loop backend's ``Scan``)."""
    return function_of(onnx_node.OP_TYPE, rank, state)


def add_fallback(model: onnx.ModelProto, rank: int, state: int, taps: int, channels: int) -> None:
    """Give ``model`` the bodies of its ``BiSelectiveScan`` and ``ConvSiLU`` nodes (once; the model's dt rank,
    state size, conv taps and mixer channels E) and make its Scan bodies explicit."""
    for op_type, sizes in ((onnx_node.OP_TYPE, (rank, state)), (onnx_node.CONV_OP_TYPE, (taps, channels))):
        if not any(f.domain == onnx_node.DOMAIN and f.name == op_type for f in model.functions):
            model.functions.append(function_of(op_type, *sizes))
    if not any(o.domain == onnx_node.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(onnx_node.DOMAIN, onnx_node.VERSION))
    explicit_scan_inputs(model.graph, _types(model.graph))


def _types(graph: onnx.GraphProto) -> Dict[str, onnx.TypeProto]:
    """The type (element type and shape, as far as known) of every typed value of ``graph`` and its subgraphs."""
    types = {v.name: v.type for v in (*graph.input, *graph.output, *graph.value_info)}
    for t in graph.initializer:
        types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
    for g in _subgraphs(graph.node):
        types.update(_types(g))
    return types


def _subgraphs(nodes: Iterable[onnx.NodeProto]) -> List[onnx.GraphProto]:
    return [a.g for n in nodes for a in n.attribute if a.type == onnx.AttributeProto.GRAPH] + \
           [g for n in nodes for a in n.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]


def free_names(graph: onnx.GraphProto) -> List[str]:
    """Values ``graph`` (or a subgraph of it) reads that it neither takes as an input nor defines, in order."""
    defined: Set[str] = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {o for n in graph.node for o in n.output}
    used = [name for n in graph.node for name in n.input if name]
    used += [name for g in _subgraphs(graph.node) for name in free_names(g)]
    used += [o.name for o in graph.output]
    return [name for name in dict.fromkeys(used) if name not in defined]


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Reads of ``old`` in ``graph`` and its subgraphs read ``new``."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
    for output in graph.output:
        if output.name == old:
            output.name = new
    for g in _subgraphs(graph.node):
        _rename(g, old, new)


def explicit_scan_inputs(graph: onnx.GraphProto, types: Dict[str, onnx.TypeProto]) -> None:
    """Every ``Scan`` in ``graph`` (innermost first) takes the outer values its body reads as extra states,
    passed through unchanged: results are the same, and a runtime that reads only the node's inputs has them."""
    for g in _subgraphs(graph.node):
        explicit_scan_inputs(g, types)
    for node in graph.node:
        if node.op_type != "Scan" or node.domain not in ("", "ai.onnx"):
            continue
        body = next(a.g for a in node.attribute if a.name == "body")
        states = len(node.input) - next(a.i for a in node.attribute if a.name == "num_scan_inputs")
        for k, name in enumerate(free_names(body)):
            inner, passed = f"{name}__scan_in", f"{name}__scan_out"
            _rename(body, name, inner)
            at = states + k
            node.input.insert(at, name)
            node.output.insert(at, f"{node.output[0]}__{passed}" if node.output else passed)
            kind = types.get(name) or helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None)
            body.input.insert(at, helper.make_value_info(inner, kind))  # ONNX Runtime wants the shapes of
            body.output.insert(at, helper.make_value_info(passed, kind))  # a Scan body's outputs
            body.node.append(helper.make_node("Identity", [inner], [passed]))


def standard_operators(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every node of ours replaced by its body: standard operators only, no local function and
    no custom domain left (what runtimes without our kernels, and OpenVINO, which runs no local functions,
    read). A file without our nodes comes back as it was."""
    import onnx.inliner

    inlined = onnx.inliner.inline_local_functions(model)
    del inlined.functions[:]
    kept = [o for o in inlined.opset_import if o.domain != onnx_node.DOMAIN]
    del inlined.opset_import[:]
    inlined.opset_import.extend(kept)
    left = {n.op_type for g in (inlined.graph, *_all_subgraphs(inlined.graph)) for n in g.node if n.domain == onnx_node.DOMAIN}
    if left:
        raise RuntimeError(f"nodes {sorted(left)} of domain {onnx_node.DOMAIN!r} have no body in this file")
    return inlined


def _all_subgraphs(graph: onnx.GraphProto) -> List[onnx.GraphProto]:
    found = _subgraphs(graph.node)
    return [g for sub in found for g in (sub, *_all_subgraphs(sub))]
