"""Shared test helpers: one comparison that reports max-abs and relative error, a tiny Vim, image folders, the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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



def check_pre_norm_step(dtype: torch.dtype, shape, with_residual: bool, device: str) -> None:
    """The fused pre-norm step (residual add + RMSNorm, :func:`visionmamba.ops.norm.fused`) against its formula
    in float64, forward and every gradient, on the kernels that run ``device``'s tensors."""
    from visionmamba.ops import norm

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(*shape, generator=g).to(dtype).to(device)
    residual = torch.randn(*shape, generator=g).to(device) if with_residual else None
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(device)
    dy = torch.randn(*shape, generator=g).to(dtype).to(device)
    dres = torch.randn(*shape, generator=g).to(device)

    def run(fn, cast):
        leaves = [t.detach().clone().to(cast(t)).requires_grad_(True) for t in (hidden, residual, weight) if t is not None]
        h, *rest = leaves
        res, w = (rest if with_residual else [None, *rest])
        y, out = fn(h, res, w, 1e-5)
        grads = torch.autograd.grad([y, out], leaves, [dy.to(y.dtype), dres.to(out.dtype)])
        return y, out, grads

    y, out, grads = run(norm.fused, lambda t: t.dtype)
    ref_y, ref_out, ref_grads = run(norm.reference, lambda t: torch.float64)
    assert y.dtype == dtype and out.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(y, ref_y, rtol_max=tol, name="normalised")
    assert_close(out, ref_out, rtol_max=1e-6, name="residual")
    for name, got, want in zip(["hidden", "residual", "weight"] if with_residual else ["hidden", "weight"], grads, ref_grads):
        assert_close(got, want, rtol_max=tol * 10, name=f"grad {name}")

TINY = ["--model-args", json.dumps({"depth": 2, "embed_dim": 32, "patch_size": 8, "stride": 8}), "--img-size", "32"]
PLAIN = ["--auto-augment", "", "--reprob", "0", "--hflip", "0", "--mixup", "0", "--cutmix", "0", "--smoothing", "0",
         "--scale", "1", "1", "--crop-pct", "1", "--drop-path", "0", "--no-model-ema", "--workers", "0",
         "--warmup-epochs", "0", "--unscale-lr", "--no-progress", "--no-preset"]


def make_folder(root: Path, *, classes=("a", "b", "c"), per_class=4, splits=("train", "val"), seed=0, size=32) -> Path:
    """Class folders of random-but-class-dependent PNGs (each class has its own mean colour)."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.full((size, size, 3), 40 + 80 * k, dtype=np.float64)
                pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def cli(*args, env=None, check=True, timeout=600, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "visionmamba", *map(str, args)], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, cwd=cwd,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# A tiny backbone and the seg / det options of the dense-prediction tests.
TINY_BACKBONE = dict(
    model="vim_custom", model_args={"embed_dim": 32, "depth": 4, "patch_size": 8, "stride": 8},
    crop_size=64, scale_range=(0.75, 1.25), batch_size=2, lr=1e-3, layer_decay=0.9, warmup_iters=1, drop_path=0.0,
    workers=0, progress=False, checkpoint_every=0, eval_every=0,
)
SEG_TINY = dict(TINY_BACKBONE, num_classes=11, reduce_zero_label=False, decoder_channels=16, eval_mode="whole")
DET_TINY = dict(
    TINY_BACKBONE, train_split="train", val_split="val", fpn_channels=16, anchor_sizes=(8, 16, 32, 64, 128),
    detector_args=dict(box_batch_size_per_image=16, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_train=100,
                       rpn_post_nms_top_n_test=50, rpn_pre_nms_top_n_test=100, box_detections_per_img=10),
)
