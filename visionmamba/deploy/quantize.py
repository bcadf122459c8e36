"""Post-training static int8 of an exported model, by the runtimes' own tools: ONNX Runtime's
``onnxruntime.quantization`` (QDQ, per-channel int8 weights) and OpenVINO's NNCF.

What is quantized: the matrix products (in_proj, x_proj, out_proj, the head) and the patch embedding. The fused
nodes ``visionmamba.ConvSiLU`` and ``visionmamba.BiSelectiveScan`` stay float32: the scan's recurrence
multiplies a state by its decay L times, so rounding there compounds, and the runtimes' quantizers do not
touch custom nodes anyway. Activations are calibrated on the images given (min/max ranges in ONNX Runtime,
NNCF's transformer preset in OpenVINO, which keeps the norms and the elementwise ops float).

ONNX Runtime keeps the products' outputs float (``OpTypesToExcludeOutputQuantization``): each product then
runs as one ``MatMulIntegerToFloat`` kernel, where quantized outputs would cost a DequantizeLinear pass that
takes back what the int8 product gained (benchmarks/RESULTS.md).
"""
import ast
import contextlib
import fnmatch
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

from visionmamba.files import prepare_output_dir

FORMATS = ("onnx", "openvino")  # --format: the file each runtime reads (.onnx; OpenVINO's .xml + .bin)
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")  # the stock nodes ONNX Runtime's quantizer may touch
# The modules left float by default. out_proj reads the gate's output, whose outlier channels (Quamba, MambaQuant)
# a per-tensor int8 range cannot hold: ONNX Runtime's tool has no smoothing, so it stays float there (measured:
# docs/deployment.md); NNCF's transformer preset smooths it (SmoothQuant), so OpenVINO quantizes everything.
KEEP_FLOAT = {"onnx": ("*.out_proj",), "openvino": ()}


def require(fmt: str) -> None:
    """A one-line error when the runtime's quantization tool is missing (before any work)."""
    try:
        if fmt == "onnx":
            import onnxruntime.quantization  # noqa: F401
        else:
            import nncf  # noqa: F401
            import openvino  # noqa: F401
    except ImportError as err:
        raise ValueError(f"int8 {fmt} needs {'onnxruntime' if fmt == 'onnx' else 'openvino and nncf'} ({err}): "
                         "pip install 'visionmamba[quantize]'") from err


def module_of(node: Any) -> str:
    """The PyTorch module a node of ``torch.onnx.export`` came from (``layers.3.mixer.out_proj``; x_proj's
    product of both directions is ``layers.3.mixer``), from the exporter's name scopes; "" when unknown."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    names = ast.literal_eval(scopes) if scopes else []
    return names[-2] if len(names) >= 2 else ""


def float_nodes(model: Any, modules: Sequence[str]) -> List[str]:
    """The names of the quantizable nodes of ``model`` (an ``onnx.ModelProto``) whose module matches one of the
    shell-style patterns ``modules`` (``head``, ``*.out_proj``, ``layers.23.*``); a pattern that matches
    nothing is a one-line error naming what the model has."""
    nodes = [n for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    picked = []
    for pattern in modules:
        hits = [n.name for n in nodes if fnmatch.fnmatchcase(module_of(n), pattern)]
        if not hits:
            known = sorted({module_of(n) for n in nodes} - {""})
            raise ValueError(f"--keep-float {pattern!r} matches none of the model's quantizable modules "
                             f"({', '.join(known[:4])}, ..., {known[-1] if known else ''})")
        picked += hits
    return list(dict.fromkeys(picked))


def onnx_int8(source: Path, target: Path, batches: Sequence[np.ndarray], keep_float: Sequence[str] = ()) -> None:
    """Write ``target``: the ONNX file ``source`` with static int8 products (QDQ, per-channel weights),
    calibrated on ``batches`` (NCHW float32 arrays); the modules matching ``keep_float`` (:func:`float_nodes`)
    stay float. The file's metadata and model-local functions (the fused nodes' bodies) are kept."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            batch = next(self.batches, None)
            return None if batch is None else {name: batch}

    model = onnx.load(str(source))
    name = model.graph.input[0].name
    props = {p.key: p.value for p in model.metadata_props}
    with _quiet_logging():
        quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
                        nodes_to_exclude=float_nodes(model, keep_float),
                        extra_options={"OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)})
    quantized = onnx.load(str(target))
    onnx.helper.set_model_props(quantized, {**props, "quantized": "int8 (onnxruntime.quantization, static QDQ)"})
    onnx.save(quantized, str(target))


def openvino_int8(source: Path, batches: Sequence[np.ndarray], extension: Optional[str],
                  keep_float: Sequence[str] = ()) -> Any:
    """The ONNX file ``source`` read by OpenVINO (with our ``extension`` library for the fused nodes, or None
    for a standard-ops file) and quantized by NNCF on ``batches`` (an ``openvino.Model``; :func:`write_openvino`
    saves it); the modules matching ``keep_float`` stay float (OpenVINO names an operation after its ONNX node,
    a Gemm's product ``NAME/WithoutBiases``). The ONNX metadata goes to the model's ``rt_info`` under
    ``visionmamba``."""
    import nncf
    import onnx
    import openvino

    proto = onnx.load(str(source))
    names = float_nodes(proto, keep_float)

    core = openvino.Core()
    if extension:
        core.add_extension(extension)
    model = core.read_model(str(source))
    ignored = nncf.IgnoredScope(patterns=[f"^{re.escape(n)}(/.*)?$" for n in names], validate=False) if names else None
    with _quiet_logging():
        quantized = nncf.quantize(model, nncf.Dataset(list(batches)), subset_size=sum(len(b) for b in batches),
                                  model_type=nncf.ModelType.TRANSFORMER, ignored_scope=ignored)
    props = {p.key: p.value for p in proto.metadata_props}
    for key, value in {**props, "quantized": "int8 (NNCF, transformer preset)"}.items():
        quantized.set_rt_info(value, ["visionmamba", key])
    return quantized


def write_openvino(model: Any, target: Path) -> None:
    """Save an OpenVINO model as ``target`` (.xml) and its .bin, both in place at once or neither: written in
    a scratch folder beside them, the weights renamed first (an old .xml never points at half-new weights
    for long, and a failed save leaves the old pair)."""
    import openvino

    target = Path(target)
    prepare_output_dir(target.parent)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        openvino.save_model(model, str(scratch / target.name), compress_to_fp16=False)
        os.replace(scratch / target.with_suffix(".bin").name, target.with_suffix(".bin"))
        os.replace(scratch / target.name, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def outputs_of(fmt: str, target: Path) -> List[Path]:
    """The files a quantized model of ``fmt`` occupies (OpenVINO's weights beside its .xml)."""
    return [target] if fmt == "onnx" else [target, Path(target).with_suffix(".bin")]


def agreement(reference: np.ndarray, quantized: np.ndarray) -> float:
    """The fraction of images whose top-1 class is the same in both (N, classes) logit arrays."""
    return float((reference.argmax(1) == quantized.argmax(1)).mean())


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """The quantizers log a line per tensor at INFO/WARNING (the root logger, NNCF's): silence them for the call."""
    loggers = [logging.getLogger(), logging.getLogger("nncf")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
