"""The training transform of the classification recipe: timm's, made safe for every Pillow we admit.

timm's RandAugment and AutoAugment posterize with 0 bits now and then (``PosterizeIncreasing`` at a
magnitude of 10, which ``mstd0.5`` draws for ~0.2% of transforms; ``Posterize`` at low magnitudes).
Pillow < 13 turned every pixel black for 0 bits; Pillow 13 raises ``bits must be between or equal to 1
and 8``, which stopped a training run at the first such draw. :func:`training_transform` swaps timm's
posterize for :func:`posterize`, which gives Pillow < 13's result on every Pillow.
"""
from typing import Any, Callable, Iterator, Optional, Tuple

from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment
from timm.data import create_transform


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize (``bits_to_keep`` most significant bits of each channel) with Pillow < 13's 0 bits:
    a black image of the same mode and size."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _augment_ops(node: Any) -> Iterator[Any]:
    """Every timm ``AugmentOp`` inside a transform (Compose, RandAugment, AutoAugment, AugMix)."""
    if isinstance(node, timm_auto_augment.AugmentOp):
        yield node
    elif isinstance(node, (list, tuple)):  # AutoAugment's policy is a list of sub-policies, each a list of ops
        for child in node:
            yield from _augment_ops(child)
    else:
        for attr in ("transforms", "ops", "policy"):
            yield from _augment_ops(getattr(node, attr, ()))


def make_posterize_safe(transform: Callable) -> int:
    """Point every posterize op of ``transform`` at :func:`posterize`; returns how many were changed."""
    changed = 0
    for op in _augment_ops(transform):
        if op.aug_fn is timm_auto_augment.posterize:
            op.aug_fn = posterize
            changed += 1
    return changed


def training_transform(
    img_size: int, *, auto_augment: Optional[str], interpolation: str, re_prob: float, hflip: float,
    scale: Tuple[float, float],
) -> Callable:
    """timm's training transform (random resized crop, flip, auto-augment, normalise, random erasing in
    pixel mode), with the posterize ops made safe."""
    transform = create_transform(
        img_size, is_training=True, auto_augment=auto_augment or None, interpolation=interpolation,
        re_prob=re_prob, re_mode="pixel", re_count=1, hflip=hflip, scale=scale,
    )
    make_posterize_safe(transform)
    return transform
