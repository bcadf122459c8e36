"""The CPU kernels of the fused ops (:mod:`visionmamba.ops.library`): C++ (``csrc/``) compiled at first use
with torch's cpp_extension. Each public function is the CPU kernel of the op of the same name.

The whole contract is fused, forward and backward: delta bias, softplus, the D skip and the SiLU(z) gate.

* :func:`conv_silu`, :func:`bi_scan`, :func:`bi_scan_`: the mixer core (``ops/scan/fused.py``): the depthwise
  conv + SiLU of both directions, then (after x_proj) the scan of both directions in one kernel that
  vectorises over channels, applies dt_proj inside (delta is never stored) and walks the backward direction
  in reverse (no flips, no layout copies). Its backward recomputes the states per (direction, channel) row
  from channel-major copies, so no (batch, E, L, N) tensor is ever stored (``checkpoint_steps`` 0).
* :func:`selective_scan` and its backward, the one-direction scan, one (batch, channel) row per task.

The kernels compute in float32 (float64 stays float64) and return their inputs' dtypes.

Reductions over channels or batch go to per-task partial buffers summed here in a fixed order: results are
deterministic. Nothing is compiled at install time; when no compiler is available :func:`available` is
False and the dispatcher falls back to the reference scan.
"""
import functools
import hashlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Tuple

import torch

from visionmamba.ops.library import gradients_like, in_layout_of
from visionmamba.ops.memory import keep_freed_memory
from visionmamba.ops.scan import toolchain
from visionmamba.ops.scan.reference import compute_dtype

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("scan_rows.cpp", "scan_lanes.cpp", "conv_silu.cpp", "bindings.cpp")
HEADERS = ("selective_scan.h", "scan_math.h", "scan_lanes.h", "conv_silu.h")
CHECKPOINT_STEPS = 0  # the backward recomputes the states per row: none are kept
FLOAT32_ACTIVATIONS = True  # the mixer hands these kernels float32 activations (it casts first, autocast off)


def extension_name(chain: Optional[toolchain.Toolchain] = None) -> str:
    """The build's name: the instruction-set level, and a hash of the sources, the toolchain (compiler, flags,
    threading), the torch version and the Python ABI. Builds are cached by name (TORCH_EXTENSIONS_DIR), so
    machines and environments that share a cache each keep their own binary instead of crashing on, or
    rebuilding, another's."""
    chain = chain or toolchain.toolchain()
    digest = hashlib.sha1(f"{torch.__version__} {sys.implementation.cache_tag} {chain.key()}".encode())
    for name in SOURCES + HEADERS:
        digest.update((CSRC / name).read_bytes())
    level = chain.flags.level.replace("-", "_").replace("+", "_")
    return f"visionmamba_scan_cpu_{level}_{digest.hexdigest()[:10]}"


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

        chain = toolchain.toolchain()
        if chain.kind == "missing":
            return None, f"no C++ compiler: {chain.version} (install one, or set CXX)"
        name = extension_name(chain)
        if not os.path.exists(os.path.join(_get_build_directory(name, False), f"{name}.so")):
            print("visionmamba: compiling the C++ CPU scan (once; cached afterwards)", file=sys.stderr)
        module = load(
            name=name,
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=list(chain.flags.cflags),
            extra_ldflags=list(chain.flags.ldflags),
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
    """True when the kernels build here (the first call compiles them, once per machine and version)."""
    return _build()[0] is not None


def build_error() -> Optional[str]:
    """Why the kernels could not be built, or None."""
    return _build()[1]


# ----------------------------------------------------------------------------------------- one direction
def _prepare(u, delta, A, B, C, D, z, delta_bias):
    """The kernel's layout in one compute dtype: contiguous u, delta (bias added), A; B and C side by side,
    time-major (batch, L, 2N); absent D and z as empty tensors."""
    ct = compute_dtype(u.dtype)
    empty = u.new_empty(0, dtype=ct)
    delta = delta.to(ct) if delta_bias is None else delta.to(ct) + delta_bias.to(ct)[:, None]
    BC = torch.cat([B.to(ct), C.to(ct)], dim=1).transpose(1, 2).contiguous()
    return (u.to(ct).contiguous(), delta.contiguous(), A.to(ct).contiguous(), BC,
            empty if D is None else D.to(ct).contiguous(), empty if z is None else z.to(ct).contiguous())


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> torch.Tensor:
    """The whole one-direction contract in one fused pass; returns u's dtype and layout."""
    out = load().scan_forward(*_prepare(u, delta, A, B, C, D, z, delta_bias), delta_softplus)
    return in_layout_of(u, out.to(u.dtype))


def selective_scan_backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> List[torch.Tensor]:
    """The gradients of :func:`selective_scan` for its eight tensors (empty placeholders for absent ones)."""
    dout = dout.to(compute_dtype(u.dtype)).contiguous()
    du, ddelta, dz, dA_part, dBC_part, dD_part, dbias_part = load().scan_backward(
        *_prepare(u, delta, A, B, C, D, z, delta_bias), delta_softplus, dout
    )
    state = A.shape[-1]
    dBC = dBC_part.sum(1).transpose(1, 2)  # (batch, 2N, L)
    grads = (du, ddelta, dA_part.sum(0), dBC[:, :state], dBC[:, state:], dD_part.sum(0), dz, dbias_part.sum(0))
    return gradients_like((u, delta, A, B, C, D, z, delta_bias), grads)


# ---------------------------------------------------------------------------- both directions (the mixer)
def _lanes(t: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """``t`` in the compute dtype with contiguous last axis (the kernels read rows of channels)."""
    t = t.to(ct)
    return t if t.stride(-1) == 1 else t.contiguous()


def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise conv + SiLU of both directions: x (b, L, E) token-major (a strided view of contiguous
    channels is fine); weight (2, E, K); bias (2, E) -> u (2, b, L, E) in x's dtype."""
    ct = compute_dtype(x.dtype)
    u = load().conv_forward(_lanes(x, ct), weight.to(ct).transpose(1, 2).contiguous(), bias.to(ct).contiguous())
    return u.to(x.dtype)


def conv_silu_backward(du: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> List[torch.Tensor]:
    """(dx (b, L, E), dweight (2, E, K), dbias (2, E)) of :func:`conv_silu`, contiguous, in their dtypes."""
    ct = compute_dtype(x.dtype)
    dx, dw_part, db_part = load().conv_backward(_lanes(x, ct), weight.to(ct).transpose(1, 2).contiguous(),
                                                bias.to(ct).contiguous(), du.to(ct).contiguous())
    return [dx.to(x.dtype), dw_part.sum(0).transpose(1, 2).contiguous().to(weight.dtype), db_part.sum(0).to(bias.dtype)]


def _bi_forward(u, x_proj_out, dt_weight, A, D, z, bias, out) -> None:
    """Both directions into ``out`` (b, L, E) contiguous in the compute dtype (may be ``u[0]``)."""
    ct = out.dtype
    A_t = A.to(ct).transpose(1, 2).contiguous()  # (2, N, E): channels contiguous, the lanes
    W_t = dt_weight.to(ct).transpose(1, 2).contiguous()  # (2, R, E)
    load().bi_forward(u.to(ct).contiguous(), W_t, A_t, x_proj_out.to(ct).contiguous(), D.to(ct).contiguous(),
                      _lanes(z, ct), bias.to(ct).contiguous(), out)


def bi_scan(u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
            z: torch.Tensor, bias: torch.Tensor, checkpoint_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both directions, dt_proj included: u (2, b, L, E); x_proj_out, x_proj's output (2, b, L, R + 2N) (dt_t,
    B_t, C_t per row); dt_weight (2, E, R); A (2, E, N); D, bias (2, E); z (b, L, E) -> ((y_fwd + y_bwd) / 2
    as (b, L, E) in z's dtype, no checkpoints: (2, b, 0, N, E)). delta = dt_weight dt_t is computed inside."""
    _check_no_checkpoints(checkpoint_steps)
    out = torch.empty(u.shape[1:], dtype=compute_dtype(u.dtype))
    _bi_forward(u, x_proj_out, dt_weight, A, D, z, bias, out)
    return out.to(z.dtype), u.new_empty((2, u.shape[1], 0, A.shape[-1], u.shape[3]), dtype=torch.float32)


def bi_scan_(u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
             z: torch.Tensor, bias: torch.Tensor) -> None:
    """:func:`bi_scan` in place, for inference: the result is written over u[0] (the kernel reads the rows it
    owns before it writes them); no buffer the size of the output is allocated."""
    if u.is_contiguous() and u.dtype == compute_dtype(u.dtype):
        _bi_forward(u, x_proj_out, dt_weight, A, D, z, bias, u[0])
    else:
        u[0].copy_(bi_scan(u, x_proj_out, dt_weight, A, D, z, bias, 0)[0])


def bi_scan_inference(u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor,
                      D: torch.Tensor, z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`bi_scan`'s result alone, without a backward (the op of traced and exported graphs)."""
    return bi_scan(u, x_proj_out, dt_weight, A, D, z, bias, CHECKPOINT_STEPS)[0]


def bi_scan_backward(dout: torch.Tensor, u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor,
                     A: torch.Tensor, D: torch.Tensor, z: torch.Tensor, bias: torch.Tensor, checkpoint_steps: int,
                     checkpoints: torch.Tensor) -> List[torch.Tensor]:
    """The gradients of :func:`bi_scan` for its seven tensors (contiguous, in their dtypes); it recomputes
    delta and the states per (direction, channel) row from channel-major copies."""
    _check_no_checkpoints(checkpoint_steps)
    ct = compute_dtype(u.dtype)
    inputs = (u, x_proj_out, dt_weight, A, D, z, bias)
    xdbl, W = x_proj_out.to(ct).contiguous(), dt_weight.to(ct)
    dt = xdbl[..., : W.shape[-1]]
    u_c = u.to(ct).transpose(2, 3).contiguous()  # (2, b, E, L)
    delta_c = W.unsqueeze(1) @ dt.transpose(2, 3)  # (2, b, E, L), as the forward computed it
    du, ddelta, dz, dA_part, dBC_part, dD_part, dbias_part = load().bi_backward(
        u_c, delta_c, A.to(ct).contiguous(), xdbl, D.to(ct).contiguous(), _lanes(z, ct), bias.to(ct).contiguous(),
        dout.to(ct).transpose(1, 2).contiguous()
    )
    ddt = ddelta.transpose(2, 3) @ W.unsqueeze(1)  # (2, b, L, R)
    grads = (du.transpose(2, 3), torch.cat([ddt, dBC_part.sum(0)], dim=-1), torch.einsum("dbel,dblr->der", ddelta, dt),
             dA_part.sum(0), dD_part.sum(0), dz.transpose(1, 2), dbias_part.sum(0))
    return [g.to(t.dtype).contiguous() for t, g in zip(inputs, grads)]


def _check_no_checkpoints(checkpoint_steps: int) -> None:
    if checkpoint_steps != CHECKPOINT_STEPS:
        raise ValueError(f"the CPU kernels keep no checkpoints (checkpoint_steps {CHECKPOINT_STEPS}), got {checkpoint_steps}")
