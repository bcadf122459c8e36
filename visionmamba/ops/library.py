"""The fused operations as ``torch.library`` ops: one declaration each (schema, fake, autograd) and, per
device type, the module whose kernel of the same name runs it (the spirit of torchvision's ``csrc/ops``:
one op, a kernel per device). torch.compile and torch.export see each op as one opaque node.

The ops, and why each exists (shapes in the kernels' docstrings; the math in ``scan/reference.py``):

* ``selective_scan`` / ``selective_scan_backward``: the public one-direction scan of the kernel backends.
* ``conv_silu`` / ``conv_silu_backward``: the depthwise causal conv + SiLU of both directions.
* ``bi_scan`` / ``bi_scan_backward``: the scan of both directions, dt_proj, D skip and gate included, on
  x_proj's output. It also returns the states the backward restarts from every ``checkpoint_steps`` steps
  (the kernel module's CHECKPOINT_STEPS; with 0 none are kept, for a forward without a backward), in the
  dtype of the module's ``checkpoint_dtype``.
* ``bi_scan_``: inference's ``bi_scan``, in place: the result is written over ``u[0]`` (``u[1]`` is left
  undefined), so a block's scan allocates nothing; no gradient.
* ``bi_scan_inference``: inference's ``bi_scan`` as a function of one result, what traced and exported graphs
  hold (converters such as OpenVINO's want neither side effects nor unused outputs).
* ``mixer_core``: the CPU's inference forward of the whole core (conv + SiLU, x_proj, ``bi_scan``) in one pass
  of token tiles, so that u and x_proj's output never leave the cache; CPU only, eager inference only.
* ``add_rms_norm`` / ``add_rms_norm_backward``: the pre-norm step (float32 residual + RMSNorm) in one pass.
* ``add_rms_norm_`` and ``rms_norm``: inference's pre-norm step, the residual updated in place, and the
  first block's, which has no residual yet (one op cannot do both: inductor cannot compile an optional
  in-place argument given as None).

Backward ops are ops of their own so that compiled and exported graphs hold them too. Kernel modules are
imported at their first call (Triton only where it runs). :func:`cuda_kernels_on_cpu` routes CPU tensors
to the CUDA kernels, which Triton's interpreter runs on the CPU: how the tests run them without a GPU.
"""
import contextlib
import functools
import importlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

NAMESPACE = "visionmamba"
LIB = torch.library.Library(NAMESPACE, "DEF")

_SCAN_KERNELS = {"cpu": "visionmamba.ops.scan.cpu", "cuda": "visionmamba.ops.scan.triton"}
_NORM_KERNELS = {"cpu": "visionmamba.ops.norm_cpu", "cuda": "visionmamba.ops.norm_triton"}
SCHEMAS: Dict[str, str] = {}  # op name -> schema, in declaration order
KERNELS: Dict[str, Dict[str, str]] = {}  # op name -> device type -> module holding the kernel of that name
# device type of the tensors -> device type whose kernels run them; meta tensors (shapes only, no data) take
# the CPU kernels' calling constants, and the ops' fakes run them
_route = {"cpu": "cpu", "meta": "cpu"}


def _define(name: str, schema: str, kernels: Dict[str, str], fake: Callable) -> None:
    qualname = f"{NAMESPACE}::{name}"
    torch.library.define(qualname, schema, lib=LIB)
    torch.library.register_fake(qualname, fake, lib=LIB)
    SCHEMAS[name], KERNELS[name] = schema, dict(kernels)
    for device_type in kernels:
        _register(name, device_type)


def _register(name: str, device_type: str) -> None:
    kernel = functools.partial(_run, name, device_type)
    torch.library.register_kernel(f"{NAMESPACE}::{name}", device_type, kernel, lib=LIB)


def _run(name: str, device_type: str, *args):
    module = KERNELS[name].get(kernel_device(device_type))
    if module is None:
        raise NotImplementedError(f"visionmamba::{name} has no kernel for {device_type} tensors")
    return getattr(importlib.import_module(module), name)(*args)


def kernel_module(device_type: str) -> str:
    """The module whose scan kernels run tensors of ``device_type`` (following :func:`cuda_kernels_on_cpu`)."""
    return _SCAN_KERNELS[kernel_device(device_type)]


def kernel_device(device_type: str) -> str:
    """The device type whose kernels (or, for meta tensors, whose kernels' fakes) run tensors of ``device_type``."""
    return _route.get(device_type, device_type)


def routed_to_cuda(device_type: str) -> bool:
    """True when tensors of ``device_type`` run the CUDA kernels."""
    return kernel_device(device_type) == "cuda"


@contextlib.contextmanager
def cuda_kernels_on_cpu() -> Iterator[None]:
    """Within this context CPU tensors run the CUDA (Triton) kernels: Triton's interpreter
    (``TRITON_INTERPRET=1``) runs them on the CPU. For tests and rehearsals without a GPU."""
    for name, kernels in KERNELS.items():
        if "cuda" in kernels and "cpu" not in kernels and not torch._C._dispatch_has_kernel_for_dispatch_key(
                f"{NAMESPACE}::{name}", "CPU"):
            _register(name, "cpu")  # routes only: outside the context it says there is no CPU kernel
    previous, _route["cpu"] = _route["cpu"], "cuda"
    try:
        yield
    finally:
        _route["cpu"] = previous


def dispatcher_kernels() -> Dict[str, List[str]]:
    """Op name -> the device types the dispatcher has a kernel for (what the tests check)."""
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    return {name: [d for d, key in keys.items() if torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{NAMESPACE}::{name}", key)] for name in SCHEMAS}


def register_backward(name: str, *, saved_outputs: int = 0) -> None:
    """Autograd for op ``name`` whose gradients come from the op ``name + "_backward"``, called as
    ``(grad, *inputs, *outputs[1 : 1 + saved_outputs])``: one gradient per tensor input.

    ``saved_outputs`` counts auxiliary outputs after the first (e.g. states kept for the backward), which are
    not differentiable; the op's first output is the one ``grad`` belongs to. Non-tensor inputs (sizes,
    flags) are passed on as they were given and get no gradient.
    """
    backward_op = getattr(torch.ops.visionmamba, f"{name}_backward")

    def setup_context(ctx, inputs, output) -> None:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        ctx.is_tensor = [isinstance(x, torch.Tensor) for x in inputs]
        ctx.constants = [None if t else x for t, x in zip(ctx.is_tensor, inputs)]
        ctx.save_for_backward(*(x for x in inputs if isinstance(x, torch.Tensor)), *outputs[1 : 1 + saved_outputs])

    def backward(ctx, grad, *unused):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if t else c for t, c in zip(ctx.is_tensor, ctx.constants)]
        grads = iter(backward_op(grad.contiguous(), *inputs, *saved))
        return tuple(next(grads) if t else None for t in ctx.is_tensor)

    torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup_context, lib=LIB)


def empty_like_all(*tensors: Optional[torch.Tensor], like: torch.Tensor) -> List[torch.Tensor]:
    """Contiguous tensors shaped like ``tensors``, an empty placeholder for each absent one (ops return
    tensors only)."""
    return [like.new_empty(0) if t is None else t.new_empty(t.shape) for t in tensors]


def in_layout_of(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` with the strides of ``t`` (the one-direction ops' outputs take their input's layout)."""
    target = torch.empty_like(t)
    return value if value.stride() == target.stride() else target.copy_(value)


def gradients_like(tensors: Sequence[Optional[torch.Tensor]], grads: Sequence[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    """Each gradient in the dtype and layout of its tensor, an empty placeholder for each absent tensor
    (the one-direction backward's result on every device; the first tensor is present)."""
    return [tensors[0].new_empty(0) if t is None else in_layout_of(t, g.to(t.dtype)) for t, g in zip(tensors, grads)]


# ------------------------------------------------------------------------------------- the one-direction scan
_SCAN_ARGS = "Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus"
_define("selective_scan", f"({_SCAN_ARGS}) -> Tensor", _SCAN_KERNELS,
        lambda u, delta, A, B, C, D, z, delta_bias, delta_softplus: torch.empty_like(u))
_define("selective_scan_backward", f"(Tensor dout, {_SCAN_ARGS}) -> Tensor[]", _SCAN_KERNELS,
        lambda dout, u, delta, A, B, C, D, z, delta_bias, softplus: [
            torch.empty_like(t) if t is not None else u.new_empty(0) for t in (u, delta, A, B, C, D, z, delta_bias)])


def _scan_setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.present = [t is not None for t in (D, z, delta_bias)]
    ctx.delta_softplus = delta_softplus


def _scan_backward(ctx, dout):
    grads = torch.ops.visionmamba.selective_scan_backward(dout.contiguous(), *ctx.saved_tensors, ctx.delta_softplus)
    du, ddelta, dA, dB, dC, dD, dz, dbias = grads
    present_D, present_z, present_bias = ctx.present
    return (du, ddelta, dA, dB, dC, dD if present_D else None, dz if present_z else None,
            dbias if present_bias else None, None)


torch.library.register_autograd(f"{NAMESPACE}::selective_scan", _scan_backward, setup_context=_scan_setup_context,
                                lib=LIB)

# ---------------------------------------------------------------------------- the mixer core, both directions
_define("conv_silu", "(Tensor x, Tensor weight, Tensor bias) -> Tensor", _SCAN_KERNELS,
        lambda x, weight, bias: x.new_empty((weight.shape[0], *x.shape)))
_define("conv_silu_backward", "(Tensor du, Tensor x, Tensor weight, Tensor bias) -> Tensor[]", _SCAN_KERNELS,
        lambda du, x, weight, bias: empty_like_all(x, weight, bias, like=x))
register_backward("conv_silu")

_BI_ARGS = "Tensor u, Tensor x_proj_out, Tensor dt_weight, Tensor A, Tensor D, Tensor z, Tensor bias"


def _bi_scan_fake(u, x_proj_out, dt_weight, A, D, z, bias, checkpoint_steps):
    chunks = -(-u.shape[2] // checkpoint_steps) if checkpoint_steps else 0
    module = _SCAN_KERNELS.get(kernel_device(u.device.type))  # none for devices without kernels
    dtype = importlib.import_module(module).checkpoint_dtype(u.dtype) if module else torch.float32
    states = u.new_empty((2, u.shape[1], chunks, A.shape[-1], u.shape[3]), dtype=dtype)
    return z.new_empty(z.shape), states


_define("bi_scan", f"({_BI_ARGS}, int checkpoint_steps) -> (Tensor, Tensor)", _SCAN_KERNELS, _bi_scan_fake)
_define("bi_scan_backward", f"(Tensor dout, {_BI_ARGS}, int checkpoint_steps, Tensor checkpoints) -> Tensor[]",
        _SCAN_KERNELS, lambda dout, *args: empty_like_all(*args[:7], like=dout))
register_backward("bi_scan", saved_outputs=1)
_define("bi_scan_", f"({_BI_ARGS.replace('Tensor u', 'Tensor(a!) u')}) -> ()", _SCAN_KERNELS, lambda *args: None)
_define("bi_scan_inference", f"({_BI_ARGS}) -> Tensor", _SCAN_KERNELS, 
        lambda u, x_proj_out, dt_weight, A, D, z, bias: z.new_empty(z.shape))
_define("mixer_core", "(Tensor x, Tensor z, Tensor conv_weight, Tensor conv_bias, Tensor x_proj_weight, "
        "Tensor dt_weight, Tensor dt_bias, Tensor A, Tensor D) -> Tensor", {"cpu": _SCAN_KERNELS["cpu"]},
        lambda x, z, *weights: x.new_empty(z.shape))

# ------------------------------------------------------------------------------------------ the pre-norm step
_define("add_rms_norm", "(Tensor hidden, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)",
        _NORM_KERNELS, lambda hidden, residual, weight, eps: (
            hidden.new_empty(hidden.shape), hidden.new_empty(hidden.shape, dtype=torch.float32),
            hidden.new_empty((hidden.numel() // hidden.shape[-1],), dtype=torch.float32)))
_define("add_rms_norm_backward", "(Tensor dy, Tensor? dout, Tensor out, Tensor rstd, Tensor weight, bool has_residual)"
        " -> Tensor[]", _NORM_KERNELS, lambda dy, dout, out, rstd, weight, has_residual: [
            dy.new_empty(out.shape), out.new_empty(out.shape if has_residual else (0,)), weight.new_empty(weight.shape)])


def _norm_setup_context(ctx, inputs, output) -> None:
    hidden, residual, weight, eps = inputs
    _, out, rstd = output
    ctx.save_for_backward(out, rstd, weight)
    ctx.has_residual, ctx.hidden_dtype = residual is not None, hidden.dtype


def _norm_backward(ctx, dy, dout, _drstd):
    out, rstd, weight = ctx.saved_tensors
    if dy is None:  # only the new residual was used
        dy = out.new_zeros(out.shape, dtype=ctx.hidden_dtype)
    dhidden, dresidual, dweight = torch.ops.visionmamba.add_rms_norm_backward(dy, dout, out, rstd, weight,
                                                                              ctx.has_residual)
    return dhidden, dresidual if ctx.has_residual else None, dweight, None


torch.library.register_autograd(f"{NAMESPACE}::add_rms_norm", _norm_backward, setup_context=_norm_setup_context,
                                lib=LIB)
_define("add_rms_norm_", "(Tensor hidden, Tensor(a!) residual, Tensor weight, float eps) -> Tensor", _NORM_KERNELS,
        lambda hidden, residual, weight, eps: hidden.new_empty(hidden.shape))
_define("rms_norm", "(Tensor hidden, Tensor weight, float eps) -> Tensor", _NORM_KERNELS,
        lambda hidden, weight, eps: hidden.new_empty(hidden.shape))
