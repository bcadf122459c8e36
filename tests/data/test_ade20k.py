"""ADE20K-layout segmentation data."""
import numpy as np
import pytest
import torch
from PIL import Image

from visionmamba.data.ade20k import SegmentationFolder, train_transform
from visionmamba.models.upernet import IGNORE_INDEX


def test_segmentation_folder_and_reduce_zero_label(scenes, tmp_path):
    ds = SegmentationFolder(str(scenes), "training", train_transform(64, (0.75, 1.25)), reduce_zero_label=False, train=True)
    image, label = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and label.shape == (64, 64)
    assert label.dtype == torch.int64 and set(label.unique().tolist()) <= set(range(11)) | {IGNORE_INDEX}
    image2, label2 = ds[0]
    assert torch.equal(image, image2) and torch.equal(label, label2)  # seeded per (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], image)
    reduced = SegmentationFolder(str(scenes), "training", train_transform(64, (1, 1)), reduce_zero_label=True, train=True)
    raw = torch.tensor([[0, 1, 2, 255]])
    path = tmp_path / "l.png"
    Image.fromarray(raw.numpy().astype(np.uint8)).save(path)
    assert reduced.read_label(path).tolist() == [[IGNORE_INDEX, 0, 1, IGNORE_INDEX]]
    with pytest.raises(FileNotFoundError, match="ADE20K layout"):
        SegmentationFolder(str(tmp_path), "training", train_transform(64, (1, 1)), reduce_zero_label=True, train=True)
