"""Class-folder (ImageNet layout) data sets and what every data set shares: image reading with clear errors,
per-sample seeded augmentation, a sampler that resumes mid-epoch, the evaluation transform.

Augmentation is seeded per (seed, epoch, sample index), so a batch looks the same whatever the number of
loader workers or processes and whether the run was interrupted and resumed.
"""
import contextlib
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
        with sample_rng(self.seed, self.epoch, index):
            return self.transform(image), target


@contextlib.contextmanager
def sample_rng(seed: int, epoch: int, index: int) -> Iterator[None]:
    """Run a block with python, numpy and torch (CPU) RNGs seeded from (seed, epoch, sample index), restoring
    the outer states after: a sample's random augmentation depends on nothing else."""
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    sample_seed = hash((seed, epoch, index)) & 0x7FFFFFFF
    random.seed(sample_seed)
    np.random.seed(sample_seed)
    torch.manual_seed(sample_seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


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
