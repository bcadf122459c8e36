"""The ``onnx`` scan backend: the fused nodes ``visionmamba.ConvSiLU`` and ``visionmamba.BiSelectiveScan``.

Inside :func:`fused_nodes`, ``torch.onnx.export`` writes the mixer core as these two nodes (and x_proj as a
stock ``MatMul``), with the contracts of the ops ``conv_silu`` and ``bi_scan`` (:mod:`visionmamba.ops.library`),
inference only. ONNX Runtime runs them with our kernels, OpenVINO with its extension (:mod:`.runtime_kernels`);
every other runtime runs each node's body, a model-local ONNX function of standard operators that
:mod:`.onnx_graph` adds to the file (the ``loop`` backend's formulation, the one a plain ``torch.onnx.export``
writes inline). Outside that context an export writes the ``loop`` backend.
"""
import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from visionmamba.ops import scan
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


scan.BACKENDS["onnx"] = scan.Backend("the fused nodes visionmamba.ConvSiLU and BiSelectiveScan that `visionmamba export` "
                                     "writes (torch.onnx.export only)", __import__(__name__, fromlist=["_"]), eager=False)


@contextlib.contextmanager
def fused_nodes() -> Iterator[None]:
    """``torch.onnx.export`` within this context writes the fused nodes instead of standard operators."""
    with scan.export_backend("onnx"):
        yield
