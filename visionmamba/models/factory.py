"""Building models: by name (:func:`create_model`, through timm's registry) or from a checkpoint file with
what inference needs (:func:`load_for_inference`).

A checkpoint written by ``visionmamba train`` carries the model name and arguments, the class names and
the evaluation transform; an official ``.pth`` (or a bare state dict) needs the model name, and gets the
released models' transform and the ImageNet class names.
"""
import inspect
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import timm
from timm.data import ImageNetInfo, resolve_data_config

from visionmamba.files import PathLike
from visionmamba.models.registry import CUSTOM, OFFICIAL_ALIASES, VARIANTS
from visionmamba.models.vim import VisionMamba, load_checkpoint
from visionmamba.models.weights import read_file
from visionmamba.ops.devices import resolve_device


def check_model_name(name: str) -> None:
    """A ValueError unless ``name`` is one of ours (variant, official alias or ``vim_custom``)."""
    if name not in VARIANTS and name not in OFFICIAL_ALIASES and name != CUSTOM:
        raise ValueError(f"unknown Vim model {name!r}; choose one of {list_models()} (or an official long name, or {CUSTOM!r})")


def check_model_args(model_args: Dict[str, Any], reserved: Iterable[str] = ()) -> None:
    """A ValueError for a ``model_args`` key :class:`VisionMamba` does not take, or one the caller sets itself
    (``reserved``, e.g. ``num_classes`` from the data, ``img_size`` from ``--img-size``)."""
    accepted = [k for k in inspect.signature(VisionMamba.__init__).parameters if k != "self"]
    unknown = sorted(set(model_args) - set(accepted))
    if unknown:
        raise ValueError(f"unknown model argument(s) {unknown}; VisionMamba takes {accepted}")
    taken = sorted(set(model_args) & set(reserved))
    if taken:
        raise ValueError(f"model argument(s) {taken} are set by the command itself (from the data or its own flags); "
                         "leave them out of --model-args")


def list_models() -> list:
    """Our variant names (the official long names are registered too, as aliases)."""
    return list(VARIANTS)


def canonical_name(name: str) -> str:
    """Our name of a model (an official long name is an alias of one of ours)."""
    return OFFICIAL_ALIASES.get(name, name)


def trained_args(contents: Dict[str, Any], name: str, source: str) -> Dict[str, Any]:
    """The model arguments a checkpoint of ours was trained with (none for official and bare files); a
    ValueError when it holds another model than ``name``."""
    recorded = contents.get("model_name")
    if recorded and canonical_name(recorded) != canonical_name(name):
        raise ValueError(f"{source} holds a {recorded!r} model, not {name!r}: build {recorded!r} (or leave out the "
                         "model name where a command takes it from the checkpoint)")
    return dict(contents.get("model_args") or {})


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: Optional[PathLike] = None,
    use_ema: bool = False,
    **kwargs: Any,
) -> VisionMamba:
    """Build a Vim variant (an official alias, or ``vim_custom``) through timm, optionally loading weights.

    ``pretrained=True`` fetches the released weights from the Hugging Face hub; ``checkpoint_path``
    loads a local official ``.pth``, one of ours, or a safetensors file (``use_ema`` picks the EMA
    weights of a container). A checkpoint of ours (``visionmamba train``, ``convert``) rebuilds the model it
    was trained as (its ``model_args``: depth, classes, image size, ...). Other keyword arguments go to
    :class:`VisionMamba` (``img_size``, ``num_classes``, ``drop_path_rate``, ``scan_backend``, ...) and win
    over the checkpoint's.
    """
    check_model_name(name)
    if pretrained and checkpoint_path is not None:
        raise ValueError("pass either pretrained=True or checkpoint_path=..., not both")
    if use_ema and checkpoint_path is None:
        raise ValueError("use_ema=True selects the EMA weights of a checkpoint file; pass checkpoint_path=... too")
    if checkpoint_path is None:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    contents = read_file(checkpoint_path)
    args = {**trained_args(contents, name, f"checkpoint {os.fspath(checkpoint_path)!r}"), **kwargs}
    model = timm.create_model(name, **args)
    load_checkpoint(model, os.fspath(checkpoint_path), use_ema=use_ema, contents=contents)
    return model


@dataclass
class InferenceModel:
    """A model ready for inference with what it needs to read images and name classes."""

    model: VisionMamba  # in eval mode, on its device
    data_config: Dict[str, Any]  # the evaluation transform (timm data config)
    labels: List[str]  # a name per output
    name: str
    classes: Optional[List[str]] = None  # the class folders of a model trained by visionmamba train
    random_weights: bool = False  # built without a checkpoint (export, benchmark)

    @property
    def image_size(self) -> Tuple[int, int]:
        """The (H, W) the model was trained at (its evaluation transform's input size)."""
        return tuple(self.data_config["input_size"][-2:])


NO_CHECKPOINT = ("no --checkpoint given: the model would run with random weights. Pass --checkpoint FILE (one of "
                 "ours, or a released .pth: `visionmamba models` lists them, with where to download each)")


def load_for_inference(
    checkpoint: Optional[str], model_name: Optional[str] = None, *, use_ema: bool = False, img_size: Optional[int] = None,
    device: str = "cpu", allow_random: bool = False,
) -> InferenceModel:
    """Build the model a checkpoint holds (ours: everything inside; official: pass ``model_name``).

    Without a checkpoint a ValueError, unless ``allow_random`` (a freshly initialised ``model_name``)."""
    if model_name is not None:
        check_model_name(model_name)
    if not checkpoint and not allow_random:
        raise ValueError(NO_CHECKPOINT)
    meta: Dict[str, Any] = read_file(checkpoint) if checkpoint else {}
    name = model_name or meta.get("model_name")
    if not name:
        raise ValueError(f"checkpoint {checkpoint!r} does not say which model it holds (an official or bare file): "
                         "pass --model NAME (`visionmamba models` lists them)")
    args = trained_args(meta, name, f"checkpoint {checkpoint!r}") if checkpoint else {}
    if img_size:
        args["img_size"] = img_size
    model = timm.create_model(name, **args)
    if checkpoint:
        load_checkpoint(model, checkpoint, use_ema=use_ema, contents=meta)
    model.eval().to(resolve_device(device))
    data_config = dict(meta["data_config"]) if meta.get("data_config") else resolve_data_config({}, model=model)
    if img_size:
        data_config["input_size"] = (3, img_size, img_size)
    labels = list(meta["classes"]) if meta.get("classes") else default_labels(model.num_classes)
    return InferenceModel(model=model, data_config=data_config, labels=labels, name=name, classes=meta.get("classes"),
                          random_weights=not checkpoint)


def default_labels(num_classes: int) -> List[str]:
    """ImageNet's class descriptions for a 1000-class head, else the class indices as strings."""
    if num_classes == 1000:
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return [str(i) for i in range(num_classes)]
