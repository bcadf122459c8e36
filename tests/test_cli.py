"""The command line starts fast: help and argument errors answer without importing torch."""
import subprocess
import sys

import pytest

# Runs the command as its script does, in a process where importing torch fails loudly.
BLOCK_TORCH = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("the command imported torch")
sys.meta_path.insert(0, NoTorch())
sys.argv = ["visionmamba", *sys.argv[1:]]
runpy.run_module("visionmamba", run_name="__main__")
"""


@pytest.mark.parametrize("args, code, says", [
    (["--help"], 0, "usage: visionmamba"),
    (["train", "--help"], 0, "--epochs"),
    (["export", "--help"], 0, "--format"),
    (["train", "--epochs", "x"], 2, "invalid int value: 'x'"),
    (["predict"], 2, "required: images"),
    (["export", "--format", "nope"], 2, "invalid choice: 'nope'"),
    (["nonsense"], 2, "invalid choice: 'nonsense'"),
])
def test_help_and_argument_errors_do_not_import_torch(args, code, says):
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], capture_output=True, text=True)
    assert result.returncode == code, result.stderr[-2000:]
    assert says in result.stdout + result.stderr
    assert "imported torch" not in result.stderr


def test_the_package_still_registers_the_models_on_import():
    code = "import timm, visionmamba; print(timm.is_model('vim_tiny_patch16_224'), visionmamba.VARIANTS is not None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]


@pytest.mark.parametrize("args, says", [(["models"], "vim_tiny_patch16_224"),
                                        (["info", "vim_tiny_patch16_224"], "parameters")])
def test_the_command_registers_the_models_when_a_command_needs_them(args, says):
    result = subprocess.run([sys.executable, "-m", "visionmamba", *args], capture_output=True, text=True)
    assert result.returncode == 0 and says in result.stdout, result.stderr[-2000:]
