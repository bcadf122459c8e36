"""Whether the Triton kernels work on a GPU, tried once per device before ``auto`` picks them there.

A GPU Triton cannot target, an old driver, a kernel that fails to compile or launch (out of shared memory),
or one that runs but computes wrong values would otherwise end the user's run with a traceback, or worse. The
probe runs every Triton kernel the models use (mixer core and one-direction scan, forward and backward; the
pre-norm step and its in-place forms) on a small problem shaped like Vim-Ti's, waits for the device, and
compares the results with the reference. ``auto`` then falls back to the portable backend for that device
with one warning; an explicit ``backend="triton"`` is never probed and raises what the kernels raise.
"""
import functools
import warnings
from typing import Optional

import torch

from visionmamba.ops import library
from visionmamba.ops.scan import fused, reference

REPORT = "please report it with the output of `visionmamba env`"


def problem(device: torch.device, small: bool):
    """Mixer-core inputs: Vim-Ti's widths (E 384, N 16, dt rank 12) over 197 tokens on a GPU; tiny in the
    interpreter, which runs every program in Python."""
    batch, length, channels, state, rank = (1, 11, 16, 4, 2) if small else (2, 197, 384, 16, 12)
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    tensors = (r(batch, length, channels), r(batch, length, channels), r(2, channels, 4) * .3, r(2, channels) * .1,
               r(2, rank + 2 * state, channels) / 6, r(2, channels, rank) / 2, r(2, channels) * .1,
               -torch.exp(r(2, channels, state) * .3), 1 + .1 * r(2, channels))
    return [t.to(device) for t in tensors]


def _check(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    got, expected = got.float(), expected.float()
    error = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    if not error <= 1e-3 * max(expected.abs().max().item(), 1.0):  # also catches NaN
        raise RuntimeError(f"{name} computed wrong values (max error {error:.3g} against the reference)")


def run_kernels(device: torch.device) -> None:
    """Every Triton kernel on ``device`` once, checked against the reference; raises what goes wrong."""
    small = device.type != "cuda"  # CPU tensors routed to the Triton interpreter (tests)
    args = problem(device, small)
    leaves = [t.clone().requires_grad_(True) for t in args]
    out = fused.bidirectional(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in args]
    expected = reference.bidirectional(*ref_leaves)
    expected_grads = torch.autograd.grad(expected.square().sum(), ref_leaves)
    _check("the mixer core", out, expected)
    for got, want in zip(grads, expected_grads):
        _check("the mixer core's backward", got, want)
    with torch.no_grad():
        _check("the in-place mixer core", fused.bidirectional(*args), expected)

    u, delta = args[0].transpose(1, 2).contiguous(), args[1].transpose(1, 2).contiguous().sigmoid()
    A, B, C = args[7][0], args[0][:, :, : args[7].shape[-1]].transpose(1, 2), args[1][:, :, : args[7].shape[-1]].transpose(1, 2)
    one = [t.clone().requires_grad_(True) for t in (u, delta, A, B.contiguous(), C.contiguous())]
    y = fused.selective_scan(*one, D=args[8][0], delta_softplus=True)
    grads = torch.autograd.grad(y.sum(), one)
    ref_one = [t.detach().double().requires_grad_(True) for t in one]
    y_ref = reference.selective_scan(*ref_one, D=args[8][0].double(), delta_softplus=True)
    _check("the one-direction scan", y, y_ref)
    for got, want in zip(grads, torch.autograd.grad(y_ref.sum(), ref_one)):
        _check("the one-direction scan's backward", got, want)

    from visionmamba.ops import norm

    hidden, residual, weight = args[0], args[1].clone(), 1 + args[3][0]
    leaves = [t.clone().requires_grad_(True) for t in (hidden, residual, weight)]
    y, added = norm.fused(*leaves, 1e-5)
    grads = torch.autograd.grad(y.sum() + added.sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (hidden, residual, weight)]
    y_ref, added_ref = norm.reference(*ref_leaves, 1e-5)
    _check("the pre-norm step", y, y_ref)
    for got, want in zip(grads, torch.autograd.grad(y_ref.sum() + added_ref.sum(), ref_leaves)):
        _check("the pre-norm step's backward", got, want)
    with torch.no_grad():
        _check("the in-place pre-norm step", norm.fused(hidden, residual.clone(), weight, 1e-5, inplace=True)[0], y_ref)
        _check("the first block's norm", norm.fused(hidden.clone(), None, weight, 1e-5, inplace=True)[0],
               norm.reference(hidden.double(), None, weight.double(), 1e-5)[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # launch failures surface here, not at the launch


def _describe(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device} (Triton's interpreter)"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{device} ({torch.cuda.get_device_name(device)}, sm_{major}{minor})"


@functools.cache
def failure(device_type: str, index: Optional[int]) -> Optional[str]:
    """Why the Triton kernels do not work on the device, or None when they do; tried once per device (and
    warned about once)."""
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:  # whatever the caller's modes: the probe differentiates, in float32
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            run_kernels(device)
    except Exception as err:  # compile errors, out of resources, driver errors, wrong values: all fall back
        lines = str(err).strip().splitlines() or [""]
        cause = f"{type(err).__name__}: {lines[0][:300]}"
        try:
            import triton

            version = f"Triton {triton.__version__}"
        except ImportError:  # pragma: no cover - the probe runs only where Triton imports
            version = "Triton"
        warnings.warn(f"visionmamba: the Triton kernels failed on {_describe(device)} with {version} ({cause}); "
                      f"using the pure-PyTorch 'chunked' scan and plain norms there (slower). This is a bug: {REPORT}")
        return cause
    return None


@torch.compiler.assume_constant_result
def triton_works(device_type: str, index: int) -> bool:
    """True when the Triton kernels passed the probe on the device (index -1: the current one)."""
    return failure(device_type, None if index < 0 else index) is None


def routed(device: torch.device) -> bool:
    """True for tensors the Triton kernels run: CUDA ones, or CPU ones routed to the interpreter."""
    return device.type == "cuda" or library.routed_to_cuda(device.type)
