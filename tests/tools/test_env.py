"""``visionmamba env``: the bug-report facts, as text and JSON, in a fresh process as users run it; a machine
whose kernels cannot be built says why instead of failing."""
import json
import os
import subprocess
import sys

import torch

from visionmamba.ops.scan import toolchain


def run_env(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionmamba", "env", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_the_json_report_names_versions_compiler_and_backends():
    proc = run_env("--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    assert data["torch"]["version"] == torch.__version__
    assert data["packages"]["torch"] and data["packages"]["timm"]
    assert data["compiler"]["kind"] in ("gcc", "clang") and data["compiler"]["cflags"]
    assert data["cpu"]["kernel_level"] and data["cpu"]["model"]
    cpu_row = next(row for row in data["backends"] if row["device"] == "cpu")
    assert cpu_row["backend"] == "cpu" and data["cpu"]["kernel_level"] in cpu_row["why"]
    assert len(data["backends"]) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_the_text_report_has_one_fact_per_line():
    proc = run_env()
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for start in ("visionmamba ", "cpu: ", "torch: ", "packages: ", "compiler: ", "backends ", "  cpu: cpu - ",
                  "runtime libraries:", "environment: "):
        assert any(line.startswith(start) for line in lines), (start, proc.stdout)


def test_a_machine_without_a_compiler_gets_the_reason(tmp_path):
    """No compiler (and an empty build cache): the CPU row says the reference runs and why; exit 0."""
    proc = run_env("--json", env={"CXX": "no-such-compiler", "TORCH_EXTENSIONS_DIR": str(tmp_path),
                                  "VISIONMAMBA_SCAN_BACKEND": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    cpu_row = next(row for row in data["backends"] if row["device"] == "cpu")
    assert cpu_row["backend"] == "reference" and "no C++ compiler" in cpu_row["why"], cpu_row
    assert data["compiler"]["kind"] == "missing" and data["environment"]["CXX"] == "no-such-compiler"


def test_the_cpu_is_named_with_family_and_model_on_x86_linux():
    name = toolchain.cpu_model()
    if sys.platform.startswith("linux") and "cpu family" in open("/proc/cpuinfo").read():
        assert "family" in name and "model" in name
    assert name
