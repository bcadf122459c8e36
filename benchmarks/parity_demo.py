"""Build Vim-Ti and Vim-S with the golden fixtures' seeded weights, compare with the official outputs,
and time the Vim-Ti forward on this CPU. Needs no download: the fixtures ship in tests/data."""
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))
from golden import CASES, load_case  # noqa: E402

import visionmamba  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    print(f"visionmamba {visionmamba.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    for case in sorted(CASES):
        model, x, ref = load_case(case)
        model.eval()
        with torch.no_grad():
            tokens = model.forward_features(x)
            outs = {
                "tokens.final_norm": tokens,
                "features": model.forward_head(tokens, pre_logits=True),
                "logits": model.forward_head(tokens),
            }
        diffs = ", ".join(f"{k} {(v - ref[k]).abs().max().item():.2e}" for k, v in outs.items())
        print(f"parity {case} (max abs diff vs official, bound 1e-4): {diffs}")
    model = visionmamba.create_model("vim_tiny_patch16_224").eval()
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    print(f"Vim-Ti forward, batch 8, 224x224, scan backend 'auto': {min(times) * 1000:.0f} ms (best of 3)")


if __name__ == "__main__":
    main()
