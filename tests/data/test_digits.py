"""The embedded demo data: the digits split, the single-digit folders and the digit scenes."""
import json

import numpy as np
from PIL import Image

from visionmamba import cli
from visionmamba.data.digits import coco_annotations, digit_sources, digits_split, make_scenes, write_digits_folder


def test_scenes_are_deterministic_and_consistent():
    a, b = make_scenes("training", 5, seed=3, size=64), make_scenes("training", 5, seed=3, size=64)
    other = make_scenes("training", 5, seed=4, size=64)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.semantic, y.semantic)
        assert np.array_equal(x.boxes, y.boxes) and np.array_equal(x.labels, y.labels)
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, other))
    for scene in a:
        assert len(scene.boxes) == len(scene.labels) == len(scene.masks) >= 1
        for box, label, mask in zip(scene.boxes, scene.labels, scene.masks):
            ys, xs = np.nonzero(mask)
            assert list(box) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert (scene.semantic[mask] == label + 1).all()  # instances do not overlap
        assert ((scene.semantic > 0) == scene.masks.any(0)).all()


def test_coco_document_round_trips_through_pycocotools(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    scenes = make_scenes("validation", 3, size=64)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco_annotations(scenes, ["a.png", "b.png", "c.png"])))
    coco = COCO(str(path))
    assert len(coco.getAnnIds()) == sum(len(s.labels) for s in scenes)
    for image_id, scene in enumerate(scenes, start=1):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        for ann, mask, label in zip(anns, scene.masks, scene.labels):
            assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), mask)
            assert ann["category_id"] == label + 1


def test_scenes_cli(tmp_path, capsys):
    assert cli.main(["scenes", str(tmp_path / "s"), "--train", "3", "--val", "2", "--size", "64"]) == 0
    assert len(list((tmp_path / "s" / "images" / "training").iterdir())) == 3
    assert len(json.loads((tmp_path / "s" / "coco" / "annotations" / "instances_val.json").read_text())["images"]) == 2


def test_demo_data_set_is_the_bundled_digits(tmp_path):
    assert write_digits_folder(tmp_path) == (1437, 360)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [str(d) for d in range(10)]
    image = Image.open(next((tmp_path / "val" / "3").iterdir()))
    assert image.size == (8, 8) and image.mode == "L"


def test_one_split_serves_the_folders_and_the_scenes():
    scans, labels, split = digits_split()
    assert len(split["train"]) == 1437 and len(split["val"]) == 360
    assert not set(split["train"]) & set(split["val"])
    assert np.bincount(labels[split["val"]]).min() >= 35  # stratified: every digit held out
    sources = digit_sources()
    assert np.array_equal(sources["validation"][1], labels[split["val"]])
    assert np.allclose(sources["training"][0], scans[split["train"]] / 16.0)
