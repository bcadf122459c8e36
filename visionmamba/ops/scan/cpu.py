"""The CPU kernels of the fused ops (:mod:`visionmamba.ops.library`): C++ (``csrc/``) compiled at first use
with torch's cpp_extension. Each public function is the CPU kernel of the op of the same name.

The whole contract is fused, forward and backward: delta bias, softplus, the D skip and the SiLU(z) gate.

* :func:`conv_silu`, :func:`bi_scan`, :func:`bi_scan_`: the mixer core (``ops/scan/fused.py``): the depthwise
  conv + SiLU of both directions, then (after x_proj) the scan of both directions in one kernel that
  vectorises over channels, applies dt_proj inside (delta is never stored) and walks the backward direction
  in reverse (no flips, no layout copies). Its backward has the same layout and tasks: from the states the
  forward saved every ``CHECKPOINT_STEPS`` steps it recomputes one chunk of states at a time into a buffer
  that stays in cache, so no (batch, E, L, N) tensor is ever stored.
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
SOURCES = ("scan_rows.cpp", "scan_lanes.cpp", "conv_silu.cpp", "mixer_core.cpp", "rms_norm.cpp", "bindings.cpp")
HEADERS = ("selective_scan.h", "scan_math.h", "scan_lanes.h", "scan_lanes_backward.h", "conv_silu.h", "mixer_core.h",
           "tensor_args.h")
CHECKPOINT_STEPS = 32  # steps between the saved states: the lanes kernels' chunk (kPhaseSteps in scan_lanes.h)
FLOAT32_ACTIVATIONS = True  # the mixer hands these kernels float32 activations (it casts first, autocast off)
BF16_INFERENCE = True  # ... except in inference, where conv_silu and bi_scan_ also read and write bfloat16


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


def _activations(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels read activations of ``dtype`` in: bfloat16 as it is, the others in the compute dtype."""
    return dtype if dtype == torch.bfloat16 else compute_dtype(dtype)


def _conv_weights(weight: torch.Tensor, bias: torch.Tensor, ct: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The conv's weight (2, E, K) as the kernels take it, (2, K, E) (channels contiguous), and its bias, in ``ct``."""
    return weight.to(ct).transpose(1, 2).contiguous(), bias.to(ct).contiguous()


def _scan_weights(dt_weight: torch.Tensor, A: torch.Tensor, D: torch.Tensor, bias: torch.Tensor,
                  ct: torch.dtype) -> List[torch.Tensor]:
    """The scan's weights as the lanes kernels take them, in ``ct``: (W_t (2, R, E), A_t (2, N, E), D, bias),
    channels contiguous (the lanes)."""
    return [dt_weight.to(ct).transpose(1, 2).contiguous(), A.to(ct).transpose(1, 2).contiguous(),
            D.to(ct).contiguous(), bias.to(ct).contiguous()]


def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise conv + SiLU of both directions: x (b, L, E) token-major (a strided view of contiguous
    channels is fine); weight (2, E, K); bias (2, E) -> u (2, b, L, E) in x's dtype (bfloat16 read and
    written as it is, computed in float32)."""
    ct = compute_dtype(x.dtype)
    u = load().conv_forward(_lanes(x, _activations(x.dtype)), *_conv_weights(weight, bias, ct))
    return u.to(x.dtype)


def conv_silu_backward(du: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> List[torch.Tensor]:
    """(dx (b, L, E), dweight (2, E, K), dbias (2, E)) of :func:`conv_silu`, contiguous, in their dtypes."""
    ct = compute_dtype(x.dtype)
    dx, dw_part, db_part = load().conv_backward(_lanes(x, ct), *_conv_weights(weight, bias, ct),
                                                du.to(ct).contiguous())
    return [dx.to(x.dtype), dw_part.sum(0).transpose(1, 2).contiguous().to(weight.dtype), db_part.sum(0).to(bias.dtype)]


def checkpoint_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved states for activations of ``dtype``: the compute dtype."""
    return compute_dtype(dtype)


def _bi_forward(u, x_proj_out, dt_weight, A, D, z, bias, out, checkpoints) -> None:
    """Both directions into ``out`` (b, L, E) contiguous, of the activations' dtype (may be ``u[0]``), the
    states before every chunk into ``checkpoints`` (2, b, chunks, N, E) unless it is empty."""
    act, ct = out.dtype, compute_dtype(out.dtype)
    weights = _scan_weights(dt_weight, A, D, bias, ct)
    load().bi_forward(u.to(act).contiguous(), x_proj_out.to(act).contiguous(), _lanes(z, act), weights, out, checkpoints)


def bi_scan(u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
            z: torch.Tensor, bias: torch.Tensor, checkpoint_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both directions, dt_proj included: u (2, b, L, E); x_proj_out, x_proj's output (2, b, L, R + 2N) (dt_t,
    B_t, C_t per row); dt_weight (2, E, R); A (2, E, N); D, bias (2, E); z (b, L, E) -> ((y_fwd + y_bwd) / 2
    as (b, L, E) in z's dtype, the states before every chunk of ``checkpoint_steps`` (CHECKPOINT_STEPS, or 0
    for none) steps (2, b, chunks, N, E)). delta = dt_weight dt_t is computed inside."""
    if checkpoint_steps not in (0, CHECKPOINT_STEPS):
        raise ValueError(f"the CPU kernels keep a checkpoint every {CHECKPOINT_STEPS} steps or none, "
                         f"got checkpoint_steps {checkpoint_steps}")
    ct = compute_dtype(u.dtype)
    chunks = -(-u.shape[2] // checkpoint_steps) if checkpoint_steps else 0
    checkpoints = u.new_empty((2, u.shape[1], chunks, A.shape[-1], u.shape[3]), dtype=ct)
    out = torch.empty(u.shape[1:], dtype=ct)
    _bi_forward(u, x_proj_out, dt_weight, A, D, z, bias, out, checkpoints)
    return out.to(z.dtype), checkpoints


def bi_scan_(u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
             z: torch.Tensor, bias: torch.Tensor) -> None:
    """:func:`bi_scan` in place, for inference: the result is written over u[0] (the kernel reads the rows it
    owns before it writes them); no buffer the size of the output is allocated. bfloat16 activations are read
    and written as they are (the states and sums in float32)."""
    if u.is_contiguous() and u.dtype == _activations(u.dtype):
        _bi_forward(u, x_proj_out, dt_weight, A, D, z, bias, u[0], u.new_empty(0))
    else:
        u[0].copy_(bi_scan(u, x_proj_out, dt_weight, A, D, z, bias, 0)[0])


def bi_scan_inference(u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor,
                      D: torch.Tensor, z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`bi_scan`'s result alone, without a backward (the op of traced and exported graphs)."""
    return bi_scan(u, x_proj_out, dt_weight, A, D, z, bias, 0)[0]


def mixer_core(x: torch.Tensor, z: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
               x_proj_weight: torch.Tensor, dt_weight: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor,
               D: torch.Tensor) -> torch.Tensor:
    """The mixer core's inference forward in one pass of token tiles (``csrc/mixer_core.h``): conv + SiLU,
    x_proj and the scan of both directions, per chunk of CHECKPOINT_STEPS tokens while its rows are in cache,
    one batch row per task. Arguments as :func:`visionmamba.ops.scan.reference.bidirectional` (x_proj_weight
    (2, R + 2N, E)); x and z float32 or bfloat16 (read and written as they are, computed in float32) -> (b, L, E)
    in x's dtype. No gradient."""
    act = _activations(x.dtype)
    if act not in (torch.float32, torch.bfloat16):
        raise ValueError(f"mixer_core runs float32 or bfloat16 activations, got {x.dtype}")
    f32 = torch.float32
    columns = x_proj_weight.shape[1]
    x_proj_t = torch.nn.functional.pad(x_proj_weight.to(f32).transpose(1, 2), (0, -columns % 16)).contiguous()
    out = torch.empty(z.shape, dtype=act)
    load().mixer_core(_lanes(x, act), *_conv_weights(conv_weight, conv_bias, f32), x_proj_t, _lanes(z, act),
                      _scan_weights(dt_weight, A, D, dt_bias, f32), out)
    return out.to(x.dtype)


def bi_scan_backward(dout: torch.Tensor, u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor,
                     A: torch.Tensor, D: torch.Tensor, z: torch.Tensor, bias: torch.Tensor, checkpoint_steps: int,
                     checkpoints: torch.Tensor) -> List[torch.Tensor]:
    """The gradients of :func:`bi_scan` for its seven tensors (contiguous, in their dtypes), from the states it
    saved; token-major like the forward. dt_proj's part is two matrix products on the kernel's ddelta."""
    if checkpoint_steps != CHECKPOINT_STEPS or checkpoints.shape[2] != -(-u.shape[2] // CHECKPOINT_STEPS):
        raise ValueError(f"the CPU backward restarts from the states bi_scan saved every {CHECKPOINT_STEPS} steps; "
                         f"got checkpoint_steps {checkpoint_steps} and {checkpoints.shape[2]} checkpoints")
    ct = compute_dtype(u.dtype)
    inputs = (u, x_proj_out, dt_weight, A, D, z, bias)
    xdbl, W = x_proj_out.to(ct).contiguous(), dt_weight.to(ct)
    weights = _scan_weights(W, A, D, bias, ct)
    du, ddelta, dz, dA_part, dBC_part, dD_part, dbias_part = load().bi_backward(
        dout.to(ct).contiguous(), u.to(ct).contiguous(), xdbl, _lanes(z, ct), weights, checkpoints.to(ct).contiguous())
    rows = ddelta.view(2, -1, ddelta.shape[-1])  # (2, b L, E)
    dt = xdbl[..., : W.shape[-1]].reshape(2, -1, W.shape[-1])  # (2, b L, R)
    ddt = torch.bmm(rows, W).view(*u.shape[:3], W.shape[-1])
    grads = (du, torch.cat([ddt, dBC_part.sum(0)], dim=-1), torch.bmm(rows.transpose(1, 2), dt),
             dA_part.sum(0).transpose(1, 2), dD_part.sum(0), dz, dbias_part.sum(0))
    return [g.to(t.dtype).contiguous() for t, g in zip(inputs, grads)]
