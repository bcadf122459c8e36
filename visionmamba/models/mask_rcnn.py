"""Object detection and instance segmentation with a Vim backbone: torchvision's Mask R-CNN on the feature
pyramid.

Only the glue is written here: the pyramid's four maps go through torchvision's FPN (with the extra
max-pooled level, as ViTDet's p6) into torchvision's Mask R-CNN. Cascade R-CNN (the paper's detector) has
no torchvision implementation; Mask R-CNN is the detector offered.
"""
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from visionmamba.models.pyramid import VimFeaturePyramid
from visionmamba.models.vim import VisionMamba


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
