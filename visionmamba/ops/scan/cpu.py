"""The CPU backend: C++ kernels (``csrc/``) compiled at first use with torch's cpp_extension.

The whole contract is fused, forward and backward: delta bias, softplus, the D skip and the SiLU(z) gate.

* :func:`bidirectional`, the mixer core the model runs: the depthwise conv + SiLU of both directions, then
  x_proj (through :mod:`visionmamba.ops.linear`), then the scan of both directions in one kernel that
  vectorises over channels, applies dt_proj inside (delta is never stored) and walks the backward direction
  in reverse (no flips, no layout copies). Its backward recomputes the states per (direction, channel) row
  from channel-major copies, so no (batch, E, L, N) tensor is ever stored.
* :func:`forward` / :func:`backward`, the one-direction scan of the custom op (``selective_scan(...,
  backend="cpu")``), one (batch, channel) row per task.

Reductions over channels or batch go to per-task partial buffers summed here in a fixed order: results are
deterministic. Nothing is compiled at install time; when no compiler is available :func:`available` is
False and the dispatcher falls back to the reference scan.
"""
import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Tuple

import torch

from visionmamba.ops.linear import linear
from visionmamba.ops.memory import keep_freed_memory
from visionmamba.ops.scan.custom_op import register_backward
from visionmamba.ops.scan.reference import compute_dtype

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("scan_rows.cpp", "scan_lanes.cpp", "conv_silu.cpp", "bindings.cpp")
HEADERS = ("selective_scan.h", "scan_math.h")
CFLAGS = ("-O3", "-ffast-math", "-fopenmp")


def instruction_set() -> Tuple[str, Tuple[str, ...]]:
    """(name, compiler flags) of the instruction-set level the kernels are built for on this CPU.

    Never ``-march=native``: a binary built for the build machine dies (SIGILL) on an older CPU that shares
    the build cache, e.g. through a home folder on a cluster. x86-64 uses the level torch itself dispatches
    to (``torch.backends.cpu.get_cpu_capability()``, lowered by ``ATEN_CPU_CAPABILITY``): v4 (AVX-512, for
    the AVX-512 exp path), v3 (AVX2 + FMA) or the x86-64 baseline, tuned for the build machine (tuning only
    orders legal instructions: the binary runs on any CPU of its level); ARM the ARMv8-A baseline.
    """
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        capability = torch.backends.cpu.get_cpu_capability()
        level = {"AVX512": "x86-64-v4", "AVX2": "x86-64-v3"}.get(capability, "x86-64")
        return level, (f"-march={level}", "-mtune=native")  # tuning picks among legal instructions only
    if machine in ("aarch64", "arm64"):
        return "armv8-a", ("-march=armv8-a",)
    return machine or "generic", ()


def extension_name() -> str:
    """The build's name: the instruction-set level, and a hash of the sources, the flags, the torch version and
    the Python ABI. Builds are cached by name (TORCH_EXTENSIONS_DIR), so machines and environments that share
    a cache each keep their own binary instead of crashing on, or rebuilding, another's."""
    level, flags = instruction_set()
    digest = hashlib.sha1(f"{torch.__version__} {sys.implementation.cache_tag} {' '.join(CFLAGS + flags)}".encode())
    for name in SOURCES + HEADERS:
        digest.update((CSRC / name).read_bytes())
    return f"visionmamba_scan_cpu_{level.replace('-', '_')}_{digest.hexdigest()[:10]}"


@functools.cache
def _build() -> Tuple[Optional[ModuleType], Optional[str]]:
    """Compile (once per source version; cached by torch under TORCH_EXTENSIONS_DIR) and import the kernels.

    Returns (module, None), or (None, the reason) when they cannot be built here.
    """
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "no CUDA runtime found" is expected on CPU machines
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        name = extension_name()
        if not os.path.exists(os.path.join(_get_build_directory(name, False), f"{name}.so")):
            print("visionmamba: compiling the C++ CPU scan once (about a minute; cached afterwards)", file=sys.stderr)
        module = load(
            name=name,
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=list(CFLAGS + instruction_set()[1]),
            extra_ldflags=["-fopenmp"],
            verbose=bool(os.environ.get("VISIONMAMBA_VERBOSE_BUILD")),
        )
        return module, None
    except Exception as err:  # no compiler, no ninja, headers missing: reported once by the dispatcher
        lines = str(err).strip().splitlines() or [""]
        return None, f"{type(err).__name__}: " + next((line for line in lines if "error" in line), lines[-1])
    finally:
        quiet.setLevel(level)


def load() -> ModuleType:
    """The compiled kernels (compiled at the first call); raises RuntimeError when they cannot be built."""
    module, error = _build()
    if module is None:
        raise RuntimeError(f"the C++ CPU scan could not be built ({error})")
    keep_freed_memory()  # the CPU path's large activations would otherwise be page-faulted in anew each layer
    return module


def available() -> bool:
    """True when the kernels build here (the first call compiles them, about a minute)."""
    return _build()[0] is not None


def build_error() -> Optional[str]:
    """Why the kernels could not be built, or None."""
    return _build()[1]


# ------------------------------------------------------------------------------- one direction (custom op)
def _prepare(u, delta, A, B, C, D, z, delta_bias):
    """The kernel's layout in one compute dtype: contiguous u, delta (bias added), A; B and C side by side,
    time-major (batch, L, 2N); absent D and z as empty tensors."""
    ct = compute_dtype(u.dtype)
    empty = u.new_empty(0, dtype=ct)
    delta = delta.to(ct) if delta_bias is None else delta.to(ct) + delta_bias.to(ct)[:, None]
    BC = torch.cat([B.to(ct), C.to(ct)], dim=1).transpose(1, 2).contiguous()
    return (u.to(ct).contiguous(), delta.contiguous(), A.to(ct).contiguous(), BC,
            empty if D is None else D.to(ct).contiguous(), empty if z is None else z.to(ct).contiguous())


def forward(u, delta, A, B, C, D, z, delta_bias, softplus) -> torch.Tensor:
    """The whole contract in one fused pass; returns u's dtype."""
    if u.device.type != "cpu":
        raise ValueError(f"the 'cpu' scan backend needs CPU tensors, got {u.device}; use backend='auto'")
    return load().scan_forward(*_prepare(u, delta, A, B, C, D, z, delta_bias), softplus).to(u.dtype)


def backward(u, delta, A, B, C, D, z, delta_bias, softplus, dout):
    dout = dout.to(compute_dtype(u.dtype)).contiguous()
    du, ddelta, dz, dA_part, dBC_part, dD_part, dbias_part = load().scan_backward(
        *_prepare(u, delta, A, B, C, D, z, delta_bias), softplus, dout
    )
    state = A.shape[-1]
    dBC = dBC_part.sum(1).transpose(1, 2)  # (batch, 2N, L)
    return (
        du.to(u.dtype), ddelta.to(delta.dtype), dA_part.sum(0).to(A.dtype),
        dBC[:, :state].to(B.dtype), dBC[:, state:].to(C.dtype),
        None if D is None else dD_part.sum(0).to(D.dtype), None if z is None else dz.to(z.dtype),
        None if delta_bias is None else dbias_part.sum(0).to(delta_bias.dtype),
    )


# ---------------------------------------------------------------------------- both directions (the mixer)
# The kernels as torch.library custom ops (fake shapes for tracing, a backward op for autograd), so that
# torch.compile(fullgraph=True) and torch.export see each as one opaque operator.
@torch.library.custom_op("visionmamba::cpu_conv_silu", mutates_args=())
def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise conv + SiLU of both directions: x (b, L, E) token-major (a strided view of contiguous
    channels is fine); weight (2, E, K); bias (2, E) -> u (2, b, L, E)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return load().conv_forward(x, weight.transpose(1, 2).contiguous(), bias.contiguous())


@conv_silu.register_fake
def _(x, weight, bias):
    return x.new_empty((2, *x.shape))


@torch.library.custom_op("visionmamba::cpu_conv_silu_backward", mutates_args=())
def conv_silu_backward(du: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> List[torch.Tensor]:
    """(dx (b, L, E), dweight (2, E, K), dbias (2, E)) of :func:`conv_silu`."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    dx, dw_part, db_part = load().conv_backward(x, weight.transpose(1, 2).contiguous(), bias.contiguous(), du.contiguous())
    return [dx, dw_part.sum(0).transpose(1, 2).contiguous(), db_part.sum(0)]


@conv_silu_backward.register_fake
def _(du, x, weight, bias):
    return [t.new_empty(t.shape) for t in (x, weight, bias)]  # contiguous, as the real ones


@torch.library.custom_op("visionmamba::cpu_bi_scan", mutates_args=())
def bi_scan(u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
            z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Both directions, dt_proj included: u (2, b, L, E); x_proj_out, x_proj's output (2, b, L, R + 2N) (dt_t,
    B_t, C_t per row); dt_weight (2, E, R); A (2, E, N); D, bias (2, E); z (b, L, E) -> (y_fwd + y_bwd) / 2
    as (b, L, E). The kernel vectorises over channels and computes delta = dt_weight dt_t inside."""
    z = z if z.stride(-1) == 1 else z.contiguous()  # the kernel reads z_t as contiguous channels
    A_t = A.transpose(1, 2).contiguous()  # (2, N, E): channels contiguous, the lanes
    W_t = dt_weight.transpose(1, 2).contiguous()  # (2, R, E)
    return load().bi_forward(u.contiguous(), W_t, A_t, x_proj_out.contiguous(), D.contiguous(), z, bias.contiguous())


@bi_scan.register_fake
def _(u, x_proj_out, dt_weight, A, D, z, bias):
    return u.new_empty(u.shape[1:])


@torch.library.custom_op("visionmamba::cpu_bi_scan_backward", mutates_args=())
def bi_scan_backward(dout: torch.Tensor, u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor,
                     A: torch.Tensor, D: torch.Tensor, z: torch.Tensor, bias: torch.Tensor) -> List[torch.Tensor]:
    """The gradients of :func:`bi_scan` for its seven inputs; it recomputes delta and the states per
    (direction, channel) row from channel-major copies."""
    z = z if z.stride(-1) == 1 else z.contiguous()
    x_proj_out = x_proj_out.contiguous()
    dt = x_proj_out[..., : dt_weight.shape[-1]]
    u_c = u.transpose(2, 3).contiguous()  # (2, b, E, L)
    delta_c = dt_weight.unsqueeze(1) @ dt.transpose(2, 3)  # (2, b, E, L), as the forward computed it
    du, ddelta, dz, dA_part, dBC_part, dD_part, dbias_part = load().bi_backward(
        u_c, delta_c, A.contiguous(), x_proj_out, D.contiguous(), z, bias.contiguous(), dout.transpose(1, 2).contiguous()
    )
    ddt = ddelta.transpose(2, 3) @ dt_weight.unsqueeze(1)  # (2, b, L, R)
    dx_proj_out = torch.cat([ddt, dBC_part.sum(0)], dim=-1)
    ddt_weight = torch.einsum("dbel,dblr->der", ddelta, dt).contiguous()
    return [du.transpose(2, 3).contiguous(), dx_proj_out, ddt_weight, dA_part.sum(0), dD_part.sum(0),
            dz.transpose(1, 2).contiguous(), dbias_part.sum(0)]


@bi_scan_backward.register_fake
def _(dout, u, x_proj_out, dt_weight, A, D, z, bias):
    return [t.new_empty(t.shape) for t in (u, x_proj_out, dt_weight, A, D, z, bias)]  # contiguous, as the real ones


register_backward(conv_silu, conv_silu_backward)
register_backward(bi_scan, bi_scan_backward)


def bidirectional(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D) -> torch.Tensor:
    """The mixer core on the CPU, token-major throughout: the conv, x_proj, dt_proj and the scan all
    vectorise over channels. Same arguments and result as :func:`visionmamba.ops.scan.reference.bidirectional`
    (x, z (b, L, E) -> (b, L, E))."""
    params = (x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)
    if torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):  # the kernels compute in float32 whatever autocast says
            return _bidirectional(*params)
    return _bidirectional(*params)


def _bidirectional(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D) -> torch.Tensor:
    dtype = x.dtype
    ct = compute_dtype(dtype)
    x = x.to(ct)
    batch, length, inner = x.shape
    u = conv_silu(x, conv_weight.to(ct), conv_bias.to(ct))  # (2, b, L, E)
    x_proj_weight = x_proj_weight.to(ct)
    rows = u.view(2, batch * length, inner)
    width = x_proj_weight.shape[1]  # R + 2N
    x_proj_out = torch.stack([linear(rows[i], x_proj_weight[i]) for i in range(2)]).view(2, batch, length, width)
    out = bi_scan(u, x_proj_out, dt_proj_weight.to(ct), A.to(ct), D.to(ct), z.to(ct), dt_proj_bias.to(ct))
    return out.to(dtype)
