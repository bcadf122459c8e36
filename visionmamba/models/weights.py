"""Read and write Vim weights: official ``.pth`` containers, bare or DDP state dicts, safetensors.

Official checkpoints pickle an ``argparse.Namespace`` beside the weights; they are read with
``torch.load(weights_only=True)`` and that one class allow-listed, never with arbitrary unpickling.
"""
import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from visionmamba.models.vim import VisionMamba, grid_from_pos_embed, pos_embed_resample

PathLike = Union[str, os.PathLike]

# Containers we know: which key holds the raw weights and which the EMA weights.
_MODEL_KEYS = ("model", "state_dict")
_EMA_KEYS = ("model_ema", "state_dict_ema")
# Globals an official (DeiT-style) training checkpoint needs besides tensors and plain containers.
_SAFE_GLOBALS = [argparse.Namespace]


def read_file(path: PathLike) -> Dict[str, Any]:
    """The whole checkpoint file as a dict (a container or a bare state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return load_safetensors(str(path), device="cpu")
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError or RuntimeError with the offending global
            raise ValueError(
                f"cannot read checkpoint {str(path)!r} safely: {err}. It is not a PyTorch/safetensors "
                "checkpoint of a Vim model, or it pickles objects beyond tensors and argparse.Namespace."
            ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def extract_state_dict(obj: Mapping[str, Any], *, use_ema: bool = False, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Pick the (EMA) weights out of a container and strip a DDP ``module.`` prefix."""
    keys = _EMA_KEYS if use_ema else _MODEL_KEYS
    found = next((k for k in keys if k in obj), None)
    if found is not None:
        state = obj[found]
    elif use_ema:
        raise KeyError(f"{source} has no EMA weights (looked for {list(_EMA_KEYS)}; keys: {sorted(obj)[:10]})")
    else:
        state = obj
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{source}: expected a state dict of tensors, found keys {sorted(state)[:10]}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def adapt_state_dict(state: Dict[str, torch.Tensor], model: VisionMamba, *, drop_head: bool = False) -> Dict[str, torch.Tensor]:
    """The conversion table from a checkpoint to ``model``, every key on purpose.

    * Official, ours and safetensors files use the same names: kept as they are.
    * ``pos_embed`` of another grid: resampled (class row kept at the middle; square source grid).
    * ``head.*``: dropped when the model has no head (``num_classes=0``), or, with ``drop_head``, when the
      checkpoint's head has another number of classes (fine-tuning on a new label set).
    Anything else that does not fit is reported by :func:`load_checkpoint`.
    """
    state = dict(state)
    pos = state.get("pos_embed")
    if pos is not None and pos.dim() == 3 and pos.shape[1] != model.pos_embed.shape[1] and pos.shape[2] == model.embed_dim:
        state["pos_embed"] = pos_embed_resample(pos, grid_from_pos_embed(pos.shape[1]), model.patch_embed.grid_size)
    head = model.head
    other_classes = drop_head and isinstance(head, nn.Linear) and "head.weight" in state and (
        tuple(state["head.weight"].shape) != tuple(head.weight.shape)
    )
    if isinstance(head, nn.Identity) or other_classes:
        for key in ("head.weight", "head.bias"):
            state.pop(key, None)
    return state


def check_keys(state: Mapping[str, torch.Tensor], model: nn.Module, source: str, optional: frozenset = frozenset()) -> None:
    """Raise one ValueError listing missing, unexpected and mis-shaped keys (``optional`` may be missing)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in optional]
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


def load_checkpoint(
    model: VisionMamba,
    path: PathLike,
    *,
    use_ema: bool = False,
    strict: bool = True,
    drop_head: bool = False,
) -> Dict[str, List[str]]:
    """Load an official ``.pth``, one of ours, a bare/DDP state dict or a safetensors file into ``model``.

    ``drop_head`` keeps the model's own (fresh) head when the checkpoint's has another class count.
    Returns ``{"missing": [...], "unexpected": [...]}`` (empty lists after a strict load). With
    ``strict=False`` mis-shaped tensors are skipped and reported as missing.
    """
    source = f"checkpoint {str(path)!r}"
    state = adapt_state_dict(extract_state_dict(read_file(path), use_ema=use_ema, source=source), model, drop_head=drop_head)
    new_head = frozenset({"head.weight", "head.bias"} - set(state)) if isinstance(model.head, nn.Linear) and drop_head else frozenset()
    if strict:
        check_keys(state, model, source, optional=new_head)
    else:
        expected = model.state_dict()
        state = {k: v for k, v in state.items() if k not in expected or tuple(v.shape) == tuple(expected[k].shape)}
    result = model.load_state_dict(state, strict=strict and not new_head)
    return {
        "missing": [k for k in result.missing_keys if k not in new_head],
        "unexpected": list(result.unexpected_keys),
    }


def atomic_write(path: PathLike, write) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path``: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def convert_to_safetensors(src: PathLike, dst: PathLike, *, use_ema: bool = False) -> Tuple[int, int]:
    """Write the (EMA) weights of any accepted checkpoint as safetensors. Returns (tensors, values)."""
    state = extract_state_dict(read_file(src), use_ema=use_ema, source=f"checkpoint {str(src)!r}")
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    metadata = {"format": "pt", "source": Path(src).name, "weights": "ema" if use_ema else "model"}
    atomic_write(dst, lambda tmp: save_safetensors(state, tmp, metadata=metadata))
    return len(state), sum(v.numel() for v in state.values())
