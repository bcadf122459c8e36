"""Training and evaluation end to end on tiny generated image folders (CPU)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import visionmamba
from helpers import PLAIN, TINY, cli, make_folder, tiny_vim
from visionmamba.data.folders import eval_transform
from visionmamba.models.weights import read_file
from visionmamba.train.classification import evaluate_checkpoint
from visionmamba.train.config import EvalConfig, TrainConfig, resolve


def log_of(run: Path):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_records(tmp_path):
    data = make_folder(tmp_path / "data", per_class=2)
    run = tmp_path / "run"
    cli("train", "--data", data, "--output", run, *TINY, *PLAIN, "--epochs", 3, "--batch-size", 6, "--lr", 3e-3)
    records = log_of(run)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert {"lr", "top1", "top5", "val_loss", "img_per_s", "peak_mem_mb"} <= set(records[0])
    assert (run / "curves.png").stat().st_size > 1000 and (run / "best.pth").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 3 and config["model_args"]["depth"] == 2
    ckpt = read_file(run / "last.pth")
    assert ckpt["epoch"] == 3 and ckpt["classes"] == ["a", "b", "c"] and ckpt["model_name"] == "vim_tiny_patch16_224"
    assert {"optimizer", "scheduler", "rng", "versions", "model_ema", "scaler", "data_config"} <= set(ckpt)


def test_presets_and_config_resolution():
    tiny = resolve(TrainConfig, {"data": "x", "model": "vim_tiny_patch16_224"})
    assert (tiny.batch_size, tiny.lr, tiny.weight_decay, tiny.drop_path) == (128, 5e-4, 0.1, 0.0)
    ft = resolve(TrainConfig, {"data": "x", "model": "vim_small_patch16_stride8_224", "epochs": 3})
    assert (ft.lr, ft.weight_decay, ft.min_lr, ft.epochs) == (5e-6, 1e-8, 1e-5, 3)
    plain = resolve(TrainConfig, {"data": "x", "model": "vim_tiny_patch16_224"}, use_preset=False)
    assert plain.weight_decay == 0.05 and plain.auto_augment == "rand-m9-mstd0.5-inc1" and plain.reprob == 0.25
    with pytest.raises(ValueError, match="precision"):
        resolve(TrainConfig, {"data": "x", "precision": "fp8"})
    with pytest.raises(ValueError, match="--data"):
        resolve(TrainConfig, {})


def test_weight_decay_groups_follow_the_official_recipe():
    from timm.optim import create_optimizer_v2

    model = tiny_vim()
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "layers.0.mixer.A_log" in decayed and "layers.0.mixer.A_b_log" in decayed  # as officially
    assert not decayed & {"pos_embed", "cls_token", "layers.0.mixer.D", "layers.0.norm.weight"}


RECIPE = [*TINY, "--epochs", 3, "--batch-size", 4, "--checkpoint-every", 2, "--workers", 0, "--no-progress",
          "--no-preset", "--drop-path", 0.1, "--model-ema-decay", 0.9, "--lr", 1e-3, "--warmup-epochs", 1]


def test_sigkill_and_resume_ends_with_identical_weights(tmp_path):
    """Full recipe (RandAugment, erasing, mixup/cutmix, drop path, EMA): killed mid-epoch, resumed, same result."""
    data = make_folder(tmp_path / "data", per_class=6, splits=("train",))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cli("train", "--data", data, "--output", straight, *RECIPE)

    proc = subprocess.Popen(
        [sys.executable, "-m", "visionmamba", "train", "--data", str(data), "--output", str(killed), *map(str, RECIPE)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 300
    while not (killed / "last.pth").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = read_file(killed / "last.pth")
    assert at_kill["epoch"] < 3, "the run finished before it could be killed"
    cli("train", "--data", data, "--output", killed, *RECIPE, "--resume")  # last.pth is never half-written

    a, b = read_file(straight / "last.pth"), read_file(killed / "last.pth")
    assert a["global_step"] == b["global_step"] == 3 * 4
    for part in ("model", "model_ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key} differs after resume"
    assert [r["train_loss"] for r in log_of(straight)] == pytest.approx([r["train_loss"] for r in log_of(killed)], rel=1e-6)


def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tmp_path):
    data = make_folder(tmp_path / "data", per_class=4)
    common = ["--data", data, *TINY, *PLAIN, "--epochs", 2, "--lr", 3e-3, "--no-repeated-aug"]
    cli("train", "--output", tmp_path / "single", "--batch-size", 4, *common)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "visionmamba",
         "train", "--output", str(tmp_path / "ddp"), "--batch-size", "2", *map(str, common)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, ddp = read_file(tmp_path / "single" / "last.pth"), read_file(tmp_path / "ddp" / "last.pth")
    for key, value in single["model"].items():
        assert torch.allclose(value, ddp["model"][key], atol=1e-5, rtol=1e-4), key
    s_log, d_log = log_of(tmp_path / "single"), log_of(tmp_path / "ddp")
    assert [r["top1"] for r in s_log] == [r["top1"] for r in d_log]  # each val image counted once over both ranks
    assert [r["train_loss"] for r in s_log] == pytest.approx([r["train_loss"] for r in d_log], rel=1e-4)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_torchrun_restarts_a_killed_worker_and_the_run_resumes(tmp_path):
    """The documented fault-tolerant command (c10d rendezvous, --max-restarts, --resume in the command) on two
    local processes: one worker is killed mid-run; torchrun restarts both, which continue from last.pth."""
    data = make_folder(tmp_path / "data", per_class=4, splits=("train",))
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--max-restarts", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}", "--rdzv-id", "test", "-m",
         "visionmamba", "train", "--data", str(data), "--output", str(run), *map(str, TINY), *map(str, PLAIN),
         "--epochs", "6", "--batch-size", "2", "--checkpoint-every", "1", "--no-repeated-aug",
         "--resume"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
    )
    deadline = time.time() + 300
    while not (run / "last.pth").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    at_kill = read_file(run / "last.pth")["global_step"]
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "failed (exitcode: -9)" in err and at_kill < 6 * 3  # killed mid-run; the agent restarted the group
    epochs = [r["epoch"] for r in log_of(run)]
    assert epochs == sorted(set(epochs)) and epochs[-1] == 5  # every epoch once, the last one reached
    assert read_file(run / "last.pth")["global_step"] == 6 * 3  # 12 images, 2 per process and step: 3 steps an epoch


def test_eval_matches_a_hand_computed_accuracy(tmp_path):
    data = make_folder(tmp_path / "data", per_class=3, splits=("val",), classes=("x", "y"))
    torch.manual_seed(0)
    model = visionmamba.create_model("vim_tiny_patch16_224", num_classes=2, img_size=32, depth=2, embed_dim=32,
                                     patch_size=8, stride=8).eval()
    dcfg = dict(input_size=(3, 32, 32), interpolation="bicubic", crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    torch.save({"model": model.state_dict(), "model_name": "vim_tiny_patch16_224", "classes": ["x", "y"], "data_config": dcfg,
                "model_args": dict(num_classes=2, img_size=32, depth=2, embed_dim=32, patch_size=8, stride=8)}, tmp_path / "m.pth")
    transform = eval_transform(dcfg)
    correct = total = 0
    for label, name in enumerate(["x", "y"]):
        for path in sorted((data / "val" / name).iterdir()):
            with torch.no_grad():
                pred = model(transform(Image.open(path).convert("RGB"))[None]).argmax().item()
            correct += pred == label
            total += 1
    metrics = evaluate_checkpoint(EvalConfig(data=str(data / "val"), checkpoint=str(tmp_path / "m.pth"), workers=0, progress=False))
    assert metrics["count"] == total == 6
    assert metrics["top1"] == pytest.approx(100.0 * correct / total)
    assert metrics["top5"] == 100.0  # two classes
    out = cli("eval", "--data", data / "val", "--checkpoint", tmp_path / "m.pth", "--workers", 0, "--no-progress").stdout
    assert f"top-1 {100.0 * correct / total:.2f}%" in out


def test_official_pth_evaluates_on_an_imagenet_style_folder(tmp_path):
    import argparse

    data = make_folder(tmp_path / "val", per_class=1, splits=(".",), classes=("n01440764", "n01443537"), size=40)
    torch.manual_seed(0)
    model = visionmamba.create_model("vim_tiny_patch16_224")
    torch.save({"model": model.state_dict(), "model_ema": model.state_dict(), "args": argparse.Namespace(lr=5e-4)},
               tmp_path / "vim_t_midclstok_76p1acc.pth")
    for ema in ([], ["--ema"]):
        out = cli("eval", "--data", data, "--checkpoint", tmp_path / "vim_t_midclstok_76p1acc.pth",
                  "--model", "vim_tiny_patch16_224", "--workers", 0, "--no-progress", *ema).stdout
        assert "(2 images)" in out and "top-1" in out
    proc = cli("eval", "--data", data, "--checkpoint", tmp_path / "vim_t_midclstok_76p1acc.pth", "--workers", 0, check=False)
    assert proc.returncode == 2 and "--model" in proc.stderr


def test_corrupt_images_error_or_skip_with_a_count(tmp_path):
    data = make_folder(tmp_path / "data", per_class=2)
    (data / "train" / "b" / "broken.png").write_bytes(b"not an image at all")
    args = ["train", "--data", data, *TINY, *PLAIN, "--epochs", 1, "--batch-size", 7]
    proc = cli(*args, "--output", tmp_path / "r1", check=False)
    assert proc.returncode == 2 and "broken.png" in proc.stderr and "--skip-corrupt" in proc.stderr
    cli(*args, "--output", tmp_path / "r2", "--skip-corrupt")
    assert log_of(tmp_path / "r2")[0]["skipped_images"] == 1


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = make_folder(tmp_path / "data", per_class=4, splits=("train",))
    args = ["train", "--data", data, *TINY, *PLAIN, "--epochs", 2, "--batch-size", 3, "--lr", 1e30, "--checkpoint-every", 1]
    proc = cli(*args, "--output", tmp_path / "stop", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite loss" in proc.stderr and "epoch 0, step" in proc.stderr and "last good checkpoint" in proc.stderr
    kept = read_file(tmp_path / "stop" / "last.pth")
    assert all(torch.isfinite(v).all() for v in kept["model"].values())
    cli(*args, "--output", tmp_path / "skip", "--skip-nonfinite")
    assert sum(r["skipped_steps"] for r in log_of(tmp_path / "skip")) > 0


def test_finetune_resamples_positions_and_replaces_the_head(tmp_path):
    data = make_folder(tmp_path / "data", per_class=2, splits=("train",))
    torch.manual_seed(0)
    source = visionmamba.create_model("vim_tiny_patch16_224", depth=2, embed_dim=32, patch_size=8, stride=8, img_size=32)
    torch.save({"model": source.state_dict()}, tmp_path / "pre.pth")
    run = tmp_path / "ft"
    cli("train", "--data", data, "--output", run, *PLAIN, "--epochs", 1, "--batch-size", 6, "--lr", 0,
        "--model-args", json.dumps({"depth": 2, "embed_dim": 32, "patch_size": 8, "stride": 4}), "--img-size", "32",
        "--finetune", tmp_path / "pre.pth", "--no-model-ema")
    tuned = read_file(run / "last.pth")["model"]
    assert tuned["pos_embed"].shape == (1, 7 * 7 + 1, 32) and tuned["head.weight"].shape == (3, 32)
    assert torch.equal(tuned["pos_embed"][:, 24], source.state_dict()["pos_embed"][:, 8])  # class row kept
    assert torch.equal(tuned["layers.1.mixer.A_log"], source.state_dict()["layers.1.mixer.A_log"])


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    data = make_folder(tmp_path / "data", per_class=4, splits=("train",))
    common = ["--data", data, *TINY, *PLAIN, "--epochs", 2, "--lr", 3e-3]
    cli("train", "--output", tmp_path / "big", "--batch-size", 4, *common)
    cli("train", "--output", tmp_path / "accum", "--batch-size", 2, "--accum-steps", 2, *common)
    big, accum = read_file(tmp_path / "big" / "last.pth"), read_file(tmp_path / "accum" / "last.pth")
    assert big["global_step"] == accum["global_step"] == 2 * 3  # 12 images, global batch 4
    for key, value in big["model"].items():
        assert torch.allclose(value, accum["model"][key], atol=1e-5, rtol=1e-4), key


def test_a_short_run_with_the_default_recipe_trains_through_a_zero_bit_posterize(tmp_path, monkeypatch):
    """Every recipe default (RandAugment rand-m9-mstd0.5-inc1, erasing, mixup/cutmix, EMA, the vim_tiny preset)
    but the model's size, batch and epochs; seed 6 makes image 0..11's draws posterize to 0 bits once."""
    from visionmamba.data import augment
    from visionmamba.train.classification import train

    zero_bits, safe = [], augment.posterize

    def counting(img, bits, **kwargs):
        zero_bits.extend([bits] if bits <= 0 else [])
        return safe(img, bits, **kwargs)

    monkeypatch.setattr(augment, "posterize", counting)
    data = make_folder(tmp_path / "data", per_class=4, splits=("train",))
    cfg = resolve(TrainConfig, dict(data=str(data), output=str(tmp_path / "run"), img_size=32, epochs=1, batch_size=4,
                                    workers=0, progress=False, seed=6,
                                    model_args={"depth": 2, "embed_dim": 32, "patch_size": 8, "stride": 8}))
    assert cfg.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.mixup == 0.8 and cfg.model_ema and cfg.reprob == 0.25
    record = train(cfg)
    assert zero_bits, "the seeded run no longer reaches the 0-bit case"
    assert record["epoch"] == 0 and record["train_loss"] > 0


def test_small_runs_adapt_the_schedule_and_say_so(capsys):
    tiny = resolve(TrainConfig, {"data": "x", "epochs": 1})  # the vim_tiny preset: lr 5e-4
    schedule = tiny.schedule(global_batch=8)
    assert schedule.lr == pytest.approx(5e-4 * 8 / 512) and schedule.lr >= schedule.min_lr >= schedule.warmup_lr
    assert schedule.min_lr == pytest.approx(1e-5 * 8 / 512) and schedule.warmup_epochs == 0
    assert len(schedule.notes) == 2 and "below --min-lr" in schedule.notes[0] and "warm-up cut" in schedule.notes[1]
    official = resolve(TrainConfig, {"data": "x"}).schedule(global_batch=1024)  # 8 GPUs x 128: the recipe untouched
    assert (official.lr, official.min_lr, official.warmup_lr, official.warmup_epochs, official.notes) == (1e-3, 1e-5, 1e-6, 5, ())
    long = resolve(TrainConfig, {"data": "x", "epochs": 40, "warmup_epochs": 50}).schedule(global_batch=1024)
    assert long.warmup_epochs == 4


def test_train_help_shows_the_preset_values():
    from visionmamba.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "(default: 64)" in text and "vim_tiny_patch16_224 128" in " ".join(text.split())


def test_resume_reads_the_runs_own_options(tmp_path):
    data = make_folder(tmp_path / "data", per_class=2, splits=("train",))
    run = tmp_path / "run"
    cli("train", "--data", data, "--output", run, *TINY, *PLAIN, "--epochs", 1, "--batch-size", 3, "--lr", 1e-3)
    proc = cli("train", "--output", run, "--resume", "--epochs", 2, "--workers", 0)  # nothing else given
    assert json.loads(proc.stdout.splitlines()[-1])["epoch"] == 1
    config = json.loads((run / "config.json").read_text())
    assert config["model_args"]["depth"] == 2 and config["batch_size"] == 3 and config["lr"] == 1e-3
    assert config["epochs"] == 2 and config["auto_augment"] == ""
    moved = tmp_path / "moved.pth"
    (run / "last.pth").rename(moved)
    cli("train", "--resume", moved, "--output", tmp_path / "elsewhere", "--epochs", 3, "--workers", 0)
    assert read_file(tmp_path / "elsewhere" / "last.pth")["epoch"] == 3


def test_data_may_be_a_class_folder_in_train_and_a_split_root_in_eval(tmp_path):
    data = make_folder(tmp_path / "data", per_class=2)
    proc = cli("train", "--data", data / "train", "--output", tmp_path / "r", *TINY, *PLAIN, "--epochs", 1, "--batch-size", 3)
    assert "no train/ folder: training on its 3 class folders" in proc.stderr
    assert "top1" not in json.loads(proc.stdout.splitlines()[-1])
    proc = cli("eval", "--data", data, "--checkpoint", tmp_path / "r" / "last.pth", "--workers", 0, "--no-progress")
    assert "(6 images)" in proc.stdout and "the validation split of" in proc.stderr
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "train" / "x.png").write_bytes((data / "train" / "a" / "0.png").read_bytes())
    proc = cli("train", "--data", tmp_path / "flat", "--output", tmp_path / "r2", *TINY, *PLAIN, check=False)
    assert proc.returncode == 2 and "has no class folders" in proc.stderr and "DATA/train/<class>/" in proc.stderr
    assert "Traceback" not in proc.stderr
