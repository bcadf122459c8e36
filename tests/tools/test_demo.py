"""The demos' wiring on tiny budgets."""
import functools

import torch

from visionmamba.data.digits import write_scenes
from visionmamba.tools import demo


def test_dense_demo_runs_end_to_end_on_a_small_budget(tmp_path, monkeypatch, capsys):
    """The demo's wiring (scenes, pre-training, both fine-tunings, evaluation) with tiny budgets."""
    monkeypatch.setattr(demo, "write_scenes", functools.partial(write_scenes, train=8, val=4))
    monkeypatch.setitem(demo.PRETRAIN, "epochs", 1)
    figures = demo.run_dense_demo(str(tmp_path / "demo"), iters=2)
    assert set(figures) == {"mIoU", "box_AP50", "box_AP", "mask_AP50"}
    assert all(0.0 <= v <= 1.0 for v in figures.values())
    text = capsys.readouterr().out
    assert "segmentation demo: mIoU" in text and "detection demo: box mAP@0.5" in text
    ckpt = torch.load(tmp_path / "demo" / "seg" / "last.pth", weights_only=False)
    assert ckpt["config"]["finetune"] == str(tmp_path / "demo" / "pretrain" / "last.pth")


def test_the_classification_demo_trains_and_evaluates_in_one_epoch(tmp_path, capsys):
    """``make demo``'s code for one epoch: the bundled digits written, a run trained and tested."""
    accuracy = demo.run_demo(str(tmp_path / "demo"), epochs=1)
    out = capsys.readouterr().out
    assert 0.0 <= accuracy <= 1.0 and f"demo test accuracy: {accuracy:.3f}" in out
    assert "1437 train / 360 test" in out and (tmp_path / "demo" / "run" / "curves.png").is_file()
