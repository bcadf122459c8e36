"""Read, check and convert weight files: official ``.pth`` containers, ours, bare or DDP state dicts, safetensors.

Official checkpoints pickle an ``argparse.Namespace`` beside the weights; they are read with
``torch.load(weights_only=True)`` and that one class allow-listed, never with arbitrary unpickling.
Nothing here knows a model: the conversion from a file's keys to a model's is the model's
``checkpoint_filter_fn`` (:func:`visionmamba.models.vim.checkpoint_filter_fn`), passed in as ``filter_fn``.
"""
import argparse
import json
import re
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


# The safetensors metadata entry in which ``convert`` keeps what rebuilds the model (JSON).
META_KEY = "visionmamba"
# What a checkpoint of ours carries besides weights, kept by ``convert``.
MODEL_FACTS = ("model_name", "model_args", "classes", "data_config")


def read_file(path: PathLike) -> Dict[str, Any]:
    """The whole checkpoint file as a dict (a container or a bare state dict). A safetensors file that
    ``convert`` wrote is a container: ``{"model": tensors, "model_name": ..., ...}``."""
    path = require_file(path, "checkpoint")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip archive, or a legacy pickle
        raise ValueError(f"{str(path)!r} is not a checkpoint: a PyTorch file is a zip archive or a pickle, a "
                         "safetensors file ends in .safetensors; give the .pth or .safetensors file of the weights")
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError or RuntimeError with the offending global
            raise ValueError(f"cannot read checkpoint {str(path)!r} safely: {_load_failure(err)}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def _load_failure(err: Exception) -> str:
    """torch.load's long message, as the one reason that matters."""
    text = str(err)
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe:
        return (f"it pickles {unsafe.group(1)}, and only tensors, plain containers and argparse.Namespace are "
                "loaded (arbitrary objects could run code); re-save its state dict with torch.save")
    first = text.strip().splitlines()[0][:160] if text.strip() else type(err).__name__
    return f"it is damaged or not a checkpoint of weights ({first})"


def _read_safetensors(path: Path) -> Dict[str, Any]:
    from safetensors import safe_open

    try:
        tensors = load_safetensors(str(path), device="cpu")
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:  # safetensors raises its own SafetensorError, without the path
        raise ValueError(f"cannot read the safetensors file {str(path)!r}: {err}; it is damaged or not safetensors") from err
    if META_KEY not in meta:
        return tensors
    return {"model": tensors, **json.loads(meta[META_KEY])}


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


def check_keys(state: Mapping[str, torch.Tensor], model: nn.Module, source: str,
               describe: Optional[Callable[[Mapping[str, Any]], str]] = None) -> None:
    """Raise one ValueError, one line, counting missing, unexpected and mis-shaped keys (a few of each named)
    and, with ``describe``, saying what the checkpoint holds and what the model is."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or mis_shaped):
        return
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
        if items:
            parts.append(f"{title} ({len(items)}): " + ", ".join(items[:3]) + (", ..." if len(items) > 3 else ""))
    holds = f" it holds {describe(state)}, the model is {describe(expected)};" if describe else ""
    raise ValueError(f"{source} does not fit the model:{holds} " + "; ".join(parts) + ". Build the model the "
                     "checkpoint was trained as (name, model arguments, num_classes), or load with strict=False")


def load_weights(
    model: nn.Module,
    path: PathLike,
    *,
    use_ema: bool = False,
    strict: bool = True,
    filter_fn: Optional[FilterFn] = None,
    describe: Optional[Callable[[Mapping[str, Any]], str]] = None,
    contents: Optional[Mapping[str, Any]] = None,
) -> Dict[str, List[str]]:
    """Load the (EMA) weights of any accepted file into ``model``, through ``filter_fn(state, model)``.

    Returns ``{"missing": [...], "unexpected": [...]}`` (empty lists after a strict load). With
    ``strict=False`` mis-shaped tensors are skipped and reported as missing. ``describe`` names what a
    state dict holds in the error of a strict load; ``contents``: the file as :func:`read_file` read it.
    """
    source = f"checkpoint {str(path)!r}"
    state = extract_state_dict(read_file(path) if contents is None else contents, use_ema=use_ema, source=source)
    if filter_fn is not None:
        state = filter_fn(state, model)
    if strict:
        check_keys(state, model, source, describe)
    else:
        expected = model.state_dict()
        state = {k: v for k, v in state.items() if k not in expected or tuple(v.shape) == tuple(expected[k].shape)}
    result = model.load_state_dict(state, strict=strict)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


def convert_to_safetensors(src: PathLike, dst: PathLike, *, use_ema: bool = False,
                           facts: Optional[Mapping[str, Any]] = None) -> Tuple[int, int]:
    """Write the (EMA) weights of any accepted checkpoint as safetensors, with what rebuilds the model (the
    source's model name, arguments, classes and evaluation transform, updated by ``facts``) in the file's
    metadata, so the file is a checkpoint of ours again. Returns (tensors, values)."""
    contents = read_file(src)
    state = extract_state_dict(contents, use_ema=use_ema, source=f"checkpoint {str(src)!r}")
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    kept = {k: contents[k] for k in MODEL_FACTS if contents.get(k) is not None}
    kept.update({k: v for k, v in (facts or {}).items() if v is not None})
    metadata = {"format": "pt", "source": Path(src).name, "weights": "ema" if use_ema else "model"}
    if kept:
        metadata[META_KEY] = json.dumps(kept)
    atomic_write(dst, lambda tmp: save_safetensors(state, tmp, metadata=metadata))
    return len(state), sum(v.numel() for v in state.values())
