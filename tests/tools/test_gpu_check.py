"""benchmarks/gpu_check.py cannot waste a lent GPU: its --quick dry run on the CPU runs end to end (kernel
tests and the scan table in Triton's interpreter, every table, the CSV and the Figure-1 plot), and its
control flow keeps going past a failing test, a failing point, a CUDA error and a budget that runs out."""
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

from visionmamba.tools.benchmark import Point  # noqa: E402

# As on the device, where visionmamba is not installed: no site processing (so no editable install), the
# packages' folder added as a plain path, the script run by path from another folder.
BARE = (f"import runpy, sys; sys.path += {site.getsitepackages()!r}; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')")


def dry_run(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}  # the script sets them
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    return subprocess.run([sys.executable, "-S", "-c", BARE, script, "--quick", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT / "tests")


def test_dry_run_from_a_bare_checkout_writes_every_table_past_a_failing_test_and_a_failing_point(tmp_path):
    failing = tmp_path / "test_planted.py"
    failing.write_text("def test_planted_failure():\n    assert 1 == 2\n\ndef test_fine():\n    pass\n")
    out = tmp_path / "out"
    # a budget no loaded machine runs out of: the budget's own behaviour is tested on a fake clock below
    done = dry_run("--out", out, "--models", "vim_tiny_patch16_224", "no_such_model", "deit_tiny_patch16_224",
                   "--tests", str(failing), "--budget-s", 3000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / "results.md").read_text()
    assert report.startswith("# gpu_check: CPU dry run") and "torch " in report and "Triton " in report
    for heading in ("Inference, bf16", "Training step", "Selective scan alone", "Targets", "Autotuner picks",
                    "Kernel tests on this device"):
        assert f"## {heading}" in report
    assert "1 failed, 1 passed" in report and "FAILED" in report and "test_planted_failure" in report
    rows = (out / "benchmark.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 3  # header, three specs at two sizes and in training
    assert sum(",ok," in row for row in rows) == 6 and sum("no_such_model" in row and ",error: " in row for row in rows) == 3
    assert (out / "figure1.png").stat().st_size > 0


def test_without_a_gpu_it_asks_for_the_dry_run(tmp_path):
    if subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(torch.cuda.is_available())"]).returncode:
        pytest.skip("a GPU is present")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--quick" in done.stderr


def test_an_output_path_that_is_a_file_is_refused_before_running(tmp_path):
    taken = tmp_path / "results"
    taken.write_text("the user's file")
    done = dry_run("--out", taken, timeout=120)
    assert done.returncode == 2 and "is a file" in done.stderr and "Traceback" not in done.stderr
    assert taken.read_text() == "the user's file"


def fake_measure(seconds=0.0, raises=(), clock=None):
    def measure(spec, res, batch, device, dtype, train, repeats):
        if clock is not None:
            clock[0] += seconds  # a point's time on the fake clock
        if spec in raises:
            raise RuntimeError(f"{spec} cannot launch")  # e.g. a Triton OutOfResources
        return Point(spec, res, batch, "train" if train else "infer", img_per_s=100.0, peak_mem_mb=10.0)
    return measure


def test_a_point_that_raises_is_its_status_and_the_others_still_run(tmp_path):
    run = gpu_check.Run(tmp_path, 60, ["# test"])
    points = gpu_check.measure_points(run, ["a", "b", "c"], [32, 64], 2, "cpu", False, 1, fake_measure(raises={"b"}))
    assert [p.status for p in points] == ["ok", "error: RuntimeError: b cannot launch", "ok"] * 2
    run.section("Inference", "table")  # each phase rewrites the files
    assert "## Inference" in (tmp_path / "results.md").read_text()
    assert len((tmp_path / "benchmark.csv").read_text().splitlines()) == 7 and (tmp_path / "figure1.png").exists()


def test_after_a_cuda_error_the_remaining_points_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "device_broken", lambda device: "AcceleratorError: an illegal memory access")
    run = gpu_check.Run(tmp_path, 60, ["# test"])
    points = gpu_check.measure_points(run, ["a", "b", "c"], [32], 2, "cuda", False, 1, fake_measure(raises={"b"}))
    assert [p.status.split(":")[0] for p in points] == ["ok", "error", "skipped"]
    assert "illegal memory access" in points[2].status
    assert gpu_check.scan_section(run, gpu_check.plan(True, False)).startswith("skipped: the device failed")


def test_the_benchmarks_stop_when_their_share_of_the_budget_is_spent(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: clock[0])
    run = gpu_check.Run(tmp_path, 1.0, ["# test"])  # 0.6 s for the benchmarks, 0.4 s kept for the tests
    points = gpu_check.measure_points(run, ["a", "b", "c"], [32], 2, "cpu", False, 1,
                                      fake_measure(seconds=0.4, clock=clock))
    assert [p.status for p in points] == ["ok", "ok", "skipped: out of budget"]
    assert run.left() > 0  # the tests' share is still there


def test_tests_that_outlast_the_budget_are_stopped_and_reported(tmp_path):
    slow = tmp_path / "test_slow.py"
    slow.write_text("import time\n\ndef test_slow():\n    time.sleep(60)\n")
    report = gpu_check.run_tests([str(slow)], dict(os.environ), timeout_s=10)
    assert report.startswith("stopped after 10 s")
    assert gpu_check.run_tests([str(slow)], dict(os.environ), timeout_s=3) == "skipped: out of budget"


def test_the_per_test_timeout_names_the_plugin_only_when_it_does_not_load_itself(monkeypatch):
    found = object()
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: found if name == "pytest_timeout" else None)
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    assert gpu_check.per_test_timeout() == ["--timeout", "120"]  # "-p" too would fail: "already registered"
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert gpu_check.per_test_timeout() == ["-p", "pytest_timeout", "--timeout", "120"]
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    assert gpu_check.per_test_timeout() == []


def test_an_exception_without_a_message_is_still_a_status(tmp_path):
    def measure(*args):
        raise RuntimeError()

    run = gpu_check.Run(tmp_path, 60, ["# test"])
    assert [p.status for p in gpu_check.measure_points(run, ["a"], [32], 2, "cpu", False, 1, measure)] == ["error: RuntimeError: "]
