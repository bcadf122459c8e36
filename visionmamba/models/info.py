"""``visionmamba info``: the model card of a variant (exact parameters, compute at a resolution, cfg, files).

Compute is counted analytically, in multiply-accumulates (MACs, the unit fvcore reports as "flops") for
the convolutions and matrix products, plus the selective scan by the paper's Eq. 8, 3·L·E·N + L·E·N per
direction (discretisation and input injection, then the C read-out), which the matrix-product count
does not contain.
"""
from dataclasses import dataclass
from typing import Tuple

import timm

from visionmamba.models.registry import OFFICIAL_ALIASES, RELEASED, VARIANTS
from visionmamba.models.vim import VisionMamba


@dataclass
class Compute:
    patch_embed: int
    projections: int  # in_proj, x_proj, dt_proj, out_proj, all blocks
    conv: int  # depthwise conv, both directions, all blocks
    scan: int  # Eq. 8, both directions, all blocks
    head: int

    @property
    def macs(self) -> int:
        """Convolutions and matrix products (MACs)."""
        return self.patch_embed + self.projections + self.conv + self.head

    @property
    def total(self) -> int:
        return self.macs + self.scan


def compute(model: VisionMamba, img_size: Tuple[int, int]) -> Compute:
    """Analytic cost of one image through ``model`` at ``img_size`` (H, W)."""
    grid = model.patch_embed.grid_for(*img_size)
    patches = grid[0] * grid[1]
    L = patches + 1
    mixer = model.layers[0].mixer
    D, E, N, R, K = mixer.dim, mixer.d_inner, mixer.d_state, mixer.dt_rank, mixer.d_conv
    depth = len(model.layers)
    p, c = model.patch_embed.patch_size, model.patch_embed.in_chans
    classes = model.num_classes
    return Compute(
        patch_embed=patches * D * c * p * p,
        projections=depth * (L * D * 2 * E + 2 * L * E * (R + 2 * N) + 2 * L * R * E + L * E * D),
        conv=depth * 2 * L * E * K,
        scan=depth * 2 * (3 * L * E * N + L * E * N),
        head=D * classes,
    )


# Floats a training step keeps per token, per block and per channel of the model width (the activations saved
# for the backward), measured on the CPU path with Vim-Ti at 224 and 512 (benchmarks/RESULTS.md).
ACTIVATION_FLOATS_PER_TOKEN = 30


def training_memory_mb(model: VisionMamba, img_size: Tuple[int, int], batch: int, *, activation_bytes: int = 4,
                       ema: bool = False) -> float:
    """About how much memory one training step of ``model`` takes (MB): weights, gradients and AdamW's two
    moments (and an EMA copy), plus the activations of ``batch`` images of ``img_size``."""
    params = sum(p.numel() for p in model.parameters())
    grid = model.patch_embed.grid_for(*img_size)
    tokens = grid[0] * grid[1] + 1
    activations = ACTIVATION_FLOATS_PER_TOKEN * model.embed_dim * tokens * len(model.layers) * batch * activation_bytes
    return (params * 4 * (4 + int(ema)) + activations) / 2**20


def model_card(name: str, img_size: int) -> str:
    """The text of ``visionmamba info``: parameters, compute at ``img_size``, eval transform, released file."""
    variant = OFFICIAL_ALIASES.get(name, name)
    if variant not in VARIANTS:
        raise ValueError(f"unknown Vim model {name!r}; choose one of {list(VARIANTS)}")
    model = timm.create_model(variant, img_size=img_size)
    params = sum(p.numel() for p in model.parameters())
    cost = compute(model, (img_size, img_size))
    cfg = model.pretrained_cfg
    hub_id, filename, top1 = RELEASED[variant]
    official = next(k for k, v in OFFICIAL_ALIASES.items() if v == variant)
    tokens = model.patch_embed.num_patches + 1
    lines = [
        f"{variant}  (official name: {official})",
        f"  parameters        {params:,}",
        f"  input             {img_size}x{img_size}, patch {model.patch_embed.patch_size}, stride {model.patch_embed.stride}: "
        f"{tokens:,} tokens (class token at {model.cls_index(tokens - 1)})",
        f"  compute           {cost.total / 1e9:.3f} G = {cost.macs / 1e9:.3f} GMACs (conv + matmul) + {cost.scan / 1e9:.3f} G scan (Eq. 8)",
        f"    patch embed     {cost.patch_embed / 1e9:.3f} GMACs",
        f"    projections     {cost.projections / 1e9:.3f} GMACs",
        f"    depthwise conv  {cost.conv / 1e9:.3f} GMACs",
        f"    selective scan  {cost.scan / 1e9:.3f} G (2 directions x depth x 4·L·E·N)",
        f"    head            {cost.head / 1e9:.4f} GMACs",
        f"  dims              D {model.embed_dim}, E {model.layers[0].mixer.d_inner}, N {model.layers[0].mixer.d_state}, "
        f"dt rank {model.layers[0].mixer.dt_rank}, depth {len(model.layers)}",
        f"  eval transform    resize {int(round(cfg['input_size'][1] / cfg['crop_pct']))}, centre crop "
        f"{cfg['input_size'][1]}, {cfg['interpolation']}, mean {tuple(cfg['mean'])}, std {tuple(cfg['std'])}",
        f"  released weights  {hub_id} / {filename} (ImageNet-1k top-1 {top1}%)",
    ]
    return "\n".join(lines)

