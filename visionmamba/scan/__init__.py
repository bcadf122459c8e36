"""The single dispatch point for the selective scan.

Model code calls :func:`selective_scan` and never imports a backend module. Backends live in a plain
dict; each implements the same contract as :func:`visionmamba.scan.reference.selective_scan`.
"""
import os
from typing import Callable, Dict, Optional

import torch

from . import reference

BACKEND_ENV = "VISIONMAMBA_SCAN_BACKEND"

_BACKENDS: Dict[str, Callable[..., torch.Tensor]] = {
    "reference": reference.selective_scan,
}


def available_backends() -> list:
    """Names accepted by ``backend=`` (besides ``"auto"``)."""
    return sorted(_BACKENDS)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete backend name; the environment variable overrides ``"auto"``."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "") or _auto_backend(device)
    if backend not in _BACKENDS:
        raise ValueError(
            f"unknown selective-scan backend {backend!r}; expected 'auto' or one of {available_backends()}"
            + (f" (check the {BACKEND_ENV} environment variable)" if os.environ.get(BACKEND_ENV) else "")
        )
    return backend


def _auto_backend(device: torch.device) -> str:
    return "reference"


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Selective scan with the chosen backend.

    Shapes: u, delta, z (batch, E, L); A (E, N); B, C (batch, N, L); D, delta_bias (E,).
    Returns (batch, E, L) in u's dtype, computed in (at least) float32. See
    :func:`visionmamba.scan.reference.selective_scan` for the recurrence.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    fn = _BACKENDS[resolve_backend(backend, u.device)]
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, E, L), got shape {tuple(u.shape)}")
    batch, channels, length = u.shape
    state = A.shape[-1] if A.dim() == 2 else -1
    expected = {
        "delta": (delta, (batch, channels, length)),
        "A": (A, (channels, state)),
        "B": (B, (batch, state, length)),
        "C": (C, (batch, state, length)),
        "D": (D, (channels,)),
        "z": (z, (batch, channels, length)),
        "delta_bias": (delta_bias, (channels,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(tensor.shape)}")
