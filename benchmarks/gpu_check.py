"""One GPU script: Vim-Ti against DeiT-Ti, all ratios from one run, then the kernels checked on the GPU.

Made for a lent GPU whose minutes are counted: it runs from a bare checkout with the machine's own
``python3`` (torch >= 2.11, Triton >= 3.6; nothing to install), prints the versions first, and returns
something whatever happens.

1. inference, bf16 autocast: Vim-Ti, DeiT-Ti (PyTorch's fused attention) and DeiT-Ti with plain attention at
   224 / 512 / 1024 / 1248 (batch 128) and 2048 (batch 16): images/s and peak memory;
2. a training step at 224 (batch 128) for the three;
3. the selective scan alone, Triton against the official formulation (benchmarks/bench_scan.py's table);
4. the autotuner's pick per kernel and key;
5. a focused subset of the kernel tests on the GPU (every autotune config of the scan, one bidirectional
   case per dtype, the 64-bit offsets, the norm kernels, golden parity of the model with the Triton backend).

Every point is isolated: an exception becomes that point's status, and after a CUDA error (which spoils the
process) the remaining GPU points are marked skipped. ``results.md``, ``benchmark.csv`` and ``figure1.png``
under ``--out`` are rewritten atomically after every phase, so a run stopped by a time limit keeps what it
measured. ``--budget-s`` bounds the whole run: the benchmarks stop at TESTS_SHARE of it short of the end, the
tests get what is left. ``--quick`` runs the same steps on tiny shapes; without a GPU it runs on the CPU, the
kernel tests and the scan table in Triton's interpreter, the model points with the CPU kernels (a CI test
does this, with a failing test, a failing point and a budget that runs out).

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out runs/gpu_check
    python3 benchmarks/gpu_check.py --quick --out /tmp/gpu_check_dry
"""
import argparse
import dataclasses
import importlib.util
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a bare checkout: `python3 benchmarks/gpu_check.py` finds the package beside it

MODELS = ["vim_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_patch16_224:naive"]
TARGETS = "Vim-Ti >= 618 img/s and <= 4.5 GiB at 1248x1248 (batch 128, bf16); >= 2x DeiT-Ti (fused attention) at 2048"
TESTS_SHARE = 0.4  # of the budget, kept for the kernel tests
GPU_TESTS = [  # what only a GPU can show; the rest of each file runs in CI under the interpreter
    "tests/ops/test_scan_triton.py::test_every_gpu_backward_config_gives_every_gradient",
    "tests/ops/test_scan_triton.py::test_every_gpu_forward_config_in_training_and_in_place_inference",
    "tests/ops/test_scan_triton.py::test_single_direction_matches_reference",
    "tests/ops/test_scan_triton.py::test_fused_bidirectional_matches_the_flip_composition_forward_and_every_gradient",
    "tests/ops/test_scan_triton.py::test_model_with_triton_backend_matches_reference_model",
    "tests/ops/test_triton_offsets.py",
    "tests/ops/test_norm_triton.py",
    "tests/models/test_parity.py::test_triton_backend_matches_official_on_gpu",
]
# one case per dtype of the parametrised scan test, all of the rest
GPU_TESTS_FILTER = "not test_single_direction_matches_reference or 1-63-16"


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
        return Plan("cuda", [224, 512, 1024, 1248], 128, 2048, 16, 224, 5, [*GPU_TESTS, "-k", GPU_TESTS_FILTER],
                    [(8, 384, 197, 16), (8, 384, 6085, 16)])
    tests = ["tests/ops/test_norm_triton.py", "-k", "dtype0 and shape1"]  # one case: the plumbing, not the coverage
    return Plan("cuda" if on_gpu else "cpu", [32], 2, 48, 1, 32, 1, tests, [(2, 16, 33, 4)])


class Run:
    """What one gpu_check run has measured so far, the budget left, and the files that show it."""

    def __init__(self, out: Path, budget_s: float, header: List[str]):
        self.out, self.header = out, header
        self.budget_s = budget_s
        self.started = time.perf_counter()
        self.points: list = []
        self.sections: List[str] = []
        self.cuda_error: Optional[str] = None

    def left(self) -> float:
        return self.started + self.budget_s - time.perf_counter()

    def benchmarks_left(self) -> float:
        return self.left() - TESTS_SHARE * self.budget_s

    def section(self, title: str, body: str) -> None:
        self.sections += [f"## {title}", "", body, ""]
        self.write()

    def write(self) -> None:
        """results.md, and benchmark.csv and figure1.png once there are points: each replaced whole."""
        from visionmamba.files import atomic_write
        from visionmamba.tools.benchmark import plot, write_csv

        elapsed = f"({time.perf_counter() - self.started:.0f} s of a {self.budget_s:.0f} s budget)"
        text = "\n".join([*self.header, "", *self.sections, elapsed]) + "\n"
        atomic_write(self.out / "results.md", lambda tmp: Path(tmp).write_text(text))
        if self.points:
            atomic_write(self.out / "benchmark.csv", lambda tmp: write_csv(self.points, Path(tmp)))
            inference = [p for p in self.points if p.mode == "infer"]
            if inference:
                atomic_write(self.out / "figure1.png", lambda tmp: plot(inference, Path(tmp), title="bf16, inference"))


def device_broken(device: str) -> Optional[str]:
    """The error a trivial operation now raises on ``device`` (a CUDA error is sticky: every later call in
    the process fails with it), or None."""
    import torch

    from visionmamba.tools.benchmark import error_line

    if device != "cuda":
        return None
    try:
        (torch.ones(1, device=device) + 1).item()
        torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001  (any failure here means the device is unusable)
        return error_line(err)
    return None


def measure_points(run: Run, specs: List[str], resolutions: List[int], batch: int, device: str, train: bool,
                   repeats: int, measure: Optional[Callable] = None) -> list:
    """Each (resolution, model) point, isolated: an exception is the point's status; after a CUDA error or
    once the benchmarks' share of the budget is spent, the remaining points are marked skipped."""
    from visionmamba.tools.benchmark import Point, error_line
    from visionmamba.tools.benchmark import measure as measure_point

    measure = measure or measure_point
    points = []
    for res in resolutions:
        for spec in specs:
            point = Point(spec, res, batch, "train" if train else "infer")
            if run.cuda_error:
                point.status = f"skipped: the device failed earlier ({run.cuda_error})"
            elif run.benchmarks_left() <= 0:
                point.status = "skipped: out of budget"
            else:
                try:
                    point = measure(spec, res, batch, device, "bf16", train, repeats)
                except Exception as err:  # noqa: BLE001  (recorded: one point's failure must not end the run)
                    point.status = f"error: {error_line(err)}"
                if point.status != "ok":
                    run.cuda_error = device_broken(device)
                _empty_cache(device)
            print(f"  {spec} @ {res}: {point.status}, {point.img_per_s:.1f} img/s, {point.peak_mem_mb:.0f} MB", flush=True)
            points.append(point)
    run.points += points
    return points


def _empty_cache(device: str) -> None:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001  (a broken device is reported by device_broken)
            pass


def scan_section(run: Run, p: Plan) -> str:
    if run.cuda_error:
        return f"skipped: the device failed earlier ({run.cuda_error})"
    if run.benchmarks_left() <= 0:
        return "skipped: out of budget"
    from visionmamba.tools.benchmark import error_line

    try:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import torch
        from bench_scan import scan_table

        from visionmamba.ops import scan

        backends = ["triton"] if scan.triton_available() else ["chunked"]
        dtype = torch.bfloat16 if p.device == "cuda" else torch.float32
        return markdown(scan_table(p.scan_shapes, backends, p.device, p.repeats, dtype))
    except Exception as err:  # noqa: BLE001
        run.cuda_error = device_broken(p.device)
        return f"error: {error_line(err, 200)}"


def autotune_picks() -> str:
    """The config each autotuned kernel runs with, per key (E, length bucket, ..., dtypes)."""
    try:
        from visionmamba.ops.scan import triton as kernels
    except Exception as err:  # noqa: BLE001  (no Triton: nothing was tuned)
        return f"none ({type(err).__name__})"
    lines = [f"- {name}: {key} -> {config}" for name, kernel in
             (("scan forward", kernels._scan_fwd_kernel), ("scan backward", kernels._scan_bwd_kernel))
             for key, config in kernel.cache.items()]
    return "\n".join(lines) or "none (one config each: nothing to tune)"


def per_test_timeout(seconds: int = 120) -> List[str]:
    """pytest arguments that stop a test hanging longer than ``seconds`` (pytest-timeout, where installed: the
    device has it). The plugin loads itself; naming it with ``-p`` as well fails ("already registered")
    unless plugin autoloading is off."""
    if importlib.util.find_spec("pytest_timeout") is None:
        return []
    load = ["-p", "pytest_timeout"] if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") else []
    return [*load, "--timeout", str(seconds)]


def run_tests(paths: List[str], env: Dict[str, str], timeout_s: float) -> str:
    """The kernel tests in a fresh pytest process, stopped after ``timeout_s``: the summary line, and the
    failures' names and first error lines (never raises: the run goes on to write what it has)."""
    if timeout_s < 10:
        return "skipped: out of budget"
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *per_test_timeout(), *paths]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired as stopped:
        tail = (stopped.stdout or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return f"stopped after {timeout_s:.0f} s (budget); the output so far:\n\n```\n{tail}\n```"
    lines = done.stdout.strip().splitlines() or ["no output: " + done.stderr.strip()[-500:]]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return "\n".join([lines[-1], *(f"- {line[:300]}" for line in failures)])


def targets(points) -> List[str]:
    """The issue's targets against this run's points (meaningful on an H100/H200 only)."""
    by = {(pt.model, pt.res, pt.mode): pt for pt in points if pt.status == "ok"}
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
    if not rows:
        return "no rows"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def versions(on_gpu: bool) -> str:
    import timm
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.cuda.get_device_name() if on_gpu else "CPU dry run, Triton interpreter"
    return (f"{device}; Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"Triton {triton_version}, timm {timm.__version__}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.md, benchmark.csv, figure1.png")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (on the CPU with the interpreter without a GPU)")
    parser.add_argument("--budget-s", type=float, default=360.0, help="the whole run's time, benchmarks and tests (360)")
    parser.add_argument("--models", nargs="+", default=MODELS, help="model specs, as `visionmamba benchmark` takes them")
    parser.add_argument("--tests", nargs="+", help="pytest arguments instead of the plan's subset")
    args = parser.parse_args(argv)
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.quick:
        print("gpu_check: no CUDA device; use --quick for the CPU dry run", file=sys.stderr)
        return 2
    if args.budget_s <= 0:
        print(f"gpu_check: --budget-s must be positive, got {args.budget_s:g}", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "1")  # the log shows each autotuning and its pick (read at use)
    # the processes it starts (the tests, the CPU points) import the package from this checkout too
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ)
    if not on_gpu:
        # The kernel tests and the scan table run the Triton kernels in the interpreter; the model points keep
        # the CPU kernels (Vim-Ti's 24 blocks in the interpreter take minutes a step): the dry run checks the
        # script, the GPU run the speed.
        env["TRITON_INTERPRET"] = os.environ["TRITON_INTERPRET"] = "1"
    from visionmamba.files import OutputError, prepare_output_dir

    try:
        prepare_output_dir(args.out)  # before any GPU time is spent
    except OutputError as err:
        print(f"gpu_check: {err.strerror}", file=sys.stderr)
        return 2
    header = f"# gpu_check: {versions(on_gpu)}"
    print(header, flush=True)
    p = plan(args.quick, on_gpu)
    run = Run(args.out, args.budget_s, [header])
    run.write()
    from visionmamba.tools.benchmark import ratio_table

    points = measure_points(run, args.models, p.resolutions, p.batch, p.device, False, p.repeats)
    points += measure_points(run, args.models, [p.large], p.large_batch, p.device, False, p.repeats)
    run.section(f"Inference, bf16, batch {p.batch} (batch {p.large_batch} at {p.large})", ratio_table(points))
    train = measure_points(run, args.models, [p.train_res], p.batch, p.device, True, p.repeats)
    run.section(f"Training step at {p.train_res}, batch {p.batch}", ratio_table(train))
    run.section("Selective scan alone vs the official formulation", scan_section(run, p))
    run.section("Targets", "\n".join([TARGETS, "", *targets(points)]))
    run.section("Autotuner picks", autotune_picks())
    if run.cuda_error:
        run.section("Kernel tests on this device", f"skipped: the device failed earlier ({run.cuda_error})")
    else:
        print("## Kernel tests on this device", flush=True)
        run.section("Kernel tests on this device", run_tests(args.tests or p.tests, env, run.left()))
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
