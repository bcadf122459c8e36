"""The one dispatch point of the selective scan: a backend is picked per call from :data:`BACKENDS`.

Model code calls :func:`bidirectional` (the mixer core) or :func:`selective_scan` and never imports a
backend module. Each backend is a module of this package with these two functions on the contract of :mod:`visionmamba.ops.scan.reference`, the specification every other backend is tested against.
``cpu`` and ``triton`` are one module, ``fused``: the fused ops of :mod:`visionmamba.ops.library`, whose
kernels the dispatcher picks by device (C++ on the CPU, Triton on CUDA), so each of the two names stands
for its device's kernels. ``loop`` is the backend of the exporters (a loop that exported graphs keep), not a
fast path: while ``torch.onnx.export`` traces, ``auto`` and the fused backends are :func:`export_backend`'s
(``loop``: standard ONNX operators that every runtime runs; :mod:`visionmamba.deploy` registers ``onnx``, the
fused nodes, and picks it for ``visionmamba export``).

``"auto"`` picks per device (``cpu`` on the CPU, falling back to ``reference`` with a warning when no
compiler is available; ``triton`` on CUDA when Triton imports and its kernels pass a first-use check on the
device (:mod:`visionmamba.ops.scan.probe`), else ``chunked`` with one warning); the environment variable
``VISIONMAMBA_SCAN_BACKEND`` overrides "auto", and a model's ``scan_backend=`` overrides both. The first use
of the ``cpu`` kernels compiles them and applies :func:`visionmamba.ops.memory.keep_freed_memory` (the CPU
path's large activations would otherwise be page-faulted in anew every layer); the pure-PyTorch backends
apply it at their first CPU call.
"""
import contextlib
import functools
import os
import sys
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, Iterator, Optional, Tuple

import torch

from visionmamba.ops import library
from visionmamba.ops.memory import keep_freed_memory
from visionmamba.ops.scan import chunked, cpu, fused, loop, probe, reference

BACKEND_ENV = "VISIONMAMBA_SCAN_BACKEND"


@dataclass(frozen=True)
class Backend:
    description: str
    module: ModuleType  # its selective_scan and bidirectional
    devices: Optional[Tuple[str, ...]] = None  # the device types it runs on; None: any
    eager: bool = True  # False: it only writes an exported graph (its nodes have no eager kernel)


BACKENDS: Dict[str, Backend] = {
    "reference": Backend("the specification: a plain loop over the sequence, autograd for the backward", reference),
    "cpu": Backend("fused C++ kernels compiled at first use (the default on the CPU)", fused, ("cpu",)),
    "chunked": Backend("pure PyTorch: closed form inside chunks, hand-written recomputing backward (any device)",
                       chunked),
    "triton": Backend("fused Triton kernels, forward and backward (the default on CUDA)", fused, ("cuda",)),
    "loop": Backend("PyTorch's scan operator over chunks of steps: a loop exported graphs keep (ONNX, torch.export)",
                    loop),
}
EXPORTED_AS_ONNX = ("auto", "cpu", "triton")  # backends that are the export backend while torch.onnx.export traces
_EXPORT_BACKEND = ["loop"]  # what they are then: standard operators, unless deploy asks for its fused nodes


@contextlib.contextmanager
def export_backend(name: str) -> Iterator[None]:
    """Within this context ``torch.onnx.export`` writes the mixer core with backend ``name`` (by default
    ``loop``, standard operators; ``onnx``, registered by :mod:`visionmamba.deploy`, the fused nodes)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown export backend {name!r}; expected one of {available_backends()}")
    previous, _EXPORT_BACKEND[0] = _EXPORT_BACKEND[0], name
    try:
        yield
    finally:
        _EXPORT_BACKEND[0] = previous


def available_backends() -> list:
    """Names accepted by ``backend=`` (besides ``"auto"``)."""
    return list(BACKENDS)


@torch.compiler.assume_constant_result
def cpu_available() -> bool:
    """True when the C++ CPU kernels build here (the first call compiles them, once per machine and version)."""
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
    if probe.routed(device):
        if not triton_available():
            return "chunked"
        return "triton" if probe.triton_works(device.type, -1 if device.index is None else device.index) else "chunked"
    if device.type == "meta":  # shapes only: the fused ops' fakes, one call per op
        return "cpu"
    if device.type == "cpu":
        if cpu_available():
            return "cpu"
        _warn_cpu_fallback()
        return "reference"
    return "chunked"


def exporting_onnx() -> bool:
    """True while ``torch.onnx.export`` traces (torch.onnx is imported by then; it is not read otherwise)."""
    exporter = sys.modules.get("torch.onnx")
    return exporter is not None and exporter.is_in_onnx_export()


@torch.compiler.assume_constant_result
def _env_backend() -> str:
    return os.environ.get(BACKEND_ENV, "")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete backend name; the environment variable overrides ``"auto"``. While
    ``torch.onnx.export`` traces, ``auto`` and the fused backends are :func:`export_backend`'s."""
    if backend in EXPORTED_AS_ONNX and exporting_onnx():
        return _EXPORT_BACKEND[0]
    if backend == "auto":
        backend = _env_backend() or _auto_backend(device)
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown selective-scan backend {backend!r}; expected 'auto' or one of {available_backends()}"
            + (f" (check the {BACKEND_ENV} environment variable)" if _env_backend() else "")
        )
    devices = BACKENDS[backend].devices
    kernels = library.kernel_device(device.type)
    if devices is not None and kernels not in devices:
        raise ValueError(f"the {backend!r} scan backend runs on {' and '.join(devices)} tensors, got {device.type}; "
                         "use backend='auto'")
    if not BACKENDS[backend].eager and not exporting_onnx():  # its nodes have no kernel: it would return garbage
        raise ValueError(f"the {backend!r} scan backend is what torch.onnx.export writes; it does not run eagerly")
    if backend == "triton" and not triton_available():
        raise RuntimeError("the 'triton' scan backend needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    if backend == "cpu" and device.type != "meta" and not cpu_available():  # meta tensors need no build
        raise RuntimeError(f"the 'cpu' scan backend is unavailable: {cpu.build_error()}")
    if device.type == "cpu" and backend in ("reference", "chunked") and not torch.compiler.is_compiling():
        keep_freed_memory()  # as the cpu kernels do when they load: their large temporaries, reused not faulted
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
    module = BACKENDS[resolve_backend(backend, u.device)].module
    return module.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)


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
    module = BACKENDS[resolve_backend(backend, x.device)].module
    return module.bidirectional(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)


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
