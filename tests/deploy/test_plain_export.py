"""A plain torch.onnx.export (and timm's onnx_export) of any Vim writes standard operators that plain ONNX Runtime
and plain OpenVINO run: nothing of ours is needed to export or to run the file."""
import numpy as np
import onnx
import pytest
import timm
import torch

import visionmamba  # noqa: F401  (registers the models, as a user's `import visionmamba` does)
from visionmamba.models.registry import VARIANTS

OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # OpenVINO computes in bf16 by default where the CPU has it


def plain_runtimes(path: str):
    """Run the file in ONNX Runtime and OpenVINO as they come: no library, no extension, no option of ours."""
    import onnxruntime
    import openvino

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    compiled = openvino.Core().compile_model(path, "CPU", OPENVINO_F32)
    name = session.get_inputs()[0].name
    return {"onnxruntime": lambda x: session.run(None, {name: x})[0], "openvino": lambda x: compiled(x)[0]}


def standard_only(path: str) -> None:
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert not model.functions and {o.domain for o in model.opset_import} <= {"", "ai.onnx"}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_plain_torch_onnx_export_runs_in_plain_runtimes(name, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    torch.manual_seed(0)
    model = timm.create_model(name, depth=1).eval()  # every width, patch and stride; one block (export time)
    batch = torch.export.Dim("batch")
    torch.onnx.export(model, (torch.randn(2, 3, 224, 224),), str(tmp_path / "m.onnx"), dynamo=True,
                      dynamic_shapes=({0: batch},), verbose=False)
    standard_only(str(tmp_path / "m.onnx"))
    runs = plain_runtimes(str(tmp_path / "m.onnx"))
    for batch_size in (1, 3):
        x = torch.randn(batch_size, 3, 224, 224)
        with torch.no_grad():
            expected = model(x).numpy()
        for runtime, run in runs.items():
            assert np.abs(run(x.numpy()) - expected).max() < 1e-4, (runtime, batch_size)


def test_timms_onnx_export_runs_in_plain_runtimes(tmp_path):
    """timm.utils.onnx.onnx_export as timm's onnx_export.py calls it (dynamo, dynamic size, full check)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    from timm.utils.onnx import onnx_export

    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", depth=2).eval()
    onnx_export(model, str(tmp_path / "m.onnx"), use_dynamo=True, batch_size=1, dynamic_size=True, check=True)
    standard_only(str(tmp_path / "m.onnx"))
    runs = plain_runtimes(str(tmp_path / "m.onnx"))
    for shape in [(1, 3, 224, 224), (3, 3, 320, 256)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x).numpy()
        for runtime, run in runs.items():
            assert np.abs(run(x.numpy()) - expected).max() < 1e-4, (runtime, shape)
