"""Loading official containers, our formats and safetensors; conversion; clear errors."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import visionmamba
from helpers import tiny_vim
from visionmamba import load_checkpoint


def official_container(model_state, ema_state):
    """What hustvl/Vim main.py writes: weights, EMA, optimizer, scheduler, a pickled Namespace."""
    return {
        "model": model_state,
        "model_ema": ema_state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        "lr_scheduler": {"last_epoch": 299},
        "epoch": 299,
        "scaler": "none",
        "args": argparse.Namespace(model="vim_tiny", lr=5e-4, input_size=224, data_path="/imagenet", no_amp=True),
    }


@pytest.fixture()
def states():
    torch.manual_seed(1)
    raw, ema = tiny_vim().state_dict(), tiny_vim().state_dict()
    return raw, ema


def assert_loaded(model, state):
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_official_pth_round_trip_raw_and_ema(tmp_path, states):
    raw, ema = states
    path = tmp_path / "vim_t_midclstok_76p1acc.pth"
    torch.save(official_container(raw, ema), path)
    with pytest.raises(Exception):  # plain weights_only loading refuses the pickled Namespace ...
        torch.load(path, weights_only=True)
    model = tiny_vim()
    assert load_checkpoint(model, path) == {"missing": [], "unexpected": []}  # ... ours allow-lists it
    assert_loaded(model, raw)
    load_checkpoint(model, path, use_ema=True)
    assert_loaded(model, ema)


def test_bare_ddp_and_safetensors(tmp_path, states):
    raw, _ = states
    torch.save({f"module.{k}": v for k, v in raw.items()}, tmp_path / "ddp.pth")
    torch.save(raw, tmp_path / "bare.pth")
    save_file(raw, str(tmp_path / "w.safetensors"))
    for name in ("ddp.pth", "bare.pth", "w.safetensors"):
        model = tiny_vim()
        load_checkpoint(model, tmp_path / name)
        assert_loaded(model, raw)
    with pytest.raises(ValueError, match="no EMA weights"):
        load_checkpoint(tiny_vim(), tmp_path / "bare.pth", use_ema=True)


def test_strict_error_lists_missing_unexpected_and_mis_shaped(tmp_path, states):
    raw, _ = states
    broken = dict(raw)
    del broken["layers.1.mixer.D_b"]
    broken["layers.1.mixer.extra"] = torch.zeros(1)
    broken["head.weight"] = torch.zeros(7, 32)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as info:
        load_checkpoint(tiny_vim(), tmp_path / "broken.pth")
    message = str(info.value)
    assert "missing (1): layers.1.mixer.D_b" in message
    assert "unexpected (1): layers.1.mixer.extra" in message
    assert "mis-shaped (1): head.weight: checkpoint (7, 32) vs model (10, 32)" in message
    report = load_checkpoint(tiny_vim(), tmp_path / "broken.pth", strict=False)
    assert set(report["missing"]) == {"layers.1.mixer.D_b", "head.weight"}
    assert report["unexpected"] == ["layers.1.mixer.extra"]


def test_pos_embed_resampled_when_resolutions_differ(tmp_path, states):
    raw, _ = states
    torch.save({"model": raw}, tmp_path / "ours.pth")
    model = tiny_vim(img_size=48)  # grid 6x6 instead of 4x4
    load_checkpoint(model, tmp_path / "ours.pth")
    assert model.pos_embed.shape == (1, 37, 32)
    assert torch.equal(model.pos_embed[:, 18], raw["pos_embed"][:, 8])


def test_features_model_drops_the_head_on_purpose(tmp_path, states):
    raw, _ = states
    torch.save(raw, tmp_path / "bare.pth")
    model = tiny_vim(num_classes=0)
    load_checkpoint(model, tmp_path / "bare.pth")
    assert "head.weight" not in model.state_dict()


def test_unsafe_pickles_are_refused(tmp_path):
    torch.save({"model": {}, "evil": Path("/etc/passwd")}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="cannot read checkpoint .* safely"):
        load_checkpoint(tiny_vim(), tmp_path / "evil.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tiny_vim(), tmp_path / "absent.pth")


def test_damaged_empty_and_folder_checkpoints_name_the_path(tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    with pytest.raises(ValueError, match=r"cannot read the safetensors file '.*cut.safetensors'.*damaged"):
        load_checkpoint(tiny_vim(), tmp_path / "cut.safetensors")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_checkpoint(tiny_vim(), tmp_path / "empty.pth")
    (tmp_path / "dir.pth").mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder, not a file"):
        load_checkpoint(tiny_vim(), tmp_path / "dir.pth")


def test_create_model_with_checkpoint_path(tmp_path):
    torch.manual_seed(3)
    source = visionmamba.create_model("vim_tiny_patch16_224", depth=2)
    torch.save(official_container(source.state_dict(), source.state_dict()), tmp_path / "c.pth")
    model = visionmamba.create_model("vim_tiny_patch16_224", depth=2, checkpoint_path=tmp_path / "c.pth", use_ema=True)
    assert_loaded(model, source.state_dict())
    with pytest.raises(ValueError, match="unknown Vim model"):
        visionmamba.create_model("vim_huge")
    with pytest.raises(ValueError, match="use_ema"):
        visionmamba.create_model("vim_tiny_patch16_224", use_ema=True)


def _fake_hub_cache(root: Path, repo: str, filename: str, payload) -> None:
    """Lay out a Hugging Face cache entry as hf_hub_download leaves it after a download."""
    folder = root / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    torch.save(payload, folder / "snapshots" / commit / filename)


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_pretrained_offline_error_names_file_and_alternative(tmp_path):
    proc = _run(
        "import visionmamba; visionmamba.create_model('vim_tiny_patch16_224', pretrained=True)",
        {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "HF_HOME": str(tmp_path)},
    )
    assert proc.returncode != 0
    assert "vim_t_midclstok_76p1acc.pth" in proc.stderr and "hustvl/Vim-tiny-midclstok" in proc.stderr
    assert "checkpoint_path=" in proc.stderr


def test_pretrained_goes_through_the_hub_cache(tmp_path):
    torch.manual_seed(5)
    source = visionmamba.create_model("vim_tiny_patch16_224")
    _fake_hub_cache(tmp_path, "hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth",
                    official_container(source.state_dict(), source.state_dict()))
    torch.save(source.state_dict(), tmp_path / "expected.pth")
    code = (
        "import torch, visionmamba\n"
        f"ref = torch.load({str(tmp_path / 'expected.pth')!r})\n"
        "m = visionmamba.create_model('vim_tiny_patch16_224', pretrained=True)\n"
        "assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())\n"
        "m = visionmamba.create_model('vim_tiny_patch16_224', pretrained=True, num_classes=10)\n"
        "assert m.head.weight.shape == (10, 192) and torch.equal(m.pos_embed, ref['pos_embed'])\n"
        "print('ok')\n"
    )
    proc = _run(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "HF_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def test_convert_cli_writes_safetensors(tmp_path, states):
    raw, ema = states
    torch.save(official_container(raw, ema), tmp_path / "official.pth")
    out = tmp_path / "ema.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "visionmamba", "convert", str(tmp_path / "official.pth"), str(out), "--ema"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "EMA weights" in proc.stdout
    converted = load_file(str(out))
    assert set(converted) == set(ema) and all(torch.equal(converted[k], ema[k]) for k in ema)
    proc = subprocess.run(
        [sys.executable, "-m", "visionmamba", "convert", str(tmp_path / "missing.pth"), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr
