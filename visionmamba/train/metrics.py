"""Metrics: segmentation scores from a confusion matrix (as mmseg), COCO box and mask AP (pycocotools)."""
import contextlib
import io
from typing import Any, Dict, List, Sequence

import numpy as np
import torch


def segmentation_scores(confusion: torch.Tensor) -> Dict[str, float]:
    """mIoU, mean accuracy and pixel accuracy (all in %) from a (classes x classes) confusion matrix
    (rows: truth, columns: prediction). Classes absent from both truth and prediction do not count,
    as in mmseg (nan-mean); their per-class IoU is None."""
    confusion = confusion.double()
    tp = confusion.diag()
    truth, predicted = confusion.sum(1), confusion.sum(0)
    union = truth + predicted - tp
    iou = tp / union  # nan where union == 0
    accuracy = tp / truth
    return {
        "mIoU": 100.0 * iou.nanmean().item(),
        "mAcc": 100.0 * accuracy.nanmean().item(),
        "aAcc": 100.0 * (tp.sum() / confusion.sum().clamp(min=1)).item(),
        "IoU": [None if v != v else 100.0 * v for v in iou.tolist()],  # None (valid JSON) for absent classes
    }


def to_coco_results(output: Dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int]) -> List[Dict[str, Any]]:
    """One image's detections as COCO result entries (boxes as x, y, w, h; masks as RLE at 0.5)."""
    from pycocotools import mask as mask_utils

    boxes = output["boxes"].detach().cpu().double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores, labels = output["scores"].tolist(), output["labels"].tolist()
    masks = (output["masks"][:, 0] > 0.5).cpu().numpy() if "masks" in output else None
    results = []
    for k, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        entry = {"image_id": image_id, "category_id": int(category_ids[label - 1]), "bbox": box, "score": float(score)}
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            entry["segmentation"] = rle
        results.append(entry)
    return results


def coco_scores(coco_gt, results: List[Dict[str, Any]], image_ids: Sequence[int], kinds: Sequence[str] = ("bbox", "segm")) -> Dict[str, float]:
    """COCO AP, AP50, AP75 (in %) per kind over ``image_ids``; zero when there is no detection at all."""
    from pycocotools.cocoeval import COCOeval

    scores: Dict[str, float] = {}
    for kind in kinds:
        if not results:
            scores.update({f"{kind}_AP": 0.0, f"{kind}_AP50": 0.0, f"{kind}_AP75": 0.0})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
            evaluator = COCOeval(coco_gt, coco_dt, kind)
            evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = [max(float(v), 0.0) * 100.0 for v in evaluator.stats[:3]]  # -1 (no ground truth) counts as 0
        scores.update({f"{kind}_AP": stats[0], f"{kind}_AP50": stats[1], f"{kind}_AP75": stats[2]})
    return scores
