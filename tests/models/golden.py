"""The seeded weight rule of the golden dev fixtures (``tests/fixtures/dev_*_io.safetensors``).

The fixtures hold outputs and gradients of the official hustvl/Vim code; their weights are not stored
but drawn by this rule (``../shared/golden/README.md``), so a fresh clone can check parity.
"""
import math
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file

DATA = Path(__file__).parents[1] / "fixtures"
CASES = {"dev_ti224": DATA / "dev_ti224_io.safetensors", "dev_s224": DATA / "dev_s224_io.safetensors"}


def fixture_config(case: str) -> Tuple[str, int, int, int, int, int, int]:
    """(model name, dim, stride, img, weight seed, input seed, batch) from the file's metadata."""
    import json

    with safe_open(str(CASES[case]), "pt") as fh:
        meta = json.loads(fh.metadata()["meta"])
    name, _, dim, stride, img, wseed, iseed, batch = meta["tuple"]
    return name, dim, stride, img, wseed, iseed, batch


def rule_weights(shapes: Dict[str, torch.Size], seed: int) -> Dict[str, torch.Tensor]:
    """Draw every tensor of the state dict in sorted key order from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        r = torch.randn(shape, generator=g)
        leaf = key.rsplit(".", 2)
        if key.endswith("A_log") or key.endswith("A_b_log"):
            out[key] = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)) + 0.3 * r
        elif key.endswith("dt_proj.bias") or key.endswith("dt_proj_b.bias"):
            dt = 0.001 * torch.exp(math.log(100) * torch.sigmoid(r))
            out[key] = dt + torch.log(-torch.expm1(-dt))
        elif key.endswith(".D") or key.endswith(".D_b") or key.endswith("norm.weight") or key == "norm_f.weight":
            out[key] = 1 + 0.1 * r
        elif ".conv1d" in key:
            out[key] = (0.3 if key.endswith("weight") else 0.1) * r
        elif any(key.endswith(f"{m}.weight") for m in ("dt_proj", "dt_proj_b", "x_proj", "x_proj_b", "in_proj")):
            out[key] = r / math.sqrt(shape[1])
        elif key.endswith("out_proj.weight"):
            out[key] = r / math.sqrt(shape[1] * 24)
        elif key == "patch_embed.proj.weight":
            out[key] = r / math.sqrt(3 * 16 * 16)
        else:
            assert leaf[0] in ("cls_token", "pos_embed", "patch_embed") or key.startswith("head."), key
            out[key] = 0.02 * r
    return out


def load_case(case: str, **model_kwargs):
    """(model with the rule's weights, input batch, reference tensors) of one dev fixture."""
    import visionmamba

    name, _, _, img, wseed, iseed, batch = fixture_config(case)
    model = visionmamba.create_model(name, drop_path_rate=0.0, **model_kwargs)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(rule_weights(shapes, wseed), strict=True)
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(iseed))
    return model, x, load_file(str(CASES[case]))
