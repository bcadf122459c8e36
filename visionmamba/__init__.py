"""visionmamba: Vision Mamba (Vim, arXiv 2401.09417), faithful to the official checkpoints, in plain PyTorch.

Importing the package registers the Vim variants with timm (``timm.create_model("vim_tiny_patch16_224")``).
The package is layered, each tier importing only the ones before it: ``ops`` (the selective scan and its
kernels) < ``models`` < ``data`` < ``train`` < ``deploy`` < ``tools`` < ``cli``.

The names below are imported at their first use (PEP 562), and in the ``visionmamba`` command the timm
registration waits for a command that needs a model: ``visionmamba --help`` and argument errors answer
without loading torch.
"""
import importlib
import sys
from pathlib import Path
from typing import Any, List

from visionmamba.version import __version__

_EXPORTS = {  # name -> the module that defines it
    "VisionMamba": "visionmamba.models.vim",
    "create_model": "visionmamba.models.factory",
    "load_for_inference": "visionmamba.models.factory",
    "load_checkpoint": "visionmamba.models.vim",
    "convert_to_safetensors": "visionmamba.models.weights",
    "pos_embed_resample": "visionmamba.models.pos_embed",
    "selective_scan": "visionmamba.ops.scan",
    "available_backends": "visionmamba.ops.scan",
    "list_models": "visionmamba.models.factory",
    "VARIANTS": "visionmamba.models.registry",
    "OFFICIAL_ALIASES": "visionmamba.models.registry",
    "RELEASED": "visionmamba.models.registry",
    "PathLike": "visionmamba.files",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'visionmamba' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> List[str]:
    return sorted({*globals(), *__all__})


def in_the_command_line() -> bool:
    """True in the ``visionmamba`` command: its script, or ``python -m visionmamba``."""
    argv = list(getattr(sys, "orig_argv", []))
    run_as_module = any(a == "-m" and b == "visionmamba" for a, b in zip(argv, argv[1:]))
    script = Path(getattr(sys, "argv", [""])[0] or "").name
    return run_as_module or script in ("visionmamba", "visionmamba.exe", "visionmamba-script.py")


if not in_the_command_line():
    importlib.import_module("visionmamba.models")  # registers the timm entrypoints
