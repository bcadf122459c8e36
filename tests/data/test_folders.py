"""Reading images: high bit depths scaled (not saturated or blackened), unreadable files named clearly."""
import numpy as np
import pytest
from PIL import Image

from visionmamba.data.folders import CorruptImageError, SeededImageFolder, load_rgb


def _grey(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    assert image.mode == "RGB" and (array[..., 0] == array[..., 2]).all()
    return array[..., 0]


def test_16_bit_32_bit_and_float_images_are_scaled_to_8_bit(tmp_path):
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    expected = np.round(ramp * 255)
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray((ramp * 65535).round().astype(np.int32)).save(tmp_path / "g32.tif")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "unit.tif")
    Image.fromarray((ramp * 255).astype(np.float32)).save(tmp_path / "byte.tif")
    assert Image.open(tmp_path / "g16.png").mode == "I;16" and Image.open(tmp_path / "g32.tif").mode == "I"
    for name in ("g16.png", "g32.tif", "unit.tif", "byte.tif"):
        got = _grey(load_rgb(str(tmp_path / name))).astype(float)
        assert np.abs(got - expected).max() <= 1, name  # PIL's own conversion gives 255 or 0 almost everywhere


def test_unknown_ranges_empty_files_and_decompression_bombs_are_clear_errors(tmp_path, monkeypatch):
    Image.fromarray(np.full((8, 8), 1e6, np.float32)).save(tmp_path / "huge.tif")
    with pytest.raises(CorruptImageError, match="huge.tif.*only \\[0, 1\\] or \\[0, 255\\]"):
        load_rgb(str(tmp_path / "huge.tif"))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(CorruptImageError, match="the file is empty.*--skip-corrupt"):
        load_rgb(str(tmp_path / "empty.png"))
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2x the limit: PIL refuses it
    with pytest.raises(CorruptImageError, match="big.png.*MAX_IMAGE_PIXELS"):
        load_rgb(str(tmp_path / "big.png"))


def test_skip_corrupt_also_skips_decompression_bombs(tmp_path, monkeypatch):
    for i in range(2):
        (tmp_path / "c" / f"{i}").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "c" / f"{i}" / "small.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "c" / "0" / "bomb.png")
    (tmp_path / "c" / "0" / "._small.png").write_bytes(b"\0" * 10)  # a macOS resource fork: not an image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = SeededImageFolder(str(tmp_path / "c"), lambda im: np.asarray(im), skip_corrupt=True)
    assert len(folder) == 3  # the hidden file is not listed
    assert sorted(item is None for item in (folder[i] for i in range(3))) == [False, False, True]
