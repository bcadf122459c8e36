"""Typed configurations of every run, with the official recipes as defaults; the CLI turns each field into a flag.

:class:`TrainConfig` (classification, docs/specification.md §5), :class:`SegConfig` and :class:`DetConfig`
(dense prediction, §6.2 / §6.3) share :class:`RunConfig`'s fields; :class:`EvalConfig` describes an evaluation.
:func:`resolve` builds and validates one from defaults, the model's preset and the given overrides.
"""
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Tuple, Type, TypeVar, get_args, get_origin, get_type_hints

PRECISIONS = ("fp32", "bf16", "fp16")
# VisionMamba arguments every run sets itself: from the data, --img-size / --crop-size and --drop-path.
RESERVED_MODEL_ARGS = ("num_classes", "img_size", "drop_path_rate")


def _at_least(cfg: Any, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {minimum:g}, got {value}")


@dataclass
class RunConfig:
    """Options every training run has."""

    data: str = ""
    output: str = "runs/vim"
    model: str = "vim_tiny_patch16_224"
    model_args: Dict[str, Any] = field(default_factory=dict)  # extra VisionMamba arguments (depth, embed_dim, ...)
    finetune: Optional[str] = None  # initial weights (official .pth or ours); head dropped if classes differ
    batch_size: int = 64  # per process
    lr: float = 5e-4
    weight_decay: float = 0.05
    drop_path: float = 0.1
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; the scan state stays fp32 either way)
    seed: int = 0
    workers: int = 4
    checkpoint_every: int = 1000  # optimizer steps between checkpoints
    resume: Optional[str] = None  # a checkpoint of ours, or "auto" for OUTPUT/last.pth
    overwrite: bool = False  # start afresh in an output folder that holds another run (its files are replaced)
    skip_nonfinite: bool = False
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        from visionmamba.models.factory import check_model_args, check_model_name  # torch: not for --help
        from visionmamba.ops.devices import resolve_device

        if not self.data:
            raise ValueError("no data folder given: pass --data DIR")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in the output folder and --overwrite replaces it: pick one")
        check_model_name(self.model)
        check_model_args(self.model_args, RESERVED_MODEL_ARGS)
        resolve_device(self.device)
        _at_least(self, 1, "batch_size")
        _at_least(self, 0, "workers", "checkpoint_every", "lr", "weight_decay", "drop_path")


@dataclass
class TrainConfig(RunConfig):
    """Classification. Defaults are hustvl/Vim main.py's (docs/specification.md §5); presets adjust per model.

    ``data`` holds train/ and val/ class sub-folders (the ImageNet layout); ``batch_size`` is per process,
    the global batch is batch_size x processes x accum_steps; ``lr`` is scaled by global batch / 512 unless
    ``unscale_lr``; A_log is weight-decayed, as in the official recipe (1-D tensors, pos_embed, cls_token
    are not); ``checkpoint_every`` counts optimizer steps between mid-epoch checkpoints (0: end of epoch only).
    """

    img_size: int = 224
    epochs: int = 300
    accum_steps: int = 1  # gradient accumulation: batches per optimizer step
    unscale_lr: bool = False
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: int = 5
    opt_eps: float = 1e-8
    clip_grad: Optional[float] = None
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    hflip: float = 0.5
    scale: Tuple[float, float] = (0.08, 1.0)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    repeated_aug: bool = True  # only when distributed, as officially
    model_ema: bool = True
    model_ema_decay: float = 0.99996
    skip_corrupt: bool = False

    def validate(self) -> None:
        super().validate()
        _at_least(self, 1, "epochs", "accum_steps", "img_size")
        _at_least(self, 0, "warmup_epochs", "min_lr", "warmup_lr")

    def schedule(self, global_batch: int) -> "Schedule":
        """The learning-rate schedule of a run with ``global_batch`` images per optimizer step, adapted where
        the recipe's values do not fit a small run (each adaptation is named in ``notes``):

        * the lr scaled below ``min_lr`` or ``warmup_lr`` (batch 8: 5e-4 x 8 / 512 = 7.8e-6 < 1e-5) would make
          the cosine schedule rise: both are scaled by the same factor as the lr;
        * a warm-up as long as the run or longer would never reach the lr: it is cut to a tenth of the epochs.
        """
        factor = 1.0 if self.unscale_lr else global_batch / 512
        lr, min_lr, warmup_lr, warmup = self.lr * factor, self.min_lr, self.warmup_lr, self.warmup_epochs
        notes = []
        if lr < max(min_lr, warmup_lr) and factor < 1:
            min_lr, warmup_lr = min_lr * factor, warmup_lr * factor
            notes.append(f"the lr scaled to global batch {global_batch} ({lr:.2e} = {self.lr:g} x {global_batch} / 512) is "
                         f"below --min-lr/--warmup-lr; both scaled by the same factor to {min_lr:.2e} / {warmup_lr:.2e} "
                         "(pass --unscale-lr with your own --lr, --min-lr and --warmup-lr to set them yourself)")
        elif lr < max(min_lr, warmup_lr):
            notes.append(f"--lr {lr:g} is below --min-lr {min_lr:g} or --warmup-lr {warmup_lr:g}: the lr will rise "
                         "during the run")
        if warmup and warmup >= self.epochs:
            warmup = self.epochs // 10
            notes.append(f"--warmup-epochs {self.warmup_epochs} is not shorter than the run's {self.epochs} epoch(s): "
                         f"warm-up cut to {warmup} epoch(s) (pass a smaller --warmup-epochs to choose)")
        return Schedule(lr=lr, min_lr=min_lr, warmup_lr=warmup_lr, warmup_epochs=warmup, notes=tuple(notes))


@dataclass(frozen=True)
class Schedule:
    """A run's learning-rate schedule (cosine with linear warm-up, per epoch) and why it differs from the
    configuration, if it does."""

    lr: float
    min_lr: float
    warmup_lr: float
    warmup_epochs: int
    notes: Tuple[str, ...] = ()


@dataclass
class DenseConfig(RunConfig):
    """Options shared by both dense tasks; :class:`SegConfig` and :class:`DetConfig` set each task's defaults.

    Iteration-based: ``checkpoint_every`` counts iterations (a checkpoint is also written at every
    evaluation and at the end).
    """

    output: str = "runs/dense"
    train_split: str = ""
    val_split: str = ""
    out_indices: Optional[Tuple[int, int, int, int]] = None  # blocks feeding the pyramid; default: depth/4 steps
    crop_size: int = 512
    scale_range: Tuple[float, float] = (0.5, 2.0)
    iters: int = 60000
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.1
    layer_decay: float = 0.92
    warmup_iters: int = 1500
    eval_every: int = 4000  # iterations between evaluations (0: only at the end)

    def validate(self) -> None:
        super().validate()
        _at_least(self, 1, "iters", "crop_size")
        _at_least(self, 0, "eval_every", "warmup_iters", "layer_decay")
        if self.crop_size % 32:
            raise ValueError(f"crop_size must be a multiple of 32 (the coarsest pyramid stride), got {self.crop_size}")


@dataclass
class SegConfig(DenseConfig):
    """UperNet on ADE20K-layout data; defaults from the official Vim-Ti config and script (docs/specification.md §6.2)."""

    task: ClassVar[str] = "seg"  # the task of train/dense.py that runs it
    output: str = "runs/seg"
    train_split: str = "training"
    val_split: str = "validation"
    num_classes: int = 150
    reduce_zero_label: bool = True  # ADE20K: label 0 is "other" (ignored), classes are 1..150
    decoder_channels: Optional[int] = None  # UperNet channels; default: the backbone's width (192 for Vim-Ti)
    aux_weight: float = 0.4  # auxiliary FCN head on the stride-16 level (0: no auxiliary head)
    eval_mode: str = "slide"  # "slide" (512 windows, stride 341, as officially) or "whole"

    def validate(self) -> None:
        super().validate()
        _at_least(self, 2, "num_classes")
        if self.eval_mode not in ("slide", "whole"):
            raise ValueError(f"eval_mode must be 'slide' or 'whole', got {self.eval_mode!r}")


@dataclass
class DetConfig(DenseConfig):
    """Mask R-CNN on COCO-layout data; defaults from the official ViTDet-style config (docs/specification.md §6.3)."""

    task: ClassVar[str] = "det"
    output: str = "runs/det"
    train_split: str = "train2017"
    val_split: str = "val2017"
    crop_size: int = 1024
    scale_range: Tuple[float, float] = (0.1, 2.0)
    iters: int = 184375
    batch_size: int = 16
    lr: float = 1e-4
    layer_decay: float = 0.837
    warmup_iters: int = 250
    eval_every: int = 0
    fpn_channels: int = 256
    anchor_sizes: Tuple[int, int, int, int, int] = (32, 64, 128, 256, 512)
    detector_args: Dict[str, Any] = field(default_factory=dict)  # more torchvision MaskRCNN arguments


@dataclass
class EvalConfig:
    """Evaluation of a classification checkpoint on a class-folder data set."""

    data: str = ""  # a folder of class sub-folders (e.g. ImageNet val)
    checkpoint: Optional[str] = None
    model: Optional[str] = None  # needed for official / bare checkpoints; ours carry it
    ema: bool = False
    img_size: Optional[int] = None
    batch_size: int = 64
    workers: int = 4
    precision: str = "fp32"
    device: str = "auto"
    skip_corrupt: bool = False
    progress: bool = True

    def validate(self) -> None:
        from visionmamba.models.factory import check_model_name
        from visionmamba.ops.devices import resolve_device

        if not self.data:
            raise ValueError("no data folder given: pass --data DIR (class sub-folders of images)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.model is not None:
            check_model_name(self.model)
        resolve_device(self.device)
        _at_least(self, 1, "batch_size")
        _at_least(self, 0, "workers")


# Per-model presets reproducing hustvl/Vim/vim/scripts/*.sh (8 processes: global batch 1024 or 512).
PRESETS: Dict[str, Dict[str, Any]] = {
    "vim_tiny_patch16_224": dict(batch_size=128, lr=5e-4, weight_decay=0.1, drop_path=0.0),
    "vim_small_patch16_224": dict(batch_size=64, lr=1e-3, weight_decay=0.05, drop_path=0.05),
    "vim_tiny_patch16_stride8_224": dict(
        batch_size=128, lr=5e-6, weight_decay=1e-8, drop_path=0.0, epochs=30, warmup_lr=1e-5, min_lr=1e-5
    ),
    "vim_small_patch16_stride8_224": dict(
        batch_size=128, lr=5e-6, weight_decay=1e-8, drop_path=0.0, epochs=30, warmup_lr=1e-5, min_lr=1e-5
    ),
}

Config = TypeVar("Config", RunConfig, EvalConfig)


def recorded_options(cls: Type[Config], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """The options of the run that ``overrides["resume"]`` continues: OUTPUT/config.json for ``"auto"`` (none
    yet: {}), the checkpoint's own config for a path. Only ``cls``'s fields that describe the run, not the
    machine it runs on (device, workers, progress bars) nor what to do with the folder (resume, overwrite)."""
    resume = overrides.get("resume")
    if not resume:
        return {}
    if resume == "auto":
        path = Path(overrides.get("output", cls.output)) / "config.json"
        try:
            recorded = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError as err:
            raise ValueError(f"cannot read the run's options from {str(path)!r} ({err}); pass the options again, or "
                             "--resume PATH of its last.pth") from err
    else:
        from visionmamba.models.weights import read_file  # torch: only when resuming from a path

        recorded = read_file(resume).get("config") or {}
    names = {f.name for f in fields(cls)} - {"resume", "overwrite", "device", "workers", "progress"}
    return {k: v for k, v in recorded.items() if k in names} if isinstance(recorded, dict) else {}


def _typed(cls: type, values: Dict[str, Any]) -> Dict[str, Any]:
    """JSON's lists back to the tuples of ``cls``'s tuple fields."""
    hints = get_type_hints(cls)
    tuples = {name for name, hint in hints.items() if tuple in (get_origin(hint), *map(get_origin, get_args(hint)))}
    return {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in values.items()}


def resolve(cls: Type[Config], overrides: Dict[str, Any], *, use_preset: bool = True) -> Config:
    """``cls``'s defaults, then (classification) the model's preset, then ``overrides``; validated. A run that
    resumes (``resume`` set) starts from the options it was started with instead of the preset."""
    unknown = set(overrides) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}")
    recorded = recorded_options(cls, overrides) if issubclass(cls, RunConfig) else {}
    values: Dict[str, Any] = {}
    if use_preset and cls is TrainConfig and not recorded:
        values.update(PRESETS.get(overrides.get("model", cls.model), {}))
    values.update(recorded)
    values.update(overrides)
    cfg = cls(**_typed(cls, values))
    cfg.validate()
    return cfg
