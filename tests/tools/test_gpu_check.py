"""benchmarks/gpu_check.py runs end to end before any GPU time is spent: its --quick dry run on the CPU
(kernel tests and the scan table in Triton's interpreter, every table, the CSV and the Figure-1 plot)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_every_table_and_the_plot(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets what it needs
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "results.md").read_text()
    for heading in ("Kernel tests on this device", "Inference, bf16", "Training step", "Selective scan alone", "Targets"):
        assert heading in report
    assert "1 passed" in report
    rows = (tmp_path / "benchmark.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 3  # header, three models at two sizes and in training
    assert all(",ok," in row for row in rows[1:]), rows
    assert (tmp_path / "figure1.png").stat().st_size > 0


def test_gpu_check_without_a_gpu_asks_for_the_dry_run(tmp_path):
    if subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(torch.cuda.is_available())"]).returncode:
        pytest.skip("a GPU is present")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 2 and "--quick" in done.stderr


def test_gpu_check_refuses_an_output_path_that_is_a_file_before_running(tmp_path):
    taken = tmp_path / "results"
    taken.write_text("the user's file")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--out", str(taken)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "is a file" in done.stderr and "Traceback" not in done.stderr
    assert taken.read_text() == "the user's file"
