"""``visionmamba quantize``: an int8 file for ONNX Runtime or OpenVINO from a checkpoint and a folder of
calibration images, checked against the float model before it is written; and the runtime files as models
that ``visionmamba eval`` scores like a checkpoint.

The images are read with the model's own evaluation preprocessing (resize, centre crop, normalise), a spread
of the folder's sorted files (every class of an ImageFolder tree). The runtimes' tools do the quantizing
(:mod:`visionmamba.deploy.quantize`); the file is written only when its top-1 class agrees with the PyTorch
float model's on at least ``min_agreement`` percent of the calibration images (``force`` writes it anyway).
"""
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from visionmamba.data.folders import CorruptImageError, eval_transform, load_rgb
from visionmamba.deploy import quantize as int8
from visionmamba.files import atomic_write, check_output_file, list_images, require_folder

DEFAULT_IMAGES = 300  # calibration images used by default (ONNX Runtime's and NNCF's examples use 100-300)
MIN_IMAGES = 32  # fewer leave the activation ranges to a handful of images
MIN_AGREEMENT = 99.0  # percent of calibration images whose top-1 class must match the float model's
SMALLEST_SCALE = 4  # images upscaled more than this to the model's input are not what the model sees
RUNTIME_SUFFIXES = {".onnx": "onnx", ".xml": "openvino"}  # files `eval` runs in a runtime instead of PyTorch


def calibration_images(folder: str, data_config: Dict[str, Any], count: int) -> torch.Tensor:
    """``count`` images (or all, when fewer) spread evenly over the sorted files under ``folder``, read with the
    evaluation transform of ``data_config``: a (n, C, H, W) float tensor. One-line errors for a folder with no
    images, fewer than :data:`MIN_IMAGES`, an unreadable file, or images far smaller than the model's input."""
    root = require_folder(folder, "calibration folder")
    try:
        files = list_images([root])
    except FileNotFoundError:
        files = []
    if len(files) < MIN_IMAGES:
        raise ValueError(f"the calibration folder {folder!r} holds {len(files) or 'no'} image(s) (.jpg, .png, ...); "
                         f"calibration needs at least {MIN_IMAGES} (default {DEFAULT_IMAGES}) like the ones the model will see")
    picked = [files[round(i * len(files) / count)] for i in range(count)] if count < len(files) else files
    transform, side = eval_transform(data_config), min(data_config["input_size"][-2:])
    images = []
    for path in picked:
        try:
            image = load_rgb(str(path))
        except CorruptImageError as err:
            raise ValueError(f"calibration image unreadable: {err}; remove it or choose another folder") from None
        if min(image.size) * SMALLEST_SCALE < side:
            raise ValueError(f"calibration image {str(path)!r} is {image.size[0]}x{image.size[1]}, more than "
                             f"{SMALLEST_SCALE}x smaller than the model's {side}x{side} input: calibrate on images like "
                             "the ones it will see")
        images.append(transform(image))
    return torch.stack(images)


@dataclass
class Report:
    images: int
    agreement: float  # percent of calibration images with the float model's top-1 class
    max_abs_diff: float  # of the logits, over the calibration images
    quantize_s: float


def quantize(model_name: Optional[str], checkpoint: Optional[str], calib: str, fmt: str, output: Path, *,
             images: int = DEFAULT_IMAGES, img_size: Optional[int] = None, use_ema: bool = False, batch_size: int = 8,
             min_agreement: float = MIN_AGREEMENT, force: bool = False, overwrite: bool = False,
             keep_float: Optional[Sequence[str]] = None) -> Report:
    """Write ``output``: the model of ``checkpoint`` in int8 for ``fmt`` (see the module docstring). Every
    check that needs no model (format, tools, output, the calibration folder's size) runs before the work."""
    from visionmamba.deploy.export import check_size, onnx_protos
    from visionmamba.models.factory import load_for_inference

    if fmt not in int8.FORMATS:
        raise ValueError(f"--format must be one of {int8.FORMATS}, got {fmt!r}")
    if not 0 <= min_agreement <= 100:
        raise ValueError(f"--min-agreement is a percentage (0-100), got {min_agreement:g}")
    if images < MIN_IMAGES:
        raise ValueError(f"--images {images}: calibration needs at least {MIN_IMAGES} images")
    int8.require(fmt)
    keep_float = int8.KEEP_FLOAT[fmt] if keep_float is None else keep_float
    output = Path(output)
    if fmt == "openvino" and output.suffix != ".xml":
        raise ValueError(f"an OpenVINO model is an .xml file (its weights go to the .bin beside it): got {str(output)!r}")
    for path in int8.outputs_of(fmt, output):
        check_output_file(path, overwrite=overwrite)
    loaded = load_for_inference(checkpoint, model_name, use_ema=use_ema, img_size=img_size)
    check_size(loaded.model, img_size or loaded.image_size[0])
    pixels = calibration_images(calib, loaded.data_config, images)
    batches = [b.numpy() for b in pixels.split(batch_size)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="visionmamba-int8-") as scratch:
        source = Path(scratch) / "float.onnx"
        protos, _ = onnx_protos(loaded, img_size, False, ("fused",))
        source.write_bytes(protos["fused"].SerializeToString())
        if fmt == "onnx":
            staged = Path(scratch) / "int8.onnx"
            int8.onnx_int8(source, staged, batches, keep_float)
            run = onnx_runner(staged)
        else:
            model = int8.openvino_int8(source, batches, openvino_library(), keep_float)
            run = openvino_runner(model)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            reference = torch.cat([loaded.model(b) for b in pixels.split(batch_size)]).numpy()
        quantized = np.concatenate([run(batch) for batch in batches])
        agree = 100 * int8.agreement(reference, quantized)
        if agree < min_agreement and not force:
            raise ValueError(f"the int8 model agrees with the float model on {agree:.1f}% of the {len(pixels)} calibration "
                             f"images, {min_agreement - agree:.1f} points under --min-agreement {min_agreement:g}: nothing "
                             "written (--force writes it anyway)")
        if fmt == "onnx":
            atomic_write(output, lambda tmp: Path(tmp).write_bytes(staged.read_bytes()))
        else:
            int8.write_openvino(model, output)
    return Report(len(pixels), agree, float(np.abs(reference - quantized).max()), seconds)


def openvino_library() -> str:
    """Our OpenVINO extension (:func:`~visionmamba.deploy.export.openvino_extension`: the fused nodes' kernels,
    built at first use), its failure as a user's one-line error."""
    from visionmamba.deploy.export import openvino_extension

    try:
        return openvino_extension()
    except RuntimeError as err:
        raise ValueError(f"{err}; int8 OpenVINO needs it for the fused nodes: quantize for --format onnx instead") from None


def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from visionmamba.deploy.export import onnx_session

    session = onnx_session(str(path))
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def openvino_runner(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A float32-hinted CPU compile (the int8 products stay int8; the float parts are not turned into bf16)."""
    import openvino

    core = openvino.Core()
    core.add_extension(openvino_library())
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda x: compiled(x)[0]


class RuntimeModel(nn.Module):
    """A runtime's file as a module, so ``evaluate`` scores it as it scores PyTorch models."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], num_classes: int) -> None:
        super().__init__()
        self.run, self.num_classes = run, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.run(x.detach().cpu().float().numpy())))


def _readable(path: str, read: Callable[[], Any]) -> Any:
    """``read()``, a runtime's refusal of a damaged or foreign file as one line naming it."""
    try:
        return read()
    except Exception as err:  # noqa: BLE001  (each runtime raises its own types: InvalidProtobuf, RuntimeError)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"cannot read the model file {path!r}: {reason}") from None


@dataclass
class RuntimeFile:
    model: RuntimeModel
    data_config: Dict[str, Any]
    classes: Optional[List[str]]
    labels: List[str]


def load_runtime_file(path: str) -> RuntimeFile:
    """An ``.onnx`` file (ONNX Runtime with our kernels) or OpenVINO ``.xml`` written by ``visionmamba export`` or
    ``quantize``, with the preprocessing and labels its metadata holds."""
    from visionmamba.files import require_file

    path = str(require_file(path, "model file"))
    if path.endswith(".onnx"):
        from visionmamba.deploy.export import onnx_session

        session = _readable(path, lambda: onnx_session(path))
        meta = dict(session.get_modelmeta().custom_metadata_map)
        name = session.get_inputs()[0].name
        run: Callable[[np.ndarray], np.ndarray] = lambda x: session.run(None, {name: x})[0]  # noqa: E731
    else:
        import openvino

        core = openvino.Core()
        core.add_extension(openvino_library())
        model = _readable(path, lambda: core.read_model(path))
        info = model.get_rt_info()  # an RTMap: `in` and [] but no .get
        meta = {key: value.astype(str) for key, value in (info["visionmamba"].items() if "visionmamba" in info else ())}
        run = openvino_runner(model)
    if "labels" not in meta:
        raise ValueError(f"{path!r} holds no visionmamba metadata (preprocessing, labels): write it with "
                         "`visionmamba export` or `visionmamba quantize`")
    config = {"input_size": tuple(json.loads(meta["input_size"])), "interpolation": meta["interpolation"],
              "crop_pct": float(meta["crop_pct"]), "mean": tuple(json.loads(meta["mean"])), "std": tuple(json.loads(meta["std"]))}
    labels = json.loads(meta["labels"])
    classes = json.loads(meta["classes"]) if "classes" in meta else None
    return RuntimeFile(RuntimeModel(run, len(labels)), config, classes, labels)
