"""Session set-up. Triton reads TRITON_INTERPRET once, when it is first imported (torch.compile imports
it too), so on a machine without a GPU the interpreter is switched on here, before any test runs."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
