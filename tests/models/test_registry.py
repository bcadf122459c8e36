"""Variants registered with timm, official aliases and pretrained cfgs."""
import os
import subprocess
import sys

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

import visionmamba
from visionmamba.models.registry import OFFICIAL_ALIASES, RELEASED, VARIANTS


def test_all_names_registered_with_timm():
    registered = set(timm.list_models("vim_*"))
    assert set(VARIANTS) | set(OFFICIAL_ALIASES) <= registered
    assert len(OFFICIAL_ALIASES) == 5


@pytest.mark.parametrize("official, ours", sorted(OFFICIAL_ALIASES.items()))
def test_alias_builds_the_same_model(official, ours):
    torch.manual_seed(0)
    a = timm.create_model(official, depth=2)
    torch.manual_seed(0)
    b = visionmamba.create_model(ours, depth=2)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_pretrained_cfg_is_the_official_eval_transform(name):
    model = visionmamba.create_model(name, depth=1)
    cfg = model.pretrained_cfg
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert tuple(cfg["mean"]) == IMAGENET_DEFAULT_MEAN and tuple(cfg["std"]) == IMAGENET_DEFAULT_STD
    hub_id, filename, _ = RELEASED[name]
    assert cfg["hf_hub_id"] == hub_id and cfg["hf_hub_filename"] == filename
    data_cfg = resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**data_cfg)
    assert "Resize(size=256" in repr(transform) and "CenterCrop(size=(224, 224))" in repr(transform)


def test_import_needs_only_torch_and_timm():
    code = (
        "import sys\n"
        "for name in ('triton', 'sklearn', 'matplotlib', 'tqdm', 'onnx'):\n"
        "    sys.modules[name] = None  # makes 'import name' fail as if it were not installed\n"
        "import visionmamba, torch\n"
        "m = visionmamba.create_model('vim_tiny_patch16_224', depth=1)\n"
        "print(m(torch.randn(1, 3, 224, 224)).shape)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch.Size([1, 1000])" in proc.stdout


def test_models_cli_lists_variants():
    proc = subprocess.run([sys.executable, "-m", "visionmamba", "models", "--aliases"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    for name in VARIANTS:
        assert name in proc.stdout
    assert "vim_t_midclstok_76p1acc.pth" in proc.stdout
    assert OFFICIAL_ALIASES and all(alias in proc.stdout for alias in OFFICIAL_ALIASES)


def test_vim_custom_is_built_from_its_arguments_alone():
    torch.manual_seed(0)
    custom = visionmamba.create_model("vim_custom", embed_dim=32, depth=2, patch_size=8, stride=8, img_size=32)
    torch.manual_seed(0)
    plain = visionmamba.VisionMamba(embed_dim=32, depth=2, patch_size=8, stride=8, img_size=32)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in custom.state_dict().items())
    assert "vim_custom" in timm.list_models("vim_*") and "vim_custom" not in visionmamba.list_models()
    with pytest.raises(ValueError, match="no released weights"):
        visionmamba.create_model("vim_custom", pretrained=True)
    features = timm.create_model("vim_custom", features_only=True, depth=4, embed_dim=32, img_size=64)
    assert len(features(torch.randn(1, 3, 64, 64))) == 4  # one map per quarter of the depth by default


def test_default_out_indices_end_each_quarter():
    from visionmamba.models.registry import default_out_indices

    assert default_out_indices(24) == (5, 11, 17, 23)
    assert default_out_indices(12) == (2, 5, 8, 11)


FETCH = """
import sys, time, torch, visionmamba
start = time.perf_counter()
try:
    model = visionmamba.create_model("vim_tiny_patch16_224", pretrained=True)
    print("loaded", float(model.head.bias.sum()), flush=True)
except RuntimeError as err:
    print(f"refused after {time.perf_counter() - start:.1f} s: {err}", flush=True)
"""


def test_pretrained_offline_fails_fast_or_takes_the_cached_file(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    for offline in ({}, {"HF_HUB_OFFLINE": "1"}):
        run = subprocess.run([sys.executable, "-c", FETCH], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **env, **offline})
        out = run.stdout.strip()
        assert out.startswith("refused after"), run.stderr[-2000:]
        assert float(out.split()[2]) < 10 and "vim_t_midclstok_76p1acc.pth" in out and "checkpoint_path=" in out
    snapshot = tmp_path / "hub" / "models--hustvl--Vim-tiny-midclstok" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--hustvl--Vim-tiny-midclstok" / "refs").mkdir()
    (tmp_path / "hub" / "models--hustvl--Vim-tiny-midclstok" / "refs" / "main").write_text("0" * 40)
    model = visionmamba.create_model("vim_tiny_patch16_224")
    with torch.no_grad():
        model.head.bias.fill_(0.5)
    torch.save({"model": model.state_dict()}, snapshot / "vim_t_midclstok_76p1acc.pth")
    run = subprocess.run([sys.executable, "-c", FETCH], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert run.stdout.split() == ["loaded", "500.0"], run.stdout + run.stderr[-2000:]
