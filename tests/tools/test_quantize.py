"""``visionmamba quantize``: int8 files for ONNX Runtime and OpenVINO from a trained demo model, their accuracy
against the float model on held-out digits (scored by ``visionmamba eval`` as a user scores them), and the
calibration folder's mistakes as one line each with nothing written."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_folder
from visionmamba import cli as cli_module
from visionmamba.data.digits import write_digits_folder
from visionmamba.deploy import quantize as int8
from visionmamba.models.factory import load_for_inference
from visionmamba.tools import quantize
from visionmamba.tools.demo import DEMO_CONFIG
from visionmamba.train.classification import train
from visionmamba.train.config import TrainConfig, resolve

pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo's model and recipe on the bundled digits, trained for a few epochs (~96% held-out top-1)."""
    root = tmp_path_factory.mktemp("digits")
    write_digits_folder(root / "data")
    cfg = resolve(TrainConfig, dict(DEMO_CONFIG, data=str(root / "data"), output=str(root / "run"), epochs=8), use_preset=False)
    train(cfg)
    return root


def run(capsys, *args):
    code = cli_module.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def top1(capsys, checkpoint, data):
    code, out, err = run(capsys, "eval", "--checkpoint", checkpoint, "--data", data, "--no-progress", "--workers", 0)
    assert code == 0, err
    return float(re.search(r"top-1 ([\d.]+)%", out).group(1))


def logits(path, images):
    return np.concatenate([quantize.load_runtime_file(str(path)).model.run(b) for b in np.split(images, 4)])


@pytest.mark.parametrize("fmt, name", [("onnx", "int8.onnx"), ("openvino", "int8.xml")])
def test_int8_keeps_the_float_models_accuracy(trained, tmp_path, capsys, fmt, name):
    checkpoint, val = trained / "run" / "last.pth", trained / "data" / "val"
    out = tmp_path / name
    code, said, err = run(capsys, "quantize", "--checkpoint", checkpoint, "--calib", trained / "data" / "train",
                          "--format", fmt, "--output", out)
    assert code == 0, err
    assert "calibrated on 300 images" in said and "agrees with the float model on" in said
    assert out.is_file() and (fmt == "onnx" or out.with_suffix(".bin").is_file())
    float_top1, int8_top1 = top1(capsys, checkpoint, val), top1(capsys, out, val)
    assert float_top1 > 90 and abs(int8_top1 - float_top1) <= 0.5, (float_top1, int8_top1)
    # top-1 agreement on the held-out images, image by image
    loaded = quantize.load_runtime_file(str(out))
    reference = load_for_inference(str(checkpoint))
    images = quantize.calibration_images(str(val), reference.data_config, 360).numpy()
    with torch.no_grad():
        expected = reference.model(torch.from_numpy(images)).numpy()
    assert int8.agreement(expected, logits(out, images)) >= 0.99
    assert loaded.classes == reference.classes and loaded.data_config["input_size"] == (3, 16, 16)
    # an existing output is refused before any work
    code, _, err = run(capsys, "quantize", "--checkpoint", checkpoint, "--calib", val, "--format", fmt, "--output", out)
    assert code == 2 and "already exists" in err and err.count("\n") == 1


def test_calibration_folder_mistakes_are_one_line_and_write_nothing(trained, tmp_path, capsys):
    checkpoint, out = trained / "run" / "last.pth", tmp_path / "q.onnx"

    def refused(folder, says):
        code, _, err = run(capsys, "quantize", "--checkpoint", checkpoint, "--calib", folder, "--output", out)
        assert code == 2 and says in err and err.count("\n") == 1, err
        assert not out.exists() and not list(tmp_path.glob(".q.onnx*"))

    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, "holds no image(s)")
    refused(tmp_path / "missing", "does not exist")
    few = tmp_path / "few"
    few.mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), (i, i, i)).save(few / f"{i}.png")
    refused(few, "holds 5 image(s)")
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(40):
        Image.new("RGB", (16, 16), (i, i, i)).save(broken / f"{i:02d}.png")
    (broken / "07.png").write_bytes(b"not a png")
    refused(broken, "07.png")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    for i in range(40):
        Image.new("RGB", (3, 3), (i, i, i)).save(tiny / f"{i:02d}.png")
    refused(tiny, "more than 4x smaller than the model's 16x16 input")
    code, _, err = run(capsys, "quantize", "--checkpoint", checkpoint, "--calib", tiny, "--output", tmp_path / "q.bin",
                       "--format", "openvino")
    assert code == 2 and "an .xml file" in err
    code, _, err = run(capsys, "quantize", "--calib", tiny, "--output", out)
    assert code == 2 and "pass --checkpoint" in err


def test_a_file_that_misses_the_agreement_bar_is_written_only_when_forced(trained, tmp_path, capsys, monkeypatch):
    checkpoint, calib, out = trained / "run" / "last.pth", trained / "data" / "val", tmp_path / "q.onnx"
    monkeypatch.setattr(int8, "agreement", lambda reference, quantized: 0.962)
    code, _, err = run(capsys, "quantize", "--checkpoint", checkpoint, "--calib", calib, "--output", out, "--images", 64)
    assert code == 2 and "agrees with the float model on 96.2% of the 64 calibration images, 2.8 points under" in err
    assert not out.exists()
    code, said, err = run(capsys, "quantize", "--checkpoint", checkpoint, "--calib", calib, "--output", out, "--images", 64,
                          "--force")
    assert code == 0 and out.is_file(), err
    assert quantize.load_runtime_file(str(out)).labels == [str(digit) for digit in range(10)]


def test_eval_refuses_a_damaged_runtime_file_in_one_line(tmp_path, capsys):
    data = make_folder(tmp_path / "data", splits=("val",))
    for name in ("model.onnx", "model.xml"):
        (tmp_path / name).write_text("not a model")
        code, _, err = run(capsys, "eval", "--checkpoint", tmp_path / name, "--data", data / "val", "--workers", 0)
        assert code == 2 and "cannot read the model file" in err and name in err and err.count("\n") == 1, err


def test_the_commands_defaults_are_the_modules():
    assert cli_module.QUANTIZE_DEFAULTS == {"images": quantize.DEFAULT_IMAGES, "min_images": quantize.MIN_IMAGES,
                                            "min_agreement": quantize.MIN_AGREEMENT}
