"""The main job on embedded data: train a small Vim on scikit-learn's handwritten digits, then test it.

Same code path as ImageNet training (``visionmamba.training``: ImageFolder, timm transforms, AdamW,
cosine schedule, checkpoints, records), with a scaled-down configuration. No download: the 1,797 real
8x8 digit scans ship inside scikit-learn.
"""
import time
from pathlib import Path
from typing import Any, Dict, Optional

from visionmamba.data.folders import write_digits_folder
from visionmamba.train.classification import EvalConfig, evaluate_checkpoint, resolve_config, train

# A small Vim for 16x16 inputs (the 8x8 scans upsampled): 4x4 patches -> 16 tokens + the class token.
DEMO_CONFIG: Dict[str, Any] = dict(
    model="vim_tiny_patch16_224",
    model_args={"embed_dim": 64, "depth": 4, "patch_size": 4, "stride": 4},
    img_size=16,
    epochs=25,
    batch_size=32,
    lr=2e-3,
    unscale_lr=True,
    warmup_epochs=2,
    warmup_lr=1e-4,
    min_lr=1e-5,
    weight_decay=0.05,
    drop_path=0.0,
    auto_augment=None,  # digits: no RandAugment, no flips, no erasing, no mixing; mild random crops
    reprob=0.0,
    hflip=0.0,
    scale=(0.75, 1.0),
    crop_pct=1.0,
    mixup=0.0,
    cutmix=0.0,
    smoothing=0.1,
    model_ema=False,
    workers=0,
    checkpoint_every=0,
    progress=False,  # one summary line per epoch instead of bars
)


def run_demo(output: str = "runs/demo", *, epochs: Optional[int] = None) -> float:
    """Train and test on the digits; prints the test accuracy and wall time (set-up excluded)."""
    out = Path(output)
    data = out / "data"
    if not (data / "val").is_dir():
        n_train, n_test = write_digits_folder(data)
        print(f"wrote the bundled digits to {data}: {n_train} train / {n_test} test images (fixed split)")
    overrides = dict(DEMO_CONFIG, data=str(data), output=str(out / "run"))
    if epochs is not None:
        overrides["epochs"] = epochs
    cfg = resolve_config(overrides, use_preset=False)
    start = time.perf_counter()
    train(cfg)
    metrics = evaluate_checkpoint(
        EvalConfig(data=str(data / "val"), checkpoint=str(out / "run" / "last.pth"), workers=0, progress=False)
    )
    seconds = time.perf_counter() - start
    accuracy = metrics["top1"] / 100.0
    print(f"curves: {out / 'run' / 'curves.png'}, log: {out / 'run' / 'log.jsonl'}, checkpoint: {out / 'run' / 'last.pth'}")
    print(f"demo test accuracy: {accuracy:.3f} ({seconds:.0f} s)")
    return accuracy
