"""predict, features, benchmark, compile, ONNX export and info, end to end on CPU."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import visionmamba
from helpers import PLAIN, TINY, assert_close, cli, make_folder, tiny_vim
from visionmamba.models.info import compute


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
    from visionmamba.tools.inference import list_images, load_for_inference, predict

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
    from visionmamba.tools.inference import extract_features, load_for_inference

    checkpoint, _ = trained
    model = load_for_inference(str(checkpoint)).model
    x = torch.randn(2, 3, 40, 56)
    tokens = model.forward_features(x)
    feats = extract_features(model, x, "map")
    assert torch.allclose(feats["map"].flatten(2).transpose(1, 2), torch.cat([tokens[:, :17], tokens[:, 18:]], 1))
    assert torch.allclose(extract_features(model, x, "pooled")["pooled"], tokens[:, 17])


def test_benchmark_smoke_run_writes_csv_and_plot(tmp_path):
    out = cli("benchmark", "--models", "vim_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_patch16_224:naive",
              "--res", 32, 48, "--batch", 1, "--repeats", 1, "--out", tmp_path).stdout
    assert "speed vs first" in out and "deit_tiny_patch16_224:naive" in out
    rows = (tmp_path / "benchmark.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[0].startswith("model,res,batch,mode,status,img_per_s,peak_mem_mb")
    assert all(",ok," in row for row in rows[1:])
    assert (tmp_path / "benchmark.png").stat().st_size > 5000


def test_torch_compile_gives_the_eager_outputs():
    torch.manual_seed(0)
    model = tiny_vim().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(torch.compile(model)(x), model(x), atol=1e-5, name="compiled")


def test_onnx_round_trip_at_two_resolutions(tmp_path):
    pytest.importorskip("onnxruntime")
    from visionmamba.tools.export import export_onnx

    args = dict(depth=2, embed_dim=32, patch_size=8, stride=8, num_classes=10)
    for size in (32, 48):
        torch.manual_seed(0)
        report = export_onnx("vim_tiny_patch16_224", tmp_path / f"m{size}.onnx", img_size=size, model_args=args)
        assert report["max_abs_diff"] < 1e-4


def test_info_reports_exact_parameters_and_checked_compute():
    out = cli("info", "vim_small_patch16_stride8_224").stdout
    assert "26,001,256" in out and "vim_s_midclstok_ft_81p6acc.pth" in out and "730 tokens" in out
    from visionmamba.models.info import parameter_counts

    assert parameter_counts() == {
        "vim_tiny_patch16_224": 7_148_008, "vim_tiny_patch16_stride8_224": 7_250_344, "vim_small_patch16_224": 25_796_584,
        "vim_small_patch16_stride8_224": 26_001_256, "vim_base_patch16_224": 97_598_440,
    }


def test_compute_count_matches_spec_formulas_and_a_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_vim(depth=2, scan_backend="reference").eval()
    cost = compute(model, (32, 48))
    L, E, N, depth = 4 * 6 + 1, 64, 16, 2
    assert cost.scan == depth * 2 * (3 * L * E * N + L * E * N)  # Eq. 8 per direction
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 48))
    # The counter sees every product twice (multiply + add); the reference scan's read-out h @ C is a bmm
    # (2 L E N per direction); F.conv1d computes K - 1 padded outputs more than it keeps.
    readout = depth * 2 * 2 * L * E * N
    padding = depth * 2 * 2 * E * 3 * 4
    assert counter.get_total_flops() == 2 * cost.macs + readout + padding
