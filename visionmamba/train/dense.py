"""``seg-train`` / ``seg-eval`` and ``det-train`` / ``det-eval``: iteration-based training of the dense heads
with the official recipes as defaults (spec §6.2, §6.3), DDP under torchrun, kill-safe resumable checkpoints.

Both tasks share one loop: AdamW with layer-wise lr decay (timm), warm-up then a poly (segmentation) or
step (detection) schedule (timm), per-sample seeded augmentation, atomic checkpoints every N iterations,
evaluation every M iterations into ``log.jsonl`` and ``curves.png``.
"""
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import MultiStepLRScheduler, PolyLRScheduler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from visionmamba.models import mask_rcnn
from visionmamba.models import upernet
from visionmamba.models.weights import atomic_write, extract_state_dict, load_checkpoint, read_file
from visionmamba.data.folders import ResumableSampler
from visionmamba.train.distributed import DistInfo, all_reduce_sum, barrier, broadcast_buffers, cleanup, init_distributed
from visionmamba.train.trainer import NonFiniteLossError, peak_memory_mb
from visionmamba.train.classification import _rng_state, _set_rng_state, _versions, append_record, autocast_for, run_training


@dataclass
class DenseConfig:
    """Options shared by both tasks; :class:`SegConfig` and :class:`DetConfig` set the task's defaults."""

    data: str = ""
    output: str = "runs/dense"
    train_split: str = ""
    val_split: str = ""
    model: str = "vim_tiny_patch16_224"
    model_args: Dict[str, Any] = field(default_factory=dict)  # extra VisionMamba arguments (depth, embed_dim, ...)
    finetune: Optional[str] = None  # ImageNet-pretrained Vim weights for the backbone (official .pth or ours)
    out_indices: Optional[Tuple[int, int, int, int]] = None  # blocks feeding the pyramid; default: depth/4 steps
    crop_size: int = 512
    scale_range: Tuple[float, float] = (0.5, 2.0)
    iters: int = 60000
    batch_size: int = 8  # per process
    lr: float = 2e-4
    weight_decay: float = 0.1
    layer_decay: float = 0.92
    warmup_iters: int = 1500
    drop_path: float = 0.1
    precision: str = "fp32"
    seed: int = 0
    workers: int = 4
    checkpoint_every: int = 1000  # iterations between checkpoints (also written at every evaluation and the end)
    eval_every: int = 4000  # iterations between evaluations (0: only at the end)
    resume: Optional[str] = None  # a checkpoint of ours, or "auto" for OUTPUT/last.pth
    skip_nonfinite: bool = False
    device: str = "auto"
    progress: bool = True


@dataclass
class SegConfig(DenseConfig):
    """UperNet on ADE20K-layout data; defaults from the official Vim-Ti config and script (spec §6.2)."""

    output: str = "runs/seg"
    train_split: str = "training"
    val_split: str = "validation"
    num_classes: int = 150
    reduce_zero_label: bool = True  # ADE20K: label 0 is "other" (ignored), classes are 1..150
    decoder_channels: Optional[int] = None  # UperNet channels; default: the backbone's width (192 for Vim-Ti)
    aux_weight: float = 0.4  # auxiliary FCN head on the stride-16 level (0: no auxiliary head)
    eval_mode: str = "slide"  # "slide" (512 windows, stride 341, as officially) or "whole"


@dataclass
class DetConfig(DenseConfig):
    """Mask R-CNN on COCO-layout data; defaults from the official ViTDet-style config (spec §6.3)."""

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


def default_out_indices(depth: int) -> Tuple[int, ...]:
    """Blocks ending each quarter of the depth: (5, 11, 17, 23) for the 24-block models, as officially."""
    return tuple(round(depth * (k + 1) / 4) - 1 for k in range(4))


def build_model(cfg: DenseConfig, num_classes: int, *, pretrained: bool = True) -> nn.Module:
    """The task's model with a fresh Vim backbone (``cfg.finetune`` weights loaded when ``pretrained``)."""
    backbone = timm.create_model(
        cfg.model, num_classes=0, img_size=cfg.crop_size, drop_path_rate=cfg.drop_path, **cfg.model_args
    )
    if cfg.finetune and pretrained:
        load_checkpoint(backbone, cfg.finetune, drop_head=True)
    out_indices = cfg.out_indices or default_out_indices(len(backbone.layers))
    if isinstance(cfg, SegConfig):
        return upernet.VimUperNet(
            backbone, num_classes, out_indices=out_indices,
            channels=cfg.decoder_channels or backbone.embed_dim, aux_weight=cfg.aux_weight,
        )
    return mask_rcnn.VimMaskRCNN(
        backbone, num_classes, out_indices=out_indices, min_size=cfg.crop_size, max_size=cfg.crop_size,
        fpn_channels=cfg.fpn_channels, anchor_sizes=cfg.anchor_sizes, detector_args=cfg.detector_args,
    )


def resolve(cls: type, overrides: Dict[str, Any]) -> DenseConfig:
    """``cls`` defaults updated by ``overrides``, validated."""
    unknown = set(overrides) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}")
    cfg = cls(**overrides)
    if not cfg.data:
        raise ValueError("no data folder given: pass --data ROOT")
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {cfg.precision!r}")
    if cfg.crop_size % 32:
        raise ValueError(f"crop_size must be a multiple of 32 (the coarsest pyramid stride), got {cfg.crop_size}")
    if isinstance(cfg, SegConfig) and cfg.eval_mode not in ("slide", "whole"):
        raise ValueError(f"eval_mode must be 'slide' or 'whole', got {cfg.eval_mode!r}")
    return cfg


# ------------------------------------------------------------------------------------------------ tasks
class SegTask:
    """Data, batches and metric of semantic segmentation."""

    metric = "mIoU"

    def __init__(self, cfg: SegConfig, *, train: bool = True) -> None:
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.classes: List[str] = []
        if train:
            self.train_set = upernet.SegmentationFolder(
                cfg.data, cfg.train_split, upernet.train_transform(cfg.crop_size, cfg.scale_range),
                reduce_zero_label=cfg.reduce_zero_label, train=True, seed=cfg.seed,
            )
        make_val = lambda: upernet.SegmentationFolder(  # noqa: E731
            cfg.data, cfg.val_split, upernet.eval_transform(cfg.crop_size), reduce_zero_label=cfg.reduce_zero_label,
            train=False,
        )
        self.val_set = val_set_or_none(make_val) if train else make_val()

    collate = staticmethod(upernet.collate_pairs)

    @staticmethod
    def to_device(batch, device: torch.device):
        images, labels = batch
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    def evaluate(self, model: nn.Module, dataset, dist: DistInfo, *, progress: bool = False) -> Dict[str, Any]:
        from torchmetrics.classification import MulticlassConfusionMatrix

        model.eval()
        confusion = MulticlassConfusionMatrix(self.num_classes, ignore_index=upernet.IGNORE_INDEX).to(dist.device)
        shard = list(range(dist.rank, len(dataset), dist.world_size))
        for i in tqdm(shard, desc="seg-eval", disable=not progress, dynamic_ncols=True):
            image, label = dataset[i]
            with torch.no_grad():
                logits = upernet.predict_logits(model, image[None].to(dist.device), mode=self.cfg.eval_mode, crop=self.cfg.crop_size,
                                        stride=self.cfg.crop_size * 2 // 3)
                logits = nn.functional.interpolate(logits.float(), size=label.shape, mode="bilinear", align_corners=False)
            confusion.update(logits.argmax(1), label[None].to(dist.device))
        return upernet.segmentation_scores(confusion.compute().cpu())  # torchmetrics sums the matrix over ranks


class DetTask:
    """Data, batches and metric of detection / instance segmentation."""

    metric = "bbox_AP"

    def __init__(self, cfg: DetConfig, *, train: bool = True) -> None:
        self.cfg = cfg
        root = Path(cfg.data)
        make_val = lambda: mask_rcnn.CocoInstances(  # noqa: E731
            str(root / cfg.val_split), str(root / "annotations" / f"instances_{cfg.val_split}.json"),
            mask_rcnn.eval_transform(), train=False,
        )
        if train:
            self.train_set = mask_rcnn.CocoInstances(
                str(root / cfg.train_split), str(root / "annotations" / f"instances_{cfg.train_split}.json"),
                mask_rcnn.train_transform(cfg.crop_size, cfg.scale_range), train=True, seed=cfg.seed,
            )
            self.val_set = val_set_or_none(make_val)
            self.classes = self.train_set.classes
        else:
            self.val_set = make_val()
            self.classes = self.val_set.classes
        self.num_classes = len(self.classes)

    collate = staticmethod(mask_rcnn.collate_lists)

    @staticmethod
    def to_device(batch, device: torch.device):
        images, targets = batch
        return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]

    def evaluate(self, model: nn.Module, dataset, dist: DistInfo, *, progress: bool = False) -> Dict[str, Any]:
        model.eval()
        results: List[Dict[str, Any]] = []
        image_ids: List[int] = []
        shard = list(range(dist.rank, len(dataset), dist.world_size))
        for i in tqdm(shard, desc="det-eval", disable=not progress, dynamic_ncols=True):
            image, target = dataset[i]
            with torch.no_grad():
                output = model([image.to(dist.device)])[0]
            image_id = int(target["image_id"])
            image_ids.append(image_id)
            results += mask_rcnn.to_coco_results(output, image_id, dataset.category_ids)
        results, image_ids = mask_rcnn.gather_results(results, image_ids, dist)
        return mask_rcnn.coco_scores(dataset.coco, results, image_ids) if dist.is_main else {}


def val_set_or_none(make):
    try:
        return make()
    except FileNotFoundError:
        return None


def make_task(cfg: DenseConfig, *, train: bool = True):
    return SegTask(cfg, train=train) if isinstance(cfg, SegConfig) else DetTask(cfg, train=train)


# ------------------------------------------------------------------------------------------------- loop
class DenseRun:
    """One training run of either task (one per process)."""

    def __init__(self, cfg: DenseConfig, dist: DistInfo) -> None:
        self.cfg, self.dist, self.out = cfg, dist, Path(cfg.output)
        self.task = make_task(cfg)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.model = build_model(cfg, self.task.num_classes)
        sync_bn = dist.distributed and dist.device.type == "cuda"  # BN statistics over the global batch (GPU only)
        if sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if isinstance(cfg, SegConfig) and cfg.batch_size * (dist.world_size if sync_bn else 1) < 2:
            raise ValueError(
                "UperNet's pyramid pooling normalises a 1x1 map with BatchNorm, which needs at least 2 images per "
                "batch (per process on CPU; over all GPUs with SyncBatchNorm): raise --batch-size"
            )
        self.model.to(dist.device)
        torch.manual_seed(cfg.seed + dist.rank)
        self.ddp = (
            DistributedDataParallel(
                self.model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
                find_unused_parameters=isinstance(cfg, DetConfig),  # a batch without positives leaves the mask head unused
            )
            if dist.distributed
            else self.model
        )
        self.optimizer = create_optimizer_v2(self.model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
        if isinstance(cfg, SegConfig):
            self.scheduler = PolyLRScheduler(
                self.optimizer, t_initial=cfg.iters, power=1.0, lr_min=0.0, warmup_t=cfg.warmup_iters,
                warmup_lr_init=cfg.lr * 1e-6, t_in_epochs=False,
            )
        else:  # x0.1 at the same fractions of the run as the official 163,889 / 177,546 of 184,375
            milestones = [round(cfg.iters * 163889 / 184375), round(cfg.iters * 177546 / 184375)]
            self.scheduler = MultiStepLRScheduler(
                self.optimizer, decay_t=milestones, decay_rate=0.1, warmup_t=cfg.warmup_iters,
                warmup_lr_init=cfg.lr * 1e-3, warmup_prefix=False, t_in_epochs=False,  # absolute milestones
            )
        self.scaler = torch.amp.GradScaler(dist.device.type) if cfg.precision == "fp16" else None
        self.autocast = autocast_for(cfg.precision, dist.device)
        base = DistributedSampler(self.task.train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed)
        self.sampler = ResumableSampler(base)
        self.steps_per_epoch = len(base) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.task.train_set)} training images make no full batch of {cfg.batch_size}; lower --batch-size")
        self.iteration, self.best = 0, -1.0
        self.loss_sum, self.loss_count = 0.0, 0  # since the last record
        self.skipped = 0  # over the whole run

    def state(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "iteration": self.iteration, "best": self.best, "rng": _rng_state(),
            "running": [self.loss_sum, self.loss_count, self.skipped],
            "task": "seg" if isinstance(self.cfg, SegConfig) else "det", "num_classes": self.task.num_classes,
            "classes": list(self.task.classes), "config": asdict(self.cfg), "versions": _versions(),
        }

    def save(self, name: str = "last.pth") -> None:
        if self.dist.is_main:
            state = self.state()
            atomic_write(self.out / name, lambda tmp: torch.save(state, tmp))

    def resume(self, path: str) -> None:
        ckpt = read_file(path)
        if "iteration" not in ckpt or "optimizer" not in ckpt:
            raise ValueError(f"{path!r} is not a seg-train/det-train checkpoint (no iteration/optimizer); use --finetune for backbone weights")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration, self.best = ckpt["iteration"], ckpt["best"]
        self.loss_sum, self.loss_count, self.skipped = ckpt["running"]
        _set_rng_state(ckpt["rng"])

    def record(self) -> Dict[str, Any]:
        """Evaluate (if there is a validation split), log, checkpoint; returns the record."""
        totals = all_reduce_sum(torch.tensor([self.loss_sum, float(self.loss_count)], dtype=torch.float64))
        record: Dict[str, Any] = {
            "iter": self.iteration, "lr": max(g["lr"] for g in self.optimizer.param_groups),
            "train_loss": totals[0].item() / max(totals[1].item(), 1.0), "skipped_steps": self.skipped,
        }
        self.loss_sum, self.loss_count = 0.0, 0
        if self.task.val_set is not None:
            broadcast_buffers(self.model)  # rank 0 saves its BatchNorm statistics: every shard is scored with them
            record.update(self.task.evaluate(self.model, self.task.val_set, self.dist, progress=self.cfg.progress and self.dist.is_main))
            record["val_images"] = len(self.task.val_set)
        record["peak_mem_mb"] = peak_memory_mb(self.dist.device)
        if self.dist.is_main:
            records = append_record(self.out / "log.jsonl", record, "iter")
            plot_dense_curves(records, self.task.metric, self.out / "curves.png")
            print(summary(record, self.task.metric), flush=True)
        self.save()
        if record.get(self.task.metric, -1.0) > self.best:
            self.best = record[self.task.metric]
            self.save("best.pth")
        barrier()
        return record

    def train(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        record: Dict[str, Any] = {}
        bar = tqdm(total=cfg.iters, initial=self.iteration, desc="train", disable=not (cfg.progress and self.dist.is_main), dynamic_ncols=True)
        while self.iteration < cfg.iters:
            epoch, done = divmod(self.iteration, self.steps_per_epoch)
            self.task.train_set.set_epoch(epoch)
            self.sampler.set_epoch(epoch, start=done * cfg.batch_size)
            loader = DataLoader(
                self.task.train_set, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=cfg.workers,
                collate_fn=self.task.collate, drop_last=True, pin_memory=self.dist.device.type == "cuda",
                generator=torch.Generator().manual_seed(cfg.seed + epoch),  # keeps the global RNG untouched
            )
            for batch in loader:
                self.step(batch)
                bar.update(1)
                it = self.iteration
                if it == cfg.iters or (cfg.eval_every and it % cfg.eval_every == 0):
                    record = self.record()
                elif cfg.checkpoint_every and it % cfg.checkpoint_every == 0:
                    self.save()
                if it == cfg.iters:
                    break
        bar.close()
        return record

    def step(self, batch) -> None:
        self.model.train()
        self.scheduler.step_update(self.iteration)
        inputs, targets = self.task.to_device(batch, self.dist.device)
        with self.autocast():
            loss, parts = self.ddp(inputs, targets)
        bad = all_reduce_sum(torch.tensor([0.0 if torch.isfinite(loss.detach()).item() else 1.0]))
        self.optimizer.zero_grad(set_to_none=True)
        if bad.item() > 0:
            if not self.cfg.skip_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}; parts {parts}) at iteration {self.iteration + 1}; the step was not "
                    "applied. Lower the learning rate, use --precision fp32, or pass --skip-nonfinite to skip such steps."
                )
            self.skipped += 1
        else:
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.loss_sum += loss.item()
            self.loss_count += 1
        self.iteration += 1


def summary(record: Dict[str, Any], metric: str) -> str:
    text = f"iter {record['iter']}: lr {record['lr']:.2e}, train loss {record['train_loss']:.4f}"
    shown = [k for k in ("mIoU", "mAcc", "aAcc", "bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50") if k in record]
    text += "".join(f", {k} {record[k]:.2f}" for k in shown)
    return text + f", peak {record['peak_mem_mb']:.0f} MB" + (f", skipped {record['skipped_steps']} steps" if record["skipped_steps"] else "")


def plot_dense_curves(records: List[Dict[str, Any]], metric: str, path: Path) -> None:
    """Training loss and the task's metric per iteration as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iters = [r["iter"] for r in records]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(iters, [r["train_loss"] for r in records], marker="o")
    ax_loss.set_xlabel("iteration"), ax_loss.set_ylabel("train loss")
    if all(metric in r for r in records):
        ax_metric.plot(iters, [r[metric] for r in records], marker="o")
    ax_metric.set_xlabel("iteration"), ax_metric.set_ylabel(metric)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def train_dense(cfg: DenseConfig) -> Dict[str, Any]:
    """Run (or resume) a seg/det training run; returns the last record."""
    return run_training(cfg, DenseRun)


def load_dense(path: str, device: torch.device) -> Tuple[nn.Module, DenseConfig, Dict[str, Any]]:
    """A seg-train / det-train checkpoint's model (eval mode), config and raw contents."""
    ckpt = read_file(path)
    if ckpt.get("task") not in ("seg", "det"):
        raise ValueError(f"{path!r} is not a seg-train / det-train checkpoint (no task recorded)")
    cls = SegConfig if ckpt["task"] == "seg" else DetConfig
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()}
    cfg = cls(**values)
    model = build_model(cfg, ckpt["num_classes"], pretrained=False)
    model.load_state_dict(extract_state_dict(ckpt))
    return model.to(device).eval(), cfg, ckpt


def evaluate_dense(checkpoint: str, data: Optional[str] = None, split: Optional[str] = None, *, device: str = "auto",
                   eval_mode: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Metrics of a seg/det checkpoint on ``data``/``split`` (default: those it was trained with)."""
    dist = init_distributed(device)
    try:
        model, cfg, ckpt = load_dense(checkpoint, dist.device)
        if data:
            cfg.data = data
        if split:
            cfg.val_split = split
        if eval_mode:
            if not isinstance(cfg, SegConfig):
                raise ValueError("--mode applies to segmentation checkpoints only")
            cfg.eval_mode = eval_mode
        task = make_task(cfg, train=False)
        if isinstance(cfg, DetConfig) and task.num_classes != ckpt["num_classes"]:
            raise ValueError(f"the checkpoint detects {ckpt['num_classes']} classes but the annotations list {task.num_classes}")
        start = time.perf_counter()
        metrics = task.evaluate(model, task.val_set, dist, progress=progress and dist.is_main)
        metrics["seconds"] = time.perf_counter() - start
        metrics["images"] = len(task.val_set)
        return metrics
    finally:
        cleanup()
