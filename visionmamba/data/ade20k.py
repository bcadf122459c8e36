"""ADE20K-layout segmentation data: image / label-map pairs and the official training and test transforms.

Transforms are torchvision's v2, which move an image and its label map together; the training recipe
(random resize 0.5-2x, 512 crop, flip, photometric distortion) is the official mmseg pipeline's.
"""
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from visionmamba.data.folders import CorruptImageError, load_rgb, sample_rng
from visionmamba.files import is_image
from visionmamba.models.upernet import IGNORE_INDEX


def train_transform(crop: int, scale_range: Tuple[float, float]) -> v2.Compose:
    """mmseg's ADE20K training pipeline: random short-side resize, crop (label padded with ignore), flip,
    photometric distortion, normalise."""
    return v2.Compose([
        v2.RandomResize(int(crop * scale_range[0]), int(crop * scale_range[1]) + 1),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(),
        v2.RandomPhotometricDistort(),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def eval_transform(short_side: int) -> v2.Compose:
    """Test-time resize (short side, as the official single-scale test) and normalise; labels untouched."""
    return v2.Compose([
        v2.Resize(short_side, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


class SegmentationFolder(Dataset):
    """ADE20K layout: ``root/images/<split>/<name>.<ext>`` with ``root/annotations/<split>/<name>.png``.

    ``reduce_zero_label`` (ADE20K) maps label 0 ("other") to ignore and shifts the rest down by one.
    Training items are (image, label) after the joint transform; evaluation items are (image resized for
    the model, label at the original size) so that the metric is computed at full resolution.
    """

    def __init__(
        self, root: str, split: str, transform: v2.Compose, *, reduce_zero_label: bool, train: bool, seed: int = 0
    ) -> None:
        images, annotations = Path(root) / "images" / split, Path(root) / "annotations" / split
        for folder in (images, annotations):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{folder} does not exist: segmentation data follow the ADE20K layout "
                    f"ROOT/images/{split}/*.jpg with ROOT/annotations/{split}/*.png"
                )
        self.samples: List[Tuple[Path, Path]] = []
        for path in sorted(p for p in images.iterdir() if is_image(p)):
            label = annotations / (path.stem + ".png")
            if not label.is_file():
                raise FileNotFoundError(f"image {path} has no label map {label}")
            self.samples.append((path, label))
        if not self.samples:
            raise FileNotFoundError(f"no images in {images}")
        self.transform, self.reduce_zero_label, self.train, self.seed = transform, reduce_zero_label, train, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def read_label(self, path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as img:
                label = torch.from_numpy(np.array(img if img.mode in ("L", "P") else img.convert("L"))).long()
        except (OSError, ValueError) as err:
            raise CorruptImageError(f"cannot read label map {str(path)!r} ({err}); replace or remove the file") from err
        if self.reduce_zero_label:
            label = torch.where(label == 0, IGNORE_INDEX, label - 1)
            label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
        return label

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.samples[index]
        try:
            image = tv_tensors.Image(v2.functional.pil_to_tensor(load_rgb(str(image_path))))
        except CorruptImageError as err:
            raise CorruptImageError(f"cannot read image {str(image_path)!r}: replace or remove it and its label map ({err.__cause__})") from err
        label = self.read_label(label_path)
        if image.shape[-2:] != label.shape:
            raise ValueError(f"{image_path} is {tuple(image.shape[-2:])} but its label map {label_path} is {tuple(label.shape)}")
        if not self.train:
            return self.transform(image), label
        with sample_rng(self.seed, self.epoch, index):
            image, mask = self.transform(image, tv_tensors.Mask(label))
        return image, mask.as_subclass(torch.Tensor)


def collate_pairs(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([b[0] for b in batch]).as_subclass(torch.Tensor), torch.stack([b[1] for b in batch])
