"""Selective-scan backends against the official reference formulation, measured in the same run.

Prints three tables (CPU by default; --device cuda for the GPU kernels):
1. scan: backend, shape, forward ms, forward+backward ms, ratio to the official formulation, and on a
   GPU the achieved GB/s against a copy of the same bytes;
2. memory: peak RSS of forward+backward at a long sequence, each point in a fresh process (CPU);
3. roofline (CPU): the ``cpu`` kernels' state elements per second (the one-direction op, and the models'
   kernel of both directions) as a fraction of this machine's own limit for the same work (``roofline.py``,
   measured in the same run), forward and backward;
4. model: whole Vim-Ti forward vs timm's DeiT-Ti at 224 and 512 (batch 8).

    python benchmarks/bench_scan.py                 # the full CPU table (a few minutes on 2 cores)
    python benchmarks/bench_scan.py --quick         # tiny shapes, seconds (CI smoke run)
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import visionmamba
from visionmamba.ops import scan
from visionmamba.ops.scan import cpu

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import roofline  # noqa: E402  (benchmarks/roofline.py)


def official_formulation(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The formulation of the official code's reference scan: a loop that indexes deltaA[:, :, t] each step
    (written here from its description; autograd then materialises a full-size gradient per step)."""
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u)
    x = A.new_zeros((u.shape[0], u.shape[1], A.shape[1]))
    ys = []
    for t in range(u.shape[2]):
        x = deltaA[:, :, t] * x + deltaB_u[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, t].float()))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype)


def make_inputs(batch, channels, length, state, device, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = dict(u=r(batch, channels, length), delta=r(batch, channels, length) * 0.5 - 4, A=-torch.arange(1.0, state + 1).repeat(channels, 1),
             B=r(batch, state, length), C=r(batch, state, length), D=torch.ones(channels), z=r(batch, channels, length),
             delta_bias=torch.zeros(channels))
    return {k: v.to(device=device, dtype=dtype if k in ("u", "delta", "B", "C", "z") else torch.float32).requires_grad_(grad) for k, v in t.items()}


def timed(fn: Callable[[], None], device: str, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def scan_table(shapes, backends, device, repeats, dtype) -> List[Dict]:
    rows = []
    for batch, channels, length, state in shapes:
        base_fwd = base_bwd = None
        copy_ms = None
        if device == "cuda":
            blob = torch.empty(_bytes(batch, channels, length, state, dtype) // 4, device=device)
            copy_ms = timed(lambda: blob.clone(), device, repeats)
        for name in ["official"] + backends:
            fn = official_formulation if name == "official" else (lambda n: lambda **kw: scan.selective_scan(**kw, backend=n))(name)
            inputs = make_inputs(batch, channels, length, state, device, dtype)
            with torch.no_grad():
                fwd = timed(lambda: fn(**inputs, delta_softplus=True), device, repeats)
            grads = make_inputs(batch, channels, length, state, device, dtype, grad=True)
            bwd_repeats = 1 if name == "official" else repeats
            both = timed(lambda: fn(**grads, delta_softplus=True).sum().backward(), device, bwd_repeats)
            if name == "official":
                base_fwd, base_bwd = fwd, both
            row = dict(backend=name, shape=f"B{batch} E{channels} L{length} N{state}", fwd_ms=fwd, fwd_bwd_ms=both,
                       fwd_speedup=base_fwd / fwd, fwd_bwd_speedup=base_bwd / both)
            if copy_ms is not None:
                row["GB/s"] = _bytes(batch, channels, length, state, dtype) / fwd / 1e6
                row["copy GB/s"] = _bytes(batch, channels, length, state, dtype) / copy_ms / 1e6
            rows.append(row)
    return rows


def _bytes(batch, channels, length, state, dtype) -> int:
    """Bytes a fused forward must move: u, delta, z in, y out (batch, E, L); B, C in (batch, N, L)."""
    size = torch.finfo(dtype).bits // 8
    return size * (4 * batch * channels * length + 2 * batch * state * length)


def memory_point(backend: str, batch: int, channels: int, length: int, state: int) -> float:
    """Peak resident memory (MB) of one forward+backward above what the process held before it, measured
    in a fresh process: the kernel's peak-RSS counter (VmHWM) is reset just before the call."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
from bench_scan import make_inputs, official_formulation
from visionmamba.ops import scan
torch.set_num_threads(2)
def status(key):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) / 1024
inputs = make_inputs({batch}, {channels}, {length}, {state}, 'cpu', grad=True)
if {backend!r} == 'cpu':
    scan.selective_scan(**make_inputs(1, 2, 3, 2, 'cpu'), backend='cpu')  # build/load before measuring
open('/proc/self/clear_refs', 'w').write('5')
base = status('VmRSS:')
fn = official_formulation if {backend!r} == 'official' else (lambda **kw: scan.selective_scan(**kw, backend={backend!r}))
fn(**inputs, delta_softplus=True).sum().backward()
print(status('VmHWM:') - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def model_table(resolutions, batch, repeats) -> List[Dict]:
    """Vim-Ti vs timm's DeiT-Ti as shipped, and vs DeiT-Ti with Vim's oneDNN linear route (like-for-like
    matrix products). The three models run in turns within each repeat (medians), so that the drift of a
    shared machine hits them alike."""
    import timm

    from visionmamba.ops.linear import use_onednn_linears

    rows = []
    for res in resolutions:
        models = {
            "deit_tiny_ms": timm.create_model("deit_tiny_patch16_224", img_size=res).eval(),
            "deit_tiny_onednn_ms": use_onednn_linears(timm.create_model("deit_tiny_patch16_224", img_size=res).eval()),
            "vim_tiny_ms": visionmamba.create_model("vim_tiny_patch16_224", img_size=res).eval(),
        }
        x = torch.randn(batch, 3, res, res)
        times: Dict[str, List[float]] = {name: [] for name in models}
        with torch.no_grad():
            for model in models.values():
                model(x)  # warm-up
            for _ in range(repeats):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(x)
                    times[name].append((time.perf_counter() - start) * 1000)
        row = dict(res=res, tokens=(res // 16) ** 2 + 1, **{name: statistics.median(t) for name, t in times.items()})
        row["vim_over_deit"] = row["vim_tiny_ms"] / row["deit_tiny_ms"]
        row["vim_over_deit_onednn"] = row["vim_tiny_ms"] / row["deit_tiny_onednn_ms"]
        rows.append(row)
    return rows


ROOFLINE_TARGETS = {"fwd": 0.60, "bwd": 0.40}  # issue 26: the kernel's share of the machine's limit


def mixer_core_rows(shapes, repeats: int, rank: int = 12) -> List[Dict]:
    """The kernel the models run, both directions with dt_proj fused (op ``bi_scan``; Vim-Ti's dt rank 12):
    forward (``bi_scan_inference``) and forward+backward ms, in the rows of :func:`scan_table`."""
    rows = []
    ops = torch.ops.visionmamba
    for batch, channels, length, state in shapes:
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        args = [r(2, batch, length, channels), r(2, batch, length, rank + 2 * state) / 4, r(2, channels, rank) / 4,
                -torch.arange(1.0, state + 1).repeat(2, channels, 1), r(2, channels), r(batch, length, channels),
                r(2, channels) - 4]
        with torch.no_grad():
            fwd = timed(lambda: ops.bi_scan_inference(*args), "cpu", repeats)
        leaves = [t.clone().requires_grad_(True) for t in args]
        both = timed(lambda: ops.bi_scan(*leaves, cpu.CHECKPOINT_STEPS)[0].sum().backward(), "cpu", repeats)
        rows.append(dict(backend="cpu-bi", shape=f"B{batch} E{channels} L{length} N{state}", fwd_ms=fwd, fwd_bwd_ms=both))
    return rows


def roofline_table(scan_rows: List[Dict], threads: int) -> List[Dict]:
    """The ``cpu`` rows' throughput in state elements per second (B E L N per call and direction) against the
    roofline; the backward's time is the forward+backward time less the forward's. ``cpu`` is the
    one-direction op (one (batch, channel) row per task), ``cpu-bi`` the models' kernel (both directions)."""
    limits = {"fwd": roofline.elements_per_second(False, threads), "bwd": roofline.elements_per_second(True, threads)}
    rows = []
    for row in scan_rows:
        if row["backend"] not in ("cpu", "cpu-bi"):
            continue
        sizes = {part[0]: int(part[1:]) for part in row["shape"].split()}
        elements = sizes["B"] * sizes["E"] * sizes["L"] * sizes["N"] * (2 if row["backend"] == "cpu-bi" else 1)
        rates = {"fwd": elements / row["fwd_ms"] * 1e3, "bwd": elements / max(row["fwd_bwd_ms"] - row["fwd_ms"], 1e-6) * 1e3}
        out = dict(kernel=row["backend"], shape=row["shape"])
        for kind in ("fwd", "bwd"):
            out[f"{kind}_G_per_s"] = rates[kind] / 1e9
            out[f"{kind}_limit_G_per_s"] = limits[kind] / 1e9
            out[f"{kind}_fraction"] = rates[kind] / limits[kind]
            out[f"{kind}_target_met"] = "yes" if rates[kind] / limits[kind] >= ROOFLINE_TARGETS[kind] else "no"
        rows.append(out)
    return rows


def print_table(title: str, rows: List[Dict]) -> None:
    print(f"\n{title}")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes only (a smoke run)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    print(f"visionmamba {visionmamba.__version__}, torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    if args.device == "cuda":
        backends = ["chunked", "triton"] if scan.triton_available() else ["chunked"]
        shapes = [(8, 384, 197, 16), (8, 384, 6085, 16)]
    else:
        backends = ["reference", "cpu", "chunked"]
        shapes = [(8, 384, 197, 16), (8, 384, 1025, 16)]
    if args.quick:
        shapes, args.repeats = [(2, 16, 33, 4)], 1
    results = {"scan": scan_table(shapes, backends, args.device, args.repeats, dtype)}
    print_table("scan (ms; speed-up = official formulation time / backend time, same run)", results["scan"])
    if args.device == "cpu":
        from visionmamba.ops.scan import toolchain
        from visionmamba.ops.scan.toolchain import cpu_model

        results["roofline"] = roofline_table(results["scan"] + mixer_core_rows(shapes, args.repeats), args.threads)
        exp = "AVX-512 exp2" if roofline.library().roofline_avx512() else "portable exp"
        print_table(f"roofline of the cpu kernel: {cpu_model()}, {toolchain.toolchain().flags.level} ({exp}), "
                    f"{args.threads} threads; fraction = kernel / machine limit for the same work (targets: forward "
                    f">= {ROOFLINE_TARGETS['fwd']:.0%}, backward >= {ROOFLINE_TARGETS['bwd']:.0%})", results["roofline"])
        mem_shape = (1, 8, 50, 4) if args.quick else (8, 384, 4097, 16)
        mem = [dict(backend=b, shape="B{} E{} L{} N{}".format(*mem_shape), peak_mb=memory_point(b, *mem_shape))
               for b in ("reference", "cpu", "chunked")]  # the official formulation needs the reference's memory and more
        for row in mem:
            row["fraction_of_reference"] = row["peak_mb"] / max(mem[0]["peak_mb"], 1e-9)
        results["memory"] = mem
        print_table("memory: peak RSS of forward+backward above the inputs (fresh process per row)", mem)
        batch = 2 if args.quick else 8
        results["model"] = model_table([64] if args.quick else [224, 512], batch, args.repeats)
        print_table(f"model forward, batch {batch}, no grad (ms, median, models in turns): Vim-Ti (defaults) vs timm "
                    "DeiT-Ti as shipped and with the same oneDNN linears", results["model"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
