"""Segmentation scores and COCO AP, checked by hand."""
import json
from pathlib import Path

import pytest
import torch

from visionmamba.models.upernet import IGNORE_INDEX
from visionmamba.train.metrics import coco_scores, segmentation_scores


def test_segmentation_scores_by_hand():
    # truth 0 0 1 1 2 ; prediction 0 1 1 1 0 ; class 3 absent from both (does not count)
    from torchmetrics.classification import MulticlassConfusionMatrix

    truth = torch.tensor([0, 0, 1, 1, 2, IGNORE_INDEX])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    confusion = MulticlassConfusionMatrix(4, ignore_index=IGNORE_INDEX)(pred, truth)
    scores = segmentation_scores(confusion)
    # IoU: class 0: tp 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 0 / (1 + 0) = 0
    assert scores["IoU"][:3] == pytest.approx([100 / 3, 200 / 3, 0.0])
    assert scores["IoU"][3] is None
    assert scores["mIoU"] == pytest.approx(100 / 3)
    assert scores["aAcc"] == pytest.approx(60.0)  # 3 of 5 counted pixels
    assert scores["mAcc"] == pytest.approx(100 * (0.5 + 1.0 + 0.0) / 3)


def _coco_gt(tmp_path: Path):
    from pycocotools.coco import COCO

    doc = {
        "images": [{"id": 1, "file_name": "a.png", "height": 100, "width": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "seven"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(doc))
    return COCO(str(path))


def test_coco_box_ap_by_hand(tmp_path):
    gt = _coco_gt(tmp_path)
    perfect = [{"image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "score": 0.9},
               {"image_id": 1, "category_id": 7, "bbox": [60, 60, 30, 30], "score": 0.8}]
    assert coco_scores(gt, perfect, [1], kinds=("bbox",))["bbox_AP"] == pytest.approx(100.0)
    # One of two objects found at precision 1: recall 0.5 -> 51 of the 101 recall points at precision 1.
    half = coco_scores(gt, perfect[:1], [1], kinds=("bbox",))
    assert half["bbox_AP50"] == pytest.approx(100 * 51 / 101)
    # A box with IoU 0.6 with its object counts at 0.5 but not at 0.75.
    shifted = [{"image_id": 1, "category_id": 7, "bbox": [15, 10, 20, 20], "score": 0.9}]
    iou = (15 * 20) / (20 * 20 * 2 - 15 * 20)
    assert 0.5 < iou < 0.75
    scores = coco_scores(gt, shifted, [1], kinds=("bbox",))
    assert scores["bbox_AP50"] == pytest.approx(100 * 51 / 101) and scores["bbox_AP75"] == 0.0
    assert coco_scores(gt, [], [1], kinds=("bbox",))["bbox_AP"] == 0.0
