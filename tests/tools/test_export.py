"""ONNX export, checked against onnxruntime."""
import pytest
import torch


def test_onnx_round_trip_at_two_resolutions(tmp_path):
    pytest.importorskip("onnxruntime")
    from visionmamba.tools.export import export_onnx

    args = dict(depth=2, embed_dim=32, patch_size=8, stride=8, num_classes=10)
    for size in (32, 48):
        torch.manual_seed(0)
        report = export_onnx("vim_tiny_patch16_224", tmp_path / f"m{size}.onnx", img_size=size, model_args=args)
        assert report["max_abs_diff"] < 1e-4


def test_format_flag_selects_the_exporter():
    from visionmamba import cli
    from visionmamba.tools.export import EXPORTERS, export_onnx

    args = cli.build_parser().parse_args(["export", "--model", "vim_tiny_patch16_224", "--out", "m.onnx", "--format", "onnx"])
    assert EXPORTERS[args.format] is export_onnx
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["export", "--model", "vim_tiny_patch16_224", "--out", "m.onnx", "--format", "tflite"])
