"""Session set-up. Triton reads TRITON_INTERPRET once, when it is first imported (torch.compile imports
it too), so on a machine without a GPU the interpreter is switched on here, before any test runs."""
import os
from pathlib import Path

import pytest
import torch

# pytest-xdist's workers share the machine's cores: each takes its share of torch's threads. Oversubscribed,
# OpenMP's waiting threads spin on the cores the other worker needs (the golden parity tests ran ~9x slower).
# tests/ops/test_scan.py runs the kernels with several threads on purpose.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # the references' matrix products and convolutions in full float32, as the kernels compute
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> Path:
    """Tiny digit scenes (8 training, 4 validation, 64x64) in the ADE20K and COCO layouts."""
    from visionmamba.data.digits import write_scenes

    root = tmp_path_factory.mktemp("scenes")
    write_scenes(root, train=8, val=4, size=64)
    return root


@pytest.fixture
def cuda_kernels():
    """The CUDA (Triton) kernels run the test's tensors: on the GPU when there is one, else CPU tensors run
    them in Triton's interpreter (the dispatcher would otherwise pick the CPU kernels for them)."""
    if torch.cuda.is_available():
        yield
        return
    from visionmamba.ops import library

    with library.cuda_kernels_on_cpu():
        yield


@pytest.fixture(autouse=True)
def fresh_compiler_caches():
    """Each test compiles from scratch: torch.compile's frame cache outlives a test, and a model compiled
    again at another size is recompiled with dynamic shapes, a different path (docs/timm.md: training a compiled
    model at several sizes), so results would depend on which tests ran before in the same process."""
    yield
    torch._dynamo.reset()
