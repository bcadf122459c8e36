"""The one dispatch point of the selective scan: a backend is picked per call from :data:`BACKENDS`.

Model code calls :func:`bidirectional` (the mixer core) or :func:`selective_scan` and never imports a
backend module. Each backend is the module ``visionmamba.ops.scan.<name>`` and implements the contract of
:mod:`visionmamba.ops.scan.reference`, the specification every other backend is tested against. The
``cpu``, ``triton`` and ``loop`` modules also fuse the whole mixer core (``bidirectional``); for the others
it is composed from their one-direction scan exactly as the reference writes it. ``loop`` is the backend of
the exporters (a loop that exported graphs keep), not a fast path.

``"auto"`` picks per device (``cpu`` on the CPU, falling back to ``reference`` with a warning when no
compiler is available; ``triton`` on CUDA when Triton imports, else ``chunked``); the environment variable
``VISIONMAMBA_SCAN_BACKEND`` overrides "auto", and a model's ``scan_backend=`` overrides both. The kernel
backends run the one-direction scan as the custom op ``visionmamba::selective_scan``
(:mod:`~visionmamba.ops.scan.custom_op`), and their fused mixer cores as custom ops too, so that
torch.compile and torch.export see one graph. The first use of the ``cpu`` backend compiles its C++ kernels and applies
:func:`visionmamba.ops.memory.keep_freed_memory` (the CPU path's large activations would otherwise be
page-faulted in anew every layer).
"""
import functools
import os
import warnings
from typing import Dict, Optional

import torch

from visionmamba.ops.scan import cpu, loop, reference
from visionmamba.ops.scan.custom_op import selective_scan_op

BACKEND_ENV = "VISIONMAMBA_SCAN_BACKEND"

BACKENDS: Dict[str, str] = {
    "reference": "the specification: a plain loop over the sequence, autograd for the backward",
    "cpu": "fused C++ kernels compiled at first use (the default on the CPU)",
    "chunked": "pure PyTorch: closed form inside chunks, hand-written recomputing backward (any device)",
    "triton": "fused Triton kernels, forward and backward (the default on CUDA)",
    "loop": "PyTorch's scan operator over chunks of steps: a loop exported graphs keep (ONNX, torch.export)",
}


def available_backends() -> list:
    """Names accepted by ``backend=`` (besides ``"auto"``)."""
    return list(BACKENDS)


@torch.compiler.assume_constant_result
def cpu_available() -> bool:
    """True when the C++ CPU kernels build here (the first call compiles them, about a minute)."""
    return cpu.available()


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """True when Triton imports and can run here (a CUDA device, or the CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _warn_cpu_fallback() -> None:
    reason = cpu.build_error()
    warnings.warn(f"visionmamba: C++ CPU scan unavailable ({reason}); using the slower pure-PyTorch scan")


def _auto_backend(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton" if triton_available() else "chunked"
    if device.type == "cpu":
        if cpu_available():
            return "cpu"
        _warn_cpu_fallback()
        return "reference"
    return "chunked"


@torch.compiler.assume_constant_result
def _env_backend() -> str:
    return os.environ.get(BACKEND_ENV, "")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete backend name; the environment variable overrides ``"auto"``."""
    if backend == "auto":
        backend = _env_backend() or _auto_backend(device)
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown selective-scan backend {backend!r}; expected 'auto' or one of {available_backends()}"
            + (f" (check the {BACKEND_ENV} environment variable)" if _env_backend() else "")
        )
    if backend == "triton" and not triton_available():
        raise RuntimeError("the 'triton' scan backend needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    if backend == "cpu" and not cpu_available():
        raise RuntimeError(f"the 'cpu' scan backend is unavailable: {cpu.build_error()}")
    return backend


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
    :func:`visionmamba.ops.scan.reference.selective_scan` for the recurrence.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device)
    if name in ("reference", "loop"):  # plain tensor code, no custom op: tracers and exporters see through it
        module = reference if name == "reference" else loop
        return module.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    return selective_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, name)


def bidirectional(
    x: torch.Tensor,
    z: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Vim's bidirectional mixer core with the chosen backend; token-major (batch, L, E) in and out.

    Same arguments and result as :func:`visionmamba.ops.scan.reference.bidirectional`. The ``cpu`` and
    ``triton`` backends run it as fused kernels (both directions per call, the backward one read in
    reverse: no flips, no layout copies); the others compose their one-direction scan.
    """
    name = resolve_backend(backend, x.device)
    params = (x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)
    if name == "cpu":
        return cpu.bidirectional(*params)
    if name == "loop":
        return loop.bidirectional(*params)
    if name == "triton":
        from visionmamba.ops.scan import triton  # imports Triton: only where this backend runs

        return triton.bidirectional(*params)
    scan = reference.selective_scan if name == "reference" else functools.partial(selective_scan, backend=name)
    return reference.bidirectional(*params, scan=scan)


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
