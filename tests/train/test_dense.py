"""Dense prediction: digit scenes, UperNet segmentation, Mask R-CNN detection, metrics, training loop, CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from visionmamba import cli
from visionmamba.train.dense import (
    DenseRun, DetConfig, SegConfig, build_model, default_out_indices, load_dense, resolve, train_dense,
)
from visionmamba.models.mask_rcnn import CocoInstances, coco_scores
from visionmamba.train.distributed import DistInfo
from visionmamba.models.mask_rcnn import train_transform as det_train_transform
from visionmamba.data.digits import coco_annotations, make_scenes, write_scenes
from visionmamba.models.upernet import (
    IGNORE_INDEX, SegmentationFolder, VimUperNet, predict_logits, segmentation_scores,
)
from visionmamba.models.upernet import train_transform as seg_train_transform

TINY = dict(
    model="vim_tiny_patch16_224", model_args={"embed_dim": 32, "depth": 4, "patch_size": 8, "stride": 8},
    crop_size=64, scale_range=(0.75, 1.25), batch_size=2, lr=1e-3, layer_decay=0.9, warmup_iters=1, drop_path=0.0,
    workers=0, progress=False, checkpoint_every=0, eval_every=0,
)
SEG_TINY = dict(TINY, num_classes=11, reduce_zero_label=False, decoder_channels=16, eval_mode="whole")
DET_TINY = dict(
    TINY, train_split="train", val_split="val", fpn_channels=16, anchor_sizes=(8, 16, 32, 64, 128),
    detector_args=dict(box_batch_size_per_image=16, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_train=100,
                       rpn_post_nms_top_n_test=50, rpn_pre_nms_top_n_test=100, box_detections_per_img=10),
)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    write_scenes(root, train=8, val=4, size=64)
    return root


# ----------------------------------------------------------------------------------------------- scenes
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


# ---------------------------------------------------------------------------------------------- metrics
def test_segmentation_scores_by_hand():
    # truth 0 0 1 1 2 ; prediction 0 1 1 1 0 ; class 3 absent from both (does not count)
    from torchmetrics.classification import MulticlassConfusionMatrix

    truth = torch.tensor([0, 0, 1, 1, 2, IGNORE_INDEX])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    confusion = MulticlassConfusionMatrix(4, ignore_index=IGNORE_INDEX)(pred, truth)
    scores = segmentation_scores(confusion)
    # IoU: class 0: tp 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 0 / (1 + 0) = 0
    assert scores["IoU"][:3] == pytest.approx([100 / 3, 200 / 3, 0.0])
    assert scores["IoU"][3] is None
    assert scores["mIoU"] == pytest.approx(100 / 3)
    assert scores["aAcc"] == pytest.approx(60.0)  # 3 of 5 counted pixels
    assert scores["mAcc"] == pytest.approx(100 * (0.5 + 1.0 + 0.0) / 3)


def _coco_gt(tmp_path: Path):
    from pycocotools.coco import COCO

    doc = {
        "images": [{"id": 1, "file_name": "a.png", "height": 100, "width": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "seven"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(doc))
    return COCO(str(path))


def test_coco_box_ap_by_hand(tmp_path):
    gt = _coco_gt(tmp_path)
    perfect = [{"image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "score": 0.9},
               {"image_id": 1, "category_id": 7, "bbox": [60, 60, 30, 30], "score": 0.8}]
    assert coco_scores(gt, perfect, [1], kinds=("bbox",))["bbox_AP"] == pytest.approx(100.0)
    # One of two objects found at precision 1: recall 0.5 -> 51 of the 101 recall points at precision 1.
    half = coco_scores(gt, perfect[:1], [1], kinds=("bbox",))
    assert half["bbox_AP50"] == pytest.approx(100 * 51 / 101)
    # A box with IoU 0.6 with its object counts at 0.5 but not at 0.75.
    shifted = [{"image_id": 1, "category_id": 7, "bbox": [15, 10, 20, 20], "score": 0.9}]
    iou = (15 * 20) / (20 * 20 * 2 - 15 * 20)
    assert 0.5 < iou < 0.75
    scores = coco_scores(gt, shifted, [1], kinds=("bbox",))
    assert scores["bbox_AP50"] == pytest.approx(100 * 51 / 101) and scores["bbox_AP75"] == 0.0
    assert coco_scores(gt, [], [1], kinds=("bbox",))["bbox_AP"] == 0.0


# ------------------------------------------------------------------------------------------------- data
def test_segmentation_folder_and_reduce_zero_label(scenes, tmp_path):
    ds = SegmentationFolder(str(scenes), "training", seg_train_transform(64, (0.75, 1.25)), reduce_zero_label=False, train=True)
    image, label = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and label.shape == (64, 64)
    assert label.dtype == torch.int64 and set(label.unique().tolist()) <= set(range(11)) | {IGNORE_INDEX}
    image2, label2 = ds[0]
    assert torch.equal(image, image2) and torch.equal(label, label2)  # seeded per (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], image)
    reduced = SegmentationFolder(str(scenes), "training", seg_train_transform(64, (1, 1)), reduce_zero_label=True, train=True)
    raw = torch.tensor([[0, 1, 2, 255]])
    path = tmp_path / "l.png"
    from PIL import Image

    Image.fromarray(raw.numpy().astype(np.uint8)).save(path)
    assert reduced.read_label(path).tolist() == [[IGNORE_INDEX, 0, 1, IGNORE_INDEX]]
    with pytest.raises(FileNotFoundError, match="ADE20K layout"):
        SegmentationFolder(str(tmp_path), "training", seg_train_transform(64, (1, 1)), reduce_zero_label=True, train=True)


def test_coco_instances_maps_labels_and_jitters_jointly(scenes):
    ds = CocoInstances(str(scenes / "coco" / "train"), str(scenes / "coco" / "annotations" / "instances_train.json"),
                       det_train_transform(64, (0.5, 1.5)), train=True)
    assert ds.classes == [str(d) for d in range(10)]
    image, target = ds[0]
    assert image.shape == (3, 64, 64)
    n = len(target["labels"])
    assert target["boxes"].shape == (n, 4) and target["masks"].shape == (n, 64, 64)
    assert all(1 <= int(v) <= 10 for v in target["labels"])
    for box, mask in zip(target["boxes"], target["masks"]):  # boxes follow the masks through the jitter
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() <= box[3] + 1


# ------------------------------------------------------------------------------------------------ model
class _PointwiseModel(nn.Module):
    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        assert x.shape[-1] % 32 == 0 and x.shape[-2] % 32 == 0
        return self.conv(x)


def test_slide_and_whole_inference_agree_for_a_pointwise_model():
    model = _PointwiseModel().eval()
    image = torch.randn(2, 3, 75, 130)
    whole = predict_logits(model, image, mode="whole")
    slide = predict_logits(model, image, mode="slide", crop=64, stride=40)
    assert whole.shape == (2, 3, 75, 130)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="whole"):
        predict_logits(model, image, mode="tiles")


def test_upernet_shapes_and_layer_decay_groups():
    cfg = resolve(SegConfig, dict(SEG_TINY, data="x"))
    model = build_model(cfg, 11)
    assert isinstance(model, VimUperNet)
    assert model.backbone.out_indices == list(default_out_indices(4)) == [0, 1, 2, 3]
    x = torch.randn(2, 3, 64, 96)
    model.eval()
    assert model(x).shape == (2, 11, 64, 96)
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.1, layer_decay=0.5)
    scale = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            scale[names[id(p)]] = group["lr_scale"]
    assert scale["backbone.model.pos_embed"] == pytest.approx(0.5 ** 5)  # stem, 4 blocks, then the heads
    assert scale["backbone.model.layers.0.mixer.in_proj.weight"] == pytest.approx(0.5 ** 4)
    assert scale["backbone.model.layers.3.mixer.in_proj.weight"] == pytest.approx(0.5)
    assert scale["classifier.1.weight"] == scale["decoder.fusion_block.0.weight"] == 1.0


def _loss_after_steps(model, inputs, targets, steps: int) -> list:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps + 1):
        torch.manual_seed(0)  # same dropout / proposal sampling for every evaluation
        loss, _ = model(inputs, targets)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def test_aux_weight_zero_drops_the_auxiliary_head():
    cfg = resolve(SegConfig, dict(SEG_TINY, data="x", aux_weight=0.0))
    model = build_model(cfg, 11).train()
    assert model.aux_head is None
    _, parts = model(torch.randn(2, 3, 64, 64), torch.randint(0, 11, (2, 64, 64)))
    assert set(parts) == {"loss_seg"}
    with_aux = build_model(resolve(SegConfig, dict(SEG_TINY, data="x")), 11).train()
    assert set(with_aux(torch.randn(2, 3, 64, 64), torch.randint(0, 11, (2, 64, 64)))[1]) == {"loss_seg", "loss_aux"}


def test_two_steps_lower_the_segmentation_loss(scenes):
    cfg = resolve(SegConfig, dict(SEG_TINY, data=str(scenes)))
    torch.manual_seed(0)
    model = build_model(cfg, 11)
    ds = SegmentationFolder(str(scenes), "training", seg_train_transform(64, (1, 1)), reduce_zero_label=False, train=True)
    images, labels = zip(*(ds[i] for i in range(2)))
    losses = _loss_after_steps(model, torch.stack(images), torch.stack(labels), 2)
    assert losses[2] < losses[0], losses


def test_two_steps_lower_the_detection_loss(scenes):
    cfg = resolve(DetConfig, dict(DET_TINY, data=str(scenes / "coco")))
    torch.manual_seed(0)
    model = build_model(cfg, 10)
    ds = CocoInstances(str(scenes / "coco" / "train"), str(scenes / "coco" / "annotations" / "instances_train.json"),
                       det_train_transform(64, (1, 1)), train=True)
    images, targets = zip(*(ds[i] for i in range(2)))
    losses = _loss_after_steps(model, list(images), list(targets), 2)
    assert losses[2] < losses[0], losses
    model.eval()
    with torch.no_grad():
        out = model([images[0]])[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"} and out["masks"].shape[-2:] == (64, 64)


# ----------------------------------------------------------------------------------- training and CLI
def test_resume_after_interruption_equals_an_uninterrupted_run(scenes, tmp_path, monkeypatch):
    straight = resolve(SegConfig, dict(SEG_TINY, data=str(scenes), output=str(tmp_path / "a"), iters=4))
    train_dense(straight)

    interrupted = resolve(SegConfig, dict(SEG_TINY, data=str(scenes), output=str(tmp_path / "b"), iters=4, checkpoint_every=2))
    real_step = DenseRun.step

    def dying_step(self, batch):
        if self.iteration == 3:
            raise KeyboardInterrupt("killed")
        real_step(self, batch)

    monkeypatch.setattr(DenseRun, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_dense(interrupted)
    monkeypatch.setattr(DenseRun, "step", real_step)
    interrupted.resume = "auto"
    train_dense(interrupted)

    a = torch.load(tmp_path / "a" / "last.pth", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pth", weights_only=False)
    assert a["iteration"] == b["iteration"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_seg_cli_trains_evaluates_and_reports(scenes, tmp_path, capsys):
    out = tmp_path / "seg"
    args = ["seg-train", "--data", str(scenes), "--output", str(out), "--iters", "3", "--eval-every", "2",
            "--model-args", json.dumps(SEG_TINY["model_args"]), "--crop-size", "64", "--batch-size", "2",
            "--num-classes", "11", "--no-reduce-zero-label", "--decoder-channels", "16", "--workers", "0",
            "--no-progress", "--warmup-iters", "1", "--scale-range", "0.75", "1.25", "--eval-mode", "slide"]
    assert cli.main(args) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [2, 3]
    assert all(0 <= r["mIoU"] <= 100 for r in records)
    assert (out / "curves.png").is_file() and (out / "best.pth").is_file()
    capsys.readouterr()
    assert cli.main(["seg-eval", "--checkpoint", str(out / "last.pth"), "--mode", "whole", "--per-class"]) == 0
    text = capsys.readouterr().out
    assert "mIoU" in text and "class  10" in text
    model, cfg, _ = load_dense(str(out / "last.pth"), torch.device("cpu"))
    assert isinstance(cfg, SegConfig) and cfg.eval_mode == "slide" and not model.training


def test_det_cli_trains_and_evaluates(scenes, tmp_path, capsys):
    out = tmp_path / "det"
    args = ["det-train", "--data", str(scenes / "coco"), "--output", str(out), "--iters", "2",
            "--train-split", "train", "--val-split", "val", "--model-args", json.dumps(DET_TINY["model_args"]),
            "--crop-size", "64", "--batch-size", "2", "--fpn-channels", "16", "--anchor-sizes", "8", "16", "32", "64", "128",
            "--detector-args", json.dumps(DET_TINY["detector_args"]), "--workers", "0", "--no-progress", "--warmup-iters", "1"]
    assert cli.main(args) == 0
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert record["iter"] == 2 and {"bbox_AP", "bbox_AP50", "segm_AP"} <= set(record)
    capsys.readouterr()
    assert cli.main(["det-eval", "--checkpoint", str(out / "last.pth")]) == 0
    assert "bbox_AP50" in capsys.readouterr().out


def test_dense_errors_are_clear(scenes, tmp_path, capsys):
    with pytest.raises(ValueError, match="multiple of 32"):
        resolve(SegConfig, dict(SEG_TINY, data="x", crop_size=100))
    with pytest.raises(ValueError, match="--data"):
        resolve(DetConfig, {})
    torch.save({"model": {}}, tmp_path / "plain.pth")
    assert cli.main(["seg-eval", "--checkpoint", str(tmp_path / "plain.pth")]) == 2
    assert "not a seg-train / det-train checkpoint" in capsys.readouterr().err
    assert cli.main(["det-train", "--data", str(tmp_path), "--no-progress"]) == 2
    assert "COCO layout" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 2 images"):
        train_dense(resolve(SegConfig, dict(SEG_TINY, data=str(scenes), output=str(tmp_path / "b1"), batch_size=1)))

    import shutil

    from visionmamba.data.folders import CorruptImageError

    broken = tmp_path / "broken"
    shutil.copytree(scenes, broken)
    (broken / "images" / "training" / "00001.png").write_bytes(b"not an image")
    ds = SegmentationFolder(str(broken), "training", seg_train_transform(64, (1, 1)), reduce_zero_label=False, train=True)
    with pytest.raises(CorruptImageError, match="00001.png"):
        ds[1]
    (broken / "coco" / "train" / "00001.png").write_bytes(b"not an image")
    det = CocoInstances(str(broken / "coco" / "train"), str(broken / "coco" / "annotations" / "instances_train.json"),
                        det_train_transform(64, (1, 1)), train=True)
    with pytest.raises(CorruptImageError, match="00001.png"):
        det[1]


def test_nan_loss_stops_before_the_step(scenes, tmp_path, monkeypatch):
    from visionmamba.train.trainer import NonFiniteLossError

    cfg = resolve(SegConfig, dict(SEG_TINY, data=str(scenes), output=str(tmp_path / "nan"), iters=2))
    monkeypatch.setattr(VimUperNet, "loss", lambda self, x, y: (torch.tensor(float("nan"), requires_grad=True), {}))
    with pytest.raises(NonFiniteLossError, match="iteration 1"):
        train_dense(cfg)
    cfg.skip_nonfinite = True
    assert train_dense(cfg)["skipped_steps"] == 2


def test_scenes_cli(tmp_path, capsys):
    assert cli.main(["scenes", str(tmp_path / "s"), "--train", "3", "--val", "2", "--size", "64"]) == 0
    assert len(list((tmp_path / "s" / "images" / "training").iterdir())) == 3
    assert len(json.loads((tmp_path / "s" / "coco" / "annotations" / "instances_val.json").read_text())["images"]) == 2


def test_dense_demo_runs_end_to_end_on_a_small_budget(tmp_path, monkeypatch, capsys):
    """The demo's wiring (scenes, pre-training, both fine-tunings, evaluation) with tiny budgets."""
    import functools

    from visionmamba.tools import dense_demo

    monkeypatch.setattr(dense_demo, "write_scenes", functools.partial(write_scenes, train=8, val=4))
    monkeypatch.setitem(dense_demo.PRETRAIN, "epochs", 1)
    figures = dense_demo.run_dense_demo(str(tmp_path / "demo"), iters=2)
    assert set(figures) == {"mIoU", "box_AP50", "box_AP", "mask_AP50"}
    assert all(0.0 <= v <= 1.0 for v in figures.values())
    text = capsys.readouterr().out
    assert "segmentation demo: mIoU" in text and "detection demo: box mAP@0.5" in text
    ckpt = torch.load(tmp_path / "demo" / "seg" / "last.pth", weights_only=False)
    assert ckpt["config"]["finetune"] == str(tmp_path / "demo" / "pretrain" / "last.pth")


@pytest.mark.parametrize("task", ["seg", "det"])
def test_learning_rate_schedules_follow_the_official_shapes(scenes, task):
    if task == "seg":  # linear warm-up from lr * 1e-6, then poly (power 1) to 0 over the whole run
        cfg = resolve(SegConfig, dict(SEG_TINY, data=str(scenes), iters=100, warmup_iters=10, layer_decay=1.0))
    else:  # warm-up from lr * 1e-3, then x0.1 at 88.9% and 96.3% of the run (absolute iterations)
        cfg = resolve(DetConfig, dict(DET_TINY, data=str(scenes / "coco"), iters=100, warmup_iters=10, layer_decay=1.0))
    run = DenseRun(cfg, DistInfo())

    def lr_at(it: int) -> float:
        run.scheduler.step_update(it)
        return run.optimizer.param_groups[0]["lr"]

    base = cfg.lr
    if task == "seg":
        assert lr_at(0) == pytest.approx(base * 1e-6)
        assert lr_at(50) == pytest.approx(base * 0.5)
        assert lr_at(99) == pytest.approx(base * 0.01)
    else:
        assert lr_at(0) == pytest.approx(base * 1e-3)
        assert lr_at(50) == pytest.approx(base)
        assert lr_at(89) == pytest.approx(base * 0.1)
        assert lr_at(97) == pytest.approx(base * 0.01)


@pytest.mark.parametrize("task", ["seg", "det"])
def test_two_process_ddp_trains_and_evaluates_every_image_once(scenes, tmp_path, task):
    """torchrun with 2 gloo processes: training runs, and the metric reduced over both ranks equals the
    single-process evaluation of the same checkpoint."""
    import os
    import subprocess
    import sys

    out = tmp_path / task
    if task == "seg":
        args = ["seg-train", "--data", str(scenes), "--num-classes", "11", "--no-reduce-zero-label", "--decoder-channels", "16",
                "--eval-mode", "whole"]
        metric = "mIoU"
    else:
        args = ["det-train", "--data", str(scenes / "coco"), "--train-split", "train", "--val-split", "val", "--fpn-channels", "16",
                "--anchor-sizes", "8", "16", "32", "64", "128", "--detector-args", json.dumps(DET_TINY["detector_args"])]
        metric = "bbox_AP50"
    args += ["--output", str(out), "--iters", "2", "--model-args", json.dumps(TINY["model_args"]), "--crop-size", "64",
             "--batch-size", "2", "--workers", "0", "--no-progress", "--warmup-iters", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "visionmamba", *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert record["iter"] == 2 and record["val_images"] == 4
    from visionmamba.train.dense import evaluate_dense

    single = evaluate_dense(str(out / "last.pth"), device="cpu", progress=False)
    assert single[metric] == pytest.approx(record[metric], abs=1e-9)
