"""``--precision`` of the inference commands: fp32, or bf16 autocast where the device computes in bf16."""
import contextlib
from typing import ContextManager

import torch

PRECISIONS = ("fp32", "bf16")


def bf16_supported(device: torch.device) -> bool:
    """True when ``device`` runs bf16 matrix products natively (CPU: AVX-512-BF16, AMX or ARM's bf16, as
    oneDNN reports; CUDA: compute capability 8.0 or later)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The autocast context of ``precision`` on ``device``; a ValueError (one line for the CLI) for bf16 where
    the device has no bf16 arithmetic (it would be emulated, slower than fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if not bf16_supported(device):
        raise ValueError(f"--precision bf16 needs a device with bf16 arithmetic; {device} has none "
                         "(CPUs: AVX-512-BF16, AMX or ARMv8.6 bf16; GPUs: compute capability 8.0+). Use fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16)
