"""The speed/memory benchmarks: the CLI's table, CSV and plot, and the scan benchmark script, on tiny shapes."""
import json
import subprocess
import sys
from pathlib import Path

from helpers import cli


def test_scan_benchmark_smoke_run(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scan.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["backend"] for r in results["scan"]] == ["official", "reference", "cpu", "chunked"]
    assert all(r["fwd_ms"] > 0 for r in results["scan"]) and len(results["memory"]) == 3
    assert "speed-up = official formulation time / backend time" in proc.stdout
    roof, bi = results["roofline"]  # the cpu kernels against this machine's limit
    assert (roof["kernel"], bi["kernel"]) == ("cpu", "cpu-bi") and bi["fwd_fraction"] > 0
    assert roof["fwd_limit_G_per_s"] > 0 and roof["bwd_limit_G_per_s"] > 0 and 0 < roof["fwd_fraction"]
    assert "roofline of the cpu kernel" in proc.stdout


def test_cpu_targets_smoke_run():
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_targets.py"
    proc = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tables = [[line.split(" | ") for line in block.splitlines() if line.startswith("| ")]
              for block in proc.stdout.split("\nlimits: ")]
    (head, *rows), (roof_head, *roof_rows) = tables
    assert head[:3] == ["| mode", "precision", "res"] and "vim_over_deit" in head
    assert {r[0] for r in rows} == {"| infer", "| train"} and all(float(r[5]) > 0 for r in rows)
    # the model roofline: every part's time and limit, and the model's fraction of the sum of the limits
    assert {"linears_fraction", "scan_limit_ms", "conv_ms", "rest_fraction", "fraction"} <= set(roof_head)
    assert {r[0] for r in roof_rows} == {"| infer", "| train"}
    for row in roof_rows:
        cells = dict(zip(roof_head, row))
        assert float(cells["limit_ms"]) > 0 and 0 < float(cells["fraction"]) < 2


def test_benchmark_smoke_run_writes_csv_and_plot(tmp_path):
    out = cli("benchmark", "--models", "vim_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_patch16_224:naive",
              "--res", 32, 48, "--batch", 1, "--repeats", 1, "--out", tmp_path).stdout
    assert "speed vs first" in out and "deit_tiny_patch16_224:naive" in out
    rows = (tmp_path / "benchmark.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[0].startswith("model,res,batch,mode,status,img_per_s,peak_mem_mb")
    assert all(",ok," in row for row in rows[1:])
    assert (tmp_path / "benchmark.png").stat().st_size > 5000


def test_benchmark_refuses_zero_sizes_and_fails_when_every_point_fails(tmp_path):
    proc = cli("benchmark", "--batch", 0, "--out", tmp_path, check=False)
    assert proc.returncode == 2 and "must be at least 1" in proc.stderr
    proc = cli("benchmark", "--models", "no_such_model", "--res", 32, "--batch", 1, "--repeats", 1, "--out", tmp_path, check=False)
    assert proc.returncode == 1 and "every point failed" in proc.stderr


def test_onnx_runtime_points_beside_pytorch_ones(tmp_path):
    specs = ["deit_tiny_patch16_224", "deit_tiny_patch16_224:onnx", "vim_tiny_patch16_224:onnx",
             "vim_tiny_patch16_224:onnx-fallback", "vim_tiny_patch16_224:onnx-standard", "vim_tiny_patch16_224:openvino",
             "vim_tiny_patch16_224:openvino-standard", "vim_tiny_patch16_224:onnx-int8", "vim_tiny_patch16_224:openvino-int8"]
    out = cli("benchmark", "--models", *specs, "--res", 32, "--batch", 2, "--repeats", 1, "--out", tmp_path).stdout
    rows = (tmp_path / "benchmark.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == specs
    assert all(",ok," in row for row in rows), rows
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [
        "deit_tiny_patch16_224_32.onnx", "vim_tiny_patch16_224_32.onnx", "vim_tiny_patch16_224_32_int8.bin",
        "vim_tiny_patch16_224_32_int8.onnx", "vim_tiny_patch16_224_32_int8.xml", "vim_tiny_patch16_224_32_standard.onnx"]
    assert "vim_tiny_patch16_224:onnx" in out
    proc = cli("benchmark", "--models", "vim_tiny_patch16_224:onnx", "--train", "--res", 32, "--out", tmp_path, check=False)
    assert proc.returncode == 2 and "runtime points are CPU inference" in proc.stderr
