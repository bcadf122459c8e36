"""Class-folder (ImageNet layout) data sets and what every data set shares: image reading with clear errors,
per-sample seeded augmentation, a sampler that resumes mid-epoch, the evaluation transform.

Augmentation is seeded per (seed, epoch, sample index), so a batch looks the same whatever the number of
loader workers or processes and whether the run was interrupted and resumed.
"""
import contextlib
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler
from torchvision.datasets import ImageFolder

from visionmamba.files import is_image, require_folder
from visionmamba.messages import notice

_logger = logging.getLogger(__name__)


class CorruptImageError(RuntimeError):
    """An image file that cannot be read (damaged, empty, too large to decode safely, or of an unknown range)."""


SKIP_HINT = "delete or replace the file, or pass --skip-corrupt to skip unreadable images"


def load_rgb(path: str) -> Image.Image:
    """Open an image as 8-bit RGB, or raise :class:`CorruptImageError` naming the file.

    16-bit grey images (and 32-bit integer ones with values in 0..65535) are scaled by 255 / 65535, and float
    images with values in [0, 1] by 255 (values in [0, 255] are taken as they are), instead of PIL's plain
    conversion, which saturates the first and blackens the second; other ranges are refused.
    """
    try:
        with open(path, "rb") as fh:
            image = Image.open(fh)
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                return _high_depth_to_rgb(image, path)
            return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise CorruptImageError(
            f"cannot read image {path!r}: {err}; if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS, else "
            + SKIP_HINT
        ) from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        reason = "the file is empty" if os.path.getsize(path) == 0 else f"{type(err).__name__}: {err}"
        raise CorruptImageError(f"cannot read image {path!r} ({reason}); {SKIP_HINT}") from err


def _high_depth_to_rgb(image: Image.Image, path: str) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F":
        if not np.isfinite(values).all() or low < 0 or high > 255:
            raise ValueError(f"float image with values in [{low:g}, {high:g}]; only [0, 1] or [0, 255] are understood")
        scale = 1.0 if high <= 1.0 else 255.0
    else:
        if low < 0 or high > 65535:
            raise ValueError(f"{image.mode} image with values in [{low:g}, {high:g}]; only 0..65535 (16-bit) is understood")
        scale = 65535.0
    grey = np.clip(np.round(values * (255.0 / scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


SPLITS = ("train", "val")
LAYOUTS = ("DATA/train/<class>/<images> (and optionally DATA/val/<class>/<images>), or DATA/<class>/<images>")


def _subfolders(path: Path) -> List[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_split_root(root: Path) -> bool:
    """A root of split folders (train/, val/, test/) rather than a folder of classes; one without class folders
    inside is an error naming the layouts."""
    names = {p.name for p in _subfolders(root)}
    if not (names & set(SPLITS)) or not names <= {*SPLITS, "test"}:
        return False
    for split in sorted(names & set(SPLITS)):
        if not _subfolders(root / split):
            raise ValueError(f"{str(root / split)!r} has no class folders (images belong in {split}/<class>/); "
                             f"expected {LAYOUTS}")
    return True


def training_folders(data: str) -> Tuple[Path, Optional[Path]]:
    """(training class folder, validation class folder or None) of ``--data``: the ImageNet layout's root
    (DATA/train, DATA/val), or a single folder of classes (trained on, no validation; said in one line)."""
    root = require_folder(data, "data folder")
    if _is_split_root(root):
        if not (root / "train").is_dir():
            raise ValueError(f"{data!r} has val/ but no train/; train needs {LAYOUTS}")
        return root / "train", (root / "val" if (root / "val").is_dir() else None)
    if not _subfolders(root):
        raise ValueError(f"{data!r} has no class folders; train needs {LAYOUTS}")
    notice(f"{data!r} has no train/ folder: training on its {len(_subfolders(root))} class folders, without validation "
           "(add DATA/train and DATA/val to evaluate every epoch)")
    return root, None


def eval_folder(data: str) -> Path:
    """The class folder to evaluate: ``--data`` itself, or its val/ when it is the ImageNet layout's root (said
    in one line)."""
    root = require_folder(data, "data folder")
    if _is_split_root(root):
        if not (root / "val").is_dir():
            raise ValueError(f"{data!r} holds {[p.name for p in _subfolders(root)]} but no val/; eval needs a folder of "
                             "class folders (DATA/<class>/<images>) or a root with DATA/val/<class>/<images>")
        notice(f"evaluating {str(root / 'val')!r} (the validation split of {data!r})")
        return root / "val"
    if not _subfolders(root):
        raise ValueError(f"{data!r} has no class folders; eval needs DATA/<class>/<images> (e.g. ImageNet's val/)")
    return root


def _is_visible_image(path: str) -> bool:
    return is_image(Path(path)) and not Path(path).name.startswith(".")


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
        require_folder(root, "image folder (class sub-folders of images)")
        self.folder = ImageFolder(root, loader=load_rgb, is_valid_file=_is_visible_image)
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
