"""visionmamba: Vision Mamba (Vim, arXiv 2401.09417), faithful to the official checkpoints, in plain PyTorch.

Importing the package registers the Vim variants with timm (``timm.create_model("vim_tiny_patch16_224")``).
"""
import os
from typing import Any, Optional

import timm

from visionmamba.models import registry as _registry  # noqa: F401  (registers the timm entrypoints)
from visionmamba.models.weights import PathLike, convert_to_safetensors, load_checkpoint
from visionmamba.models.vim import VisionMamba, pos_embed_resample
from visionmamba.models.registry import OFFICIAL_ALIASES, RELEASED, VARIANTS
from visionmamba.ops.scan import available_backends, selective_scan

__version__ = "0.1.0"

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
]


def list_models() -> list:
    """Our variant names (the official long names are registered too, as aliases)."""
    return list(VARIANTS)


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: Optional[PathLike] = None,
    use_ema: bool = False,
    **kwargs: Any,
) -> VisionMamba:
    """Build a Vim variant (or an official alias) through timm, optionally loading weights.

    ``pretrained=True`` fetches the released weights from the Hugging Face hub; ``checkpoint_path``
    loads a local official ``.pth``, one of ours, or a safetensors file (``use_ema`` picks the EMA
    weights of a container). Other keyword arguments go to :class:`VisionMamba` (``img_size``,
    ``num_classes``, ``drop_path_rate``, ``scan_backend``, ...).
    """
    if name not in VARIANTS and name not in OFFICIAL_ALIASES:
        raise ValueError(f"unknown Vim model {name!r}; choose one of {list_models()} (or an official long name)")
    if pretrained and checkpoint_path is not None:
        raise ValueError("pass either pretrained=True or checkpoint_path=..., not both")
    if use_ema and checkpoint_path is None:
        raise ValueError("use_ema=True selects the EMA weights of a checkpoint file; pass checkpoint_path=... too")
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, os.fspath(checkpoint_path), use_ema=use_ema)
    return model
