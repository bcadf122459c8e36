"""UperNet and Mask R-CNN on Vim: shapes, inference modes, layer-decay groups, a few steps of learning."""
import pytest
import torch
import torch.nn as nn

from helpers import DET_TINY, SEG_TINY
from visionmamba.data.ade20k import SegmentationFolder
from visionmamba.data.ade20k import train_transform as seg_train_transform
from visionmamba.data.coco import CocoInstances
from visionmamba.data.coco import train_transform as det_train_transform
from visionmamba.models.registry import default_out_indices
from visionmamba.models.upernet import VimUperNet, predict_logits
from visionmamba.train.config import DetConfig, SegConfig, resolve
from visionmamba.train.dense import build_dense_model


class _PointwiseModel(nn.Module):
    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        assert x.shape[-1] % 32 == 0 and x.shape[-2] % 32 == 0
        return self.conv(x)


def test_slide_and_whole_inference_agree_for_a_pointwise_model():
    model = _PointwiseModel().eval()
    image = torch.randn(2, 3, 75, 130)
    whole = predict_logits(model, image, mode="whole")
    slide = predict_logits(model, image, mode="slide", crop=64, stride=40)
    assert whole.shape == (2, 3, 75, 130)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="whole"):
        predict_logits(model, image, mode="tiles")


def test_upernet_shapes_and_layer_decay_groups():
    cfg = resolve(SegConfig, dict(SEG_TINY, data="x"))
    model = build_dense_model(cfg, 11)
    assert isinstance(model, VimUperNet)
    assert model.backbone.out_indices == list(default_out_indices(4)) == [0, 1, 2, 3]
    x = torch.randn(2, 3, 64, 96)
    model.eval()
    assert model(x).shape == (2, 11, 64, 96)
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.1, layer_decay=0.5)
    scale = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            scale[names[id(p)]] = group["lr_scale"]
    assert scale["backbone.model.pos_embed"] == pytest.approx(0.5 ** 5)  # stem, 4 blocks, then the heads
    assert scale["backbone.model.layers.0.mixer.in_proj.weight"] == pytest.approx(0.5 ** 4)
    assert scale["backbone.model.layers.3.mixer.in_proj.weight"] == pytest.approx(0.5)
    assert scale["classifier.1.weight"] == scale["decoder.fusion_block.0.weight"] == 1.0


def _loss_after_steps(model, inputs, targets, steps: int) -> list:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps + 1):
        torch.manual_seed(0)  # same dropout / proposal sampling for every evaluation
        loss, _ = model(inputs, targets)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def test_aux_weight_zero_drops_the_auxiliary_head():
    cfg = resolve(SegConfig, dict(SEG_TINY, data="x", aux_weight=0.0))
    model = build_dense_model(cfg, 11).train()
    assert model.aux_head is None
    _, parts = model(torch.randn(2, 3, 64, 64), torch.randint(0, 11, (2, 64, 64)))
    assert set(parts) == {"loss_seg"}
    with_aux = build_dense_model(resolve(SegConfig, dict(SEG_TINY, data="x")), 11).train()
    assert set(with_aux(torch.randn(2, 3, 64, 64), torch.randint(0, 11, (2, 64, 64)))[1]) == {"loss_seg", "loss_aux"}


def test_two_steps_lower_the_segmentation_loss(scenes):
    cfg = resolve(SegConfig, dict(SEG_TINY, data=str(scenes)))
    torch.manual_seed(0)
    model = build_dense_model(cfg, 11)
    ds = SegmentationFolder(str(scenes), "training", seg_train_transform(64, (1, 1)), reduce_zero_label=False, train=True)
    images, labels = zip(*(ds[i] for i in range(2)))
    losses = _loss_after_steps(model, torch.stack(images), torch.stack(labels), 2)
    assert losses[2] < losses[0], losses


def test_two_steps_lower_the_detection_loss(scenes):
    cfg = resolve(DetConfig, dict(DET_TINY, data=str(scenes / "coco")))
    torch.manual_seed(0)
    model = build_dense_model(cfg, 10)
    ds = CocoInstances(str(scenes / "coco" / "train"), str(scenes / "coco" / "annotations" / "instances_train.json"),
                       det_train_transform(64, (1, 1)), train=True)
    images, targets = zip(*(ds[i] for i in range(2)))
    losses = _loss_after_steps(model, list(images), list(targets), 2)
    assert losses[2] < losses[0], losses
    model.eval()
    with torch.no_grad():
        out = model([images[0]])[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"} and out["masks"].shape[-2:] == (64, 64)
