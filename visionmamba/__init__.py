"""visionmamba: Vision Mamba (Vim, arXiv 2401.09417), faithful to the official checkpoints, in plain PyTorch.

Importing the package registers the Vim variants with timm (``timm.create_model("vim_tiny_patch16_224")``).
The package is layered, each tier importing only the ones before it: ``ops`` (the selective scan and its
kernels) < ``models`` < ``data`` < ``train`` < ``tools`` < ``cli``.
"""
from visionmamba.files import PathLike
from visionmamba.models.factory import create_model, list_models
from visionmamba.models.pos_embed import pos_embed_resample
from visionmamba.models.registry import OFFICIAL_ALIASES, RELEASED, VARIANTS
from visionmamba.models.vim import VisionMamba, load_checkpoint
from visionmamba.models.weights import convert_to_safetensors
from visionmamba.ops.scan import available_backends, selective_scan
from visionmamba.version import __version__

__all__ = [
    "VisionMamba",
    "create_model",
    "load_checkpoint",
    "convert_to_safetensors",
    "pos_embed_resample",
    "selective_scan",
    "available_backends",
    "list_models",
    "VARIANTS",
    "OFFICIAL_ALIASES",
    "RELEASED",
    "PathLike",
    "__version__",
]
