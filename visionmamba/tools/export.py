"""``visionmamba export``: one file for every batch size and every image size that fits the patch grid.

Two formats:

* ``onnx``: the graph ONNX Runtime (and other ONNX runtimes) run. The scan is the ``loop`` backend
  (:mod:`visionmamba.ops.scan.loop`: PyTorch's scan operator, written as an ONNX ``Scan`` node), and the
  blocks after the first run as a second loop over their stacked weights (:class:`StackedBlocks`), so the
  exporter traces one block whatever the depth: Vim-Ti exports in seconds instead of unrolling 24 blocks x
  197 steps x 2 directions. The position table is resampled inside the graph and the class token goes to
  the middle of whatever sequence arrives. The file's metadata holds the preprocessing and the labels.
* ``torch-export``: a ``torch.export`` program (``.pt2``) with the model's own scan kernels as operators:
  PyTorch speed, loadable with ``torch.export.load`` after ``import visionmamba`` (which registers them).

Both are checked against the PyTorch model at two batch sizes and three image sizes before the file is
put in place (atomically); a file that does not match is not written.
"""
import io
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from timm.data import resolve_data_config
from torch import nn
from torch._higher_order_ops.scan import scan_op

from visionmamba.files import atomic_write
from visionmamba.models.factory import InferenceModel, check_model_args, check_model_name, default_labels, load_for_inference

TOLERANCE = 1e-4  # max abs difference of the logits from the PyTorch model
CHECK_BATCHES = (1, 2)


class StackedBlocks(nn.Module):
    """A Vim whose blocks after the first run as one loop over their stacked weights (same results).

    Why: an exporter traces a loop body once, so the export costs one block instead of ``depth`` and the
    graph is as small for Vim-B as for Vim-Ti. The first block stays outside the loop: it starts the fp32
    residual stream (its input residual is None), the others continue it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if len(model.layers) < 2:
            raise ValueError("StackedBlocks needs at least two blocks")
        self.model = model
        self.names = [name for name, _ in model.layers[1].named_parameters()]
        for i, name in enumerate(self.names):
            self.register_buffer(f"stacked_{i}", torch.stack([block.get_parameter(name) for block in model.layers[1:]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model, template, names = self.model, self.model.layers[1], self.names
        hidden, _ = model._embed(x)
        hidden, residual = model.layers[0](hidden, None)

        def block(hidden: torch.Tensor, residual: torch.Tensor, *weights: torch.Tensor) -> List[torch.Tensor]:
            return list(torch.func.functional_call(template, dict(zip(names, weights)), (hidden, residual)))

        stacked = [getattr(self, f"stacked_{i}") for i in range(len(names))]
        hidden, residual = scan_op(block, [hidden, residual], stacked, ())
        return model.forward_head(model._final_norm(hidden, residual))


def load(model_name: str, checkpoint: Optional[str], use_ema: bool, img_size: int,
         model_args: Optional[Dict[str, Any]]) -> InferenceModel:
    """The model to export (from a checkpoint, or freshly initialised with ``model_args``), in eval mode."""
    check_model_name(model_name)
    if model_args:
        if checkpoint:
            raise ValueError("model arguments come from the checkpoint: drop --model-args")
        check_model_args(model_args, reserved=("img_size",))
        model = timm.create_model(model_name, img_size=img_size, **model_args).eval()
        config = {**resolve_data_config({}, model=model), "input_size": (model.patch_embed.in_chans, img_size, img_size)}
        return InferenceModel(model=model, data_config=config, labels=default_labels(model.num_classes), name=model_name)
    return load_for_inference(checkpoint, model_name, use_ema=use_ema, img_size=img_size)


def check_size(model: nn.Module, size: int) -> None:
    """A one-line error when ``size`` does not fit the model's patch grid (it names the nearest that does)."""
    model.patch_embed.check_size(size, size)


def check_sizes(model: nn.Module, size: int) -> List[int]:
    """The image sizes an export is checked at: the model's own and two larger ones (224 -> 224, 320, 512)."""
    fit = model.patch_embed.fitting_side
    return list(dict.fromkeys([size, fit(round(size * 10 / 7)), fit(round(size * 16 / 7))]))


def dynamic_shapes(model: nn.Module) -> Tuple[Dict[int, Any]]:
    """Batch, height and width dynamic; height and width as patch + stride * k, k >= 1 (a grid of >= 2 x 2)."""
    from torch.export import Dim

    patch, stride = model.patch_embed.patch_size, model.patch_embed.stride
    rows, cols = Dim("rows", min=2), Dim("cols", min=2)  # grid sides; torch.export specialises sizes of 1
    return ({0: Dim("batch"), 2: stride * rows + (patch - stride), 3: stride * cols + (patch - stride)},)


def trace(module: nn.Module, model: nn.Module, size: int) -> "torch.export.ExportedProgram":
    example = torch.randn(2, model.patch_embed.in_chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes(model))


def compare(run: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, sizes: Sequence[int]) -> Dict[str, float]:
    """Max abs difference from ``model`` per (batch, size); raises when one exceeds :data:`TOLERANCE`."""
    diffs = {}
    generator = torch.Generator().manual_seed(1)
    for size in sizes:
        for batch in CHECK_BATCHES:
            x = torch.randn(batch, model.patch_embed.in_chans, size, size, generator=generator)
            with torch.no_grad():
                diffs[f"{batch}x{size}"] = (run(x) - model(x)).abs().max().item()
    worst = max(diffs, key=diffs.get)
    if not diffs[worst] <= TOLERANCE:
        raise RuntimeError(f"the exported model differs from PyTorch by {diffs[worst]:.2e} at batch x size {worst} "
                           f"(tolerance {TOLERANCE:.0e}); nothing was written")
    return diffs


def metadata(loaded: InferenceModel) -> Dict[str, str]:
    """What a runtime needs besides the graph: preprocessing, the size rule, the labels."""
    embed, config = loaded.model.patch_embed, loaded.data_config
    return {
        "model": loaded.name,
        "image_sizes": f"height and width = {embed.patch_size} + {embed.stride} * k, k >= 1; any batch",
        "input_size": json.dumps(list(config["input_size"])),
        "interpolation": str(config.get("interpolation", "bicubic")),
        "crop_pct": str(config.get("crop_pct", 0.875)),
        "mean": json.dumps(list(config["mean"])),
        "std": json.dumps(list(config["std"])),
        "labels": json.dumps(loaded.labels),
    }


def export_onnx(model_name: str, path: Path, *, img_size: int = 224, checkpoint: Optional[str] = None,
                use_ema: bool = False, check: bool = True, model_args: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``path``: an ONNX graph with dynamic batch, height and width (see the module docstring)."""
    try:
        import onnx
        import onnxruntime  # noqa: F401  (the check)
        import onnxscript  # noqa: F401  (torch.onnx's exporter)
    except ImportError as err:
        raise ValueError(f"ONNX export needs onnx, onnxscript and onnxruntime ({err}): pip install 'visionmamba[export]'") from err

    loaded = load(model_name, checkpoint, use_ema, img_size, model_args)
    model = loaded.model.requires_grad_(False)
    check_size(model, img_size)
    model.set_scan_backend("loop")
    module = StackedBlocks(model) if len(model.layers) > 1 else model
    start = time.perf_counter()
    program = torch.onnx.export(trace(module, model, img_size), input_names=["image"], output_names=["logits"],
                                dynamo=True, external_data=False, verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata(loaded))
    report: Dict[str, Any] = {"export_s": time.perf_counter() - start}
    model.set_scan_backend("auto")
    if check:
        session = onnx_session(proto.SerializeToString())
        report["max_abs_diff"] = compare(lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0]),
                                         model, check_sizes(model, img_size))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(proto.SerializeToString()))
    return report


def onnx_session(model: Any, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session (``threads`` 0: the runtime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # the exporter leaves unused constants that the runtime warns about
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def export_torch(model_name: str, path: Path, *, img_size: int = 224, checkpoint: Optional[str] = None,
                 use_ema: bool = False, check: bool = True, model_args: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``path``: a ``torch.export`` program (.pt2) with dynamic batch, height and width."""
    loaded = load(model_name, checkpoint, use_ema, img_size, model_args)
    model = loaded.model.requires_grad_(False)
    check_size(model, img_size)
    start = time.perf_counter()
    program = trace(model, model, img_size)
    report: Dict[str, Any] = {"export_s": time.perf_counter() - start}
    if check:
        report["max_abs_diff"] = compare(program.module(), model, check_sizes(model, img_size))
    buffer = io.BytesIO()  # torch.export.save wants a .pt2 name or a buffer; the temporary file has neither
    torch.export.save(program, buffer, extra_files={"visionmamba.json": json.dumps(metadata(loaded))})
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return report


# format name -> exporter (the CLI's --format choices)
EXPORTERS: Dict[str, Callable[..., Dict[str, Any]]] = {"onnx": export_onnx, "torch-export": export_torch}
