"""Vim as a dense-prediction backbone: a ViTDet-style simple feature pyramid over selected blocks.

The plain, single-scale Vim gives (D, H/s, W/s) maps (s = patch stride); like the official segmentation
backbone (docs/specification.md §6.2) the pyramid turns four of them into strides 4, 8, 16 and 32 with transposed
convolutions and max-pooling. The class token never reaches a map (it is removed by
``forward_intermediates``), and any input size whose sides fit the patch grid works (the position table is
resampled). Also usable through timm: ``timm.create_model(name, features_only=True,
feature_cls=VimFeaturePyramid)``.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from visionmamba.models.registry import default_out_indices
from visionmamba.models.vim import VisionMamba


def _upsample(dim: int, times: int) -> nn.Module:
    """x2 transposed convolutions (with BatchNorm + GELU between them), ``times`` of them."""
    layers: List[nn.Module] = []
    for i in range(times):
        if i:
            layers += [nn.BatchNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def _scale(dim: int, factor: int) -> nn.Module:
    """Resample a stride-s map by ``factor`` (a power of 2; > 1 up, < 1 down via factor = -k for /k)."""
    if factor == 1:
        return nn.Identity()
    if factor > 1:
        return _upsample(dim, factor.bit_length() - 1)
    return nn.MaxPool2d(kernel_size=-factor, stride=-factor)


class VimFeaturePyramid(nn.Module):
    """Four maps at strides 4, 8, 16, 32 from the outputs of four blocks.

    Input (b, 3, H, W) with sides fitting the patch grid; output a list of (b, D, H/4, W/4), (b, D, H/8,
    W/8), (b, D, H/16, W/16), (b, D, H/32, W/32) (sizes rounded as the grid is). ``out_indices`` default to
    the blocks ending each quarter of the depth ((5, 11, 17, 23) for 24 blocks). For stride-16 models the
    block maps are upsampled x4 and x2, kept, and max-pooled /2; for stride-8 models upsampled x2, kept,
    pooled /2 and /4. ``feature_info`` lists channels and reductions, as timm's feature extractors do.
    """

    def __init__(self, model: VisionMamba, out_indices: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        out_indices = default_out_indices(len(model.layers)) if out_indices is None else out_indices
        if len(out_indices) != 4:
            raise ValueError(f"the pyramid takes exactly four blocks (one per level), got out_indices={tuple(out_indices)}")
        stride = model.patch_embed.stride
        if stride not in (8, 16):
            raise ValueError(f"pyramid levels are defined for patch strides 8 and 16, got {stride}")
        self.out_indices = model.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
        self.model = model
        dim = model.embed_dim
        factors = (4, 2, 1, -2) if stride == 16 else (2, 1, -2, -4)
        self.levels = nn.ModuleList(_scale(dim, f) for f in factors)
        self.feature_info = [dict(num_chs=dim, reduction=r, module=f"levels.{i}") for i, r in enumerate((4, 8, 16, 32))]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        maps = self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
        return [level(m) for level, m in zip(self.levels, maps)]
