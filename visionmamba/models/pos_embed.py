"""The middle class token's layout: putting it in and taking it out of a sequence, and position tables with
it resampled to another patch grid."""
import math
from typing import Tuple

import torch
from timm.layers import resample_abs_pos_embed
from timm.layers.helpers import is_exporting


def with_class_token(patches: torch.Tensor, cls_token: torch.Tensor) -> torch.Tensor:
    """Patches (batch, M, dim) and a class token (1 or batch, 1, dim) -> (batch, M + 1, dim), the class token
    at index M // 2."""
    mid = patches.shape[1] // 2
    cls_token = cls_token.expand(patches.shape[0], -1, -1)
    return torch.cat([patches[:, :mid], cls_token, patches[:, mid:]], dim=1)


def split_class_token(tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(batch, M + 1, dim) with the class token at M // 2 -> (the class token (batch, 1, dim), the patches
    (batch, M, dim))."""
    mid = (tokens.shape[1] - 1) // 2
    return tokens[:, mid : mid + 1], torch.cat([tokens[:, :mid], tokens[:, mid + 1 :]], dim=1)


def pos_embed_resample(
    pos_embed: torch.Tensor,
    old_grid: Tuple[int, int],
    new_grid: Tuple[int, int],
) -> torch.Tensor:
    """Resample a middle-class-token position table (1, M + 1, dim) from one patch grid to another.

    The class-token row sits at index M // 2 (M = patches). It is taken out, the M patch rows are
    resampled bicubically as a 2-D grid, and the class row is put back at the new middle, M' // 2. (The
    official helper assumes the class row comes first, which is wrong for these models.)
    """
    old_m = old_grid[0] * old_grid[1]
    if pos_embed.shape[1] != old_m + 1:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} rows, expected {old_m} patches + 1 class token for grid {old_grid}"
        )
    # no early return while exporting: it would specialise the graph to the example input's grid
    if not is_exporting() and old_grid[0] == new_grid[0] and old_grid[1] == new_grid[1]:
        return pos_embed
    cls_row, patches = split_class_token(pos_embed)
    patches = resample_abs_pos_embed(
        patches, new_size=[new_grid[0], new_grid[1]], old_size=[old_grid[0], old_grid[1]], num_prefix_tokens=0,
        interpolation="bicubic",
    )
    return with_class_token(patches, cls_row)


def grid_from_pos_embed(rows: int) -> Tuple[int, int]:
    """The square patch grid of a (1, M + 1, dim) position table."""
    side = math.isqrt(rows - 1)
    if side * side != rows - 1:
        raise ValueError(f"pos_embed with {rows} rows is not a square grid plus one class token")
    return side, side
