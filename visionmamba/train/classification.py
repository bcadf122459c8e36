"""``visionmamba train`` and ``eval``: the official ImageNet recipe (spec §5) on timm's building blocks,
DDP under torchrun, atomic kill-safe checkpoints that resume exactly, JSON-lines records and curves."""
import contextlib
import json
import platform
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from visionmamba import __version__
from visionmamba.models.weights import atomic_write, extract_state_dict, load_checkpoint, read_file
from visionmamba.data.folders import ResumableSampler, SeededImageFolder, collate_skipping, eval_transform, imagenet_targets
from visionmamba.train.distributed import DistInfo, barrier, broadcast_buffers, cleanup, init_distributed
from visionmamba.train.trainer import EpochStats, StepContext, evaluate, peak_memory_mb, reduce_stats, train_one_epoch


@dataclass
class TrainConfig:
    """Every training option. Defaults are hustvl/Vim main.py's (spec §5.1); presets adjust per model."""

    data: str = ""  # folder with train/ and val/ class sub-folders (the ImageNet layout)
    output: str = "runs/vim"
    model: str = "vim_tiny_patch16_224"
    model_args: Dict[str, Any] = field(default_factory=dict)  # extra VisionMamba arguments (depth, embed_dim, ...)
    img_size: int = 224
    epochs: int = 300
    batch_size: int = 64  # per process; the global batch is batch_size x processes x accum_steps
    accum_steps: int = 1  # gradient accumulation: batches per optimizer step
    lr: float = 5e-4  # scaled by global batch / 512 unless unscale_lr
    unscale_lr: bool = False
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: int = 5
    weight_decay: float = 0.05  # A_log is decayed, as in the official recipe; 1-D tensors, pos_embed, cls_token are not
    opt_eps: float = 1e-8
    clip_grad: Optional[float] = None
    drop_path: float = 0.1
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
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; the scan state stays fp32 either way)
    seed: int = 0
    workers: int = 4
    checkpoint_every: int = 1000  # optimizer steps between mid-epoch checkpoints (0: end of epoch only)
    resume: Optional[str] = None  # a checkpoint of ours, or "auto" for OUTPUT/last.pth
    finetune: Optional[str] = None  # initial weights (official .pth or ours); head dropped if classes differ
    skip_nonfinite: bool = False
    skip_corrupt: bool = False
    device: str = "auto"
    progress: bool = True


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


def resolve_config(overrides: Dict[str, Any], *, use_preset: bool = True) -> TrainConfig:
    """Dataclass defaults, then the model's preset, then the given overrides."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown training options {sorted(unknown)}")
    model = overrides.get("model", TrainConfig.model)
    values = dict(PRESETS.get(model, {})) if use_preset else {}
    values.update(overrides)
    cfg = TrainConfig(**values)
    if cfg.accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {cfg.accum_steps}")
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {cfg.precision!r}")
    if not cfg.data:
        raise ValueError("no data folder given: pass --data DIR with DIR/train/<class>/*.jpg (and DIR/val/...)")
    return cfg


def autocast_for(precision: str, device: torch.device):
    """A zero-argument factory of the autocast context for ``precision``."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def data_config(cfg: TrainConfig) -> Dict[str, Any]:
    """The evaluation transform of a model trained with ``cfg`` (stored in its checkpoints)."""
    return dict(
        input_size=(3, cfg.img_size, cfg.img_size),
        interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def _versions() -> Dict[str, str]:
    return {"visionmamba": __version__, "torch": str(torch.__version__), "timm": timm.__version__, "python": platform.python_version()}


class Run:
    """The state of one training run (one per process)."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist
        self.out = Path(cfg.output)
        root = Path(cfg.data)
        train_tf = create_transform(
            cfg.img_size,
            is_training=True,
            auto_augment=cfg.auto_augment,
            interpolation=cfg.interpolation,
            re_prob=cfg.reprob,
            re_mode="pixel",
            re_count=1,
            hflip=cfg.hflip,
            scale=cfg.scale,
        )
        self.train_set = SeededImageFolder(str(root / "train"), train_tf, seed=cfg.seed, skip_corrupt=cfg.skip_corrupt)
        self.classes = self.train_set.classes
        self.val_set = None
        if (root / "val").is_dir():
            self.val_set = SeededImageFolder(str(root / "val"), eval_transform(data_config(cfg)), skip_corrupt=cfg.skip_corrupt)
            if self.val_set.classes != self.classes:
                raise ValueError(f"val classes {self.val_set.classes[:5]}... differ from train classes {self.classes[:5]}...")

        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.model = timm.create_model(
            cfg.model, num_classes=len(self.classes), img_size=cfg.img_size, drop_path_rate=cfg.drop_path, **cfg.model_args
        )
        if cfg.finetune:
            load_checkpoint(self.model, cfg.finetune, drop_head=True)
        torch.manual_seed(cfg.seed + dist.rank)  # per-rank randomness (drop path) from here on
        self.model.to(dist.device)
        self.ema = ModelEmaV3(self.model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        self.ddp = (
            DistributedDataParallel(self.model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
            if dist.distributed
            else self.model
        )
        self.global_batch = cfg.batch_size * dist.world_size * cfg.accum_steps
        self.lr = cfg.lr if cfg.unscale_lr else cfg.lr * self.global_batch / 512
        self.optimizer = create_optimizer_v2(self.model, "adamw", lr=self.lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps)
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=cfg.epochs, lr_min=cfg.min_lr, warmup_t=cfg.warmup_epochs, warmup_lr_init=cfg.warmup_lr
        )
        self.scaler = torch.amp.GradScaler(dist.device.type) if cfg.precision == "fp16" else None
        self.autocast = autocast_for(cfg.precision, dist.device)
        mixing = cfg.mixup > 0 or cfg.cutmix > 0
        self.mixup = (
            Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                mode="batch", label_smoothing=cfg.smoothing, num_classes=len(self.classes),
            )
            if mixing
            else None
        )
        if mixing:
            self.loss_fn = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.loss_fn = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.loss_fn = nn.CrossEntropyLoss()

        if dist.distributed and cfg.repeated_aug:
            base = RepeatAugSampler(self.train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, num_repeats=3)
        else:
            base = DistributedSampler(self.train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed)
        self.sampler = ResumableSampler(base)
        self.steps_per_epoch = len(base) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.train_set)} training images over {dist.world_size} process(es) make no full batch of "
                f"{cfg.batch_size}; lower --batch-size"
            )
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_top1 = -1.0
        self.partial = EpochStats()  # all-rank sums of the current epoch's steps before the last checkpoint

    # ------------------------------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "model_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_top1": self.best_top1,
            "epoch_stats": asdict(self.partial),
            "rng": _rng_state(),
            "model_name": self.cfg.model,
            "model_args": dict(num_classes=len(self.classes), img_size=self.cfg.img_size, **self.cfg.model_args),
            "classes": list(self.classes),
            "data_config": data_config(self.cfg),
            "config": asdict(self.cfg),
            "versions": _versions(),
        }

    def save(self, name: str = "last.pth") -> None:
        if self.dist.is_main:
            state = self.checkpoint_state()
            atomic_write(self.out / name, lambda tmp: torch.save(state, tmp))

    def resume(self, path: str) -> None:
        ckpt = read_file(path)
        for key in ("optimizer", "epoch", "step_in_epoch", "rng"):
            if key not in ckpt:
                raise ValueError(f"{path!r} is not a training checkpoint of visionmamba (no {key!r}); use --finetune for weights")
        self.model.load_state_dict(extract_state_dict(ckpt))
        if self.ema is not None and ckpt.get("model_ema") is not None:
            self.ema.module.load_state_dict(ckpt["model_ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        self.global_step, self.best_top1 = ckpt["global_step"], ckpt["best_top1"]
        if self.dist.is_main:  # the other ranks start from zero: the sums are reduced at the epoch's end
            self.partial = EpochStats(**ckpt["epoch_stats"])
        _set_rng_state(ckpt["rng"])

    # ------------------------------------------------------------------------------------------ records
    def log_epoch(self, record: Dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        plot_curves(append_record(self.out / "log.jsonl", record, "epoch"), self.out / "curves.png")

    # --------------------------------------------------------------------------------------------- loop
    def loader(self, dataset, sampler, shuffle_seed: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            num_workers=self.cfg.workers,
            collate_fn=collate_skipping,
            drop_last=sampler is self.sampler,
            pin_memory=self.dist.device.type == "cuda",
            generator=torch.Generator().manual_seed(shuffle_seed),  # keeps the global RNG untouched
        )

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        world, rank = self.dist.world_size, self.dist.rank
        broadcast_buffers(model)
        shard = list(range(rank, len(self.val_set), world))  # every image once over all ranks
        loader = self.loader(self.val_set, shard, self.cfg.seed)
        return evaluate(model, loader, device=self.dist.device, autocast=self.autocast)

    def train(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        record: Dict[str, Any] = {}
        while self.epoch < cfg.epochs:
            epoch = self.epoch
            self.train_set.set_epoch(epoch)
            self.sampler.set_epoch(epoch, start=self.step_in_epoch * cfg.batch_size)
            self.scheduler.step(epoch)  # lr of this epoch (the official loop steps after each epoch)
            ctx = StepContext(
                optimizer=self.optimizer, loss_fn=self.loss_fn, device=self.dist.device, autocast=self.autocast,
                mixup=self.mixup, ema=self.ema, scaler=self.scaler, clip_grad=cfg.clip_grad,
                skip_nonfinite=cfg.skip_nonfinite, accum_steps=cfg.accum_steps,
            )

            def on_step(step: int, stats: EpochStats) -> None:
                self.step_in_epoch = step
                self.global_step += 1
                if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0 and step < self.steps_per_epoch:
                    self.partial = reduce_stats(stats)
                    self.save()

            stats = train_one_epoch(
                self.ddp, self.loader(self.train_set, self.sampler, cfg.seed + epoch), ctx, epoch=epoch,
                start_step=self.step_in_epoch, stats=self.partial, total_steps=self.steps_per_epoch,
                on_step=on_step, progress=cfg.progress and self.dist.is_main,
            )
            self.partial = EpochStats()
            record = {
                "epoch": epoch,
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss": stats.loss_sum / max(stats.images, 1),
                "img_per_s": stats.images / max(stats.seconds, 1e-9),
                "skipped_steps": stats.skipped_steps,
                "skipped_images": stats.skipped_images,
            }
            if self.val_set is not None:
                metrics = self.evaluate(self.model)
                record.update(val_loss=metrics["loss"], top1=metrics["top1"], top5=metrics["top5"])
                if self.ema is not None:
                    ema_metrics = self.evaluate(self.ema.module)
                    record.update(ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"])
            record["peak_mem_mb"] = peak_memory_mb(self.dist.device)
            self.epoch, self.step_in_epoch = epoch + 1, 0
            self.log_epoch(record)
            if self.dist.is_main:
                print(epoch_summary(record), flush=True)
            self.save()
            if record.get("top1", -1.0) > self.best_top1:
                self.best_top1 = record["top1"]
                self.save("best.pth")
            barrier()
        return record


def epoch_summary(record: Dict[str, Any]) -> str:
    text = f"epoch {record['epoch']}: lr {record['lr']:.2e}, train loss {record['train_loss']:.4f}"
    if "top1" in record:
        text += f", val loss {record['val_loss']:.4f}, top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}%"
    if "ema_top1" in record:
        text += f", EMA top-1 {record['ema_top1']:.2f}%"
    text += f", {record['img_per_s']:.0f} img/s, peak {record['peak_mem_mb']:.0f} MB"
    skipped = record["skipped_steps"] + record["skipped_images"]
    return text + (f", skipped {record['skipped_steps']} steps / {record['skipped_images']} images" if skipped else "")


def append_record(path: Path, record: Dict[str, Any], key: str) -> List[Dict[str, Any]]:
    """Rewrite the JSON-lines log atomically with ``record`` last; records at or after its ``key`` (left by a
    run killed after logging and resumed from an earlier checkpoint) are dropped. Returns all records."""
    records = [r for r in read_log(path) if r[key] < record[key]] + [record]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))
    return records


def read_log(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(records: List[Dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], label="train loss")
    if all("val_loss" in r for r in records):
        ax_loss.plot(epochs, [r["val_loss"] for r in records], label="val loss")
        for key in ("top1", "top5", "ema_top1"):
            if all(key in r for r in records):
                ax_acc.plot(epochs, [r[key] for r in records], label=key.replace("_", " "))
    ax_loss.set_xlabel("epoch"), ax_loss.set_ylabel("loss"), ax_loss.legend()
    ax_acc.set_xlabel("epoch"), ax_acc.set_ylabel("accuracy (%)"), ax_acc.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) a training run; returns the last epoch's record."""
    return run_training(cfg, Run)


def run_training(cfg: Any, make_run: Callable[[Any, DistInfo], Any]) -> Dict[str, Any]:
    """Join the process group, seed every RNG per rank, build the run, resume it if asked
    (``cfg.resume``: a path, or "auto" for OUTPUT/last.pth when it exists), train; shared by all trainers."""
    dist = init_distributed(cfg.device)
    try:
        torch.manual_seed(cfg.seed + dist.rank)
        np.random.seed(cfg.seed + dist.rank)
        random.seed(cfg.seed + dist.rank)
        run = make_run(cfg, dist)
        if cfg.resume:
            path = Path(cfg.output) / "last.pth" if cfg.resume == "auto" else Path(cfg.resume)
            if cfg.resume != "auto" or path.is_file():
                run.resume(str(path))
        return run.train()
    finally:
        cleanup()


@dataclass
class EvalConfig:
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


def evaluate_checkpoint(cfg: EvalConfig) -> Dict[str, float]:
    """Top-1 / top-5 / loss of a checkpoint (ours or official) on a class-folder data set."""
    from visionmamba.tools.inference import load_for_inference

    dist = init_distributed(cfg.device)
    try:
        loaded = load_for_inference(cfg.checkpoint, cfg.model, use_ema=cfg.ema, img_size=cfg.img_size, device=str(dist.device))
        dataset = SeededImageFolder(cfg.data, eval_transform(loaded.data_config), skip_corrupt=cfg.skip_corrupt)
        if loaded.classes and dataset.classes != loaded.classes:
            raise ValueError(
                f"the folder's classes {dataset.classes[:5]}... differ from the checkpoint's {loaded.classes[:5]}..."
            )
        outputs = loaded.model.num_classes
        if outputs == 1000 and not loaded.classes:
            dataset.target_map = imagenet_targets(dataset.classes)  # an ImageNet val folder, or a subset of it
        if dataset.target_map is None and outputs != len(dataset.classes):
            raise ValueError(
                f"the model predicts {outputs} classes but {cfg.data!r} has {len(dataset.classes)} class folders "
                "(for ImageNet models name the folders by WordNet id, e.g. n01440764)"
            )
        shard = list(range(dist.rank, len(dataset), dist.world_size))
        loader = DataLoader(
            dataset, batch_size=cfg.batch_size, sampler=shard, num_workers=cfg.workers, collate_fn=collate_skipping
        )
        return evaluate(
            loaded.model, loader, device=dist.device, autocast=autocast_for(cfg.precision, dist.device),
            progress=cfg.progress and dist.is_main,
        )
    finally:
        cleanup()
