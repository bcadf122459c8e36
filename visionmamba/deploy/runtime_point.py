"""One ONNX Runtime or OpenVINO point of ``visionmamba benchmark``, run as a script in a fresh process:

    python runtime_point.py RUNTIME FILE RES BATCH REPEATS THREADS LIBRARY

RUNTIME is ``onnxruntime`` or ``openvino`` (CPU, float32: OpenVINO's default bf16 on CPUs that have it is
turned off, as the other points are float32). It imports neither torch nor visionmamba, so the peak memory it
reports is the runtime's own (read as the PyTorch points read theirs: the process's peak resident set,
started anew once the weights are loaded). LIBRARY is the path of our kernel library for that runtime (its
kernel of the scan node), or ``-``. Prints ``POINT {"img_per_s": ..., "peak_mem_mb": ...}``.
"""
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np


def _process_module():
    """visionmamba/ops/rss.py loaded by path: importing the package would import torch."""
    path = Path(__file__).resolve().parents[1] / "ops" / "rss.py"
    spec = importlib.util.spec_from_file_location("visionmamba_rss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peak_rss_mb = _process_module().peak_rss_mb


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def onnxruntime_runner(path: str, threads: int, library: str):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if library != "-":
        options.register_custom_ops_library(library)
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def openvino_runner(path: str, threads: int, library: str):
    import openvino

    core = openvino.Core()
    if library != "-":
        core.add_extension(library)
    config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    compiled = core.compile_model(core.read_model(path), "CPU", config)
    return lambda x: compiled(x)


def main(argv: list) -> None:
    runtime, path, (res, batch, repeats, threads), library = argv[0], argv[1], map(int, argv[2:6]), argv[6]
    run = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner}[runtime](path, threads, library)
    x = np.random.default_rng(0).standard_normal((batch, 3, res, res), dtype=np.float32)
    reset_peak()
    run(x)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        run(x)
    img_per_s = batch * repeats / (time.perf_counter() - start)
    print("POINT " + json.dumps({"img_per_s": img_per_s, "peak_mem_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main(sys.argv[1:])
