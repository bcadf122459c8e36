"""benchmarks/memory_estimate.py: peak memory of batch inference from fake tensors, no GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_estimate  # noqa: E402


def test_the_estimate_counts_the_input_and_grows_with_the_batch():
    small, large = (memory_estimate.peak_bytes("vim_tiny_patch16_224", 64, batch) for batch in (8, 16))
    images = 8 * 3 * 64 * 64 * 4  # the second batch's eight more float32 images
    tokens = 8 * 17 * 384 * 2 * 2  # and at least their two directions' bf16 scan inputs
    assert large - small >= images + tokens


def test_plain_attention_costs_its_score_matrices():
    fused, naive = (memory_estimate.peak_bytes(spec, 512, 4) for spec in ("deit_tiny_patch16_224", "deit_tiny_patch16_224:naive"))
    scores = 4 * 3 * 1025 * 1025 * 2  # one block's (batch, heads, L, L) bf16 scores
    assert naive - fused >= scores


def test_the_table_has_a_row_per_model():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_estimate.py"), "--res", "32", "64", "--batch", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if "(batch 2)" in line]
    assert len(rows) == 3 and all(row.count("GiB") == 2 for row in rows), done.stdout


@pytest.mark.parametrize("args, says", [(["--models", "nope"], "Unknown model"), (["--res", "60"], "image size 60x60"),
                                        (["--batch", "0"], "--batch must be at least 1")])
def test_bad_input_is_one_line(args, says):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_estimate.py"), "--batch", "2", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr
