"""The CPU backend: a fused C++ selective scan, compiled at first use with torch's cpp_extension.

The whole contract is fused: bias, softplus, the D skip and the SiLU(z) gate, forward and backward.
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

from .common import compute_dtype

CHANNEL_BLOCK = 32

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// The whole contract of visionmamba.scan.selective_scan for one (batch, channel) row at a time.
// u, delta, z: (Bsz, E, L); A: (E, N); Bt, Ct: (Bsz, L, N) (time-major: states contiguous);
// D, bias: (E,) or null; y: (Bsz, E, L).
// delta_t = softplus(raw_t + bias) (threshold 20) for a whole row, in a loop the compiler vectorises.
template <typename T>
static inline void deltas(const T* raw, T bias, bool softplus, T* out, int64_t L) {
  if (softplus) {
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) {
      const T x = raw[t] + bias;
      out[t] = x > T(20) ? x : std::log(T(1) + std::exp(std::min(x, T(20))));
    }
  } else {
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) out[t] = raw[t] + bias;
  }
}

// sigmoid of a row (for the SiLU gate and the softplus derivative), vectorised.
template <typename T>
static inline void sigmoids(const T* x, T shift, T* out, int64_t L) {
#pragma omp simd
  for (int64_t t = 0; t < L; ++t) out[t] = T(1) / (T(1) + std::exp(-std::max(x[t] + shift, T(-80))));
}

template <typename T>
void scan_fwd(const T* u, const T* delta, const T* A, const T* Bt, const T* Ct, const T* D, const T* z,
              const T* bias, bool softplus, T* y, int64_t Bsz, int64_t E, int64_t L, int64_t N) {
  at::parallel_for(0, Bsz * E, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> h(N), dts(L), sig(L);
    for (int64_t be = begin; be < end; ++be) {
      const int64_t b = be / E, e = be % E;
      const T* ub = u + be * L; const T* Ae = A + e * N;
      const T* Bb = Bt + b * L * N; const T* Cb = Ct + b * L * N;
      const T De = D ? D[e] : T(0);
      T* yb = y + be * L;
      deltas(delta + be * L, bias ? bias[e] : T(0), softplus, dts.data(), L);
      if (z) sigmoids(z + be * L, T(0), sig.data(), L);
      std::fill(h.begin(), h.end(), T(0));
      T* hp = h.data();
      for (int64_t t = 0; t < L; ++t) {
        const T d = dts[t], du = d * ub[t];
        const T* Bn = Bb + t * N; const T* Cn = Cb + t * N;
        T acc = 0;
#pragma omp simd reduction(+:acc)
        for (int64_t n = 0; n < N; ++n) {
          const T hn = std::exp(d * Ae[n]) * hp[n] + du * Bn[n];
          hp[n] = hn;
          acc += Cn[n] * hn;
        }
        acc += De * ub[t];
        if (z) acc *= z[be * L + t] * sig[t];
        yb[t] = acc;
      }
    }
  });
}

// dout: (Bsz, E, L). Outputs: du, ddelta (w.r.t. the raw delta), dz: (Bsz, E, L); dA_part: (Bsz, E, N);
// dD_part, dbias_part: (Bsz, E); dB_part, dC_part: (Bsz, nblk, L, N) partial sums over each channel block.
template <typename T>
void scan_bwd(const T* u, const T* delta, const T* A, const T* Bt, const T* Ct, const T* D, const T* z,
              const T* bias, bool softplus, const T* dout,
              T* du, T* ddelta, T* dz, T* dA_part, T* dB_part, T* dC_part, T* dD_part, T* dbias_part,
              int64_t Bsz, int64_t E, int64_t L, int64_t N, int64_t blk) {
  const int64_t nblk = (E + blk - 1) / blk;
  at::parallel_for(0, Bsz * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> H(L * N), g(N), dAacc(N), dts(L), zsig(L), dsp(L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, k = task % nblk;
      const T* Bb = Bt + b * L * N; const T* Cb = Ct + b * L * N;
      T* dBb = dB_part + (b * nblk + k) * L * N; T* dCb = dC_part + (b * nblk + k) * L * N;
      for (int64_t e = k * blk; e < std::min(E, (k + 1) * blk); ++e) {
        const int64_t be = b * E + e;
        const T* ub = u + be * L; const T* db = delta + be * L; const T* Ae = A + e * N; const T* dob = dout + be * L;
        const T De = D ? D[e] : T(0), bias_e = bias ? bias[e] : T(0);
        T* Hp = H.data(); T* dt = dts.data();
        deltas(db, bias_e, softplus, dt, L);
        if (z) sigmoids(z + be * L, T(0), zsig.data(), L);
        if (softplus) sigmoids(db, bias_e, dsp.data(), L);
        for (int64_t t = 0; t < L; ++t) {  // states h_t of this channel, recomputed
          const T d = dt[t], dux = d * ub[t];
          const T* Bn = Bb + t * N;
          const T* prev = t > 0 ? Hp + (t - 1) * N : nullptr;
          T* cur = Hp + t * N;
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) cur[n] = std::exp(d * Ae[n]) * (prev ? prev[n] : T(0)) + dux * Bn[n];
        }
        std::fill(g.begin(), g.end(), T(0));
        std::fill(dAacc.begin(), dAacc.end(), T(0));
        T* gp = g.data(); T* dAp = dAacc.data();
        T dD = 0, dbias = 0;
        for (int64_t t = L - 1; t >= 0; --t) {  // adjoint walk: g = dL/dh_t through h_t = a_t h_{t-1} + delta_t u_t B_t
          const T d = dt[t], ut = ub[t];
          const T* Bn = Bb + t * N; const T* Cn = Cb + t * N;
          const T* cur = Hp + t * N;
          const T* prev = t > 0 ? Hp + (t - 1) * N : nullptr;
          T dy = dob[t];
          if (z) {
            const T zt = z[be * L + t], sig = zsig[t];
            T y = De * ut;
            for (int64_t n = 0; n < N; ++n) y += Cn[n] * cur[n];
            dz[be * L + t] = dy * y * sig * (T(1) + zt * (T(1) - sig));
            dy *= zt * sig;
          }
          T* dBn = dBb + t * N; T* dCn = dCb + t * N;
          T dd = 0, duu = 0;
#pragma omp simd reduction(+:dd, duu)
          for (int64_t n = 0; n < N; ++n) {
            const T a = std::exp(d * Ae[n]);
            const T hprev = prev ? prev[n] : T(0);
            const T gn = gp[n] + dy * Cn[n];
            dCn[n] += dy * cur[n];
            dBn[n] += gn * d * ut;
            dd += gn * (Ae[n] * a * hprev + ut * Bn[n]);
            duu += gn * Bn[n];
            dAp[n] += gn * d * a * hprev;
            gp[n] = gn * a;
          }
          if (softplus && db[t] + bias_e <= T(20)) dd *= dsp[t];
          ddelta[be * L + t] = dd;
          du[be * L + t] = duu * d + dy * De;
          dD += dy * ut;
          dbias += dd;
        }
        for (int64_t n = 0; n < N; ++n) dA_part[be * N + n] = dAp[n];
        dD_part[be] = dD;
        dbias_part[be] = dbias;
      }
    }
  });
}

template <typename T>
static const T* opt(const torch::Tensor& t) { return t.numel() ? t.data_ptr<T>() : nullptr; }

torch::Tensor forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt, torch::Tensor Ct,
                      torch::Tensor D, torch::Tensor z, torch::Tensor bias, bool softplus) {
  auto y = torch::empty_like(u);
  const int64_t Bsz = u.size(0), E = u.size(1), L = u.size(2), N = A.size(1);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "visionmamba_scan_fwd", [&] {
    scan_fwd<scalar_t>(u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                       Bt.data_ptr<scalar_t>(), Ct.data_ptr<scalar_t>(), opt<scalar_t>(D), opt<scalar_t>(z),
                       opt<scalar_t>(bias), softplus, y.data_ptr<scalar_t>(), Bsz, E, L, N);
  });
  return y;
}

std::vector<torch::Tensor> backward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt,
                                    torch::Tensor Ct, torch::Tensor D, torch::Tensor z, torch::Tensor bias,
                                    bool softplus, torch::Tensor dout, int64_t blk) {
  const int64_t Bsz = u.size(0), E = u.size(1), L = u.size(2), N = A.size(1);
  const int64_t nblk = (E + blk - 1) / blk;
  auto du = torch::empty_like(u), ddelta = torch::empty_like(u);
  auto dz = z.numel() ? torch::empty_like(u) : torch::empty({0}, u.options());
  auto dA_part = torch::empty({Bsz, E, N}, u.options());
  auto dD_part = torch::empty({Bsz, E}, u.options()), dbias_part = torch::empty({Bsz, E}, u.options());
  auto dB_part = torch::zeros({Bsz, nblk, L, N}, u.options());
  auto dC_part = torch::zeros({Bsz, nblk, L, N}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "visionmamba_scan_bwd", [&] {
    scan_bwd<scalar_t>(u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                       Bt.data_ptr<scalar_t>(), Ct.data_ptr<scalar_t>(), opt<scalar_t>(D), opt<scalar_t>(z),
                       opt<scalar_t>(bias), softplus, dout.data_ptr<scalar_t>(),
                       du.data_ptr<scalar_t>(), ddelta.data_ptr<scalar_t>(),
                       dz.numel() ? dz.data_ptr<scalar_t>() : nullptr,
                       dA_part.data_ptr<scalar_t>(), dB_part.data_ptr<scalar_t>(), dC_part.data_ptr<scalar_t>(),
                       dD_part.data_ptr<scalar_t>(), dbias_part.data_ptr<scalar_t>(), Bsz, E, L, N, blk);
  });
  return {du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part};
}
"""

_extension = None
_build_error: Optional[str] = None


def _load():
    """Compile (once per source version; cached by torch under TORCH_EXTENSIONS_DIR) and import the kernel."""
    global _extension, _build_error
    if _extension is None and _build_error is None:
        digest = hashlib.sha1((_SOURCE + torch.__version__).encode()).hexdigest()[:10]
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "no CUDA runtime found" is expected on CPU machines
        try:
            from torch.utils.cpp_extension import load_inline

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


def _prepare(u, delta, A, B, C, D, z, delta_bias):
    """Everything in one compute dtype, contiguous; B and C time-major; absent inputs as empty tensors."""
    ct = compute_dtype(u.dtype)
    empty = u.new_empty(0, dtype=ct)
    cast = lambda t: empty if t is None else t.to(ct).contiguous()  # noqa: E731
    return (cast(u), cast(delta), cast(A), B.to(ct).transpose(1, 2).contiguous(), C.to(ct).transpose(1, 2).contiguous(),
            cast(D), cast(z), cast(delta_bias))


def forward(u, delta, A, B, C, D, z, delta_bias, softplus) -> torch.Tensor:
    """The whole contract (bias, softplus, D skip, SiLU gate) in one fused pass; returns u's dtype."""
    if u.device.type != "cpu":
        raise ValueError(f"the 'cpu' scan backend needs CPU tensors, got {u.device}; use backend='auto'")
    return _load().forward(*_prepare(u, delta, A, B, C, D, z, delta_bias), softplus).to(u.dtype)


def backward(u, delta, A, B, C, D, z, delta_bias, softplus, dout):
    du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part = _load().backward(
        *_prepare(u, delta, A, B, C, D, z, delta_bias), softplus, dout.to(compute_dtype(u.dtype)).contiguous(), CHANNEL_BLOCK
    )
    return (
        du.to(u.dtype), ddelta.to(delta.dtype), dA_part.sum(0).to(A.dtype),
        dB_part.sum(1).transpose(1, 2).to(B.dtype), dC_part.sum(1).transpose(1, 2).to(C.dtype),
        None if D is None else dD_part.sum(0).to(D.dtype), None if z is None else dz.to(z.dtype),
        None if delta_bias is None else dbias_part.sum(0).to(delta_bias.dtype),
    )
