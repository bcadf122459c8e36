"""Files: atomic writes (a reader never sees half a file) and finding images."""
import os
import tempfile
from pathlib import Path
from typing import Callable, List, Sequence, Union

PathLike = Union[str, os.PathLike]

# Image file suffixes read by predict, features and the segmentation folders (lower case).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path``: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def list_images(paths: Sequence[PathLike]) -> List[Path]:
    """Image files named directly or found (recursively, sorted) under directories."""
    found: List[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if is_image(p))
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"{str(item)!r} is neither an image file nor a folder")
    if not found:
        raise FileNotFoundError(f"no images found in {[str(p) for p in paths]}")
    return found
