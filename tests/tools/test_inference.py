"""predict and features, end to end on CPU."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import visionmamba
from helpers import PLAIN, TINY, cli, make_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained for two steps on three class folders (cat, dog, fox)."""
    root = tmp_path_factory.mktemp("trained")
    data = make_folder(root / "data", classes=("cat", "dog", "fox"), per_class=2, splits=("train",))
    cli("train", "--data", data, "--output", root / "run", *TINY, *PLAIN, "--epochs", 2, "--batch-size", 6, "--lr", 1e-3)
    return root / "run" / "last.pth", data


def test_predict_names_the_folders_the_model_was_trained_on(trained):
    checkpoint, data = trained
    out = cli("predict", data / "train", "--checkpoint", checkpoint, "--json").stdout
    results = json.loads(out)
    assert len(results) == 6
    for r in results:
        assert [p["label"] for p in r["predictions"]] and {p["label"] for p in r["predictions"]} == {"cat", "dog", "fox"}
        scores = [p["score"] for p in r["predictions"]]
        assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
    table = cli("predict", data / "train" / "cat" / "0.png", "--checkpoint", checkpoint, "--topk", "2").stdout
    assert "1." in table and "2." in table and "%" in table


def test_predict_official_checkpoint_uses_imagenet_names(tmp_path):
    torch.manual_seed(0)
    model = visionmamba.create_model("vim_tiny_patch16_224")
    torch.save({"model": model.state_dict()}, tmp_path / "w.pth")
    make_folder(tmp_path / "img", classes=("x",), per_class=1, splits=(".",), size=40)
    from visionmamba.files import list_images
    from visionmamba.models.factory import load_for_inference
    from visionmamba.tools.inference import predict

    loaded = load_for_inference(str(tmp_path / "w.pth"), "vim_tiny_patch16_224")
    assert loaded.labels[0] == "tench, Tinca tinca" and len(loaded.labels) == 1000
    (result,) = predict(loaded, list_images([str(tmp_path / "img")]), topk=3)
    assert len(result["predictions"]) == 3 and all(p["label"] in loaded.labels for p in result["predictions"])


@pytest.mark.parametrize("size", [(32, 32), (48, 64), (40, 24)])
def test_features_shapes_and_dtypes(trained, tmp_path, size):
    checkpoint, data = trained
    out = tmp_path / "f"
    cli("features", data / "train" / "cat", "--checkpoint", checkpoint, "--img-size", *size, "--kind", "map", "--out", out)
    grid = (size[0] // 8, size[1] // 8)
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == 2
    feats = load_file(str(files[0]))
    assert feats["map"].shape == (32, *grid) and feats["map"].dtype == torch.float32
    with safe_open(str(files[0]), "pt") as fh:
        assert fh.metadata()["source"].endswith(".png") and fh.metadata()["kind"] == "map"


def test_feature_kinds_and_per_batch_files(trained, tmp_path):
    checkpoint, data = trained
    cli("features", data / "train", "--checkpoint", checkpoint, "--img-size", 48, "--kind", "intermediates",
        "--layers", 0, 1, "--out", tmp_path / "i", "--per-batch", "--batch-size", 4, "--dtype", "fp16")
    batches = sorted((tmp_path / "i").glob("batch_*.safetensors"))
    assert len(batches) == 2  # 6 images, 4 per batch
    first = load_file(str(batches[0]))
    assert first["0.layer0"].shape == (32, 6, 6) and first["3.layer1"].dtype == torch.float16
    for kind, shape in (("pooled", (32,)), ("tokens", (37, 32))):
        cli("features", data / "train" / "dog", "--checkpoint", checkpoint, "--img-size", 48, "--kind", kind, "--out", tmp_path / kind)
        assert load_file(str(next((tmp_path / kind).glob("*.safetensors"))))[kind].shape == shape
    proc = cli("features", data / "train", "--checkpoint", checkpoint, "--img-size", 30, "--out", tmp_path / "bad", check=False)
    assert proc.returncode == 2 and "divisible by 8" in proc.stderr


def test_features_match_the_model(trained):
    from visionmamba.models.factory import load_for_inference
    from visionmamba.tools.inference import extract_features

    checkpoint, _ = trained
    model = load_for_inference(str(checkpoint)).model
    x = torch.randn(2, 3, 40, 56)
    tokens = model.forward_features(x)
    feats = extract_features(model, x, "map")
    assert torch.allclose(feats["map"].flatten(2).transpose(1, 2), torch.cat([tokens[:, :17], tokens[:, 18:]], 1))
    assert torch.allclose(extract_features(model, x, "pooled")["pooled"], tokens[:, 17])


def test_features_mirror_folders_so_equal_names_do_not_overwrite(trained, tmp_path):
    checkpoint, data = trained
    images = tmp_path / "images"
    for sub in ("a", "b"):
        (images / sub).mkdir(parents=True)
        shutil.copy(data / "train" / "cat" / "0.png", images / sub / "x.png")
    out = tmp_path / "f"
    stdout = cli("features", images, "--checkpoint", checkpoint, "--img-size", 32, "--kind", "pooled", "--out", out).stdout
    assert "wrote 2 file(s) for 2 image(s)" in stdout
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors")) == ["a/x.safetensors", "b/x.safetensors"]
    shutil.copy(data / "train" / "cat" / "1.png", images / "a" / "x.jpg")  # x.jpg beside x.png: one name
    proc = cli("features", images, "--checkpoint", checkpoint, "--img-size", 32, "--out", tmp_path / "g", check=False)
    assert proc.returncode == 2 and "would both be written to" in proc.stderr


def test_unreadable_images_stop_with_a_hint_or_are_skipped_and_listed(trained, tmp_path):
    checkpoint, data = trained
    images = tmp_path / "images"
    shutil.copytree(data / "train" / "dog", images)
    (images / "broken.png").write_bytes(b"not an image")
    (images / "._0.png").write_bytes(b"\0\0 macOS resource fork")  # hidden: never read
    proc = cli("predict", images, "--checkpoint", checkpoint, check=False)
    assert proc.returncode == 2 and "broken.png" in proc.stderr and "--skip-corrupt" in proc.stderr
    results = json.loads(cli("predict", images, "--checkpoint", checkpoint, "--skip-corrupt", "--json").stdout)
    assert sorted(Path(r["path"]).name for r in results) == ["0.png", "1.png", "broken.png"]
    assert "error" in next(r for r in results if r["path"].endswith("broken.png"))
    out = cli("features", images, "--checkpoint", checkpoint, "--img-size", 32, "--out", tmp_path / "f", "--skip-corrupt")
    assert "wrote 2 file(s) for 2 image(s) (1 unreadable skipped)" in out.stdout and "broken.png" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["predict", "--topk", "0"], "must be at least 1"),
    (["predict", "--topk", "-1"], "must be at least 1"),
    (["predict", "--device", "bogus"], "unknown device"),
    (["features", "--layers", "99", "--kind", "intermediates", "--out", "OUT"], "out of range: the model has 2 blocks"),
    (["features", "--img-size", "32", "32", "32", "--out", "OUT"], "takes one size (S) or two (H W)"),
    (["features", "--out", "FILE"], "is a file"),
])
def test_bad_arguments_are_one_line_errors(trained, tmp_path, args, message):
    checkpoint, data = trained
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / a) if a in ("OUT", "FILE") else a for a in args]
    proc = cli(args[0], data / "train" / "cat", "--checkpoint", checkpoint, *args[1:], check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_eval_and_convert_say_when_a_checkpoint_has_no_ema(trained, tmp_path):
    checkpoint, data = trained  # trained with --no-model-ema: saved with model_ema None
    for args in (["eval", "--data", data / "train", "--checkpoint", checkpoint, "--ema", "--workers", 0],
                 ["convert", checkpoint, tmp_path / "w.safetensors", "--ema"]):
        proc = cli(*args, check=False)
        assert proc.returncode == 2 and "has no EMA weights" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    proc = cli("convert", tmp_path / "bad.safetensors", tmp_path / "o.safetensors", check=False)
    assert proc.returncode == 2 and "bad.safetensors" in proc.stderr
    proc = cli("eval", "--data", data / "train", "--checkpoint", tmp_path, check=False)
    assert proc.returncode == 2 and "is a folder, not a file" in proc.stderr


def test_predict_and_features_in_bf16(trained, tmp_path):
    from visionmamba.tools.precision import bf16_supported

    if not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no bf16 arithmetic")
    checkpoint, data = trained
    args = ("predict", data / "train", "--checkpoint", checkpoint, "--json")
    fp32, bf16 = (json.loads(cli(*args, *extra).stdout) for extra in ((), ("--precision", "bf16")))
    for a, b in zip(fp32, bf16):
        assert a["path"] == b["path"]
        for pa, pb in zip(sorted(a["predictions"], key=lambda p: p["label"]), sorted(b["predictions"], key=lambda p: p["label"])):
            assert abs(pa["score"] - pb["score"]) < 0.03
    for precision in ("fp32", "bf16"):
        cli("features", data / "train" / "cat", "--checkpoint", checkpoint, "--img-size", 48, "--kind", "pooled",
            "--out", tmp_path / precision, "--precision", precision)
    for name in (p.name for p in (tmp_path / "fp32").glob("*.safetensors")):
        a, b = (load_file(str(tmp_path / precision / name))["pooled"] for precision in ("fp32", "bf16"))
        assert b.dtype == torch.float32  # stored as --dtype says; computed in bf16
        assert (a - b).abs().max() <= 0.05 * a.abs().max() and not torch.equal(a, b)


def test_bf16_is_refused_in_one_line_where_the_device_has_none(trained, tmp_path, monkeypatch, capsys):
    import visionmamba.tools.precision as precision
    from visionmamba.cli import main

    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)
    checkpoint, data = trained
    commands = (["predict", str(data / "train"), "--checkpoint", str(checkpoint)],
                ["features", str(data / "train"), "--checkpoint", str(checkpoint), "--img-size", "48", "--out", str(tmp_path / "f")],
                ["benchmark", "--models", "vim_tiny_patch16_224", "--res", "32", "--out", str(tmp_path / "b")])
    for command in commands:
        assert main([*command, "--precision", "bf16"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs a device with bf16 arithmetic; cpu has none" in err, err
    assert not (tmp_path / "f").exists() and not (tmp_path / "b").exists()
