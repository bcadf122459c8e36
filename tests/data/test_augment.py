"""The default training recipe's transform survives every draw, on every Pillow (posterize to 0 bits)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from visionmamba.data import augment
from visionmamba.train.config import TrainConfig


def test_posterize_keeps_pillow_12s_black_image_for_zero_bits():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    assert np.asarray(augment.posterize(image, 0)).max() == 0 and augment.posterize(image, 0).mode == "RGB"
    assert np.array_equal(np.asarray(augment.posterize(image, 3)), np.asarray(ImageOps.posterize(image, 3)))
    assert augment.posterize(image, 8) is image


def recipe_transform() -> object:
    cfg = TrainConfig(data="x", img_size=32)  # the recipe's defaults: rand-m9-mstd0.5-inc1, erasing, flips, crops
    return augment.training_transform(cfg.img_size, auto_augment=cfg.auto_augment, interpolation=cfg.interpolation,
                                      re_prob=cfg.reprob, hflip=cfg.hflip, scale=cfg.scale)


def test_the_default_recipe_transform_survives_draws_that_posterize_to_zero_bits(monkeypatch):
    """3000 seeded draws of the default transform: ~0.2% posterize to 0 bits, which Pillow 13 refuses."""
    zero_bits, safe = [], augment.posterize

    def counting(img, bits, **kwargs):
        zero_bits.extend([bits] if bits <= 0 else [])
        return safe(img, bits, **kwargs)

    monkeypatch.setattr(augment, "posterize", counting)  # make_posterize_safe installs the module's function
    transform = recipe_transform()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    for seed in range(3000):
        random.seed(seed)
        torch.manual_seed(seed)
        assert transform(image).shape == (3, 32, 32)
    assert len(zero_bits) >= 2, "the seeded draws no longer reach the 0-bit case: the test tests nothing"


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "original", "v0", "augmix-m5-w4-d2"])
def test_every_timm_policy_gets_the_safe_posterize(policy):
    transform = augment.training_transform(32, auto_augment=policy, interpolation="bicubic", re_prob=0.0, hflip=0.5,
                                           scale=(0.08, 1.0))
    ops = list(augment._augment_ops(transform))
    assert ops and all(op.aug_fn is not augment.timm_auto_augment.posterize for op in ops)
    assert any(op.aug_fn is augment.posterize for op in ops)
