"""COCO-layout detection data."""
import torch

from visionmamba.data.coco import CocoInstances, train_transform


def test_coco_instances_maps_labels_and_jitters_jointly(scenes):
    ds = CocoInstances(str(scenes / "coco" / "train"), str(scenes / "coco" / "annotations" / "instances_train.json"),
                       train_transform(64, (0.5, 1.5)), train=True)
    assert ds.classes == [str(d) for d in range(10)]
    image, target = ds[0]
    assert image.shape == (3, 64, 64)
    n = len(target["labels"])
    assert target["boxes"].shape == (n, 4) and target["masks"].shape == (n, 64, 64)
    assert all(1 <= int(v) <= 10 for v in target["labels"])
    for box, mask in zip(target["boxes"], target["masks"]):  # boxes follow the masks through the jitter
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() <= box[3] + 1
