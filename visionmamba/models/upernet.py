"""Semantic segmentation with a Vim backbone: UperNet on the feature pyramid, and its inference.

The decoder is segmentation-models-pytorch's UPerNet (pyramid pooling + FPN fusion); only the glue, the
classifier and the auxiliary FCN head of the official config (docs/specification.md §6.2) are written here.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from visionmamba.models.pyramid import VimFeaturePyramid
from visionmamba.models.vim import VisionMamba

IGNORE_INDEX = 255  # label value that no loss or metric counts (ADE20K's "other" after reduce_zero_label)


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
