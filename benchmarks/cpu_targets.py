"""Vim-Ti against DeiT-Ti on this CPU, the comparisons of the CPU targets, and Vim-Ti against its model roofline,
from one run.

Batch 8, the machine's threads: forward in float32 and under bf16 autocast (each model against the other in
the same precision) at 224 and 512, and one training step (forward, backward, AdamW) at 224. The two models
run in turns within each repeat (medians), so that the drift of a shared machine hits them alike.

The model roofline: Vim-Ti's time per part (the linears, the scan, conv + SiLU, the fused core where inference
runs conv, x_proj and the scan as one op, the rest; PyTorch's profiler,
self time per operator) beside the limit of that part measured on this CPU in the same run: the linears'
multiply-adds at the machine's best matrix-product rate (the fastest of large square products, fp32 and bf16,
the threads used; the rate at Vim-Ti's exact shapes is printed beside it), the scan's state elements at the
scan roofline (``roofline.py``: the irreducible exp and multiply-adds, forward and backward), and conv + SiLU
and the rest as the bytes they must move at the machine's copy bandwidth (a model of the traffic, said in
the table); the fused core's limit is the sum of its three parts' limits. A part's fraction is its limit
over its time; the model's is the sum of the limits over the sum of the times.

    python benchmarks/cpu_targets.py [--threads 2] [--repeats 5] [--quick] [--only roofline|targets]
"""
import argparse
import contextlib
import statistics
import time
from typing import Callable, Dict, List

import roofline  # noqa: E402  (benchmarks/roofline.py)
import timm
import torch
from torch.profiler import ProfilerActivity, profile

import visionmamba
from visionmamba.ops.scan.toolchain import cpu_model
from visionmamba.tools.precision import bf16_supported

# Vim-Ti time / DeiT-Ti time, at most (issue 37): (mode, precision, res) -> ratio
TARGETS = {("infer", "fp32", 224): 1.3, ("infer", "fp32", 512): 0.8, ("infer", "bf16", 224): 1.5,
           ("infer", "bf16", 512): 0.8, ("train", "fp32", 224): 1.8, ("train", "bf16", 224): 1.8}


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
    target = TARGETS.get((mode, precision, res))
    row["target"] = f"<= {target}" if target else "-"
    row["met"] = "-" if target is None else ("yes" if row["vim_over_deit"] <= target else "no")
    return row


ROOFLINE_TARGETS = {"infer": 0.75, "train": 0.5}  # Vim-Ti time as a fraction of its model roofline, at least
PARTS = ("linears", "scan", "conv", "core", "rest")


def part_of(op: str) -> str:
    """The part of the model a profiled operator belongs to (self times: nested operators count once; the patch
    embedding's convolution is a matrix product, counted with the linears)."""
    if "mixer_core" in op:
        return "core"
    if "bi_scan" in op:
        return "scan"
    if "conv_silu" in op:
        return "conv"
    if "linear" in op.lower() or "convolution" in op or op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
        return "linears"
    return "rest"


def part_times(step: Callable[[], None]) -> Dict[str, float]:
    """ms per part of one profiled step, and the step's wall time unprofiled ("total")."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    times = dict.fromkeys(PARTS, 0.0)
    for event in prof.key_averages():
        times[part_of(event.key)] += event.self_cpu_time_total / 1e3
    scale = timed_ms(step) / sum(times.values())  # the profiler's own overhead spread over the parts
    return {**{part: ms * scale for part, ms in times.items()}, "total": sum(times.values()) * scale}


def timed_ms(step: Callable[[], None], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Multiply-adds per second of (m, k) x (k, n) in ``dtype``, the best of ``repeats`` (a linear layer's route)."""
    a, linear = torch.randn(m, k, dtype=dtype), torch.nn.Linear(k, n, bias=False, dtype=dtype)
    with torch.no_grad():
        best = float("inf")
        for _ in range(repeats + 1):
            start = time.perf_counter()
            linear(a)
            best = min(best, time.perf_counter() - start)
    return m * k * n / best


def peak_matmul_rate(dtype: torch.dtype) -> float:
    """The machine's matrix-product limit: the best multiply-add rate of large square products."""
    return max(matmul_rate(size, size, size, dtype) for size in (1024, 2048))


def copy_bandwidth() -> float:
    """Bytes per second read plus written by a 256 MB copy (the best of 5)."""
    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    best = min(timed_ms(lambda: dst.copy_(src), 1) for _ in range(5)) / 1e3
    return 2 * src.numel() * 4 / best


def vim_work(model: torch.nn.Module, batch: int) -> Dict[str, float]:
    """Vim-Ti's forward work (``model``, at its size): linear multiply-adds, scan state elements, and the bytes conv + SiLU
    and the rest must move (float32: conv reads x and writes both directions' u; the rest per block reads and
    writes the residual stream for the norm and the add, and in_proj's output once for the split)."""
    mixer, depth, dim = model.layers[0].mixer, len(model.layers), model.embed_dim
    tokens = batch * (model.patch_embed.num_patches + 1)
    inner, state, rank = mixer.d_inner, mixer.d_state, mixer.dt_rank
    macs = depth * tokens * (dim * 2 * inner + inner * dim)
    macs += batch * model.patch_embed.num_patches * dim * 3 * 16 * 16 + batch * dim * model.num_classes
    return {"macs": macs, "x_proj_macs": depth * tokens * 2 * inner * (rank + 2 * state), "elements": depth * tokens * inner * state * 2,
            "conv_bytes": depth * tokens * inner * 3 * 4, "rest_bytes": depth * tokens * (4 * dim + 2 * inner) * 4,
            "shapes": [(tokens, dim, 2 * inner), (tokens, inner, rank + 2 * state), (tokens, inner, dim)]}


def model_roofline(res: int, batch: int, mode: str, precision: str, threads: int, limits: Dict[str, float]) -> Dict:
    """One row: Vim-Ti's parts against their limits (``limits``: the measured machine rates)."""
    model = visionmamba.create_model("vim_tiny_patch16_224", img_size=res)
    times = part_times(step_fn(model, torch.randn(batch, 3, res, res), mode, precision))
    work = vim_work(model, batch)
    passes = 3 if mode == "train" else 1  # a backward is two products per forward one; conv/rest traffic likewise
    narrow = 0.5 if precision == "bf16" else 1.0  # bf16 activations move half the bytes
    rate = limits[f"matmul_{precision}"]
    bound = {"linears": passes * work["macs"] / rate * 1e3, "x_proj": passes * work["x_proj_macs"] / rate * 1e3,
             "scan": work["elements"] / limits["scan_fwd"] * 1e3
             + (work["elements"] / limits["scan_bwd"] * 1e3 if mode == "train" else 0.0),
             "conv": passes * narrow * work["conv_bytes"] / limits["bandwidth"] * 1e3,
             "core": 0.0, "rest": passes * narrow * work["rest_bytes"] / limits["bandwidth"] * 1e3}
    if times["core"]:  # the fused core (inference): its parts' limits move to it
        bound["core"] = bound.pop("x_proj") + bound["scan"] + bound["conv"]
        bound["scan"] = bound["conv"] = 0.0
    else:
        bound["linears"] += bound.pop("x_proj")
    row: Dict = {"mode": mode, "precision": precision, "res": res}
    for part in PARTS:
        row[f"{part}_ms"] = times[part]
        row[f"{part}_limit_ms"] = bound[part]
        row[f"{part}_fraction"] = bound[part] / times[part] if times[part] else "-"
    row["total_ms"], row["limit_ms"] = times["total"], sum(bound.values())
    row["fraction"] = row["limit_ms"] / row["total_ms"]
    row["target"] = f">= {ROOFLINE_TARGETS[mode]}"
    row["met"] = "yes" if row["fraction"] >= ROOFLINE_TARGETS[mode] else "no"
    return row


def machine_limits(precisions: List[str], threads: int, batch: int) -> Dict[str, float]:
    limits = {f"matmul_{p}": peak_matmul_rate(torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}
    limits["scan_fwd"] = roofline.elements_per_second(False, threads)
    limits["scan_bwd"] = roofline.elements_per_second(True, threads)
    limits["bandwidth"] = copy_bandwidth()
    shapes = vim_work(visionmamba.create_model("vim_tiny_patch16_224"), batch)["shapes"]
    for p in precisions:
        dtype = torch.float32 if p == "fp32" else torch.bfloat16
        limits[f"vim_shapes_{p}"] = sum(m * k * n for m, k, n in shapes) / sum(m * k * n / matmul_rate(m, k, n, dtype)
                                                                              for m, k, n in shapes)
    return limits


def print_rows(rows: List[Dict]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="32x32 images, one repeat (a smoke run)")
    parser.add_argument("--only", choices=["roofline", "targets"], help="print one of the two tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes, repeats = ((32,), 1) if args.quick else ((224, 512), args.repeats)
    precisions = ["fp32"] + (["bf16"] if bf16_supported(torch.device("cpu")) else [])
    print(f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}, batch 8"
          + ("" if "bf16" in precisions else " (no bf16 arithmetic on this CPU: fp32 only)"))
    if args.only != "roofline":
        rows = [compare(res, 8, "infer", p, repeats) for p in precisions for res in sizes]
        rows += [compare(sizes[0], 8, "train", p, repeats) for p in precisions]
        print_rows(rows)
    if args.only != "targets":
        limits = machine_limits(precisions, args.threads, 8)
        peak = ", ".join(f"{p} {limits['matmul_' + p] / 1e9:.0f}" for p in precisions)
        shapes = ", ".join(f"{p} {limits['vim_shapes_' + p] / 1e9:.0f}" for p in precisions)
        print(f"limits: matrix products {peak} G multiply-adds/s (Vim-Ti's linear shapes at 224: {shapes}); "
              f"scan {limits['scan_fwd'] / 1e9:.2f} forward / {limits['scan_bwd'] / 1e9:.2f} backward G state elements/s; "
              f"copy {limits['bandwidth'] / 1e9:.1f} GB/s")
        rows = [model_roofline(res, 8, "infer", p, args.threads, limits) for p in precisions for res in sizes]
        rows += [model_roofline(sizes[0], 8, "train", p, args.threads, limits) for p in precisions]
        print_rows(rows)


if __name__ == "__main__":
    main()
