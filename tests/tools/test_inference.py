"""predict and features, end to end on CPU."""
import json

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
