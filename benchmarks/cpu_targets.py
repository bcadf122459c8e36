"""Vim-Ti against DeiT-Ti on this CPU, the comparisons of issue 26's targets, from one run.

Batch 8, the machine's threads: forward in float32 and under bf16 autocast (each model against the other in
the same precision) at 224 and 512, and one training step (forward, backward, AdamW) at 224. The two models
run in turns within each repeat (medians), so that the drift of a shared machine hits them alike.

    python benchmarks/cpu_targets.py [--threads 2] [--repeats 5] [--quick]
"""
import argparse
import contextlib
import statistics
import time
from typing import Callable, Dict, List

import timm
import torch

import visionmamba
from visionmamba.ops.scan.toolchain import cpu_model
from visionmamba.tools.precision import bf16_supported

TARGETS = {("infer", 224): 1.3, ("infer", 512): 0.8, ("train", 224): 1.6}  # Vim-Ti time / DeiT-Ti time, at most


def models(res: int) -> Dict[str, torch.nn.Module]:
    return {"vim_tiny": visionmamba.create_model("vim_tiny_patch16_224", img_size=res),
            "deit_tiny": timm.create_model("deit_tiny_patch16_224", img_size=res)}


def step_fn(model: torch.nn.Module, x: torch.Tensor, mode: str, precision: str) -> Callable[[], None]:
    """One timed step: a forward without gradients, or forward + backward + AdamW."""
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    if mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.no_grad(), cast():
                model(x)
        return infer
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train() -> None:
        with cast():
            loss = model(x).float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return train


def compare(res: int, batch: int, mode: str, precision: str, repeats: int) -> Dict:
    x = torch.randn(batch, 3, res, res)
    steps = {name: step_fn(model, x, mode, precision) for name, model in models(res).items()}
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1000)
    row = {"mode": mode, "precision": precision, "res": res, **{f"{n}_ms": statistics.median(t) for n, t in times.items()}}
    row["vim_over_deit"] = row["vim_tiny_ms"] / row["deit_tiny_ms"]
    target = TARGETS.get((mode, res))
    row["target"] = f"<= {target}" if target else "-"
    row["met"] = "-" if target is None else ("yes" if row["vim_over_deit"] <= target else "no")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="32x32 images, one repeat (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes, repeats = ((32,), 1) if args.quick else ((224, 512), args.repeats)
    precisions = ["fp32"] + (["bf16"] if bf16_supported(torch.device("cpu")) else [])
    print(f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}, batch 8"
          + ("" if "bf16" in precisions else " (no bf16 arithmetic on this CPU: fp32 only)"))
    rows = [compare(res, 8, "infer", p, repeats) for p in precisions for res in sizes]
    rows += [compare(sizes[0], 8, "train", p, repeats) for p in precisions]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
