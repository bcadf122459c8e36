"""Session set-up. Triton reads TRITON_INTERPRET once, when it is first imported (torch.compile imports
it too), so on a machine without a GPU the interpreter is switched on here, before any test runs."""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> Path:
    """Tiny digit scenes (8 training, 4 validation, 64x64) in the ADE20K and COCO layouts."""
    from visionmamba.data.digits import write_scenes

    root = tmp_path_factory.mktemp("scenes")
    write_scenes(root, train=8, val=4, size=64)
    return root
