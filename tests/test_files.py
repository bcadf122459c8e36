"""visionmamba.files: atomic writes and image listing."""
import pytest

from visionmamba.files import atomic_write, list_images


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"done"))
    assert target.read_bytes() == b"done"

    def failing(tmp):
        open(tmp, "wb").write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"done" and sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_list_images_recurses_sorted_and_filters_suffixes(tmp_path):
    for name in ("b/2.PNG", "a/1.jpg", "a/notes.txt", "c.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images([tmp_path])] == ["a/1.jpg", "b/2.PNG", "c.webp"]
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        list_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        list_images([tmp_path / "empty"])
