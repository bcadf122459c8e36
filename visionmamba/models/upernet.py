"""Semantic segmentation with a Vim backbone: UperNet on the feature pyramid, ADE20K-layout data, mIoU.

The decoder is segmentation-models-pytorch's UPerNet (pyramid pooling + FPN fusion); only the glue, the
classifier and the auxiliary FCN head of the official config (spec §6.2) are written here. Data use
torchvision's v2 transforms, which move an image and its label map together; the recipe (random resize
0.5-2x, 512 crop, flip, photometric distortion) is the official mmseg pipeline's.
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from visionmamba.data.folders import CorruptImageError, load_rgb, seeded
from visionmamba.models.vim import VisionMamba
from visionmamba.models.pyramid import VimFeaturePyramid

IGNORE_INDEX = 255  # label value that no loss or metric counts (ADE20K's "other" after reduce_zero_label)
MEAN = (0.485, 0.456, 0.406)  # the official (123.675, 116.28, 103.53) / 255
STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class FCNHead(nn.Module):
    """The auxiliary head: conv-BN-ReLU, dropout, 1x1 classifier (mmseg's FCNHead with one conv)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class VimUperNet(nn.Module):
    """Vim + simple feature pyramid + UperNet decoder (+ auxiliary FCN head on the stride-16 level).

    ``forward`` gives (b, classes, H, W) logits at the input size; ``loss`` the training loss
    (cross-entropy, ``IGNORE_INDEX`` ignored, auxiliary head weighted by ``aux_weight``).
    """

    def __init__(
        self,
        backbone: VisionMamba,
        num_classes: int,
        *,
        out_indices: Sequence[int],
        channels: int = 512,
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        self.backbone = VimFeaturePyramid(backbone, out_indices)
        dim = backbone.embed_dim
        # smp's decoder takes encoder features from stride 1 on and uses those from stride 4.
        self.decoder = UPerNetDecoder(encoder_channels=(3, 0, dim, dim, dim, dim), encoder_depth=5, decoder_channels=channels)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))
        self.aux_head = FCNHead(dim, aux_channels, num_classes, dropout) if aux_weight > 0 else None
        self.aux_weight = aux_weight
        self.num_classes = num_classes

    def _forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        maps = self.backbone(x)
        logits = self.classifier(self.decoder([x, x, *maps]))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        aux = None
        if self.aux_head is not None and self.training:
            aux = F.interpolate(self.aux_head(maps[2]), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, aux

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None):
        """Logits, or with ``labels`` the training loss and its parts: (loss, {name: value})."""
        if labels is None:
            return self._forward(x)[0]
        return self.loss(x, labels)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        logits, aux = self._forward(images)
        main = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        parts = {"loss_seg": main.item()}
        total = main
        if aux is not None:
            aux_loss = F.cross_entropy(aux.float(), labels, ignore_index=IGNORE_INDEX)
            parts["loss_aux"] = aux_loss.item()
            total = total + self.aux_weight * aux_loss
        return total, parts

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        """Layer groups for layer-wise lr decay: the backbone's blocks in order, heads last."""
        return dict(
            stem=r"^backbone\.model\.(?:cls_token|pos_embed|patch_embed)",
            blocks=[(r"^backbone\.model\.layers\.(\d+)", None)],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"backbone.model." + name for name in self.backbone.model.no_weight_decay()}


# ------------------------------------------------------------------------------------------------- data
def train_transform(crop: int, scale_range: Tuple[float, float]) -> v2.Compose:
    """mmseg's ADE20K training pipeline: random short-side resize, crop (label padded with ignore), flip,
    photometric distortion, normalise."""
    return v2.Compose([
        v2.RandomResize(int(crop * scale_range[0]), int(crop * scale_range[1]) + 1),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(),
        v2.RandomPhotometricDistort(),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def eval_transform(short_side: int) -> v2.Compose:
    """Test-time resize (short side, as the official single-scale test) and normalise; labels untouched."""
    return v2.Compose([
        v2.Resize(short_side, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
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
        for path in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
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
        with seeded(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF):
            image, mask = self.transform(image, tv_tensors.Mask(label))
        return image, mask.as_subclass(torch.Tensor)


def collate_pairs(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([b[0] for b in batch]).as_subclass(torch.Tensor), torch.stack([b[1] for b in batch])


# -------------------------------------------------------------------------------------------- inference
def _pad_to(x: torch.Tensor, multiple: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)), (height, width)


@torch.no_grad()
def predict_logits(
    model: VimUperNet, image: torch.Tensor, *, mode: str = "whole", crop: int = 512, stride: int = 341
) -> torch.Tensor:
    """(b, classes, H, W) logits of normalised images of any size.

    "whole" pads to a multiple of 32 and runs once (Vim takes any size); "slide" runs crop x crop windows
    every ``stride`` pixels and averages overlapping logits (the official test mode).
    """
    if mode == "whole":
        padded, (height, width) = _pad_to(image, 32)
        return model(padded)[..., :height, :width]
    if mode != "slide":
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    batch, _, height, width = image.shape
    logits = image.new_zeros(batch, model.num_classes, height, width)
    counts = image.new_zeros(1, 1, height, width)
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride + crop, height), min(c * stride + crop, width)
            y0, x0 = max(y1 - crop, 0), max(x1 - crop, 0)
            window, _ = _pad_to(image[..., y0:y1, x0:x1], 32)
            logits[..., y0:y1, x0:x1] += model(window)[..., : y1 - y0, : x1 - x0]
            counts[..., y0:y1, x0:x1] += 1
    return logits / counts


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
