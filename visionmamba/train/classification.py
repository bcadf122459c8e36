"""``visionmamba train`` and ``eval``: the official ImageNet recipe (docs/specification.md §5) on timm's building blocks.

Transforms, Mixup/CutMix, AdamW, the cosine schedule, EMA and repeated augmentation are timm's; the run
(DDP, atomic checkpoints that resume exactly, records) is :class:`~visionmamba.train.trainer.Trainer`'s.
"""
import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from visionmamba.data.augment import training_transform
from visionmamba.data.folders import (
    SeededImageFolder,
    collate_skipping,
    eval_folder,
    eval_transform,
    imagenet_targets,
    training_folders,
)
from visionmamba.messages import notice
from visionmamba.models.factory import load_for_inference
from visionmamba.models.info import training_memory_mb
from visionmamba.models.vim import load_checkpoint
from visionmamba.ops.memory import peak_memory_mb
from visionmamba.train.config import EvalConfig, TrainConfig
from visionmamba.train.distributed import all_reduce_sum, broadcast_buffers, cleanup, init_distributed
from visionmamba.train.records import Record
from visionmamba.train.trainer import RunPolicy, Trainer, autocast_for, run_training


def data_config(cfg: TrainConfig) -> Dict[str, Any]:
    """The evaluation transform of a model trained with ``cfg`` (stored in its checkpoints)."""
    return dict(
        input_size=(3, cfg.img_size, cfg.img_size),
        interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    images: int = 0
    steps: int = 0
    skipped_steps: int = 0
    skipped_images: int = 0
    seconds: float = 0.0


def reduce_stats(stats: EpochStats) -> EpochStats:
    """Image, loss and skip sums over all ranks (a collective: every rank must call it)."""
    totals = all_reduce_sum(torch.tensor([stats.loss_sum, stats.images, stats.skipped_images], dtype=torch.float64))
    return EpochStats(
        loss_sum=totals[0].item(), images=int(totals[1].item()), steps=stats.steps,
        skipped_steps=stats.skipped_steps, skipped_images=int(totals[2].item()), seconds=stats.seconds,
    )


class ClassificationTrainer(Trainer):
    """Epochs over a class-folder data set; mid-epoch checkpoints every ``checkpoint_every`` optimizer steps."""

    policy = RunPolicy(
        command="train", step_key="epoch", metric="top1",
        panels=(("loss", ("train_loss", "val_loss")), ("accuracy (%)", ("top1", "top5", "ema_top1"))),
        resume_keys=("epoch", "step_in_epoch"),
        same_run_keys=("model", "model_args", "batch_size", "accum_steps", "img_size"),
        nonfinite_hint=("Lower the learning rate, use --precision fp32, enable --clip-grad, or pass --skip-nonfinite "
                        "to skip such steps."),
    )

    def __init__(self, cfg: TrainConfig, dist) -> None:
        super().__init__(cfg, dist)
        self.ema = ModelEmaV3(self.model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        steps = self.steps_per_epoch // cfg.accum_steps * cfg.epochs
        if self.ema is not None and dist.is_main and steps < 1 / (1 - cfg.model_ema_decay):
            notice(f"the EMA (--model-ema-decay {cfg.model_ema_decay:g}) averages over ~{1 / (1 - cfg.model_ema_decay):,.0f} "
                   f"steps, more than this run's {steps:,}: its weights (ema_top1, --ema) stay close to the initial ones; "
                   "pass a smaller decay (e.g. 0.999) or --no-model-ema")
        self.mixup, self.loss_fn = self.build_loss()
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.skipped_total = 0  # optimizer steps skipped for a non-finite loss, over the whole run
        self.partial = EpochStats()  # all-rank sums of the current epoch's steps before the last checkpoint

    # --------------------------------------------------------------------------------------------- build
    def build_data(self) -> None:
        cfg = self.cfg
        train_dir, val_dir = training_folders(cfg.data)
        train_tf = training_transform(cfg.img_size, auto_augment=cfg.auto_augment, interpolation=cfg.interpolation,
                                      re_prob=cfg.reprob, hflip=cfg.hflip, scale=cfg.scale)
        self.train_set = SeededImageFolder(str(train_dir), train_tf, seed=cfg.seed, skip_corrupt=cfg.skip_corrupt)
        self.classes = self.train_set.classes
        if len(self.classes) < 2:
            raise ValueError(f"{str(train_dir)!r} has {len(self.classes)} class folder(s) {self.classes}; a "
                             "classifier needs at least 2 (one sub-folder of images per class)")
        self.val_set = None
        if val_dir is not None:
            self.val_set = SeededImageFolder(str(val_dir), eval_transform(data_config(cfg)), skip_corrupt=cfg.skip_corrupt)
            if self.val_set.classes != self.classes:
                raise ValueError(f"val classes {self.val_set.classes[:5]}... differ from train classes {self.classes[:5]}...")

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        model = timm.create_model(
            cfg.model, num_classes=len(self.classes), img_size=cfg.img_size, drop_path_rate=cfg.drop_path, **cfg.model_args
        )
        if cfg.finetune:
            load_checkpoint(model, cfg.finetune, drop_head=True)
        return model

    def build_optimization(self):
        cfg = self.cfg
        schedule = cfg.schedule(cfg.batch_size * self.dist.world_size * cfg.accum_steps)
        if self.dist.is_main:
            for note in schedule.notes:
                notice(note)
        optimizer = create_optimizer_v2(self.model, "adamw", lr=schedule.lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps)
        scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs, lr_min=schedule.min_lr, warmup_t=schedule.warmup_epochs,
                                      warmup_lr_init=schedule.warmup_lr)
        return optimizer, scheduler

    def memory_needed_mb(self, model: nn.Module) -> float:
        cfg = self.cfg
        activation_bytes = 4 if cfg.precision == "fp32" else 3  # the residual stream and the scan state stay float32
        return training_memory_mb(model, (cfg.img_size, cfg.img_size), cfg.batch_size,
                                  activation_bytes=activation_bytes, ema=cfg.model_ema)

    def class_names(self):
        return self.classes

    def steps_applied_and_skipped(self) -> Tuple[int, int]:
        return self.global_step, self.skipped_total

    def train_sampler(self) -> Sampler:
        if self.dist.distributed and self.cfg.repeated_aug:
            return RepeatAugSampler(self.train_set, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True,
                                    num_repeats=3)
        return super().train_sampler()

    def build_loss(self) -> Tuple[Optional[Mixup], Callable]:
        """timm's batch Mixup/CutMix with soft targets, or label smoothing, or plain cross-entropy."""
        cfg = self.cfg
        if cfg.mixup > 0 or cfg.cutmix > 0:
            mixup = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                mode="batch", label_smoothing=cfg.smoothing, num_classes=len(self.classes),
            )
            return mixup, SoftTargetCrossEntropy()
        return None, LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss()

    # ----------------------------------------------------------------------------------------- the loop
    def run(self) -> Record:
        cfg, record = self.cfg, {}
        while self.epoch < cfg.epochs:
            epoch = self.epoch
            self.train_set.set_epoch(epoch)
            self.sampler.set_epoch(epoch, start=self.step_in_epoch * cfg.batch_size)
            self.scheduler.step(epoch)  # lr of this epoch (the official loop steps after each epoch)
            stats = self.train_epoch(epoch)
            self.partial = EpochStats()
            record = self.epoch_record(epoch, stats)
            self.epoch, self.step_in_epoch = epoch + 1, 0
            self.write_record(record)
        return record

    def train_epoch(self, epoch: int) -> EpochStats:
        """The rest of one epoch, from batch ``self.step_in_epoch`` on; returns its sums over all ranks.

        Gradients of ``accum_steps`` batches add up to one optimizer step; an accumulation with a
        non-finite loss is dropped as a whole (with ``skip_nonfinite``).
        """
        cfg, stats, step, finite = self.cfg, self.partial, self.step_in_epoch, True
        start = time.perf_counter() - stats.seconds
        loader = self.loader(self.train_set, self.sampler, seed=cfg.seed + epoch, collate=collate_skipping, drop_last=True)
        self.ddp.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.progress_bar(total=self.steps_per_epoch, initial=step, desc=f"epoch {epoch}") as bar:
            for images, targets, skipped in loader:
                step += 1
                bar.update(1)
                stats.skipped_images += skipped
                batch = self.prepare_batch(images, targets)
                if batch is None:  # every image of the batch was unreadable
                    continue
                where = f"epoch {epoch}, step {step} of the epoch"
                loss = self.accumulate(*batch, stats, sync=step % cfg.accum_steps == 0, where=where)
                finite = finite and loss is not None
                if step % cfg.accum_steps:  # more batches to add up before the optimizer step
                    continue
                if not finite:
                    self.drop_accumulation(stats)
                    finite = True
                    continue
                self.optimizer_step(clip=cfg.clip_grad)
                stats.steps, stats.seconds = stats.steps + 1, time.perf_counter() - start
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                self.after_step(step, stats)
        self.optimizer.zero_grad(set_to_none=True)  # an incomplete accumulation at the end of the epoch is dropped
        stats.seconds = time.perf_counter() - start
        return reduce_stats(stats)

    def prepare_batch(self, images: torch.Tensor, targets: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The batch on the device, mixed; None when nothing is left (every image unreadable)."""
        device = self.dist.device
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if self.mixup is not None and len(images) % 2:  # timm's batch mixup needs an even batch
            images, targets = images[:-1], targets[:-1]
        if len(images) == 0:
            return None
        return self.mixup(images, targets) if self.mixup is not None else (images, targets)

    def accumulate(self, images: torch.Tensor, targets: torch.Tensor, stats: EpochStats, *, sync: bool,
                   where: str) -> Optional[float]:
        """Forward and backward of one batch (DDP averages gradients over ranks only when ``sync``), counted in
        ``stats``; the loss, or None when it is not finite (and skipped)."""
        sync = sync or not hasattr(self.ddp, "no_sync")
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            with self.autocast():
                loss = self.loss_fn(self.ddp(images), targets)
            if not self.loss_is_usable(loss, where):
                return None
            self.backward(loss / self.cfg.accum_steps)
        stats.loss_sum, stats.images = stats.loss_sum + loss.item() * len(images), stats.images + len(images)
        return loss.item()

    def drop_accumulation(self, stats: EpochStats) -> None:
        """Drop the gradients of an accumulation that met a non-finite loss (every rank alike) and count it."""
        self.optimizer.zero_grad(set_to_none=True)
        stats.skipped_steps += 1
        self.skipped_total += 1

    def after_step(self, step: int, stats: EpochStats) -> None:
        """Count the optimizer step; checkpoint mid-epoch every ``checkpoint_every`` steps."""
        self.step_in_epoch = step
        self.global_step += 1
        every = self.cfg.checkpoint_every
        if every and self.global_step % every == 0 and step < self.steps_per_epoch:
            self.partial = reduce_stats(stats)
            self.save()

    def epoch_record(self, epoch: int, stats: EpochStats) -> Record:
        """The epoch's training figures and, with a validation set, the model's (and the EMA's) accuracy."""
        record: Record = {
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
        return record

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        """Accuracy on the validation set, each image scored once over all ranks."""
        world, rank = self.dist.world_size, self.dist.rank
        broadcast_buffers(model)
        shard = list(range(rank, len(self.val_set), world))
        loader = self.loader(self.val_set, shard, seed=self.cfg.seed, collate=collate_skipping, drop_last=False)
        return evaluate(model, loader, device=self.dist.device, autocast=self.autocast)

    # ------------------------------------------------------------------------------------- checkpoints
    def extra_state(self) -> Dict[str, Any]:
        cfg = self.cfg
        return {
            "model_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "skipped_total": self.skipped_total, "best_top1": self.best, "epoch_stats": asdict(self.partial),
            "model_name": cfg.model,
            "model_args": dict(num_classes=len(self.classes), img_size=cfg.img_size, **cfg.model_args),
            "classes": list(self.classes), "data_config": data_config(cfg),
        }

    def load_extra_state(self, ckpt: Dict[str, Any]) -> None:
        if self.ema is not None and ckpt.get("model_ema") is not None:
            self.ema.module.load_state_dict(ckpt["model_ema"])
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        self.global_step, self.best = ckpt["global_step"], ckpt["best_top1"]
        self.skipped_total = ckpt.get("skipped_total", 0)
        if self.dist.is_main:  # the other ranks start from zero: the sums are reduced at the epoch's end
            self.partial = EpochStats(**ckpt["epoch_stats"])


def train(cfg: TrainConfig) -> Record:
    """Run (or resume) a training run; returns the last epoch's record."""
    return run_training(cfg, ClassificationTrainer)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = False,
    desc: str = "eval",
) -> Dict[str, float]:
    """Top-1, top-5 (in %) and mean cross-entropy over ``loader``, summed over all ranks."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, correct@1, correct@5, count
    skipped = 0
    for images, targets, n_skipped in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
        skipped += n_skipped
        if len(images) == 0:
            continue
        images, targets = images.to(device), targets.to(device)
        with autocast():
            logits = model(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.tensor([
            F.cross_entropy(logits, targets, reduction="sum").item(), (top[:, 0] == targets).sum().item(),
            (top == targets[:, None]).any(dim=1).sum().item(), len(targets),
        ], dtype=torch.float64)
    sums = all_reduce_sum(sums)
    count = max(sums[3].item(), 1.0)
    skipped_total = int(all_reduce_sum(torch.tensor([float(skipped)]))[0].item())
    return {
        "loss": sums[0].item() / count, "top1": 100.0 * sums[1].item() / count, "top5": 100.0 * sums[2].item() / count,
        "count": int(sums[3].item()), "skipped_images": skipped_total,
    }


def evaluate_checkpoint(cfg: EvalConfig, load: Optional[Callable[[torch.device], Any]] = None) -> Dict[str, float]:
    """Top-1 / top-5 / loss of a checkpoint (ours or official) on a class-folder data set. ``load(device)``, when
    given, supplies the model instead (an :class:`~visionmamba.models.factory.InferenceModel`-like object with
    ``model``, ``data_config`` and ``classes``; e.g. a runtime's file)."""
    cfg.validate()
    dist = init_distributed(cfg.device)
    try:
        folder = eval_folder(cfg.data)
        if load is None:
            loaded = load_for_inference(cfg.checkpoint, cfg.model, use_ema=cfg.ema, img_size=cfg.img_size,
                                        device=str(dist.device))
        else:
            loaded = load(dist.device)
        dataset = SeededImageFolder(str(folder), eval_transform(loaded.data_config), skip_corrupt=cfg.skip_corrupt)
        if loaded.classes and dataset.classes != loaded.classes:
            raise ValueError(
                f"the folder's classes {dataset.classes[:5]}... differ from the checkpoint's {loaded.classes[:5]}..."
            )
        outputs = loaded.model.num_classes
        if outputs == 1000 and not loaded.classes:
            dataset.target_map = imagenet_targets(dataset.classes)  # an ImageNet val folder, or a subset of it
        if dataset.target_map is None and outputs != len(dataset.classes):
            raise ValueError(
                f"the model predicts {outputs} classes but {str(folder)!r} has {len(dataset.classes)} class folders "
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
