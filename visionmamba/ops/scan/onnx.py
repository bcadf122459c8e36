"""The ``onnx`` backend: what ``torch.onnx.export`` writes for the mixer core.

While ``torch.onnx.export`` traces a model, the dispatch (``ops/scan/__init__.py``) turns ``auto`` and the
fused backends into this one. The conv + SiLU of both directions and x_proj become stock ONNX operators
(``Conv``, ``MatMul``); the scan of both directions becomes one node ``visionmamba.BiSelectiveScan`` with the
contract of the op ``bi_scan`` (:mod:`visionmamba.ops.library`), inference only. ONNX Runtime runs it with
our kernel, OpenVINO with its extension (``ops/scan/runtime_kernels.py``); every other runtime runs the node's body, a model-local
ONNX function of stock operators that ``visionmamba.tools.onnx_graph`` adds to the file.
"""
import torch
import torch.nn.functional as F

from visionmamba.ops.scan import loop

DOMAIN = "visionmamba"
OP_TYPE = "BiSelectiveScan"
CONV_OP_TYPE = "ConvSiLU"
VERSION = 1

selective_scan = loop.selective_scan  # the one-direction scan exports as the loop backend's ONNX Scan


def conv_silu_stock(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The op ``conv_silu`` in stock operators (the body of the node ``ConvSiLU``): x (b, L, E), weight (2, E, K), bias (2, E) -> u (2, b, L, E).
    Direction 0 is causal; direction 1, the causal conv of the reversed sequence, is anti-causal with the
    taps reversed in forward time (no flip of the activations)."""
    length, channels, taps = x.shape[1], x.shape[2], weight.shape[-1]
    x = x.transpose(1, 2)  # (b, E, L)
    forward = F.conv1d(x, weight[0][:, None], bias[0], padding=taps - 1, groups=channels)[..., :length]
    backward = F.conv1d(x, weight[1].flip(-1)[:, None], bias[1], padding=taps - 1, groups=channels)[..., taps - 1:]
    return F.silu(torch.stack([forward, backward]).transpose(2, 3))


def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The node ``visionmamba.ConvSiLU``: x (b, L, E), weight (2, E, K), bias (2, E) float32 -> u (2, b, L, E)."""
    return torch.onnx.ops.symbolic(f"{DOMAIN}::{CONV_OP_TYPE}", (x, weight, bias), dtype=torch.float32,
                                   shape=(2, *x.shape), version=VERSION)


def bi_scan(u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
            z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The node ``visionmamba.BiSelectiveScan``: the arguments of the op ``bi_scan`` (float32) -> (b, L, E)."""
    return torch.onnx.ops.symbolic(f"{DOMAIN}::{OP_TYPE}", (u, x_proj_out, dt_weight, A, D, z, bias),
                                   dtype=torch.float32, shape=z.shape, version=VERSION)


def bidirectional(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D) -> torch.Tensor:
    """The mixer core, the contract of :func:`visionmamba.ops.scan.reference.bidirectional`, in float32."""
    dtype, f32 = x.dtype, torch.float32
    u = conv_silu(x.to(f32), conv_weight.to(f32), conv_bias.to(f32))
    x_proj_out = torch.matmul(u, x_proj_weight.to(f32).transpose(1, 2)[:, None])  # (2, b, L, R + 2N)
    out = bi_scan(u, x_proj_out, dt_proj_weight.to(f32), A.to(f32), D.to(f32), z.to(f32), dt_proj_bias.to(f32))
    return out.to(dtype)
