"""The demos on embedded data (scikit-learn's handwritten digits; no download), through the same code as
the real commands.

* :func:`run_demo` (``visionmamba demo``, the main job): train a small Vim on the single digits with
  ``train``'s code path (ImageFolder, timm transforms, AdamW, cosine schedule, checkpoints, records), then
  test it on the held-out scans.
* :func:`run_dense_demo` (``visionmamba dense-demo``): as in the paper's workflow, pre-train a backbone on
  the single digits (the stand-in for ImageNet), then fine-tune it with UperNet (segmentation) and Mask R-CNN
  (detection) on digit scenes through ``seg-train`` / ``det-train``'s code, and evaluate on held-out scenes.

The models are ``vim_custom``: Vims built from their arguments, far smaller than the released variants.
"""
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from visionmamba.data.digits import CLASSES, write_digits_folder, write_scenes
from visionmamba.files import refuse_existing
from visionmamba.models.registry import CUSTOM
from visionmamba.train.classification import evaluate_checkpoint, train
from visionmamba.train.config import DetConfig, EvalConfig, SegConfig, TrainConfig, resolve
from visionmamba.train.dense import train_dense
from visionmamba.train.trainer import RUN_FILES

# A small Vim for 16x16 inputs (the 8x8 scans upsampled): 4x4 patches -> 16 tokens + the class token.
DEMO_CONFIG: Dict[str, Any] = dict(
    model=CUSTOM,
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


def refuse_earlier_runs(runs: Sequence[Path], overwrite: bool) -> None:
    """Before any work: a demo's run folder that holds a run is replaced only with ``overwrite``."""
    refuse_existing([run / name for run in runs for name in RUN_FILES], overwrite=overwrite, what="the demo's earlier run:")


def run_demo(output: str = "runs/demo", *, epochs: Optional[int] = None, overwrite: bool = False) -> float:
    """Train and test on the digits; prints the test accuracy and wall time (set-up excluded). An earlier demo
    run in ``output`` is replaced only with ``overwrite`` (the digits written there are reused)."""
    out = Path(output)
    refuse_earlier_runs([out / "run"], overwrite)
    data = out / "data"
    if not (data / "val").is_dir():
        n_train, n_test = write_digits_folder(data)
        print(f"wrote the bundled digits to {data}: {n_train} train / {n_test} test images (fixed split)")
    overrides = dict(DEMO_CONFIG, data=str(data), output=str(out / "run"), overwrite=overwrite)
    if epochs is not None:
        overrides["epochs"] = epochs
    cfg = resolve(TrainConfig, overrides, use_preset=False)
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


# A small stride-8 Vim: 16x16 tokens on the 128x128 scenes, pyramid levels at strides 4-32.
MODEL_ARGS: Dict[str, Any] = {"embed_dim": 96, "depth": 4, "patch_size": 8, "stride": 8}
# Pre-training: the classification demo's recipe on the single digits at 32x32 (4x4 tokens).
PRETRAIN: Dict[str, Any] = dict(DEMO_CONFIG, model_args=MODEL_ARGS, img_size=32, epochs=15)
BACKBONE: Dict[str, Any] = dict(
    model=CUSTOM,
    model_args=MODEL_ARGS,
    crop_size=128,
    scale_range=(0.75, 1.5),
    batch_size=8,
    layer_decay=1.0,
    drop_path=0.0,
    workers=0,
    checkpoint_every=100,
    progress=False,
)
SEG_DEMO: Dict[str, Any] = dict(
    BACKBONE, iters=1500, lr=1e-3, weight_decay=0.05, warmup_iters=50, eval_every=500,
    num_classes=len(CLASSES), reduce_zero_label=False, decoder_channels=64, eval_mode="whole",
)
DET_DEMO: Dict[str, Any] = dict(
    BACKBONE, iters=400, lr=1e-3, weight_decay=0.05, warmup_iters=50, eval_every=200,
    train_split="train", val_split="val", fpn_channels=64, anchor_sizes=(8, 16, 32, 64, 128),
    detector_args=dict(
        box_batch_size_per_image=64, rpn_batch_size_per_image=128, rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300, box_detections_per_img=20,
    ),
)


def run_dense_demo(output: str = "runs/dense-demo", tasks: Sequence[str] = ("seg", "det"), *, iters: Optional[int] = None,
                   overwrite: bool = False) -> Dict[str, float]:
    """Write the scenes (once), pre-train the backbone (once), train and evaluate each task; prints and
    returns the headline figures. An earlier run of a task in ``output`` is replaced only with ``overwrite``
    (the scenes and the pre-trained backbone are reused)."""
    out = Path(output)
    if any(task not in ("seg", "det") for task in tasks):
        raise ValueError(f"tasks must be 'seg' or 'det', got {list(tasks)}")
    refuse_earlier_runs([out / task for task in tasks], overwrite)
    data = out / "data"
    if not (data / "classes.json").is_file():
        counts = write_scenes(data)
        print(f"wrote digit scenes to {data}: {counts['training']} training / {counts['validation']} validation")
    backbone = out / "pretrain" / "last.pth"
    if not backbone.is_file():
        digits = out / "digits"
        if not (digits / "val").is_dir():
            write_digits_folder(digits)
        start = time.perf_counter()
        record = train(resolve(TrainConfig, dict(PRETRAIN, data=str(digits), output=str(backbone.parent)), use_preset=False))
        print(f"pre-trained the backbone on single digits: top-1 {record['top1']:.1f}% ({time.perf_counter() - start:.0f} s)")
    figures: Dict[str, float] = {}
    for task in tasks:
        start = time.perf_counter()
        if task == "seg":
            cfg = resolve(SegConfig, dict(SEG_DEMO, data=str(data), output=str(out / "seg"), finetune=str(backbone),
                                          overwrite=overwrite))
        else:
            cfg = resolve(DetConfig, dict(DET_DEMO, data=str(data / "coco"), output=str(out / "det"), finetune=str(backbone),
                                          overwrite=overwrite))
        if iters is not None:
            cfg.iters = iters
            cfg.eval_every = 0
        metrics = train_dense(cfg)  # the last record holds the final evaluation on the validation scenes
        seconds = time.perf_counter() - start
        if task == "seg":
            figures["mIoU"] = metrics["mIoU"] / 100
            print(f"segmentation demo: mIoU {figures['mIoU']:.3f}, pixel accuracy {metrics['aAcc'] / 100:.3f} "
                  f"on {metrics['val_images']} held-out scenes ({seconds:.0f} s)")
        else:
            figures["box_AP50"] = metrics["bbox_AP50"] / 100
            figures["box_AP"] = metrics["bbox_AP"] / 100
            figures["mask_AP50"] = metrics["segm_AP50"] / 100
            print(f"detection demo: box mAP@0.5 {figures['box_AP50']:.3f}, box mAP {figures['box_AP']:.3f}, "
                  f"mask mAP@0.5 {figures['mask_AP50']:.3f} on {metrics['val_images']} held-out scenes ({seconds:.0f} s)")
    return figures
