"""What a training run guarantees under misuse: nothing lost, nothing silently wrong, one-line errors."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import PLAIN, TINY, cli, make_folder
from visionmamba.models.weights import read_file


def train_args(data, out, *extra):
    return ["train", "--data", data, "--output", out, *TINY, *PLAIN, "--epochs", 1, "--batch-size", 4, *extra]


def test_rerunning_into_a_used_folder_needs_resume_or_overwrite(tmp_path):
    data = make_folder(tmp_path / "data", per_class=2, splits=("train",))
    run = tmp_path / "run"
    cli(*train_args(data, run))
    before = (run / "last.pth").read_bytes()
    proc = cli(*train_args(data, run), check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "--resume" in proc.stderr
    assert "--overwrite" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (run / "last.pth").read_bytes() == before  # untouched
    cli(*train_args(data, run, "--overwrite", "--seed", 1))
    assert read_file(run / "last.pth")["config"]["seed"] == 1 and len((run / "log.jsonl").read_text().splitlines()) == 1


def test_a_second_run_in_the_same_folder_fails_at_once(tmp_path):
    data = make_folder(tmp_path / "data", per_class=4, splits=("train",))
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "visionmamba", *map(str, train_args(data, run)), "--epochs", "50"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (run / ".visionmamba.lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        proc = cli(*train_args(data, run), "--resume", check=False)
        assert proc.returncode == 2 and "in use by another run" in proc.stderr, proc.stderr
    finally:
        first.kill()
        first.wait()
    cli(*train_args(data, run, "--overwrite"))  # the killed run left no stale lock


def test_resume_refuses_another_setup(tmp_path):
    data = make_folder(tmp_path / "data", per_class=2, splits=("train",))
    run = tmp_path / "run"
    cli(*train_args(data, run), "--epochs", 2)
    renamed = tmp_path / "renamed"
    shutil.copytree(data, renamed)
    os.rename(renamed / "train" / "a", renamed / "train" / "z")  # same count, another order: swapped labels
    for args, expected in (
        (train_args(renamed, run, "--epochs", 3, "--resume"), "classes"),
        (train_args(data, run, "--epochs", 3, "--resume", "--batch-size", 2), "batch_size 4 in the checkpoint, 2 now"),
        (["train", "--data", data, "--output", run, *TINY[:1], json.dumps({"depth": 3, "embed_dim": 32, "patch_size": 8,
          "stride": 8}), *TINY[2:], *PLAIN, "--epochs", 3, "--batch-size", 4, "--resume"], "model_args"),
    ):
        proc = cli(*args, check=False)
        assert proc.returncode == 2 and "cannot resume" in proc.stderr and expected in proc.stderr, proc.stderr
    assert read_file(run / "last.pth")["epoch"] == 2


@pytest.mark.parametrize("flags, message", [
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--model", "vim_huge"], "unknown Vim model 'vim_huge'"),
    (["--model-args", '{"dept": 2}'], "unknown model argument(s) ['dept']"),
    (["--model-args", '{"img_size": 64}'], "are set by the command itself"),
    (["--resume", "--overwrite"], "pick one"),
])
def test_bad_options_are_one_line_errors(tmp_path, flags, message):
    data = make_folder(tmp_path / "data", per_class=1, splits=("train",))
    proc = cli(*train_args(data, tmp_path / "run"), *flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "last.pth").exists()


def test_cuda_without_a_gpu_and_outputs_in_the_way(tmp_path):
    data = make_folder(tmp_path / "data", per_class=1, splits=("train",))
    if not torch.cuda.is_available():
        proc = cli(*train_args(data, tmp_path / "run"), "--device", "cuda", check=False)
        assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
    (tmp_path / "file").write_text("not a folder")
    proc = cli(*train_args(data, tmp_path / "file" / "run"), check=False)
    assert proc.returncode == 2 and "is a file" in proc.stderr and "Traceback" not in proc.stderr


def test_a_one_class_data_set_is_refused(tmp_path):
    one = make_folder(tmp_path / "one", classes=("only",), per_class=4, splits=("train",))
    proc = cli(*train_args(one, tmp_path / "r1"), check=False)
    assert proc.returncode == 2 and "1 class folder(s) ['only']" in proc.stderr and "at least 2" in proc.stderr


def test_every_step_skipped_exits_non_zero(tmp_path, monkeypatch):
    from visionmamba.train import classification
    from visionmamba.train.config import TrainConfig, resolve
    from visionmamba.train.trainer import NonFiniteLossError

    data = make_folder(tmp_path / "data", per_class=2, splits=("train",))
    overrides = dict(data=str(data), output=str(tmp_path / "run"), model_args={"depth": 1, "embed_dim": 16, "patch_size": 8,
                     "stride": 8}, img_size=16, epochs=1, batch_size=2, workers=0, progress=False, skip_nonfinite=True,
                     mixup=0.0, cutmix=0.0)
    monkeypatch.setattr(classification.ClassificationTrainer, "loss_is_usable", lambda self, loss, where: False)
    with pytest.raises(NonFiniteLossError, match="every one of the run's 3 step"):
        classification.train(resolve(TrainConfig, overrides, use_preset=False))


def test_a_run_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    from visionmamba.train import trainer
    from visionmamba.train.classification import train
    from visionmamba.train.config import TrainConfig, resolve

    data = make_folder(tmp_path / "data", per_class=2, splits=("train",))
    monkeypatch.setattr(trainer, "available_memory_mb", lambda device: 50.0)
    cfg = resolve(TrainConfig, dict(data=str(data), output=str(tmp_path / "run"), batch_size=4, img_size=224, workers=0,
                                   progress=False), use_preset=False)
    with pytest.raises(ValueError, match="needs about .* GB per process but only 0.0 GB are free.*lower --batch-size"):
        train(cfg)


def test_ctrl_c_says_how_to_resume(tmp_path):
    data = make_folder(tmp_path / "data", per_class=6, splits=("train",))
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "visionmamba", *map(str, train_args(data, run)), "--epochs", "100000", "--batch-size", "2",
         "--checkpoint-every", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while not (run / "last.pth").exists() and time.time() < deadline:
        time.sleep(0.05)
    # A signal that lands inside a C call that checks for signals itself can be lost there (seen in loaded runs,
    # where a child of 50 epochs then trained to the end): press Ctrl-C again, as a user would, on a run that
    # cannot end by itself in the meantime
    for _ in range(40):
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=3)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == 130 and "interrupted" in err and "--resume" in err and "Traceback" not in err, err
