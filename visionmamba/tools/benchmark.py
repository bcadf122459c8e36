"""``visionmamba benchmark``: images/s and peak memory per model and resolution, in the style of the paper's
Figure 1 (speed and memory vs resolution), with ratios against the first model measured in the same run.

CPU points run each in a fresh process (peak resident memory is per process); GPU points run in this
process with CUDA's peak-allocated counter reset per point. Out of memory is recorded as such.
A model spec is a timm name, optionally with ":naive" to turn off fused attention (DeiT), ":onednn" to
give its plain linears Vim's oneDNN route (like-for-like matrix products on the CPU), ":onnx" to run
it in ONNX Runtime (CPU execution provider, the same thread count, our kernels of the fused nodes
registered), ":onnx-fallback" to run the same file without our kernels (the nodes' standard-operator bodies),
":onnx-standard" the standard-ops file (``--ops standard``), ":openvino" and ":openvino-standard" the fused
file with our extension and the standard-ops file in OpenVINO (float32), ":onnx-int8" / ":openvino-int8" the
fused file in int8 (``visionmamba quantize``'s tools, with our kernels): the model is exported first (Vim
through ``visionmamba export``'s graph, others with ``torch.onnx``) and measured by
:mod:`visionmamba.deploy.runtime_point` in a process without torch.
"""
import csv
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from visionmamba.files import atomic_write, refuse_existing
from visionmamba.ops.linear import use_onednn_linears
from visionmamba.ops.memory import keep_freed_memory, peak_memory_mb, reset_peak_memory
from visionmamba.tools.precision import autocast


@dataclass
class Point:
    model: str
    res: int
    batch: int
    mode: str  # "infer" or "train"
    status: str = "ok"  # ok | OOM | error: ...
    img_per_s: float = float("nan")
    peak_mem_mb: float = float("nan")


# variant -> (runtime, the file: "fused" with our kernels, "fallback" the same without them, "standard" the
# standard-ops file, "int8" the fused file quantized by `visionmamba quantize`'s path, with our kernels)
RUNTIME_VARIANTS = {"onnx": ("onnxruntime", "fused"), "onnx-fallback": ("onnxruntime", "fallback"),
                    "onnx-standard": ("onnxruntime", "standard"), "onnx-int8": ("onnxruntime", "int8"),
                    "openvino": ("openvino", "fused"), "openvino-standard": ("openvino", "standard"),
                    "openvino-int8": ("openvino", "int8")}
CALIBRATION_BATCHES = 4  # of 8 random images: speed does not depend on what the ranges were calibrated on


def build(spec: str, res: int) -> torch.nn.Module:
    """A model from ``name[:naive|:onednn]`` for res x res inputs."""
    import timm

    import visionmamba.models  # noqa: F401  (registers the Vim entrypoints)

    name, _, variant = spec.partition(":")
    model = timm.create_model(name, img_size=res)
    if variant == "naive":
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
    elif variant == "onednn":
        use_onednn_linears(model)
    elif variant:
        raise ValueError(f"unknown model variant {variant!r} in {spec!r} (':naive', ':onednn', or one of "
                         f"{', '.join(':' + v for v in RUNTIME_VARIANTS)})")
    return model


def onnx_file(name: str, res: int, folder: Path) -> Path:
    """``name`` exported for res x res inputs, written to ``folder`` (afresh: a file from an older run may
    hold an older graph)."""
    import timm

    from visionmamba.deploy.export import export_onnx
    from visionmamba.models.registry import VARIANTS

    path = folder / f"{name}_{res}.onnx"
    if path in _EXPORTED:
        return path
    if name in VARIANTS:
        export_onnx(name, path, img_size=res, check=False, overwrite=True)
    else:
        model = timm.create_model(name, img_size=res).eval()
        batch = {0: torch.export.Dim("batch")}
        with torch.no_grad():
            program = torch.onnx.export(model, (torch.randn(2, 3, res, res),), dynamo=True, external_data=False, verbose=False,
                                        dynamic_shapes=(batch,))
        atomic_write(path, program.save)
    _EXPORTED.add(path)
    return path


_EXPORTED: set = set()  # the files this process wrote (several variants of a point share one)


def standard_file(path: Path) -> Path:
    """The standard-ops file of the ONNX file at ``path`` (what ``visionmamba export --ops standard`` writes)."""
    import onnx

    from visionmamba.deploy.onnx_graph import standard_operators

    out = path.with_name(path.stem + "_standard.onnx")
    model = standard_operators(onnx.load(str(path)))
    atomic_write(out, lambda tmp: onnx.save(model, tmp))
    return out


def int8_file(path: Path, runtime: str, res: int, library: Path) -> Path:
    """The ONNX file at ``path`` in int8 for ``runtime``, by ``visionmamba quantize``'s tools (calibrated on
    random images: the ranges change the accuracy, not the speed)."""
    from visionmamba.deploy import quantize

    fmt = "onnx" if runtime == "onnxruntime" else "openvino"
    quantize.require(fmt)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((8, 3, res, res), dtype=np.float32) for _ in range(CALIBRATION_BATCHES)]
    out = path.with_name(path.stem + ("_int8.onnx" if fmt == "onnx" else "_int8.xml"))
    keep_float = quantize.KEEP_FLOAT[fmt] if path.name.startswith("vim_") else ()  # the command's defaults, for Vim
    if fmt == "onnx":
        quantize.onnx_int8(path, out, batches, keep_float)
    else:
        quantize.write_openvino(quantize.openvino_int8(path, batches, str(library), keep_float), out)
    return out


def runtime_library(runtime: str) -> Path:
    """Our kernel library for ``runtime`` (built here, so the point's process needs no torch to find it)."""
    from visionmamba.deploy import runtime_kernels

    kind = {"onnxruntime": runtime_kernels.ONNXRUNTIME, "openvino": runtime_kernels.OPENVINO}[runtime]
    ok, reason = runtime_kernels.available(kind)
    if not ok:
        raise RuntimeError(f"our {runtime} kernel cannot be built here ({reason}); measure the '-fallback' variant")
    return runtime_kernels.library_path(kind)


def measure_runtime_in_fresh_process(spec: str, runtime: str, path: Path, res: int, batch: int, repeats: int,
                                     threads: int, library: Optional[Path]) -> Point:
    """One ONNX Runtime or OpenVINO point in its own process (:mod:`visionmamba.deploy.runtime_point`), with
    the kernel library ``library`` loaded (None: none)."""
    script = Path(__file__).resolve().parents[1] / "deploy" / "runtime_point.py"
    args = [runtime, str(path), str(res), str(batch), str(repeats), str(threads), str(library) if library else "-"]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    return _point_from(proc, Point(spec, res, batch, "infer"))


def measure(spec: str, res: int, batch: int, device: str, precision: str, train: bool, repeats: int) -> Point:
    """Time ``repeats`` steps after a warm-up step; peak memory of the timed steps (the model and input
    included; the warm-up's one-off allocations, such as Triton's autotuning trials, are not)."""
    point = Point(spec, res, batch, "train" if train else "infer")
    dev = torch.device(device)
    if dev.type == "cpu":
        keep_freed_memory()  # every model under the allocator settings Vim's CPU path uses (visionmamba.ops.memory)
    try:
        model = build(spec, res).to(dev)
        x = torch.randn(batch, 3, res, res, device=dev)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
        model.train(train)

        def step() -> None:
            if train:
                with autocast(precision, dev):
                    loss = model(x).float().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                with torch.no_grad(), autocast(precision, dev):
                    model(x)

        step()
        _sync(dev)
        reset_peak_memory(dev)
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        _sync(dev)
        point.img_per_s = batch * repeats / (time.perf_counter() - start)
        point.peak_mem_mb = peak_memory_mb(dev)
    except (torch.cuda.OutOfMemoryError, MemoryError):
        point.status = "OOM"
    except Exception as err:  # noqa: BLE001  (a Triton compile or launch error is a plain Exception: one point's status)
        point.status = "OOM" if "out of memory" in str(err).lower() else f"error: {error_line(err)}"
    return point


def error_line(err: BaseException, width: int = 120) -> str:
    """``Type: first line of the message`` (cut to ``width``), for a status that fits a table cell."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:width]}"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure_in_fresh_process(spec: str, res: int, batch: int, precision: str, train: bool, repeats: int,
                             threads: int) -> Point:
    """One CPU point in its own process, so its peak memory is its own."""
    args = json.dumps(dict(spec=spec, res=res, batch=batch, precision=precision, train=train, repeats=repeats,
                           threads=threads))
    code = (
        "import json, sys, torch\n"
        "from visionmamba.tools.benchmark import measure\n"
        f"a = json.loads({args!r})\n"
        "torch.set_num_threads(a['threads'])\n"
        "p = measure(a['spec'], a['res'], a['batch'], 'cpu', a['precision'], a['train'], a['repeats'])\n"
        "from dataclasses import asdict\n"
        "print('POINT ' + json.dumps(asdict(p)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return _point_from(proc, Point(spec, res, batch, "train" if train else "infer"))


def _point_from(proc: subprocess.CompletedProcess, point: Point) -> Point:
    """``point`` completed from a measuring process's ``POINT {...}`` line, or marked OOM / error."""
    line = next((l for l in proc.stdout.splitlines() if l.startswith("POINT ")), None)
    if line is None:
        killed = proc.returncode in (-9, 137)  # the kernel's OOM killer
        point.status = "OOM" if killed else f"error: {(proc.stderr.strip().splitlines() or ['exit ' + str(proc.returncode)])[-1][:120]}"
        return point
    for key, value in json.loads(line[len("POINT "):]).items():
        setattr(point, key, value)
    return point


def run_benchmark(
    models: List[str], resolutions: List[int], *, batch: int, device: str = "cpu", precision: str = "fp32",
    train: bool = False, repeats: int = 3, threads: int = 2, out: Optional[Path] = None, progress: bool = True,
    overwrite: bool = False,
) -> List[Point]:
    """Every (model, resolution) point; writes ``benchmark.csv`` and ``benchmark.png`` under ``out`` (an earlier
    benchmark there is refused before any point is measured, unless ``overwrite``)."""
    onnx_specs = [spec for spec in models if spec.partition(":")[2] in RUNTIME_VARIANTS]
    if onnx_specs and (device != "cpu" or train or precision != "fp32"):
        raise ValueError(f"{onnx_specs}: runtime points are CPU inference (float32, or int8 files) (drop --train / --precision / --device)")
    autocast(precision, torch.device(device))  # refused before any point is measured
    if out is not None:
        refuse_existing([out / "benchmark.csv", out / "benchmark.png"], overwrite=overwrite, what="benchmark result")
    points = []
    with tempfile.TemporaryDirectory(prefix="visionmamba-onnx-") as scratch:
        onnx_folder = Path(scratch) if out is None else out / "onnx"
        for res in resolutions:
            for spec in models:
                point = _measure_point(spec, res, batch, device, precision, train, repeats, threads, onnx_folder)
                if progress:
                    print(f"  {spec} @ {res}: {point.status}, {point.img_per_s:.1f} img/s, {point.peak_mem_mb:.0f} MB", flush=True)
                points.append(point)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(points, out / "benchmark.csv")
        plot(points, out / "benchmark.png", title=f"{device}, {precision}, batch {batch}, {'training' if train else 'inference'}")
    return points


def _measure_point(spec: str, res: int, batch: int, device: str, precision: str, train: bool, repeats: int, threads: int,
                   onnx_folder: Path) -> Point:
    name, _, variant = spec.partition(":")
    if variant in RUNTIME_VARIANTS:
        runtime, form = RUNTIME_VARIANTS[variant]
        path = onnx_file(name, res, onnx_folder)
        library = runtime_library(runtime) if form in ("fused", "int8") else None
        if form == "standard":
            path = standard_file(path)
        elif form == "int8":
            path = int8_file(path, runtime, res, library)
        return measure_runtime_in_fresh_process(spec, runtime, path, res, batch, repeats, threads, library)
    if device == "cpu":
        return measure_in_fresh_process(spec, res, batch, precision, train, repeats, threads)
    point = measure(spec, res, batch, device, precision, train, repeats)
    torch.cuda.empty_cache()
    return point


def ratio_table(points: List[Point]) -> str:
    """Markdown table: img/s and memory per point, with ratios against the first model at the same resolution."""
    first = points[0].model
    base = {p.res: p for p in points if p.model == first}
    lines = ["| model | res | img/s | peak MB | speed vs first | memory vs first |", "|---|---|---|---|---|---|"]
    for p in points:
        b = base.get(p.res)
        if p.status != "ok":
            lines.append(f"| {p.model} | {p.res} | {p.status} | {p.status} | - | - |")
            continue
        speed = p.img_per_s / b.img_per_s if b and b.status == "ok" else float("nan")
        mem = p.peak_mem_mb / b.peak_mem_mb if b and b.status == "ok" else float("nan")
        lines.append(f"| {p.model} | {p.res} | {p.img_per_s:.1f} | {p.peak_mem_mb:.0f} | {speed:.2f}x | {mem:.2f}x |")
    return "\n".join(lines)


def write_csv(points: List[Point], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(points[0])))
        writer.writeheader()
        writer.writerows(asdict(p) for p in points)


def plot(points: List[Point], path: Path, title: str = "") -> None:
    """Speed (log scale) and peak memory vs resolution, one line per model; out-of-memory points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for spec in dict.fromkeys(p.model for p in points):
        mine = [p for p in points if p.model == spec]
        ok = [p for p in mine if p.status == "ok"]
        line = ax_speed.plot([p.res for p in ok], [p.img_per_s for p in ok], marker="o", label=spec)[0]
        ax_mem.plot([p.res for p in ok], [p.peak_mem_mb / 1024 for p in ok], marker="o", color=line.get_color(), label=spec)
        for p in mine:
            if p.status == "OOM":
                top = max([q.peak_mem_mb / 1024 for q in points if q.status == "ok"] or [1.0])
                ax_mem.scatter([p.res], [top * 1.1], marker="x", color=line.get_color())
                ax_mem.annotate("OOM", (p.res, top * 1.1), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_speed.set_yscale("log")
    ax_speed.set_xlabel("resolution"), ax_speed.set_ylabel("images / s (log)"), ax_speed.legend(fontsize=8)
    ax_mem.set_xlabel("resolution"), ax_mem.set_ylabel("peak memory (GB)"), ax_mem.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


