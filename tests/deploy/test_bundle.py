"""export --bundle: the files, both runtimes loading the libraries in a process without visionmamba or torch,
OpenVINO's own benchmark_app, a refused folder, a library on a CPU without its instructions."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import visionmamba
from visionmamba import cli

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
TINY = dict(depth=2, embed_dim=32, patch_size=8, stride=8, num_classes=3, img_size=32)

# Runs in a fresh interpreter where importing visionmamba or torch fails: what a deployment machine has.
PLAIN = """
import sys
class Blocked:
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("visionmamba", "torch"):
            raise ImportError("imported " + name)
sys.meta_path.insert(0, Blocked())
import json, numpy as np, onnxruntime, openvino
folder, x = sys.argv[1], np.load(sys.argv[2])
manifest = json.load(open(folder + "/manifest.json"))
model = folder + "/" + manifest["model"] + ".onnx"
out = {}
for name, info in manifest["libraries"].items():
    if info["runtime"] == "onnxruntime":
        options = onnxruntime.SessionOptions()
        options.register_custom_ops_library(folder + "/" + name)
        session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        out[name] = session.run(None, {"image": x})[0].tolist()
    else:
        core = openvino.Core()
        core.add_extension(folder + "/" + name)
        out[name] = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0].tolist()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    model = visionmamba.create_model("vim_tiny_patch16_224", **TINY).eval()
    config = dict(input_size=(3, 32, 32), interpolation="bicubic", crop_pct=0.875, mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225))
    torch.save({"model": model.state_dict(), "model_name": "vim_tiny_patch16_224", "model_args": TINY,
                "classes": ["a", "b", "c"], "data_config": config}, root / "last.pth")
    assert cli.main(["export", "--checkpoint", str(root / "last.pth"), "--bundle", str(root / "b")]) == 0
    return root / "b", model


def test_the_bundle_holds_both_forms_both_libraries_twice_and_says_how_to_load_them(bundle):
    folder, _ = bundle
    manifest = json.loads((folder / "manifest.json").read_text())
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([*manifest["sha256"], "README.md", "manifest.json"]) and len(manifest["libraries"]) == 4
    assert {"vim_tiny_patch16_224.onnx", "vim_tiny_patch16_224.standard.onnx"} <= set(names)
    assert {info["isa_level"] for info in manifest["libraries"].values()} >= {"x86-64"} or sys.platform != "linux"
    readme = (folder / "README.md").read_text()
    for words in ("register_custom_ops_library", "RegisterCustomOpsLibrary", "RegisterCustomOpLibrary",
                  "registerCustomOpLibrary", "add_extension", "benchmark_app", *manifest["libraries"]):
        assert words in readme, words
    assert not re.search(r"\{[a-z_]+\}", readme)  # every placeholder filled


def test_a_process_without_visionmamba_runs_the_bundle_in_plain_runtimes(bundle, tmp_path):
    folder, model = bundle
    x = torch.randn(3, 3, 32, 40)
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        expected = model(x).numpy()
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(folder), str(tmp_path / "x.npy")], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = json.loads(proc.stdout.splitlines()[-1])
    assert len(outputs) == 4  # both runtimes, native and portable build
    for name, out in outputs.items():
        assert np.abs(np.array(out) - expected).max() < 1e-4, name


def test_openvinos_benchmark_app_runs_the_bundle(bundle):
    folder, _ = bundle
    app = shutil.which("benchmark_app", path=str(Path(sys.executable).parent)) or shutil.which("benchmark_app")
    if app is None:
        pytest.skip("benchmark_app is not installed (it ships in the openvino wheel)")
    manifest = json.loads((folder / "manifest.json").read_text())
    library = next(n for n, i in manifest["libraries"].items() if i["runtime"] == "openvino" and "portable" not in n)
    proc = subprocess.run([app, "-m", str(folder / "vim_tiny_patch16_224.onnx"), "-extensions", str(folder / library),
                           "-d", "CPU", "-infer_precision", "f32", "-data_shape", "[1,3,32,32]", "-niter", "4",
                           "-nireq", "1", "-api", "sync"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Throughput" in proc.stdout


def test_a_bundle_goes_only_into_a_new_or_empty_folder(bundle, capsys, tmp_path):
    folder, _ = bundle
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("the user's")
    assert cli.main(["export", "--checkpoint", str(folder.parent / "last.pth"), "--bundle", str(taken)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and len(err.splitlines()) == 1 and sorted(p.name for p in taken.iterdir()) == ["mine.txt"]


def test_a_library_on_a_cpu_without_its_instructions_says_so(tmp_path):
    """The build of the tests pretends the CPU lacks an extension; both runtimes relay the library's message."""
    import onnxruntime
    import openvino

    from visionmamba.deploy import runtime_kernels

    missing = ('VISIONMAMBA_TEST_MISSING_ISA="avx512f"',)
    ort, ov = tmp_path / "ort.so", tmp_path / "ov.so"
    runtime_kernels.build(runtime_kernels.ONNXRUNTIME, ort, defines=missing)
    runtime_kernels.build(runtime_kernels.OPENVINO, ov, defines=missing)
    for load in (lambda: onnxruntime.SessionOptions().register_custom_ops_library(str(ort)),
                 lambda: openvino.Core().add_extension(str(ov))):
        with pytest.raises(Exception, match=r"this CPU lacks avx512f; load libvisionmamba_\w+_portable"):
            load()
