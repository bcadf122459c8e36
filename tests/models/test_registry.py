"""Variants registered with timm, official aliases and pretrained cfgs."""
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
