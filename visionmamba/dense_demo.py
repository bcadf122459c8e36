"""The dense-prediction demonstration on embedded data: digit scenes (see :mod:`visionmamba.scenes`),
a small Vim trained with UperNet (segmentation) and Mask R-CNN (detection) through the same code as
``seg-train`` / ``det-train``, then evaluated on held-out scenes (mIoU; COCO box and mask AP)."""
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .dense_training import DetConfig, SegConfig, evaluate_dense, resolve, train_dense
from .scenes import CLASSES, write_scenes

# A small stride-8 Vim for 128x128 scenes: 16x16 tokens; pyramid levels at strides 4-32.
BACKBONE: Dict[str, Any] = dict(
    model="vim_tiny_patch16_224",
    model_args={"embed_dim": 96, "depth": 4, "patch_size": 8, "stride": 8},
    crop_size=128,
    scale_range=(0.75, 1.5),
    batch_size=8,
    layer_decay=1.0,  # no pretrained backbone to protect
    drop_path=0.0,
    workers=0,
    checkpoint_every=100,
    progress=False,
)
SEG_DEMO: Dict[str, Any] = dict(
    BACKBONE, iters=600, lr=1e-3, weight_decay=0.05, warmup_iters=50, eval_every=300,
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


def run_dense_demo(output: str = "runs/dense-demo", tasks: Sequence[str] = ("seg", "det"), *, iters: Optional[int] = None) -> Dict[str, float]:
    """Write the scenes (once), train and evaluate each task; prints and returns the headline figures."""
    out = Path(output)
    data = out / "data"
    if not (data / "classes.json").is_file():
        counts = write_scenes(data)
        print(f"wrote digit scenes to {data}: {counts['training']} training / {counts['validation']} validation")
    figures: Dict[str, float] = {}
    for task in tasks:
        start = time.perf_counter()
        if task == "seg":
            cfg = resolve(SegConfig, dict(SEG_DEMO, data=str(data), output=str(out / "seg")))
        elif task == "det":
            cfg = resolve(DetConfig, dict(DET_DEMO, data=str(data / "coco"), output=str(out / "det")))
        else:
            raise ValueError(f"task must be 'seg' or 'det', got {task!r}")
        if iters is not None:
            cfg.iters = iters
            cfg.eval_every = 0
        train_dense(cfg)
        metrics = evaluate_dense(str(out / task / "last.pth"), progress=False)
        seconds = time.perf_counter() - start
        if task == "seg":
            figures["mIoU"] = metrics["mIoU"] / 100
            print(f"segmentation demo: mIoU {figures['mIoU']:.3f}, pixel accuracy {metrics['aAcc'] / 100:.3f} "
                  f"on {metrics['images']} held-out scenes ({seconds:.0f} s)")
        else:
            figures["box_AP50"] = metrics["bbox_AP50"] / 100
            figures["box_AP"] = metrics["bbox_AP"] / 100
            figures["mask_AP50"] = metrics["segm_AP50"] / 100
            print(f"detection demo: box mAP@0.5 {figures['box_AP50']:.3f}, box mAP {figures['box_AP']:.3f}, "
                  f"mask mAP@0.5 {figures['mask_AP50']:.3f} on {metrics['images']} held-out scenes ({seconds:.0f} s)")
    return figures
