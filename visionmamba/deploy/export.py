"""``visionmamba export``: one file for every batch size and every image size that fits the patch grid.

Two formats:

* ``onnx``, ``ops="fused"``: what ``torch.onnx.export`` writes for the model with the mixer core as the
  fused nodes ``visionmamba.ConvSiLU`` and ``visionmamba.BiSelectiveScan`` per block (:mod:`.onnx_nodes`),
  which ONNX Runtime and OpenVINO run with our kernels (:func:`onnx_session`, :func:`openvino_model`); each
  node's body in standard operators is stored in the file as a model-local function (:mod:`.onnx_graph`),
  which runtimes without the kernels run instead. ``ops="standard"``: the same file with the bodies inlined,
  standard operators only (what a plain ``torch.onnx.export`` writes too, for every runtime). The position
  table is resampled inside the graph and the class token goes to the middle of whatever sequence arrives.
  The file's metadata holds the preprocessing and the labels.
* ``torch-export``: a ``torch.export`` program (``.pt2``) with the model's own scan kernels as operators:
  PyTorch speed, loadable with ``torch.export.load`` after ``import visionmamba`` (which registers them).

Both are checked against the PyTorch model at two batch sizes and three image sizes before the file is
put in place (atomically); a file that does not match is not written.
"""
import io
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from visionmamba.deploy.onnx_nodes import fused_nodes
from visionmamba.files import atomic_write, check_output_file
from visionmamba.models.factory import InferenceModel, check_model_args, check_model_name, default_labels, load_for_inference

TOLERANCE = 1e-4  # max abs difference of the logits from the PyTorch model
CHECK_BATCHES = (1, 2)


def load(model_name: Optional[str], checkpoint: Optional[str], use_ema: bool, img_size: Optional[int],
         model_args: Optional[Dict[str, Any]]) -> InferenceModel:
    """The model to export (from a checkpoint, or freshly initialised with ``model_args``), in eval mode, at
    ``img_size`` (default: the size the checkpoint was trained at, or the model's own)."""
    if model_name is None and not checkpoint:
        raise ValueError("pass --model NAME, or --checkpoint FILE of a model trained with visionmamba train")
    if model_name is not None:
        check_model_name(model_name)
    if model_args:
        if checkpoint:
            raise ValueError("model arguments come from the checkpoint: drop --model-args")
        check_model_args(model_args, reserved=("img_size",))
        model = timm.create_model(model_name, **({"img_size": img_size} if img_size else {}), **model_args).eval()
        size = model.patch_embed.img_size
        config = {**resolve_data_config({}, model=model), "input_size": (model.patch_embed.in_chans, *size)}
        return InferenceModel(model=model, data_config=config, labels=default_labels(model.num_classes), name=model_name,
                              random_weights=True)
    return load_for_inference(checkpoint, model_name, use_ema=use_ema, img_size=img_size, allow_random=True)


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


def example_input(model: nn.Module, size: int) -> torch.Tensor:
    return torch.randn(2, model.patch_embed.in_chans, size, size, generator=torch.Generator().manual_seed(0))


def trace(model: nn.Module, size: int) -> "torch.export.ExportedProgram":
    with torch.no_grad():
        return torch.export.export(model, (example_input(model, size),), dynamic_shapes=dynamic_shapes(model))


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
        **({"classes": json.dumps(loaded.classes)} if loaded.classes else {}),  # the class folders it was trained on
    }


OPS = ("fused", "standard")  # --ops: the fused nodes with their bodies, or standard operators only


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401  (the check)
        import onnxscript  # noqa: F401  (torch.onnx's exporter)
    except ImportError as err:
        raise ValueError(f"ONNX export needs onnx, onnxscript and onnxruntime ({err}): pip install 'visionmamba[export]'") from err


def export_onnx(model_name: Optional[str], path: Path, *, img_size: Optional[int] = None, checkpoint: Optional[str] = None,
                use_ema: bool = False, check: bool = True, model_args: Optional[Dict[str, Any]] = None,
                overwrite: bool = False, ops: str = "fused") -> Dict[str, Any]:
    """Write ``path``: an ONNX graph with dynamic batch, height and width (see the module docstring).

    ``ops="fused"``: the fused nodes, with their standard-operator bodies as model-local functions;
    ``"standard"``: those bodies inlined, a file of standard operators only (checked with ONNX Runtime
    without our kernels)."""
    if ops not in OPS:
        raise ValueError(f"ops must be one of {OPS}, got {ops!r}")
    _require_onnx()
    check_output_file(path, overwrite=overwrite)
    protos, report = onnx_protos(load(model_name, checkpoint, use_ema, img_size, model_args), img_size, check, (ops,))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(protos[ops].SerializeToString()))
    return report


def onnx_protos(loaded: InferenceModel, img_size: Optional[int], check: bool, ops: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """({form: onnx.ModelProto} for each of ``ops``, report): traced once, each form with the metadata and, with
    ``check``, compared with PyTorch (the fused form with our kernels, the standard one in plain ONNX Runtime)."""
    import onnx

    from visionmamba.deploy.onnx_graph import standard_operators

    model = loaded.model.requires_grad_(False)
    img_size = img_size or loaded.image_size[0]
    check_size(model, img_size)
    start = time.perf_counter()
    fused = fused_proto(model, img_size)
    protos = {"fused": fused, "standard": standard_operators(fused) if "standard" in ops else None}
    protos = {form: protos[form] for form in ops}
    for proto in protos.values():
        onnx.helper.set_model_props(proto, metadata(loaded))
    report: Dict[str, Any] = {"export_s": time.perf_counter() - start}
    for form, proto in protos.items() if check else ():
        session = onnx_session(proto.SerializeToString(), fused=form == "fused")
        diffs = compare(lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0]), model,
                        check_sizes(model, img_size))
        seen = report.setdefault("max_abs_diff", {})
        seen.update({key: max(value, seen.get(key, 0.0)) for key, value in diffs.items()})
    return protos, report


def export_bundle(model_name: Optional[str], folder: Path, *, img_size: Optional[int] = None, checkpoint: Optional[str] = None,
                  use_ema: bool = False, check: bool = True) -> Dict[str, Any]:
    """Write the deploy bundle ``folder`` (:mod:`visionmamba.deploy.bundle`): both ONNX forms and both runtimes'
    libraries built here. The folder is checked (new or empty) and the runtimes looked for before any work."""
    from visionmamba.deploy import bundle

    _require_onnx()
    bundle.check_bundle_folder(folder)
    bundle.require_runtimes()
    loaded = load(model_name, checkpoint, use_ema, img_size, None)
    protos, report = onnx_protos(loaded, img_size, check, OPS)
    files = {f"{loaded.name}.onnx": protos["fused"].SerializeToString(),
             f"{loaded.name}.standard.onnx": protos["standard"].SerializeToString()}
    report["manifest"] = bundle.write_bundle(folder, files, loaded.name)
    return report


def fused_proto(model: nn.Module, img_size: int) -> Any:
    """The ``onnx.ModelProto`` of ``model`` with the fused nodes and their bodies (traced at ``img_size``)."""
    from visionmamba.deploy.onnx_graph import add_fallback

    with torch.no_grad(), fused_nodes():  # traced by torch.onnx itself: the mixers write the fused nodes
        program = torch.onnx.export(model, (example_input(model, img_size),), dynamic_shapes=dynamic_shapes(model),
                                    input_names=["image"], output_names=["logits"], dynamo=True,
                                    external_data=False, verbose=False)
    proto = program.model_proto
    mixer = model.layers[0].mixer
    add_fallback(proto, mixer.dt_rank, mixer.d_state, mixer.conv1d.kernel_size[0], mixer.d_inner)
    return proto


def onnx_session(model: Union[str, bytes], threads: int = 0, fused: bool = True) -> Any:
    """An ONNX Runtime CPU session for a file or serialized model (``threads`` 0: the runtime's default).

    ``fused``: with our kernel of ``visionmamba.BiSelectiveScan`` registered (built at first use, seconds);
    False, or when it cannot be built here (one warning), the runtime runs the node's stock-operator body.
    """
    try:
        import onnxruntime
    except ImportError as err:
        raise ValueError(f"ONNX Runtime is not installed ({err}): pip install 'visionmamba[export]'") from err
    from visionmamba.deploy import runtime_kernels

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # the exporter leaves unused constants that the runtime warns about
    if fused:
        runtime_kernels.try_load(runtime_kernels.ONNXRUNTIME, options)
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def openvino_model(path: Union[str, Path], threads: int = 0, fused: bool = True) -> Any:
    """An OpenVINO CPU model (``openvino.CompiledModel``, float32) compiled from an ONNX file of ``export``.

    ``fused``: with our extension loaded, so the scan node runs our kernel (built at first use, seconds);
    False, or when it cannot be built here (one warning), the file's stock-operator body, inlined first
    (OpenVINO does not run model-local functions).
    """
    try:
        import openvino
    except ImportError as err:
        raise ValueError(f"OpenVINO is not installed ({err}): pip install 'visionmamba[openvino]'") from err
    from visionmamba.deploy import runtime_kernels

    core = openvino.Core()
    if fused and runtime_kernels.try_load(runtime_kernels.OPENVINO, core):
        model = core.read_model(str(path))
    else:
        import onnx

        from visionmamba.deploy.onnx_graph import standard_operators

        model = core.read_model(standard_operators(onnx.load(str(path))).SerializeToString(), b"")
    config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    return core.compile_model(model, "CPU", config)


def openvino_extension() -> str:
    """The path of our OpenVINO extension library, built at first use (seconds): its operations run the scan
    and the conv, and it maps the PyTorch ops to them, so ``openvino.convert_model(model, example_input=x,
    extension=openvino_extension())`` converts a Vim model as it is (a module traced at x's size, or a
    ``torch.export`` program, with dynamic shapes for any size). One line when it cannot be built here."""
    try:
        import openvino  # noqa: F401
    except ImportError as err:
        raise ValueError(f"OpenVINO is not installed ({err}): pip install 'visionmamba[openvino]'") from err
    from visionmamba.deploy import runtime_kernels

    ok, reason = runtime_kernels.available(runtime_kernels.OPENVINO)
    if not ok:
        raise RuntimeError(f"visionmamba's OpenVINO extension cannot be built here: {reason}")
    return str(runtime_kernels.library_path(runtime_kernels.OPENVINO))


def openvino_from_torch(model: nn.Module, size: Optional[int] = None, threads: int = 0) -> Any:
    """An OpenVINO CPU model (``openvino.CompiledModel``, float32) converted from the PyTorch ``model`` itself,
    no file in between: its ``torch.export`` program with dynamic batch and size (any size that fits the patch
    grid) through OpenVINO's PyTorch frontend and our extension. ``size``: the example input's (default: the
    model's own)."""
    import openvino

    extension = openvino_extension()
    size = size or model.patch_embed.img_size[0]
    training = model.training
    try:
        with torch.no_grad():
            program = torch.export.export(model.eval(), (example_input(model, size),),
                                          dynamic_shapes=dynamic_shapes(model))
            converted = openvino.convert_model(program, extension=extension)
    finally:
        model.train(training)  # the caller's model is left as it was
    config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    return openvino.Core().compile_model(converted, "CPU", config)


def export_torch(model_name: Optional[str], path: Path, *, img_size: Optional[int] = None, checkpoint: Optional[str] = None,
                 use_ema: bool = False, check: bool = True, model_args: Optional[Dict[str, Any]] = None,
                 overwrite: bool = False) -> Dict[str, Any]:
    """Write ``path``: a ``torch.export`` program (.pt2) with dynamic batch, height and width."""
    check_output_file(path, overwrite=overwrite)
    loaded = load(model_name, checkpoint, use_ema, img_size, model_args)
    model = loaded.model.requires_grad_(False)
    img_size = img_size or loaded.image_size[0]
    check_size(model, img_size)
    start = time.perf_counter()
    program = trace(model, img_size)
    report: Dict[str, Any] = {"export_s": time.perf_counter() - start}
    if check:
        report["max_abs_diff"] = compare(program.module(), model, check_sizes(model, img_size))
    buffer = io.BytesIO()  # torch.export.save wants a .pt2 name or a buffer; the temporary file has neither
    torch.export.save(program, buffer, extra_files={"visionmamba.json": json.dumps(metadata(loaded))})
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return report


# format name -> exporter (the CLI's --format choices)
EXPORTERS: Dict[str, Callable[..., Dict[str, Any]]] = {"onnx": export_onnx, "torch-export": export_torch}
