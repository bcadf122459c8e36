"""Peak GPU memory of batch inference, estimated without a GPU: Vim-Ti (Triton path) against DeiT-Ti.

Each model runs its bf16-autocast inference forward on fake tensors (``torch._subclasses.FakeTensorMode``:
shapes, dtypes and allocations, no data) under PyTorch's ``MemTracker``, which counts every tensor's storage
from allocation to release: the peak is the model, the float32 input images and the largest set of live
activations. Triton's kernels are custom ops whose fake implementations allocate exactly their outputs, as
the kernels do (the in-place inference scan allocates nothing), so nothing runs and no CUDA device is
needed. Not counted: CUDA's context, cuBLAS and attention workspaces, the allocator's fragmentation. A GPU
run (benchmarks/gpu_check.py) is the final word; this tells where the memory goes before one.

    python benchmarks/memory_estimate.py                            # 224 .. 2048, batch 128
    python benchmarks/memory_estimate.py --res 1248 --batch 128 --models vim_tiny_patch16_224
"""
import argparse
import os
import sys
from typing import List, Optional

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the Triton backend resolve without CUDA; only fakes run

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402

from visionmamba.ops import library  # noqa: E402
from visionmamba.tools.benchmark import build  # noqa: E402

MODELS = ["vim_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_patch16_224:naive"]
GIB = 2**30


def peak_bytes(spec: str, res: int, batch: int) -> int:
    """Estimated peak bytes of one bf16-autocast inference forward of ``spec`` on (batch, 3, res, res)."""
    model = build(spec, res).eval()
    if hasattr(model, "set_scan_backend"):
        model.set_scan_backend("triton")
    with library.cuda_kernels_on_cpu(), FakeTensorMode(allow_non_fake_inputs=True):  # the CUDA kernels' fakes
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            images = torch.randn(batch, 3, res, res)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                model(images)
        peak = tracker.get_tracker_snapshot("peak")
    return int(sum(per_device["Total"] for per_device in peak.values()))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="timm names, ':naive' for plain attention")
    parser.add_argument("--res", type=int, nargs="+", default=[224, 512, 1024, 1248, 2048])
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    print("| model | " + " | ".join(f"{r}x{r}" for r in args.res) + " |")
    print("|---|" + "---|" * len(args.res))
    for spec in args.models:
        try:
            cells = [f"{peak_bytes(spec, res, args.batch) / GIB:.2f} GiB" for res in args.res]
        except (RuntimeError, ValueError) as err:  # an unknown model or variant, a size the model cannot take
            print(f"memory_estimate: {spec}: {str(err).splitlines()[0]}", file=sys.stderr)
            return 2
        print(f"| {spec} (batch {args.batch}) | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
