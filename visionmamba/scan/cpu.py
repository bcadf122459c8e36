"""The CPU backend: a fused C++ selective scan, compiled at first use with torch's cpp_extension.

Forward: one task per (batch, channel), a sequential loop over the sequence with the N states in a
SIMD-friendly inner loop. Backward: one task per (batch, block of channels); it recomputes the states of
one channel into a private L x N buffer and walks back through the sequence, so no (batch, E, L, N)
tensor is ever stored. Reductions over channels (dB, dC) go to per-block partial sums added up
afterwards in a fixed order: results are deterministic. Nothing is compiled at install time; when no
compiler is available :func:`available` is False and dispatch falls back to pure PyTorch.
"""
import hashlib
import logging
import os
from typing import Optional, Tuple

import torch

from .common import fused_backward, fused_forward

CHANNEL_BLOCK = 32

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// u, delta: (Bsz, E, L); A: (E, N); Bt, Ct: (Bsz, L, N) (time-major, states contiguous); y: (Bsz, E, L).
template <typename T>
void scan_fwd(const T* u, const T* delta, const T* A, const T* Bt, const T* Ct, T* y,
              int64_t Bsz, int64_t E, int64_t L, int64_t N) {
  at::parallel_for(0, Bsz * E, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> h(N);
    for (int64_t be = begin; be < end; ++be) {
      const int64_t b = be / E, e = be % E;
      const T* ub = u + be * L; const T* db = delta + be * L; const T* Ae = A + e * N;
      const T* Bb = Bt + b * L * N; const T* Cb = Ct + b * L * N;
      T* yb = y + be * L;
      std::fill(h.begin(), h.end(), T(0));
      T* hp = h.data();
      for (int64_t t = 0; t < L; ++t) {
        const T d = db[t], du = d * ub[t];
        const T* Bn = Bb + t * N; const T* Cn = Cb + t * N;
        T acc = 0;
#pragma omp simd reduction(+:acc)
        for (int64_t n = 0; n < N; ++n) {
          const T hn = std::exp(d * Ae[n]) * hp[n] + du * Bn[n];
          hp[n] = hn;
          acc += Cn[n] * hn;
        }
        yb[t] = acc;
      }
    }
  });
}

// dy: (Bsz, E, L). Outputs: du, ddelta, y: (Bsz, E, L); dA_part: (Bsz, E, N);
// dB_part, dC_part: (Bsz, nblk, L, N) partial sums over the channels of each block.
template <typename T>
void scan_bwd(const T* u, const T* delta, const T* A, const T* Bt, const T* Ct, const T* dy,
              T* du, T* ddelta, T* y, T* dA_part, T* dB_part, T* dC_part,
              int64_t Bsz, int64_t E, int64_t L, int64_t N, int64_t blk) {
  const int64_t nblk = (E + blk - 1) / blk;
  at::parallel_for(0, Bsz * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> H(L * N), g(N), dAacc(N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, k = task % nblk;
      const T* Bb = Bt + b * L * N; const T* Cb = Ct + b * L * N;
      T* dBb = dB_part + (b * nblk + k) * L * N; T* dCb = dC_part + (b * nblk + k) * L * N;
      for (int64_t e = k * blk; e < std::min(E, (k + 1) * blk); ++e) {
        const int64_t be = b * E + e;
        const T* ub = u + be * L; const T* db = delta + be * L; const T* Ae = A + e * N; const T* dyb = dy + be * L;
        T* yb = y + be * L;
        // States h_t of this channel, recomputed.
        T* Hp = H.data();
        for (int64_t t = 0; t < L; ++t) {
          const T d = db[t], dux = d * ub[t];
          const T* Bn = Bb + t * N; const T* Cn = Cb + t * N;
          const T* prev = t > 0 ? Hp + (t - 1) * N : nullptr;
          T* cur = Hp + t * N;
          T acc = 0;
#pragma omp simd reduction(+:acc)
          for (int64_t n = 0; n < N; ++n) {
            const T hn = std::exp(d * Ae[n]) * (prev ? prev[n] : T(0)) + dux * Bn[n];
            cur[n] = hn;
            acc += Cn[n] * hn;
          }
          yb[t] = acc;
        }
        // Adjoint walk: g = dL/dh_t flowing back through h_t = a_t h_{t-1} + delta_t u_t B_t.
        std::fill(g.begin(), g.end(), T(0));
        std::fill(dAacc.begin(), dAacc.end(), T(0));
        T* gp = g.data(); T* dAp = dAacc.data();
        for (int64_t t = L - 1; t >= 0; --t) {
          const T d = db[t], ut = ub[t], dyt = dyb[t];
          const T* Bn = Bb + t * N; const T* Cn = Cb + t * N;
          const T* cur = Hp + t * N;
          const T* prev = t > 0 ? Hp + (t - 1) * N : nullptr;
          T* dBn = dBb + t * N; T* dCn = dCb + t * N;
          T dd = 0, duu = 0;
#pragma omp simd reduction(+:dd, duu)
          for (int64_t n = 0; n < N; ++n) {
            const T a = std::exp(d * Ae[n]);
            const T hprev = prev ? prev[n] : T(0);
            const T gn = gp[n] + dyt * Cn[n];
            dCn[n] += dyt * cur[n];
            dBn[n] += gn * d * ut;
            dd += gn * (Ae[n] * a * hprev + ut * Bn[n]);
            duu += gn * d * Bn[n];
            dAp[n] += gn * d * a * hprev;
            gp[n] = gn * a;
          }
          ddelta[be * L + t] = dd;
          du[be * L + t] = duu;
        }
        for (int64_t n = 0; n < N; ++n) dA_part[be * N + n] = dAp[n];
      }
    }
  });
}

torch::Tensor forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt, torch::Tensor Ct) {
  auto y = torch::empty_like(u);
  const int64_t Bsz = u.size(0), E = u.size(1), L = u.size(2), N = A.size(1);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "visionmamba_scan_fwd", [&] {
    scan_fwd<scalar_t>(u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                       Bt.data_ptr<scalar_t>(), Ct.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), Bsz, E, L, N);
  });
  return y;
}

std::vector<torch::Tensor> backward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt,
                                    torch::Tensor Ct, torch::Tensor dy, int64_t blk) {
  const int64_t Bsz = u.size(0), E = u.size(1), L = u.size(2), N = A.size(1);
  const int64_t nblk = (E + blk - 1) / blk;
  auto du = torch::empty_like(u), ddelta = torch::empty_like(u), y = torch::empty_like(u);
  auto dA_part = torch::empty({Bsz, E, N}, u.options());
  auto dB_part = torch::zeros({Bsz, nblk, L, N}, u.options());
  auto dC_part = torch::zeros({Bsz, nblk, L, N}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "visionmamba_scan_bwd", [&] {
    scan_bwd<scalar_t>(u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                       Bt.data_ptr<scalar_t>(), Ct.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(),
                       du.data_ptr<scalar_t>(), ddelta.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                       dA_part.data_ptr<scalar_t>(), dB_part.data_ptr<scalar_t>(), dC_part.data_ptr<scalar_t>(),
                       Bsz, E, L, N, blk);
  });
  return {du, ddelta, y, dA_part, dB_part, dC_part};
}
"""

_extension = None
_build_error: Optional[str] = None


def _load():
    """Compile (once per source version; cached by torch under TORCH_EXTENSIONS_DIR) and import the kernel."""
    global _extension, _build_error
    if _extension is None and _build_error is None:
        from torch.utils.cpp_extension import load_inline

        digest = hashlib.sha1((_SOURCE + torch.__version__).encode()).hexdigest()[:10]
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "no CUDA runtime found" is expected on CPU machines
        try:
            _extension = load_inline(
                name=f"visionmamba_scan_cpu_{digest}",
                cpp_sources=_SOURCE,
                functions=["forward", "backward"],
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=bool(os.environ.get("VISIONMAMBA_VERBOSE_BUILD")),
            )
        except Exception as err:  # no compiler, no ninja, headers missing: reported once by the dispatcher
            _build_error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        finally:
            quiet.setLevel(level)
    if _extension is None:
        raise RuntimeError(f"the C++ CPU scan could not be built ({_build_error})")
    return _extension


def available() -> bool:
    """True when the kernel builds (the first call compiles it, about a minute)."""
    try:
        _load()
        return True
    except RuntimeError:
        return False


def core_forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    return _load().forward(u.contiguous(), delta.contiguous(), A.contiguous(), B.transpose(1, 2).contiguous(),
                           C.transpose(1, 2).contiguous())


def core_backward(u, delta, A, B, C, dy) -> Tuple[torch.Tensor, ...]:
    du, ddelta, y, dA_part, dB_part, dC_part = _load().backward(
        u.contiguous(), delta.contiguous(), A.contiguous(), B.transpose(1, 2).contiguous(),
        C.transpose(1, 2).contiguous(), dy.contiguous(), CHANNEL_BLOCK,
    )
    return du, ddelta, dA_part.sum(0), dB_part.sum(1).transpose(1, 2), dC_part.sum(1).transpose(1, 2), y


def forward(u, delta, A, B, C, D, z, delta_bias, softplus) -> torch.Tensor:
    if u.device.type != "cpu":
        raise ValueError(f"the 'cpu' scan backend needs CPU tensors, got {u.device}; use backend='auto'")
    return fused_forward(core_forward, u, delta, A, B, C, D, z, delta_bias, softplus)


def backward(u, delta, A, B, C, D, z, delta_bias, softplus, dout):
    return fused_backward(core_backward, u, delta, A, B, C, D, z, delta_bias, softplus, dout)
