"""Object detection and instance segmentation with a Vim backbone: torchvision's Mask R-CNN on the feature
pyramid, COCO-format data and COCO mAP (pycocotools).

Only the glue is written here: the pyramid's four maps go through torchvision's FPN (with the extra
max-pooled level, as ViTDet's p6) into torchvision's Mask R-CNN. Cascade R-CNN (the paper's detector) has
no torchvision implementation; Mask R-CNN is the detector offered.
"""
import contextlib
import io
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from visionmamba.data.folders import CorruptImageError, seeded
from visionmamba.train.distributed import DistInfo
from visionmamba.models.vim import VisionMamba
from visionmamba.models.pyramid import VimFeaturePyramid


class VimDetectionBackbone(nn.Module):
    """Vim pyramid (strides 4-32) + torchvision FPN + a max-pooled stride-64 level; ``out_channels`` as
    torchvision's detectors expect."""

    def __init__(self, backbone: VisionMamba, out_indices: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = VimFeaturePyramid(backbone, out_indices)
        self.fpn = FeaturePyramidNetwork([backbone.embed_dim] * 4, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        maps = self.body(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class VimMaskRCNN(nn.Module):
    """torchvision's Mask R-CNN on a Vim backbone. ``num_classes`` counts the object classes (background
    is added). Images are resized so that the short side is ``min_size`` (long side at most ``max_size``);
    ``anchor_sizes`` gives one anchor size per level (strides 4, 8, 16, 32, 64); ``detector_args`` go to
    torchvision's ``MaskRCNN`` (e.g. ``box_batch_size_per_image``, ``rpn_post_nms_top_n_train``)."""

    def __init__(
        self,
        backbone: VisionMamba,
        num_classes: int,
        *,
        out_indices: Sequence[int],
        min_size: int = 1024,
        max_size: int = 1024,
        fpn_channels: int = 256,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        detector_args: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per pyramid level (5), got {tuple(anchor_sizes)}")
        anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
        self.detector = MaskRCNN(
            VimDetectionBackbone(backbone, out_indices, fpn_channels), num_classes=num_classes + 1,
            min_size=min_size, max_size=max_size, rpn_anchor_generator=anchors, **(detector_args or {}),
        )
        self.num_classes = num_classes

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        """Detections (eval mode), or with ``targets`` in training mode the summed loss and its parts."""
        if targets is None:
            return self.detector(images)
        return self.loss(images, targets)

    def loss(self, images: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> Tuple[torch.Tensor, Dict[str, float]]:
        losses = self.detector(images, targets)
        return sum(losses.values()), {k: v.item() for k, v in losses.items()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        """Layer groups for layer-wise lr decay: the backbone's blocks in order, everything else last."""
        prefix = r"^detector\.backbone\.body\.model\."
        return dict(stem=prefix + r"(?:cls_token|pos_embed|patch_embed)", blocks=[(prefix + r"layers\.(\d+)", None)])

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        model = self.detector.backbone.body.model
        return {"detector.backbone.body.model." + name for name in model.no_weight_decay()}


# ------------------------------------------------------------------------------------------------- data
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

        for path in (Path(images_dir), Path(annotation_file)):
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} does not exist: detection data follow the COCO layout ROOT/<split>/*.jpg with "
                    "ROOT/annotations/instances_<split>.json"
                )
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while indexing
            base = CocoDetection(images_dir, annotation_file)
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
        except (OSError, ValueError, SyntaxError) as err:
            name = self.coco.imgs[self.dataset.ids[i]]["file_name"]
            raise CorruptImageError(f"cannot read image {str(Path(self.images_dir) / name)!r} ({err}); replace or remove it") from err
        image = tv_tensors.Image(v2.functional.pil_to_tensor(image))
        height, width = image.shape[-2:]
        if "boxes" not in target:  # an image without annotations
            target["boxes"] = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width))
            target["labels"] = torch.zeros(0, dtype=torch.int64)
            target["masks"] = tv_tensors.Mask(torch.zeros(0, height, width, dtype=torch.uint8))
        target["labels"] = torch.tensor([self.label_of[int(c)] for c in target["labels"]], dtype=torch.int64)
        with seeded(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF):
            image, target = self.transform(image, target)
        plain = {k: (v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else torch.tensor(v)) for k, v in target.items()}
        return image.as_subclass(torch.Tensor), plain


def collate_lists(batch: Sequence[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]) -> Tuple[List[torch.Tensor], List[Dict]]:
    return [b[0] for b in batch], [b[1] for b in batch]


# ----------------------------------------------------------------------------------------------- metric
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


def gather_results(results: List[Dict[str, Any]], image_ids: List[int], dist: DistInfo) -> Tuple[List, List]:
    """Every rank's detections and image ids, on every rank."""
    if not dist.distributed:
        return results, image_ids
    import torch.distributed as tdist

    gathered: List[Any] = [None] * dist.world_size
    tdist.all_gather_object(gathered, (results, image_ids))
    return [r for part in gathered for r in part[0]], [i for part in gathered for i in part[1]]
