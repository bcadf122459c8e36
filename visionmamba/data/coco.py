"""COCO-layout detection data: images with boxes, labels and instance masks, and the ViTDet-style transforms."""
import contextlib
import io
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from visionmamba.data.folders import CorruptImageError, load_rgb, sample_rng


def train_transform(crop: int, scale_range: Tuple[float, float]) -> v2.Compose:
    """Large-scale jitter as in ViTDet: flip, resize by a random factor of ``crop``, crop/pad to crop x crop,
    then drop boxes that left the image."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.ScaleJitter((crop, crop), scale_range=scale_range, antialias=True),
        v2.RandomCrop(crop, pad_if_needed=True),
        v2.SanitizeBoundingBoxes(min_size=1),
        v2.ToDtype(torch.float32, scale=True),
    ])


def eval_transform() -> v2.Compose:
    """The detector resizes and normalises by itself; images only become float in [0, 1]."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])


class CocoInstances(Dataset):
    """COCO instances: ``images_dir`` with ``annotation_file``. Items are (image, target) with target boxes
    (x0, y0, x1, y1), contiguous labels 1..K (``category_ids[label - 1]`` is the COCO id), masks and image_id.
    Training drops images without annotations, as torchvision's references do."""

    def __init__(self, images_dir: str, annotation_file: str, transform: v2.Compose, *, train: bool, seed: int = 0) -> None:
        from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

        class Images(CocoDetection):
            def _load_image(self, id: int):  # our reader: 16-bit and float images scaled, clear errors
                return load_rgb(os.path.join(self.root, self.coco.loadImgs(id)[0]["file_name"]))

        for path in (Path(images_dir), Path(annotation_file)):
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} does not exist: detection data follow the COCO layout ROOT/<split>/*.jpg with "
                    "ROOT/annotations/instances_<split>.json"
                )
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while indexing
            base = Images(images_dir, annotation_file)
        self.coco = base.coco
        self.images_dir = images_dir
        self.dataset = wrap_dataset_for_transforms_v2(base, target_keys=("image_id", "boxes", "labels", "masks"))
        self.category_ids = sorted(self.coco.getCatIds())
        self.label_of = {cat: i + 1 for i, cat in enumerate(self.category_ids)}
        self.classes = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.indices = list(range(len(base)))
        if train:
            self.indices = [i for i, image_id in enumerate(base.ids) if self.coco.getAnnIds(imgIds=image_id, iscrowd=False)]
        self.transform, self.train, self.seed, self.epoch = transform, train, seed, 0

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        i = self.indices[index]
        try:
            image, target = self.dataset[i]
        except CorruptImageError as err:  # said again without --skip-corrupt, which the dense trainers lack
            raise CorruptImageError(f"{str(err).split('; ')[0]}; replace or remove it") from err
        image = tv_tensors.Image(v2.functional.pil_to_tensor(image))
        height, width = image.shape[-2:]
        if "boxes" not in target:  # an image without annotations
            target["boxes"] = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width))
            target["labels"] = torch.zeros(0, dtype=torch.int64)
            target["masks"] = tv_tensors.Mask(torch.zeros(0, height, width, dtype=torch.uint8))
        target["labels"] = torch.tensor([self.label_of[int(c)] for c in target["labels"]], dtype=torch.int64)
        with sample_rng(self.seed, self.epoch, index):
            image, target = self.transform(image, target)
        plain = {k: (v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else torch.tensor(v)) for k, v in target.items()}
        return image.as_subclass(torch.Tensor), plain


def collate_lists(batch: Sequence[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]) -> Tuple[List[torch.Tensor], List[Dict]]:
    return [b[0] for b in batch], [b[1] for b in batch]
