"""Dense-prediction training: resume, CLI, errors, schedules, DDP."""
import json

import pytest
import torch

from helpers import DET_TINY, SEG_TINY, TINY_BACKBONE
from visionmamba import cli
from visionmamba.data.ade20k import SegmentationFolder
from visionmamba.data.ade20k import train_transform as seg_train_transform
from visionmamba.data.coco import CocoInstances
from visionmamba.data.coco import train_transform as det_train_transform
from visionmamba.models.upernet import VimUperNet
from visionmamba.train.config import DetConfig, SegConfig, resolve
from visionmamba.train.dense import DenseTrainer, load_dense, train_dense
from visionmamba.train.distributed import DistInfo


def test_resume_after_interruption_equals_an_uninterrupted_run(scenes, tmp_path, monkeypatch):
    straight = resolve(SegConfig, dict(SEG_TINY, data=str(scenes), output=str(tmp_path / "a"), iters=4))
    train_dense(straight)

    interrupted = resolve(SegConfig, dict(SEG_TINY, data=str(scenes), output=str(tmp_path / "b"), iters=4, checkpoint_every=2))
    real_step = DenseTrainer.train_step

    def dying_step(self, batch):
        if self.iteration == 3:
            raise KeyboardInterrupt("killed")
        real_step(self, batch)

    monkeypatch.setattr(DenseTrainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_dense(interrupted)
    monkeypatch.setattr(DenseTrainer, "train_step", real_step)
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
    cfg.skip_nonfinite, cfg.overwrite = True, True
    with pytest.raises(NonFiniteLossError, match="every one of the run's 2 step"):  # nothing was ever applied
        train_dense(cfg)
    assert json.loads((tmp_path / "nan" / "log.jsonl").read_text().splitlines()[-1])["skipped_steps"] == 2


@pytest.mark.parametrize("task", ["seg", "det"])
def test_learning_rate_schedules_follow_the_official_shapes(scenes, task):
    if task == "seg":  # linear warm-up from lr * 1e-6, then poly (power 1) to 0 over the whole run
        cfg = resolve(SegConfig, dict(SEG_TINY, data=str(scenes), iters=100, warmup_iters=10, layer_decay=1.0))
    else:  # warm-up from lr * 1e-3, then x0.1 at 88.9% and 96.3% of the run (absolute iterations)
        cfg = resolve(DetConfig, dict(DET_TINY, data=str(scenes / "coco"), iters=100, warmup_iters=10, layer_decay=1.0))
    run = DenseTrainer(cfg, DistInfo())

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
    args += ["--output", str(out), "--iters", "2", "--model-args", json.dumps(TINY_BACKBONE["model_args"]), "--crop-size", "64",
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
