"""The embedded data of the demos, built from scikit-learn's bundled handwritten digits (1,797 real 8x8
scans, 10 classes; no download): the single digits as class folders, and digit scenes for dense prediction.

Both use one fixed stratified split (:func:`digits_split`): 1,437 training and 360 held-out scans.

A scene pastes a few real digit scans, enlarged to random sizes and tinted, at random places of a noisy
canvas; it comes with a per-pixel class mask (0 background, 1 + digit) and one box and instance mask per
digit. Train and validation scenes draw their digits from disjoint writers' scans (the split above), and
every scene is a pure function of (seed, split, index). :func:`write_scenes` stores them in the two
standard layouts the dense trainers read: ADE20K (``images/<split>/*.png`` + ``annotations/<split>/*.png``)
and COCO (``coco/<split>/*.png`` + ``coco/annotations/instances_<split>.json``).
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from visionmamba.files import refuse_existing

CLASSES = ["background"] + [str(d) for d in range(10)]  # per-pixel classes; digit d is class d + 1
SPLITS = {"training": "train", "validation": "val"}  # ADE20K split name -> COCO split name
HELD_OUT = 0.2  # fraction of the scans in the held-out split


def digits_split(seed: int = 0) -> Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]:
    """The digit scans (1797, 8, 8) with values 0..16, their labels, and the fixed stratified split
    ``{"train": indices, "val": indices}``. Needs scikit-learn (the ``demo`` extra)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError("the demo data are scikit-learn's digits: pip install 'visionmamba[demo]'") from err
    digits = load_digits()
    train_idx, val_idx = train_test_split(
        np.arange(len(digits.images)), test_size=HELD_OUT, stratify=digits.target, random_state=seed
    )
    return digits.images, digits.target, {"train": train_idx, "val": val_idx}


def write_digits_folder(root: Path, *, seed: int = 0) -> Tuple[int, int]:
    """Write the digits as PNG files in the ImageFolder layout ``root/{train,val}/<digit>/<n>.png``, split
    by :func:`digits_split`. Returns (train images, held-out images)."""
    scans, labels, split = digits_split(seed)
    images = (scans * (255.0 / 16.0)).round().astype(np.uint8)
    for name, indices in split.items():
        for i in indices:
            folder = Path(root) / name / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    return len(split["train"]), len(split["val"])


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    semantic: np.ndarray  # (H, W) uint8: 0 background, 1 + digit
    boxes: np.ndarray  # (n, 4) float32, x0, y0, x1, y1 in pixels (x1, y1 exclusive)
    labels: np.ndarray  # (n,) int64: the digits
    masks: np.ndarray  # (n, H, W) bool


def digit_sources(seed: int = 0) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """The digit scans (float in [0, 1]) and labels of each scene split (ADE20K names), from :func:`digits_split`."""
    scans, labels, split = digits_split(seed)
    scans = (scans / 16.0).astype(np.float32)
    return {scene: (scans[split[name]], labels[split[name]]) for scene, name in SPLITS.items()}


def _overlaps(box: Tuple[int, int, int, int], boxes: List[Tuple[int, int, int, int]], margin: int = 2) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin for b in boxes)


def compose_scene(
    scans: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int = 128,
    max_digits: int = 4,
    digit_size: Tuple[int, int] = (20, 44),
) -> Scene:
    """One scene: 1..max_digits non-overlapping digits of side in ``digit_size`` on a size x size canvas."""
    background = rng.uniform(0, 70, size=3)
    canvas = np.broadcast_to(background, (size, size, 3)) + rng.normal(0, 8, size=(size, size, 3))
    semantic = np.zeros((size, size), np.uint8)
    placed: List[Tuple[int, int, int, int]] = []
    boxes, digit_labels, masks = [], [], []
    for _ in range(int(rng.integers(1, max_digits + 1))):
        side = int(rng.integers(digit_size[0], digit_size[1] + 1))
        for _attempt in range(20):
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if not _overlaps((x, y, x + side, y + side), placed):
                break
        else:
            continue  # no free place for this one
        k = int(rng.integers(len(scans)))
        scan = Image.fromarray(scans[k]).resize((side, side), Image.BILINEAR)
        alpha = np.clip(np.asarray(scan), 0.0, 1.0)
        colour = rng.uniform(150, 255, size=3)
        region = canvas[y : y + side, x : x + side]
        canvas[y : y + side, x : x + side] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        mask = np.zeros((size, size), bool)
        mask[y : y + side, x : x + side] = alpha > 0.35
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        placed.append((x, y, x + side, y + side))
        semantic[mask] = labels[k] + 1
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        digit_labels.append(int(labels[k]))
        masks.append(mask)
    return Scene(
        image=np.clip(canvas, 0, 255).round().astype(np.uint8),
        semantic=semantic,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(digit_labels, np.int64),
        masks=np.asarray(masks, bool).reshape(-1, size, size),
    )


def make_scenes(split: str, count: int, *, seed: int = 0, size: int = 128) -> List[Scene]:
    """``count`` scenes of ``split`` ("training" or "validation"), a pure function of the arguments."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    scans, labels = digit_sources()[split]
    rng = np.random.default_rng([seed, list(SPLITS).index(split)])
    return [compose_scene(scans, labels, rng, size=size) for _ in range(count)]


def coco_annotations(scenes: List[Scene], file_names: List[str]) -> Dict:
    """A COCO instances document (RLE masks, categories 1..10 named "0".."9")."""
    from pycocotools import mask as mask_utils

    images, annotations = [], []
    for image_id, (scene, name) in enumerate(zip(scenes, file_names), start=1):
        height, width = scene.semantic.shape
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for box, label, mask in zip(scene.boxes, scene.labels, scene.masks):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()), "iscrowd": 0, "segmentation": rle,
            })
    categories = [{"id": d + 1, "name": str(d)} for d in range(10)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_scenes(root: Path, *, train: int = 1000, val: int = 200, seed: int = 0, size: int = 128,
                 overwrite: bool = False) -> Dict[str, int]:
    """Write the scenes in the ADE20K and COCO layouts under ``root``; returns scenes per split. A data set
    already there is replaced only with ``overwrite`` (refused before anything is written)."""
    root = Path(root)
    written = [root / "classes.json", root / "images", root / "annotations", root / "coco"]
    refuse_existing(written, overwrite=overwrite, what="a data set in the output folder:")
    for path in written[1:]:  # replaced as a whole: no scene of the earlier set is left beside the new ones
        shutil.rmtree(path, ignore_errors=True)
    counts = {"training": train, "validation": val}
    for split, count in counts.items():
        scenes = make_scenes(split, count, seed=seed, size=size)
        names = [f"{i:05d}.png" for i in range(count)]
        coco_split = SPLITS[split]
        for folder in (root / "images" / split, root / "annotations" / split, root / "coco" / coco_split):
            folder.mkdir(parents=True, exist_ok=True)
        for scene, name in zip(scenes, names):
            Image.fromarray(scene.image).save(root / "images" / split / name)
            Image.fromarray(scene.image).save(root / "coco" / coco_split / name)
            Image.fromarray(scene.semantic).save(root / "annotations" / split / name)
        (root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
        document = coco_annotations(scenes, names)
        (root / "coco" / "annotations" / f"instances_{coco_split}.json").write_text(json.dumps(document))
    (root / "classes.json").write_text(json.dumps(CLASSES) + "\n")
    return counts
