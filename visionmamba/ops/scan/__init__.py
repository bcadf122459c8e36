"""The single dispatch point for the selective scan.

Model code calls :func:`selective_scan` (or :func:`bidirectional`) and never imports a backend module.
Backends, all implementing the contract of :func:`visionmamba.scan.reference.selective_scan`:

* ``reference``: the specification, a plain loop over the sequence (autograd does the backward);
* ``cpu``: a fused C++ kernel compiled at first use (the default on CPU);
* ``chunked``: pure PyTorch, closed form inside chunks, memory-lean recomputing backward (any device);
* ``triton``: fused GPU kernels, forward and backward (the default on CUDA when Triton imports).

``"auto"`` picks per device; the environment variable ``VISIONMAMBA_SCAN_BACKEND`` overrides "auto",
and the model argument ``scan_backend=`` overrides both. Every backend but ``reference`` runs as the
``torch.library`` custom op ``visionmamba::selective_scan``, so ``torch.compile(fullgraph=True)`` works.
"""
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from visionmamba.ops.scan import reference

BACKEND_ENV = "VISIONMAMBA_SCAN_BACKEND"
BACKENDS = ("reference", "cpu", "chunked", "triton")

_fallback_warned = False


def available_backends() -> list:
    """Names accepted by ``backend=`` (besides ``"auto"``)."""
    return list(BACKENDS)


def _cpu_available() -> bool:
    from visionmamba.ops.scan import cpu

    return cpu.available()


def triton_available() -> bool:
    """True when Triton imports and can run here (a CUDA device, or the CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _auto_backend(device: torch.device) -> str:
    global _fallback_warned
    if device.type == "cuda":
        return "triton" if triton_available() else "chunked"
    if device.type == "cpu":
        if _cpu_available():
            return "cpu"
        if not _fallback_warned:
            from visionmamba.ops.scan import cpu

            warnings.warn(f"visionmamba: C++ CPU scan unavailable ({cpu._build_error}); using the slower pure-PyTorch scan")
            _fallback_warned = True
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
    if backend == "cpu" and not _cpu_available():
        from visionmamba.ops.scan import cpu

        raise RuntimeError(f"the 'cpu' scan backend is unavailable: {cpu._build_error}")
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
    :func:`visionmamba.scan.reference.selective_scan` for the recurrence.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device)
    if name == "reference":
        return reference.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    from visionmamba.ops.scan.custom_op import selective_scan_op

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
    """Vim's bidirectional mixer core: conv, SiLU, x_proj, dt_proj and scan for both directions, averaged.

    x, z (batch, E, L); per direction, stacked on a leading axis of 2 (forward, backward):
    conv_weight (2, E, K), conv_bias (2, E), x_proj_weight (2, R + 2N, E), dt_proj_weight (2, E, R),
    dt_proj_bias (2, E), A (2, E, N) (= -exp(A_log)), D (2, E). Returns (batch, E, L) in x's dtype:
    ``(y_fwd + flip(y_bwd(flip(x), flip(z)))) / 2``. The ``triton`` and ``cpu`` backends run it as fused
    kernels (both directions per call, the backward one read in reverse, no flips); the others compose
    :func:`selective_scan` exactly as the official code does.
    """
    name = resolve_backend(backend, x.device)
    if name in ("triton", "cpu"):
        from visionmamba.ops.scan.custom_op import kernel

        return kernel(name).bidirectional(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)
    y_fwd = _direction(x, z, conv_weight[0], conv_bias[0], x_proj_weight[0], dt_proj_weight[0], dt_proj_bias[0], A[0], D[0], name)
    y_bwd = _direction(
        x.flip(-1), z.flip(-1), conv_weight[1], conv_bias[1], x_proj_weight[1], dt_proj_weight[1], dt_proj_bias[1], A[1], D[1], name
    ).flip(-1)
    return (y_fwd + y_bwd) / 2


def _direction(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, backend) -> torch.Tensor:
    """One causal direction. x, z (batch, E, L) -> gated scan output (batch, E, L)."""
    length, taps = x.shape[-1], conv_weight.shape[-1]
    u = F.silu(F.conv1d(x, conv_weight[:, None], conv_bias, padding=taps - 1, groups=x.shape[1])[..., :length])
    rank, state = dt_proj_weight.shape[1], A.shape[1]
    dt, B, C = F.linear(u.transpose(1, 2), x_proj_weight).split([rank, state, state], dim=-1)
    delta = F.linear(dt, dt_proj_weight).transpose(1, 2)  # the bias is added inside the scan
    return selective_scan(
        u, delta, A, B.transpose(1, 2), C.transpose(1, 2), D=D, z=z, delta_bias=dt_proj_bias,
        delta_softplus=True, backend=backend,
    )


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
