"""Shared test helpers: one comparison that reports max-abs and relative error."""
import torch

import visionmamba


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float = 0.0, rtol_max: float = 0.0, name: str = "") -> None:
    """Fail unless max|actual - expected| <= atol + rtol_max * max|expected|; the message gives both errors."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    bound = atol + rtol_max * scale
    assert err <= bound, f"{name}: max abs err {err:.3g}, relative to max|ref| {err / max(scale, 1e-30):.3g} (bound {bound:.3g})"


def tiny_vim(**kwargs) -> visionmamba.VisionMamba:
    """A small Vim for fast tests: 32x32 images, 4x4 grid, dim 32, 2 blocks."""
    args = dict(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2, num_classes=10, drop_path_rate=0.0)
    args.update(kwargs)
    return visionmamba.VisionMamba(**args)
