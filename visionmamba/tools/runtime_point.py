"""One ONNX Runtime point of ``visionmamba benchmark``, run as a script in a fresh process:

    python onnx_point.py FILE RES BATCH REPEATS THREADS

It imports neither torch nor visionmamba, so the peak memory it reports is the runtime's own (read as the
PyTorch points read theirs: the process's peak resident set, started anew once the weights are loaded).
Prints ``POINT {"img_per_s": ..., "peak_mem_mb": ...}``.
"""
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime


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


def main(argv: list) -> None:
    path, (res, batch, repeats, threads) = argv[0], map(int, argv[1:5])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch, 3, res, res), dtype=np.float32)}
    reset_peak()
    session.run(None, feed)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, feed)
    img_per_s = batch * repeats / (time.perf_counter() - start)
    print("POINT " + json.dumps({"img_per_s": img_per_s, "peak_mem_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main(sys.argv[1:])
