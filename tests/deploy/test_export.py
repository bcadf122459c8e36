"""Export: one file for every batch size and fitting image size, checked against the PyTorch model."""
import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import visionmamba  # noqa: F401  (registers the models)
from visionmamba import cli
from visionmamba.deploy.export import EXPORTERS, export_onnx, export_torch, onnx_session

TINY = dict(depth=3, embed_dim=32, num_classes=10, patch_size=8, stride=8)


def tiny(seed: int, **overrides) -> torch.nn.Module:
    """The model the exporters build after ``torch.manual_seed(seed)`` (same draws, same weights)."""
    torch.manual_seed(seed)
    return timm.create_model("vim_tiny_patch16_224", img_size=32, **{**TINY, **overrides}).eval()


@pytest.mark.parametrize("overrides", [{}, {"patch_size": 8, "stride": 4}], ids=["patch8", "stride4"])
def test_one_onnx_file_serves_every_batch_and_fitting_size(tmp_path, overrides):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    report = export_onnx("vim_tiny_patch16_224", tmp_path / "m.onnx", img_size=32, model_args={**TINY, **overrides})
    assert set(report["max_abs_diff"]) == {f"{b}x{s}" for b in (1, 2) for s in (32, 48, 72)}  # 2 batches, 3 sizes
    model = tiny(0, **overrides)
    for fused in (True, False):  # our kernel of the scan node, and the node's stock-operator body
        session = onnx_session(str(tmp_path / "m.onnx"), fused=fused)
        for shape in [(3, 3, 32, 56), (1, 3, 64, 40)]:  # other batch sizes, non-square
            x = torch.randn(*shape)
            with torch.no_grad():
                expected = model(x).numpy()
            assert np.abs(session.run(None, {"image": x.numpy()})[0] - expected).max() < 1e-4, fused
    if pytest.importorskip("openvino"):
        from visionmamba.deploy.export import openvino_model

        for fused in (True, False):
            compiled = openvino_model(tmp_path / "m.onnx", fused=fused)
            for shape in [(3, 3, 32, 56), (1, 3, 64, 40)]:
                x = torch.randn(*shape)
                with torch.no_grad():
                    expected = model(x).numpy()
                assert np.abs(compiled(x.numpy())[0] - expected).max() < 1e-4, ("openvino", fused)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["labels"]) == [str(i) for i in range(10)] and json.loads(meta["input_size"]) == [3, 32, 32]
    assert "+ %d * k" % overrides.get("stride", 8) in meta["image_sizes"]


def test_the_docs_onnx_runtime_example_classifies_an_image(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from pathlib import Path

    from PIL import Image

    page = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text()
    example = page.split("Classifying an image with the ONNX file")[1].split("```python\n")[1].split("```")[0]
    torch.manual_seed(0)
    export_onnx("vim_tiny_patch16_224", tmp_path / "m.onnx", img_size=32, model_args=TINY, check=False)
    from visionmamba.data.folders import eval_transform, load_rgb

    config = dict(input_size=(3, 32, 32), interpolation="bicubic", crop_pct=0.875, mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225))  # what export_onnx writes into the metadata for this model
    for shape in [(300, 200, 3), (90, 131, 3)]:  # tall and wide: both sides of the resize and of the crop
        Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)).save(tmp_path / "c.png")
        scope: dict = {}
        exec(example.replace("vim_t.onnx", str(tmp_path / "m.onnx")).replace("cat.jpg", str(tmp_path / "c.png")), scope)
        assert capsys.readouterr().out.strip() in [str(i) for i in range(10)]
        expected = eval_transform(config)(load_rgb(str(tmp_path / "c.png")))[None]  # what predict feeds the model
        assert np.abs(scope["x"] - expected.numpy()).max() < 1e-5, shape


def test_the_docs_fused_session_example_runs_our_kernel(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text()
    example = page.split("The same file at our kernels' speed")[1].split("```python\n")[1].split("```")[0]
    torch.manual_seed(0)
    export_onnx("vim_tiny_patch16_224", tmp_path / "m.onnx", img_size=32, model_args=TINY, check=False)
    scope: dict = {}
    exec(example.replace("vim_t.onnx", str(tmp_path / "m.onnx")), scope)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = tiny(0)(x).numpy()
    assert np.abs(scope["session"].run(None, {"image": x.numpy()})[0] - expected).max() < 1e-4
    assert np.abs(scope["compiled"](x.numpy())[0] - expected).max() < 1e-4


def test_openvino_converts_the_pytorch_model_itself():
    """openvino.convert_model takes the module (traced at the example's size, here one whose position table is
    resampled: aten's antialiased bicubic) and the torch.export program (any size) with our extension."""
    openvino = pytest.importorskip("openvino")
    from visionmamba.deploy.export import openvino_extension, openvino_from_torch

    model = tiny(0)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(x).numpy()
    converted = openvino.convert_model(model, example_input=(x,), extension=openvino_extension())
    assert {"BiSelectiveScan", "ConvSiLU", "Interpolate"} <= {op.get_type_name() for op in converted.get_ops()}
    compiled = openvino.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert np.abs(compiled(x.numpy())[0] - expected).max() < 1e-4
    compiled = openvino_from_torch(model.train())
    assert model.training  # left as it was
    model.eval()
    for shape in [(3, 3, 32, 56), (1, 3, 64, 40), (2, 3, 32, 32)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.abs(compiled(x.numpy())[0] - expected).max() < 1e-4, shape


def test_the_docs_openvino_conversion_example_runs():
    pytest.importorskip("openvino")
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text()
    example = page.split("OpenVINO also converts the PyTorch model itself")[1].split("```python\n")[1].split("```")[0]
    example = example.replace('timm.create_model("vim_tiny_patch16_224")', "tiny(0)").replace("224, 224", "32, 32")
    scope: dict = {"tiny": tiny}
    exec(example, scope)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = tiny(0)(x).numpy()
    assert np.abs(scope["compiled"](x.numpy())[0] - expected).max() < 1e-4


def test_torch_export_program_loads_and_runs_at_other_sizes(tmp_path):
    torch.manual_seed(0)
    export_torch("vim_tiny_patch16_224", tmp_path / "m.pt2", img_size=32, model_args=TINY)
    x = torch.randn(3, 3, 48, 64)
    with torch.no_grad():
        torch.save((x, tiny(0)(x)), tmp_path / "expected.pt")
    code = (  # a fresh process: what a user loading the file has
        "import sys, torch, visionmamba\n"
        "program = torch.export.load(sys.argv[1])\n"
        "x, expected = torch.load(sys.argv[2])\n"
        "print((program.module()(x) - expected).abs().max().item())\n"
        "try:\n"
        "    program.module()(torch.randn(1, 3, 44, 48))\n"
        "except Exception as err:\n"
        "    print('refused', type(err).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt2"), str(tmp_path / "expected.pt")],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert float(out[0]) < 1e-4
    assert out[1].startswith("refused")  # 44 does not fit patch 8 / stride 8


def test_sizes_that_do_not_fit_and_missing_files_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"does not fit patch 8 / stride 8.*nearest that fits: 40x40"):
        export_torch("vim_tiny_patch16_224", tmp_path / "m.pt2", img_size=37, model_args=TINY)
    assert cli.main(["export", "--model", "vim_tiny_patch16_224", "--img-size", "225", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "image size 225x225 does not fit patch 16 / stride 16" in err and "224x224" in err
    assert not (tmp_path / "m.onnx").exists()
    assert cli.main(["export", "--model", "vim_tiny_patch16_224", "--checkpoint", str(tmp_path / "absent.pth"),
                     "--out", str(tmp_path / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_format_flag_selects_the_exporter():
    args = cli.build_parser().parse_args(["export", "--model", "vim_tiny_patch16_224", "--out", "m.pt2", "--format", "torch-export"])
    assert EXPORTERS[args.format] is export_torch
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["export", "--model", "vim_tiny_patch16_224", "--out", "m.onnx", "--format", "tflite"])


def test_the_standard_ops_file_is_standard_onnx_that_every_runtime_reads(tmp_path):
    """--ops standard: no custom domain, no local function; the full checker, onnx's reference evaluator, plain ONNX
    Runtime and plain OpenVINO all agree with PyTorch."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    import onnx
    import onnxruntime
    import openvino
    from onnx.reference import ReferenceEvaluator

    path = tmp_path / "s.onnx"
    torch.manual_seed(0)
    small = {**TINY, "depth": 2}
    export_onnx("vim_tiny_patch16_224", path, img_size=32, model_args=small, ops="standard")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert not proto.functions and {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    model = tiny(0, **small)
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        expected = model(x).numpy()
    runs = {
        "reference evaluator": lambda a: ReferenceEvaluator(proto).run(None, {"image": a})[0],
        "onnxruntime": lambda a: onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"image": a})[0],
        "openvino": lambda a: openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(a)[0],
    }
    for runtime, run in runs.items():
        assert np.abs(run(x.numpy()) - expected).max() < 1e-4, runtime
