"""Formulations of the scan in standard ONNX operators, one Vim-Ti block's BiSelectiveScan (batch 8, E 384, N 16,
R 12), timed in plain ONNX Runtime and OpenVINO (float32) against the runtimes' own elementwise limit.

The candidates, each with the contract of the op bi_scan (``loop.bi_scan``'s glue, only the recurrence differs):

* ``scan T``: the exporters' formulation (``loop.scan_states``), T steps unrolled per ``Scan`` iteration;
* ``scan T, chunk ops``: the chunk's decays exp(delta A) and inputs B (delta u) as two batched operators before
  its steps, each step then ``h = a h + b`` and a MatMul for <h, C>;
* ``scan T, closed form``: inside a chunk h_t = P_t (h_0 + sum_s b_s / P_s), P = exp(cumsum(delta A)) (no step
  operators at all; the per-step decay floored at -15 so that 1 / P stays finite over T = 4 steps);
* ``loop T``: the exporters' body in an ONNX ``Loop`` (its chunks gathered by index) instead of a ``Scan``.

The limit: a step must at least compute exp(delta A), multiply by h, add b, form b and contract with C, five
passes over the (S, N, E) states; ``limit`` is 5 x L x S x N x E elements at the runtime's own rate for one
elementwise operator on a chunk-sized tensor (measured here, in the same run). Each point runs in a fresh process
(its peak resident memory is its own).

    python benchmarks/stock_scan.py [--length 197] [--repeats 5]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch._higher_order_ops.scan import scan_op
from torch._higher_order_ops.while_loop import while_loop

from visionmamba.ops.scan import loop
from visionmamba.ops.scan.toolchain import cpu_model

BATCH, CHANNELS, RANK, STATE = 8, 384, 12, 16


def chunked(t: torch.Tensor, steps: int, axis: int) -> torch.Tensor:
    """(L, S, F) -> (L / steps, steps, S, F) with a unit axis at ``axis`` (loop.scan_states' chunks)."""
    length, seqs, features = t.shape
    return t.reshape(length // steps, steps, seqs, features).unsqueeze(axis)


def chunk_ops(delta, du, A, B, C, steps):
    seqs, channels, state = delta.shape[1], delta.shape[2], B.shape[-1]

    def body(h, A, deltas, dus, Bs, Cs):
        a, b, Cs = torch.exp(deltas * A).split(1), (Bs * dus).split(1), Cs.split(1)
        ys = []
        for k in range(steps):
            h = a[k] * h + b[k]
            ys.append(torch.matmul(Cs[k], h))
        return [h, A.clone(), torch.cat(ys)]

    xs = [chunked(delta, steps, -2), chunked(du, steps, -2), chunked(B, steps, -1), chunked(C, steps, -2)]
    _, _, y = scan_op(body, [delta.new_zeros(1, seqs, state, channels), A.contiguous()], xs, ())
    return y.reshape(delta.shape)


def closed_form(delta, du, A, B, C, steps, floor=-15.0):
    seqs, channels, state = delta.shape[1], delta.shape[2], B.shape[-1]

    def body(h, A, deltas, dus, Bs, Cs):
        P = torch.exp(torch.cumsum((deltas * A).clamp_min(floor), 0))
        H = P * (h + torch.cumsum(Bs * dus / P, 0))
        return [H[-1:], A.clone(), torch.matmul(Cs, H)]

    xs = [chunked(delta, steps, -2), chunked(du, steps, -2), chunked(B, steps, -1), chunked(C, steps, -2)]
    _, _, y = scan_op(body, [delta.new_zeros(1, seqs, state, channels), A.contiguous()], xs, ())
    return y.reshape(delta.shape)


def onnx_loop(delta, du, A, B, C, steps):
    seqs, channels, state = delta.shape[1], delta.shape[2], B.shape[-1]
    xs = [chunked(delta, steps, -2), chunked(du, steps, -2), chunked(B, steps, -1), chunked(C, steps, -2)]
    ys0 = delta.new_zeros(xs[0].shape[0], steps, seqs, 1, channels)

    def cond(i, h, ys):
        return i < xs[0].shape[0]

    def body(i, h, ys):
        deltas, dus, Bs, Cs = (t.index_select(0, i.reshape(1))[0].split(1) for t in xs)
        out = []
        for k in range(steps):
            h = torch.exp(deltas[k] * A) * h + torch.matmul(Bs[k], dus[k])
            out.append(torch.matmul(Cs[k], h))
        return i + 1, h, ys.index_copy(0, i.reshape(1), torch.cat(out)[None])

    _, _, y = while_loop(cond, body, (torch.zeros((), dtype=torch.int64), delta.new_zeros(1, seqs, state, channels), ys0))
    return y.reshape(delta.shape)


def exporters_scan(steps):
    return lambda delta, du, A, B, C: loop.scan_states(delta, du, A, B, C, steps=steps)


CANDIDATES = {
    "scan 4": (exporters_scan(4), 4), "scan 8 (the exporters')": (exporters_scan(8), 8), "scan 16": (exporters_scan(16), 16),
    "scan 8, chunk ops": (lambda *a: chunk_ops(*a, 8), 8), "scan 4, closed form": (lambda *a: closed_form(*a, 4), 4),
    "loop 8": (lambda *a: onnx_loop(*a, 8), 8),
}


class BiScan(torch.nn.Module):
    """loop.bi_scan with its recurrence replaced by a candidate's (the same glue around every candidate)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.recurrence, self.steps = CANDIDATES[name]

    def forward(self, u, x_proj_out, dt_weight, A, D, z, bias):
        _, batch, length, channels = u.shape
        state, rank = A.shape[-1], dt_weight.shape[-1]
        u, x_proj_out = (torch.cat([t[:1], t[1:].flip(2)]) for t in (u, x_proj_out))
        dt, B, C = x_proj_out.split([rank, state, state], dim=-1)
        delta = loop.softplus(torch.matmul(dt, dt_weight.transpose(1, 2)[:, None]) + bias[:, None, None])

        def per_sequence(t):  # (2, b, L, F) -> (L + pad, 2b, F)
            t = t.permute(2, 0, 1, 3).reshape(length, 2 * batch, t.shape[-1])
            return F.pad(t, (0, 0, 0, 0, 0, -length % self.steps))

        A_seq = A.transpose(1, 2)[:, None].expand(2, batch, state, channels).reshape(2 * batch, state, channels)
        y = self.recurrence(per_sequence(delta), per_sequence(delta * u), A_seq, per_sequence(B), per_sequence(C))
        y = y[:length].reshape(length, 2, batch, channels).permute(1, 2, 0, 3) + u * D[:, None, None]
        return ((y[0] + y[1].flip(1)) / 2) * F.silu(z)


def inputs(length: int):
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    A = -torch.exp(torch.log(torch.arange(1, STATE + 1.0)).expand(2, CHANNELS, STATE) + 0.1 * r(2, CHANNELS, STATE))
    return (F.silu(r(2, BATCH, length, CHANNELS)), r(2, BATCH, length, RANK + 2 * STATE), 0.3 * r(2, CHANNELS, RANK), A,
            r(2, CHANNELS), r(BATCH, length, CHANNELS), r(2, CHANNELS) - 3)


POINT = """
import json, sys, time, numpy as np
runtime, path, feeds, repeats = sys.argv[1], sys.argv[2], np.load(sys.argv[3]), int(sys.argv[4])
arrays = [feeds[f"a{i}"] for i in range(7)]
if runtime == "onnxruntime":
    import onnxruntime
    s = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    run = lambda: s.run(None, dict(zip([i.name for i in s.get_inputs()], arrays)))[0]
else:
    import openvino
    c = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    run = lambda: c(arrays)[0]
def peak_mb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
out = run()
times = []
for _ in range(repeats):
    start = time.perf_counter(); run(); times.append(time.perf_counter() - start)
print(json.dumps({"ms": 1e3 * sorted(times)[len(times) // 2], "out": out.ravel()[:4096].tolist(), "peak_mb": peak_mb()}))
"""

ELEMENTWISE = """
import json, sys, time, numpy as np, onnx, onnxruntime
from onnx import helper, TensorProto
shape = json.loads(sys.argv[1])
g = helper.make_graph([helper.make_node("Mul", ["a", "b"], ["c"])], "g",
                      [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "ab"],
                      [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)])
s = onnxruntime.InferenceSession(helper.make_model(g).SerializeToString(), providers=["CPUExecutionProvider"])
a = np.random.rand(*shape).astype(np.float32)
for _ in range(3): s.run(None, {"a": a, "b": a})
start = time.perf_counter()
for _ in range(50): s.run(None, {"a": a, "b": a})
print(json.dumps({"G_el_per_s": 50 * a.size / (time.perf_counter() - start) / 1e9}))
"""


def run_point(runtime: str, path: Path, feeds: Path, repeats: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", POINT, runtime, str(path), str(feeds), str(repeats)], capture_output=True,
                          text=True, timeout=1200)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=197, help="tokens (197: 224 px, 1025: 512 px)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per point (the median is kept)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per point, interleaved (the fastest is kept: "
                                                              "this VM's speed changes between processes)")
    parser.add_argument("--only", nargs="+", choices=sorted(CANDIDATES), help="measure these candidates only")
    args = parser.parse_args()
    L, S = args.length, 2 * BATCH
    arrays = inputs(L)
    expected = loop.bi_scan(*arrays).numpy().ravel()[:4096]
    rate = json.loads(subprocess.run([sys.executable, "-c", ELEMENTWISE, json.dumps([8, S, STATE, CHANNELS])],
                                     capture_output=True, text=True, check=True).stdout)["G_el_per_s"]
    limit_ms = 5 * L * S * STATE * CHANNELS / (rate * 1e9) * 1e3
    print(f"{cpu_model()}, torch {torch.__version__}; one Vim-Ti block's scan, batch {BATCH}, L {L}; ONNX Runtime's "
          f"elementwise rate {rate:.2f} G el/s -> limit {limit_ms:.2f} ms (5 passes over the states)")
    print("| candidate | ONNX Runtime ms | x limit | OpenVINO ms | peak MB (ORT / OV) | max abs diff | export s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        feeds = Path(scratch) / "feeds.npz"
        np.savez(feeds, **{f"a{i}": a.numpy() for i, a in enumerate(arrays)})
        export_s = {}
        names = args.only or list(CANDIDATES)
        for name in names:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(BiScan(name), arrays, str(Path(scratch) / f"{names.index(name)}.onnx"), dynamo=True,
                                  verbose=False)
            export_s[name] = time.perf_counter() - start
        points = {(n, r): [] for n in names for r in ("onnxruntime", "openvino")}
        for _ in range(args.rounds):
            for name in names:
                for runtime in ("onnxruntime", "openvino"):
                    points[name, runtime].append(run_point(runtime, Path(scratch) / f"{names.index(name)}.onnx", feeds,
                                                           args.repeats))
        for name in names:
            ort, ov = (min(points[name, r], key=lambda p: p.get("ms", float("inf"))) for r in ("onnxruntime", "openvino"))
            print_row(name, ort, ov, expected, limit_ms, export_s[name])


def print_row(name: str, ort: dict, ov: dict, expected: np.ndarray, limit_ms: float, export_s: float) -> None:
    diffs = [np.abs(np.array(p["out"]) - expected).max() for p in (ort, ov) if "out" in p]
    cells = [f"{p['ms']:.2f}" if "ms" in p else p["error"] for p in (ort, ov)]
    ratio = f"{ort['ms'] / limit_ms:.1f}" if "ms" in ort else "-"
    peaks = " / ".join(f"{p['peak_mb']:.0f}" if "peak_mb" in p else "-" for p in (ort, ov))
    diff = f"{max(diffs):.1e}" if diffs else "-"
    print(f"| {name} | {cells[0]} | {ratio} | {cells[1]} | {peaks} | {diff} | {export_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
