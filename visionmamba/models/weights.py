"""Read, check and convert weight files: official ``.pth`` containers, ours, bare or DDP state dicts, safetensors.

Official checkpoints pickle an ``argparse.Namespace`` beside the weights; they are read with
``torch.load(weights_only=True)`` and that one class allow-listed, never with arbitrary unpickling.
Nothing here knows a model: the conversion from a file's keys to a model's is the model's
``checkpoint_filter_fn`` (:func:`visionmamba.models.vim.checkpoint_filter_fn`), passed in as ``filter_fn``.
"""
import argparse
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from visionmamba.files import PathLike, atomic_write, require_file

StateDict = Dict[str, torch.Tensor]
FilterFn = Callable[[StateDict, nn.Module], StateDict]

# Containers we know: which key holds the raw weights and which the EMA weights.
_MODEL_KEYS = ("model", "state_dict")
_EMA_KEYS = ("model_ema", "state_dict_ema")
# Globals an official (DeiT-style) training checkpoint needs besides tensors and plain containers.
_SAFE_GLOBALS = [argparse.Namespace]


def read_file(path: PathLike) -> Dict[str, Any]:
    """The whole checkpoint file as a dict (a container or a bare state dict)."""
    path = require_file(path, "checkpoint")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError, without the path
            raise ValueError(f"cannot read the safetensors file {str(path)!r}: {err}; it is damaged or not safetensors") from err
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError or RuntimeError with the offending global
            raise ValueError(
                f"cannot read checkpoint {str(path)!r} safely: {str(err).strip() or type(err).__name__}. It is not a "
                "PyTorch/safetensors checkpoint of a Vim model, it is damaged, or it pickles objects beyond tensors "
                "and argparse.Namespace."
            ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def extract_state_dict(obj: Mapping[str, Any], *, use_ema: bool = False, source: str = "checkpoint") -> StateDict:
    """Pick the (EMA) weights out of a container and strip a DDP ``module.`` prefix."""
    keys = _EMA_KEYS if use_ema else _MODEL_KEYS
    found = next((k for k in keys if obj.get(k) is not None), None)
    if found is not None:
        state = obj[found]
    elif use_ema:
        raise ValueError(f"{source} has no EMA weights (it was saved without an EMA, e.g. trained with --no-model-ema); "
                         "leave out --ema / use_ema to use its weights")
    else:
        state = obj
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        keys = sorted(state)[:10] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{source}: expected a state dict of tensors, found {keys}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def check_keys(state: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise one ValueError listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mis_shaped:
        lines = [f"{source} does not fit the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        lines.append("  Check the model name (tiny/small/base, stride 8 or 16) and num_classes, or load with strict=False.")
        raise ValueError("\n".join(lines))


def load_weights(
    model: nn.Module,
    path: PathLike,
    *,
    use_ema: bool = False,
    strict: bool = True,
    filter_fn: Optional[FilterFn] = None,
) -> Dict[str, List[str]]:
    """Load the (EMA) weights of any accepted file into ``model``, through ``filter_fn(state, model)``.

    Returns ``{"missing": [...], "unexpected": [...]}`` (empty lists after a strict load). With
    ``strict=False`` mis-shaped tensors are skipped and reported as missing.
    """
    source = f"checkpoint {str(path)!r}"
    state = extract_state_dict(read_file(path), use_ema=use_ema, source=source)
    if filter_fn is not None:
        state = filter_fn(state, model)
    if strict:
        check_keys(state, model, source)
    else:
        expected = model.state_dict()
        state = {k: v for k, v in state.items() if k not in expected or tuple(v.shape) == tuple(expected[k].shape)}
    result = model.load_state_dict(state, strict=strict)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


def convert_to_safetensors(src: PathLike, dst: PathLike, *, use_ema: bool = False) -> Tuple[int, int]:
    """Write the (EMA) weights of any accepted checkpoint as safetensors. Returns (tensors, values)."""
    state = extract_state_dict(read_file(src), use_ema=use_ema, source=f"checkpoint {str(src)!r}")
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    metadata = {"format": "pt", "source": Path(src).name, "weights": "ema" if use_ema else "model"}
    atomic_write(dst, lambda tmp: save_safetensors(state, tmp, metadata=metadata))
    return len(state), sum(v.numel() for v in state.values())
