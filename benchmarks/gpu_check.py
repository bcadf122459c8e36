"""One GPU script: the kernels checked on the GPU, then Vim-Ti against DeiT-Ti, all ratios from one run.

1. every Triton kernel against the reference on the GPU, forward and all gradients (the test files that run
   in CI under the interpreter, here on CUDA), and golden parity of the model with the Triton backend;
2. inference, bf16 autocast: Vim-Ti, DeiT-Ti (PyTorch's fused attention) and DeiT-Ti with plain attention at
   224 / 512 / 1024 / 1248 (batch 128) and 2048 (batch 16): images/s and peak memory;
3. a training step at 224 (batch 128) for the three;
4. the selective scan alone, Triton against the official formulation (benchmarks/bench_scan.py's table);
5. writes ``results.md`` (the tables and the issue's targets, met or not), ``benchmark.csv`` and
   ``figure1.png`` (the paper's Figure 1: speed and memory against resolution) under ``--out``.

Sized to finish within 8 minutes on one H100/H200. ``--quick`` runs the same steps on tiny shapes; without a
GPU it runs on the CPU, the kernel tests and the scan table in Triton's interpreter, the model points with
the CPU kernels (a CI test does this, so the script is known to run before any GPU time is spent).

    python benchmarks/gpu_check.py --out runs/gpu_check
    python benchmarks/gpu_check.py --quick --out /tmp/gpu_check_dry
"""
import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["vim_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_patch16_224:naive"]
TARGETS = "Vim-Ti >= 618 img/s and <= 4.5 GiB at 1248x1248 (batch 128, bf16); >= 2x DeiT-Ti (fused attention) at 2048"


@dataclasses.dataclass
class Plan:
    device: str
    resolutions: List[int]
    batch: int
    large: int
    large_batch: int
    train_res: int
    repeats: int
    tests: List[str]
    scan_shapes: List[tuple]


def plan(quick: bool, on_gpu: bool) -> Plan:
    if not quick:
        return Plan("cuda", [224, 512, 1024, 1248], 128, 2048, 16, 224, 5,
                    ["tests/ops/test_scan_triton.py", "tests/ops/test_norm_triton.py",
                     "tests/models/test_parity.py::test_triton_backend_matches_official_on_gpu"],
                    [(8, 384, 197, 16), (8, 384, 6085, 16)])
    tests = ["tests/ops/test_norm_triton.py", "-k", "dtype0 and shape1"]  # one case: the plumbing, not the coverage
    return Plan("cuda" if on_gpu else "cpu", [32], 2, 48, 1, 32, 1, tests, [(2, 16, 33, 4)])


def run_tests(paths: List[str], env: Dict[str, str]) -> str:
    """Runs the kernel tests in a fresh pytest process; returns its summary line (raises if any failed)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    if done.returncode != 0:
        raise SystemExit(f"kernel tests failed: {summary}\n{done.stdout[-4000:]}")
    return summary


def scan_rows(p: Plan) -> List[Dict]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from bench_scan import scan_table

    from visionmamba.ops import scan

    backends = ["triton"] if scan.triton_available() else ["chunked"]
    dtype = torch.bfloat16 if p.device == "cuda" else torch.float32
    return scan_table(p.scan_shapes, backends, p.device, p.repeats, dtype)


def targets(points) -> List[str]:
    """The issue's targets against this run's points (meaningful on an H100/H200 only)."""
    by = {(pt.model, pt.res, pt.mode): pt for pt in points}
    lines = []
    vim = by.get(("vim_tiny_patch16_224", 1248, "infer"))
    if vim is not None:
        lines.append(f"- Vim-Ti at 1248: {vim.img_per_s:.0f} img/s (target >= 618), {vim.peak_mem_mb / 1024:.2f} GiB "
                     f"(target <= 4.5)")
    vim, deit = (by.get((m, 2048, "infer")) for m in ("vim_tiny_patch16_224", "deit_tiny_patch16_224"))
    if vim is not None and deit is not None:
        lines.append(f"- at 2048: Vim-Ti / DeiT-Ti (fused attention) = {vim.img_per_s / deit.img_per_s:.2f}x (target >= 2)")
    return lines


def markdown(rows: List[Dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.md, benchmark.csv, figure1.png")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (on the CPU with the interpreter without a GPU)")
    args = parser.parse_args(argv)
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.quick:
        print("gpu_check: no CUDA device; use --quick for the CPU dry run", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if not on_gpu:
        # The kernel tests and the scan table run the Triton kernels in the interpreter; the model points keep
        # the CPU kernels (Vim-Ti's 24 blocks in the interpreter take minutes a step): the dry run checks the
        # script, the GPU run the speed.
        env["TRITON_INTERPRET"] = os.environ["TRITON_INTERPRET"] = "1"
    from visionmamba.files import OutputError, atomic_write, prepare_output_dir

    try:
        prepare_output_dir(args.out)  # before any GPU time is spent
    except OutputError as err:
        print(f"gpu_check: {err.strerror}", file=sys.stderr)
        return 2
    p = plan(args.quick, on_gpu)
    from visionmamba.tools.benchmark import plot, ratio_table, run_benchmark, write_csv

    started = time.perf_counter()
    report = [f"# gpu_check ({torch.cuda.get_device_name() if on_gpu else 'CPU dry run, Triton interpreter'}, "
              f"torch {torch.__version__})", ""]
    report += ["## Kernel tests on this device", "", run_tests(p.tests, env), ""]
    print(report[-2], flush=True)
    common = dict(device=p.device, dtype="bf16", repeats=p.repeats, progress=True)
    points = run_benchmark(MODELS, p.resolutions, batch=p.batch, **common)
    points += run_benchmark(MODELS, [p.large], batch=p.large_batch, **common)
    train = run_benchmark(MODELS, [p.train_res], batch=p.batch, train=True, **common)
    report += [f"## Inference, bf16, batch {p.batch} (batch {p.large_batch} at {p.large})", "", ratio_table(points), ""]
    report += [f"## Training step at {p.train_res}, batch {p.batch}", "", ratio_table(train), ""]
    report += ["## Selective scan alone vs the official formulation", "", markdown(scan_rows(p)), ""]
    report += ["## Targets", "", TARGETS, "", *targets(points), "", f"({time.perf_counter() - started:.0f} s)"]
    write_csv(points + train, args.out / "benchmark.csv")
    plot(points, args.out / "figure1.png", title=f"{p.device}, bf16, inference")
    atomic_write(args.out / "results.md", lambda tmp: Path(tmp).write_text("\n".join(report) + "\n"))
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
