"""What every command shares: its flags' spellings, shown defaults, the --overwrite rule, one-line errors."""
import argparse
import json
import time

import pytest
import torch

import visionmamba
from helpers import make_folder
from visionmamba import cli
from visionmamba.models.weights import read_file

TINY_ARGS = dict(depth=2, embed_dim=32, patch_size=8, stride=8, num_classes=3, img_size=32)


def subcommands() -> dict:
    return next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_option_shows_its_default_and_on_off_options_have_one_style(command):
    parser = subcommands()[command]
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = parser._get_formatter()._expand_help(action) if action.help else ""
        assert "default" in text or action.required, f"{command} {action.option_strings}: its help says no default"
        assert not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)), (
            f"{command} {action.option_strings}: on/off options are --name / --no-name")


@pytest.mark.parametrize("command, canonical, old", [
    ("features", "--output", "--out"), ("export", "--output", "--out"), ("benchmark", "--output", "--out"),
    ("benchmark", "--model", "--models"), ("benchmark", "--img-size", "--res"), ("benchmark", "--batch-size", "--batch"),
    ("predict", "--batch-size", "--batch"), ("features", "--img-size", "--res"), ("info", "--img-size", "--res"),
])
def test_flags_are_spelled_alike_and_the_old_spellings_stay(command, canonical, old):
    options = {s: a for a in subcommands()[command]._actions for s in a.option_strings}
    assert options[canonical] is options[old]


def test_info_and_convert_take_the_option_or_the_old_positional(capsys, tmp_path):
    assert cli.main(["info", "--model", "vim_tiny_patch16_224"]) == 0
    assert cli.main(["info", "vim_tiny_patch16_224"]) == 0
    assert capsys.readouterr().out.count("7,148,008") == 2
    assert cli.main(["info"]) == 2 and "pass --model" in capsys.readouterr().err
    assert cli.main(["info", "vim_nope"]) == 2 and "unknown Vim model 'vim_nope'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A checkpoint as `train` writes it (model name, arguments, classes, transform), of a tiny model at 32 px."""
    root = tmp_path_factory.mktemp("ours")
    torch.manual_seed(0)
    model = visionmamba.create_model("vim_tiny_patch16_224", **TINY_ARGS)
    config = dict(input_size=(3, 32, 32), interpolation="bicubic", crop_pct=0.875, mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225))
    torch.save({"model": model.state_dict(), "model_name": "vim_tiny_patch16_224", "model_args": TINY_ARGS,
                "classes": ["cat", "dog", "fox"], "data_config": config}, root / "last.pth")
    make_folder(root / "images", classes=("cat",), per_class=2, splits=(".",), size=40)
    return root


@pytest.mark.parametrize("command", ["predict", "features", "eval"])
def test_commands_refuse_random_weights(command, ours, capsys, tmp_path):
    args = {"predict": ["predict", str(ours / "images")], "features": ["features", str(ours / "images"), "--output", str(tmp_path)],
            "eval": ["eval", "--data", str(ours / "images"), "--no-progress"]}[command]
    assert cli.main([*args, "--model", "vim_tiny_patch16_224"]) == 2
    err = capsys.readouterr().err
    assert "no --checkpoint given: the model would run with random weights" in err and len(err.splitlines()) == 1


def test_predict_names_a_misspelled_model_in_one_line(ours, capsys):
    assert cli.main(["predict", str(ours / "images"), "--model", "vim_tiny_patch61_224", "--checkpoint", str(ours / "last.pth")]) == 2
    err = capsys.readouterr().err
    assert "unknown Vim model 'vim_tiny_patch61_224'" in err and len(err.splitlines()) == 1


def test_convert_keeps_what_rebuilds_the_model_and_predict_uses_it(ours, capsys, tmp_path):
    assert cli.main(["convert", str(ours / "last.pth"), "--output", str(tmp_path / "w.safetensors")]) == 0
    contents = read_file(tmp_path / "w.safetensors")
    assert contents["model_name"] == "vim_tiny_patch16_224" and contents["classes"] == ["cat", "dog", "fox"]
    assert contents["model_args"]["depth"] == 2 and list(contents["data_config"]["input_size"]) == [3, 32, 32]
    capsys.readouterr()
    assert cli.main(["predict", str(ours / "images"), "--checkpoint", str(tmp_path / "w.safetensors"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert {p["label"] for r in results for p in r["predictions"]} == {"cat", "dog", "fox"}
    official = tmp_path / "official.pth"
    torch.save({"model": read_file(ours / "last.pth")["model"]}, official)
    assert cli.main(["convert", str(official), str(tmp_path / "o.safetensors"), "--model", "vim_tiny_patch16_224"]) == 0
    assert read_file(tmp_path / "o.safetensors")["model_name"] == "vim_tiny_patch16_224"


def test_create_model_rebuilds_our_checkpoints_architecture(ours):
    model = visionmamba.create_model("vim_tiny_patch16_224", checkpoint_path=ours / "last.pth")
    assert len(model.layers) == 2 and model.num_classes == 3 and model.patch_embed.img_size == (32, 32)
    bigger = visionmamba.create_model("vim_tiny_patch16_224", checkpoint_path=ours / "last.pth", img_size=48)
    assert bigger.pos_embed.shape == (1, 37, 32)  # keyword arguments win; the table is resampled
    with pytest.raises(ValueError, match="holds a 'vim_tiny_patch16_224' model, not 'vim_small_patch16_224'"):
        visionmamba.create_model("vim_small_patch16_224", checkpoint_path=ours / "last.pth")
    loaded = visionmamba.load_for_inference(str(ours / "last.pth"))
    assert loaded.labels == ["cat", "dog", "fox"] and loaded.image_size == (32, 32)


def test_features_and_export_default_to_the_size_the_checkpoint_was_trained_at(ours, capsys, tmp_path):
    assert cli.main(["features", str(ours / "images"), "--checkpoint", str(ours / "last.pth"), "--output", str(tmp_path / "f")]) == 0
    assert "at 32x32: map (32, 4, 4)" in capsys.readouterr().out
    assert cli.main(["export", "--format", "torch-export", "--checkpoint", str(ours / "last.pth"),
                     "--output", str(tmp_path / "m.pt2")]) == 0
    assert "1x32" in capsys.readouterr().out  # the first size checked is the trained one


def test_a_mismatched_or_foreign_checkpoint_is_one_line(ours, capsys, tmp_path):
    official = tmp_path / "small.pth"
    torch.save({"model": read_file(ours / "last.pth")["model"]}, official)
    assert cli.main(["predict", str(ours / "images"), "--model", "vim_tiny_patch16_224", "--checkpoint", str(official)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "it holds a Vim of width 32, depth 2, patch 8" in err
    assert "width 192, depth 24, patch 16" in err and "missing (" in err and err.count("layers.") <= 4
    (tmp_path / "notes.pth").write_text("these are my notes, not weights\n")
    assert cli.main(["predict", str(ours / "images"), "--model", "vim_tiny_patch16_224", "--checkpoint",
                     str(tmp_path / "notes.pth")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is not a checkpoint" in err


def writing_commands(ours, out):
    """Each command that writes, pointed at ``out``; the commands are refused before their work starts."""
    ckpt, images = str(ours / "last.pth"), str(ours / "images")
    return {
        "features": (["features", images, "--checkpoint", ckpt, "--output", str(out)], out / "0.safetensors"),
        "export": (["export", "--checkpoint", ckpt, "--output", str(out / "m.onnx")], out / "m.onnx"),
        "convert": (["convert", ckpt, "--output", str(out / "w.safetensors")], out / "w.safetensors"),
        "benchmark": (["benchmark", "--output", str(out)], out / "benchmark.csv"),
        "scenes": (["scenes", "--output", str(out)], out / "classes.json"),
        "demo": (["demo", "--output", str(out)], out / "run" / "last.pth"),
        "dense-demo": (["dense-demo", "--output", str(out)], out / "seg" / "last.pth"),
        "train": (["train", "--data", images, "--output", str(out)], out / "last.pth"),
    }


@pytest.mark.parametrize("command", ["features", "export", "convert", "benchmark", "scenes", "demo", "dense-demo", "train"])
def test_one_rule_for_every_command_an_existing_output_is_kept_unless_overwrite(command, ours, capsys, tmp_path):
    args, existing = writing_commands(ours, tmp_path / "out")[command]
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_bytes(b"the user's own file")
    start = time.perf_counter()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.splitlines()) == 1, err
    assert existing.read_bytes() == b"the user's own file"
    assert time.perf_counter() - start < 20, "refused only after the work"


def test_export_and_convert_into_a_folder_fail_before_the_work(ours, capsys, tmp_path):
    for args in (["export", "--checkpoint", str(ours / "last.pth"), "--output", str(tmp_path)],
                 ["convert", str(ours / "last.pth"), "--output", str(tmp_path)]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert "is a folder; give a file name inside it" in err and len(err.splitlines()) == 1


def test_features_overwrite_leaves_one_runs_batch_files(ours, capsys, tmp_path):
    common = ["features", str(ours / "images"), "--checkpoint", str(ours / "last.pth"), "--output", str(tmp_path), "--per-batch"]
    assert cli.main([*common, "--batch-size", "1"]) == 0
    assert sorted(p.name for p in tmp_path.glob("batch_*")) == ["batch_00000.safetensors", "batch_00001.safetensors"]
    assert cli.main([*common, "--batch-size", "2"]) == 2 and "--overwrite" in capsys.readouterr().err
    assert cli.main([*common, "--batch-size", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.glob("batch_*")) == ["batch_00000.safetensors"]


def test_export_ops_standard_from_the_command_line(ours, capsys, tmp_path):
    import onnx

    assert cli.main(["export", "--checkpoint", str(ours / "last.pth"), "--ops", "standard", "--output", str(tmp_path / "s.onnx")]) == 0
    assert {o.domain for o in onnx.load(str(tmp_path / "s.onnx")).opset_import} <= {"", "ai.onnx"}
    capsys.readouterr()
    assert cli.main(["export", "--format", "torch-export", "--ops", "standard", "--checkpoint", str(ours / "last.pth"),
                     "--output", str(tmp_path / "s.pt2")]) == 2
    assert "--ops is an option of --format onnx" in capsys.readouterr().err
