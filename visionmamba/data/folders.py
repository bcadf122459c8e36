"""Data: ImageFolder sets with timm transforms, per-sample seeded augmentation, corrupt-image handling,
resumable samplers, and the bundled demo data set (scikit-learn's handwritten digits).

Augmentation is seeded per (seed, epoch, sample index), so a batch looks the same whatever the number of
loader workers or processes and whether the run was interrupted and resumed.
"""
import logging
import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler
from torchvision.datasets import ImageFolder

_logger = logging.getLogger(__name__)


class CorruptImageError(RuntimeError):
    """An image file that PIL cannot read."""


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB, or raise :class:`CorruptImageError` naming the file."""
    try:
        with open(path, "rb") as fh:
            image = Image.open(fh)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise CorruptImageError(
            f"cannot read image {path!r} ({type(err).__name__}: {err}); delete or replace the file, or pass "
            "--skip-corrupt to skip unreadable images"
        ) from err


class SeededImageFolder(Dataset):
    """An ImageFolder whose random transforms are seeded per (seed, epoch, index).

    With ``skip_corrupt`` an unreadable image yields ``None`` (dropped by :func:`collate_skipping`, which
    counts it); otherwise it raises :class:`CorruptImageError`.
    """

    def __init__(
        self,
        root: str,
        transform: Callable,
        *,
        seed: int = 0,
        skip_corrupt: bool = False,
        target_map: Optional[Sequence[int]] = None,
    ) -> None:
        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f"image folder {root!r} does not exist (expected class sub-folders of images)")
        self.folder = ImageFolder(root, loader=load_rgb)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.skip_corrupt = skip_corrupt
        self.target_map = target_map  # folder class index -> model output index (e.g. ImageNet wnids)

    @property
    def classes(self) -> List[str]:
        return self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, int]]:
        path, target = self.folder.samples[index]
        if self.target_map is not None:
            target = self.target_map[target]
        try:
            image = load_rgb(path)
        except CorruptImageError:
            if not self.skip_corrupt:
                raise
            _logger.warning("skipping unreadable image %s", path)
            return None
        with seeded(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF):
            return self.transform(image), target


class seeded:
    """Run a block with python, numpy and torch (CPU) RNGs seeded, restoring the outer states after."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.random.set_rng_state(self.states[2])


def imagenet_targets(classes: Sequence[str]) -> Optional[List[int]]:
    """ImageNet-1k output indices of folders named by WordNet id (n01440764, ...), or None if any is not one."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    index = {name: i for i, name in enumerate(info.label_names())}
    if not classes or not all(c in index for c in classes):
        return None
    return [index[c] for c in classes]


def collate_skipping(batch: Sequence[Optional[Tuple[torch.Tensor, int]]]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Stack a batch, dropping skipped (corrupt) samples: (images, targets, number skipped)."""
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([item[0] for item in kept])
    targets = torch.tensor([item[1] for item in kept], dtype=torch.long)
    return images, targets, skipped


class ResumableSampler(Sampler):
    """Wraps an epoch-seeded sampler; ``start`` skips the indices of batches already trained on."""

    def __init__(self, base: Sampler) -> None:
        self.base = base
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.base)[self.start :])

    def __len__(self) -> int:
        return len(self.base) - self.start


def eval_transform(data_config: Dict[str, Any]) -> Callable:
    """The evaluation transform described by a timm data config (resize, centre crop, normalise)."""
    from timm.data import create_transform

    return create_transform(
        data_config["input_size"], is_training=False, interpolation=data_config["interpolation"],
        crop_pct=data_config["crop_pct"], mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
    )


def write_digits_folder(root: Path, *, test_fraction: float = 0.2, seed: int = 0) -> Tuple[int, int]:
    """Write scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes) as PNG files in
    the ImageFolder layout ``root/{train,val}/<digit>/<n>.png`` on a fixed stratified split.

    Returns (train images, test images). Needs scikit-learn (the ``demo`` extra); no download.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError("the demo data set ships with scikit-learn: pip install 'visionmamba[demo]'") from err
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=test_fraction, stratify=digits.target, random_state=seed
    )
    for split, indices in (("train", train_idx), ("val", test_idx)):
        for i in indices:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    return len(train_idx), len(test_idx)
