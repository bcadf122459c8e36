"""Devices by name, checked: an unknown name or a device this machine lacks is a one-line error, never a
silent fall-back to the CPU."""
import contextlib

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this machine has no CUDA GPU (or PyTorch was built "
                             "without CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type not in ("cpu", "meta"):
        raise ValueError(f"device {name!r} is not supported here; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return device


def current_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which ``tensor``'s GPU is the current one. Triton launches on the current device, not
    on the tensors' (a ``cuda:1`` tensor would otherwise be read from ``cuda:0``); no-op on the CPU."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()
