"""``seg-train`` / ``seg-eval`` and ``det-train`` / ``det-eval``: iteration-based training of the dense heads
with the official recipes as defaults (docs/specification.md §6.2, §6.3).

Both tasks share one loop (:class:`DenseTrainer`): AdamW with layer-wise lr decay (timm), warm-up then a
poly (segmentation) or step (detection) schedule (timm), per-sample seeded augmentation, checkpoints every N
iterations, evaluation every M iterations. A task (:class:`SegTask`, :class:`DetTask`) brings its data,
batches and metric.
"""
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Tuple

import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import MultiStepLRScheduler, PolyLRScheduler
from tqdm import tqdm

from visionmamba.data.ade20k import SegmentationFolder, collate_pairs
from visionmamba.data.ade20k import eval_transform as seg_eval_transform
from visionmamba.data.ade20k import train_transform as seg_train_transform
from visionmamba.data.coco import CocoInstances, collate_lists
from visionmamba.data.coco import eval_transform as det_eval_transform
from visionmamba.data.coco import train_transform as det_train_transform
from visionmamba.models.info import training_memory_mb
from visionmamba.models.mask_rcnn import VimMaskRCNN
from visionmamba.models.registry import default_out_indices
from visionmamba.models.upernet import IGNORE_INDEX, VimUperNet, predict_logits
from visionmamba.models.vim import VisionMamba, load_checkpoint
from visionmamba.models.weights import extract_state_dict, read_file
from visionmamba.ops.memory import peak_memory_mb
from visionmamba.train.config import DenseConfig, DetConfig, SegConfig
from visionmamba.train.distributed import (
    DistInfo,
    all_gather_lists,
    all_reduce_sum,
    broadcast_buffers,
    cleanup,
    init_distributed,
)
from visionmamba.train.metrics import coco_scores, segmentation_scores, to_coco_results
from visionmamba.train.records import Record
from visionmamba.train.trainer import RunPolicy, Trainer, run_training


def build_dense_model(cfg: DenseConfig, num_classes: int, *, pretrained: bool = True) -> nn.Module:
    """The task's model with a fresh Vim backbone (``cfg.finetune`` weights loaded when ``pretrained``)."""
    backbone = timm.create_model(
        cfg.model, num_classes=0, img_size=cfg.crop_size, drop_path_rate=cfg.drop_path, **cfg.model_args
    )
    if cfg.finetune and pretrained:
        load_checkpoint(backbone, cfg.finetune, drop_head=True)
    out_indices = cfg.out_indices or default_out_indices(len(backbone.layers))
    return TASKS[cfg.task].build_model(cfg, backbone, num_classes, out_indices)


# ------------------------------------------------------------------------------------------------ tasks
class DenseTask(Protocol):
    """What one dense task brings to the shared loop: its model, data, batches, schedule and metric, and the
    settings a resumed run of it must share."""

    name: str  # "seg" or "det": the config's ``task``, recorded in checkpoints
    metric: str
    same_run_keys: Tuple[str, ...]  # besides the model, its arguments, the batch and crop size
    find_unused_parameters: bool  # for DDP
    num_classes: int
    classes: List[str]
    train_set: Any
    val_set: Any

    @staticmethod
    def build_model(cfg: Any, backbone: VisionMamba, num_classes: int, out_indices: Tuple[int, ...]) -> nn.Module: ...

    def check_batch(self, images_per_norm: int) -> None: ...

    def scheduler(self, optimizer: torch.optim.Optimizer) -> Any: ...

    def check_checkpoint(self, ckpt: Dict[str, Any]) -> None: ...

    def collate(self, batch: List[Any]) -> Any: ...

    def to_device(self, batch: Any, device: torch.device) -> Tuple[Any, Any]: ...

    def evaluate(self, model: nn.Module, dataset: Any, dist: DistInfo, *, progress: bool = False) -> Dict[str, Any]: ...


def _shard(dataset: Any, dist: DistInfo) -> List[int]:
    """This rank's items: every item once over all ranks."""
    return list(range(dist.rank, len(dataset), dist.world_size))


class SegTask:
    """Semantic segmentation on the ADE20K layout (UperNet, poly schedule); metric mIoU."""

    name, metric = "seg", "mIoU"
    same_run_keys = ("num_classes", "reduce_zero_label")
    find_unused_parameters = False

    def __init__(self, cfg: SegConfig, *, train: bool = True) -> None:
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.classes: List[str] = []
        if train:
            self.train_set = SegmentationFolder(
                cfg.data, cfg.train_split, seg_train_transform(cfg.crop_size, cfg.scale_range),
                reduce_zero_label=cfg.reduce_zero_label, train=True, seed=cfg.seed,
            )
        make_val = lambda: SegmentationFolder(  # noqa: E731
            cfg.data, cfg.val_split, seg_eval_transform(cfg.crop_size), reduce_zero_label=cfg.reduce_zero_label, train=False,
        )
        self.val_set = val_set_or_none(make_val) if train else make_val()

    @staticmethod
    def build_model(cfg: SegConfig, backbone: VisionMamba, num_classes: int, out_indices) -> nn.Module:
        return VimUperNet(backbone, num_classes, out_indices=out_indices,
                          channels=cfg.decoder_channels or backbone.embed_dim, aux_weight=cfg.aux_weight)

    @staticmethod
    def check_batch(images_per_norm: int) -> None:
        if images_per_norm < 2:
            raise ValueError(
                "UperNet's pyramid pooling normalises a 1x1 map with BatchNorm, which needs at least 2 images per "
                "batch (per process on CPU; over all GPUs with SyncBatchNorm): raise --batch-size"
            )

    def scheduler(self, optimizer: torch.optim.Optimizer) -> PolyLRScheduler:
        cfg = self.cfg
        return PolyLRScheduler(optimizer, t_initial=cfg.iters, power=1.0, lr_min=0.0, warmup_t=cfg.warmup_iters,
                               warmup_lr_init=cfg.lr * 1e-6, t_in_epochs=False)

    def check_checkpoint(self, ckpt: Dict[str, Any]) -> None:
        pass  # the class count is the config's, recorded with it

    collate = staticmethod(collate_pairs)

    @staticmethod
    def to_device(batch, device: torch.device):
        images, labels = batch
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    def evaluate(self, model: nn.Module, dataset, dist: DistInfo, *, progress: bool = False) -> Dict[str, Any]:
        from torchmetrics.classification import MulticlassConfusionMatrix

        model.eval()
        confusion = MulticlassConfusionMatrix(self.num_classes, ignore_index=IGNORE_INDEX).to(dist.device)
        crop = self.cfg.crop_size
        for i in tqdm(_shard(dataset, dist), desc="seg-eval", disable=not progress, dynamic_ncols=True):
            image, label = dataset[i]
            with torch.no_grad():
                logits = predict_logits(model, image[None].to(dist.device), mode=self.cfg.eval_mode, crop=crop,
                                        stride=crop * 2 // 3)
                logits = nn.functional.interpolate(logits.float(), size=label.shape, mode="bilinear", align_corners=False)
            confusion.update(logits.argmax(1), label[None].to(dist.device))
        return segmentation_scores(confusion.compute().cpu())  # torchmetrics sums the matrix over ranks


class DetTask:
    """Detection and instance segmentation on the COCO layout (Mask R-CNN, step schedule); metric box AP."""

    name, metric = "det", "bbox_AP"
    same_run_keys: Tuple[str, ...] = ()
    find_unused_parameters = True  # a batch without positives leaves the mask head unused

    def __init__(self, cfg: DetConfig, *, train: bool = True) -> None:
        self.cfg = cfg
        root = Path(cfg.data)
        make_val = lambda: CocoInstances(  # noqa: E731
            str(root / cfg.val_split), str(root / "annotations" / f"instances_{cfg.val_split}.json"),
            det_eval_transform(), train=False,
        )
        if train:
            self.train_set = CocoInstances(
                str(root / cfg.train_split), str(root / "annotations" / f"instances_{cfg.train_split}.json"),
                det_train_transform(cfg.crop_size, cfg.scale_range), train=True, seed=cfg.seed,
            )
            self.val_set = val_set_or_none(make_val)
            self.classes = self.train_set.classes
        else:
            self.val_set = make_val()
            self.classes = self.val_set.classes
        self.num_classes = len(self.classes)

    @staticmethod
    def build_model(cfg: DetConfig, backbone: VisionMamba, num_classes: int, out_indices) -> nn.Module:
        return VimMaskRCNN(
            backbone, num_classes, out_indices=out_indices, min_size=cfg.crop_size, max_size=cfg.crop_size,
            fpn_channels=cfg.fpn_channels, anchor_sizes=cfg.anchor_sizes, detector_args=cfg.detector_args,
        )

    @staticmethod
    def check_batch(images_per_norm: int) -> None:
        pass  # Mask R-CNN trains on batches of any size

    def scheduler(self, optimizer: torch.optim.Optimizer) -> MultiStepLRScheduler:
        cfg = self.cfg  # x0.1 at the same fractions of the run as the official 163,889 / 177,546 of 184,375
        milestones = [round(cfg.iters * 163889 / 184375), round(cfg.iters * 177546 / 184375)]
        return MultiStepLRScheduler(
            optimizer, decay_t=milestones, decay_rate=0.1, warmup_t=cfg.warmup_iters,
            warmup_lr_init=cfg.lr * 1e-3, warmup_prefix=False, t_in_epochs=False,  # absolute milestones
        )

    def check_checkpoint(self, ckpt: Dict[str, Any]) -> None:
        if self.num_classes != ckpt["num_classes"]:
            raise ValueError(f"the checkpoint detects {ckpt['num_classes']} classes but the annotations list "
                             f"{self.num_classes}")

    collate = staticmethod(collate_lists)

    @staticmethod
    def to_device(batch, device: torch.device):
        images, targets = batch
        return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]

    def evaluate(self, model: nn.Module, dataset, dist: DistInfo, *, progress: bool = False) -> Dict[str, Any]:
        model.eval()
        results: List[Dict[str, Any]] = []
        image_ids: List[int] = []
        for i in tqdm(_shard(dataset, dist), desc="det-eval", disable=not progress, dynamic_ncols=True):
            image, target = dataset[i]
            with torch.no_grad():
                output = model([image.to(dist.device)])[0]
            image_id = int(target["image_id"])
            image_ids.append(image_id)
            results += to_coco_results(output, image_id, dataset.category_ids)
        results, image_ids = all_gather_lists(results), all_gather_lists(image_ids)
        return coco_scores(dataset.coco, results, image_ids) if dist.is_main else {}


def val_set_or_none(make):
    try:
        return make()
    except FileNotFoundError:
        return None


TASKS: Dict[str, Any] = {"seg": SegTask, "det": DetTask}  # a config's ``task`` -> the task that runs it
CONFIGS: Dict[str, type] = {"seg": SegConfig, "det": DetConfig}


def make_task(cfg: DenseConfig, *, train: bool = True) -> DenseTask:
    return TASKS[cfg.task](cfg, train=train)


# ------------------------------------------------------------------------------------------------- loop
class DenseTrainer(Trainer):
    """Iterations of either task; a record (evaluation, log, checkpoints) every ``eval_every`` and at the end."""

    def __init__(self, cfg: DenseConfig, dist: DistInfo) -> None:
        task = TASKS[cfg.task]
        self.policy = RunPolicy(
            command=f"{task.name}-train", step_key="iter", metric=task.metric,
            panels=(("train loss", ("train_loss",)), (task.metric, (task.metric,))), resume_keys=("iteration",),
            same_run_keys=("model", "model_args", "batch_size", "crop_size", *task.same_run_keys),
            find_unused_parameters=task.find_unused_parameters,
        )
        super().__init__(cfg, dist)
        self.iteration = 0
        self.loss_sum, self.loss_count = 0.0, 0  # since the last record
        self.skipped = 0  # over the whole run

    def build_data(self) -> None:
        self.task = make_task(self.cfg)
        self.train_set = self.task.train_set

    def build_model(self) -> nn.Module:
        cfg, dist = self.cfg, self.dist
        model = build_dense_model(cfg, self.task.num_classes)
        sync_bn = dist.distributed and dist.device.type == "cuda"  # BN statistics over the global batch (GPU only)
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.task.check_batch(cfg.batch_size * (dist.world_size if sync_bn else 1))
        return model

    def memory_needed_mb(self, model: nn.Module) -> float:
        """The backbone's part (a lower bound: the heads come on top)."""
        vim = next(m for m in model.modules() if isinstance(m, VisionMamba))
        activation_bytes = 4 if self.cfg.precision == "fp32" else 3
        return training_memory_mb(vim, (self.cfg.crop_size, self.cfg.crop_size), self.cfg.batch_size,
                                  activation_bytes=activation_bytes)

    def class_names(self):
        return self.task.classes

    def steps_applied_and_skipped(self) -> Tuple[int, int]:
        return self.iteration - self.skipped, self.skipped

    def build_optimization(self):
        cfg = self.cfg
        optimizer = create_optimizer_v2(self.model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
        return optimizer, self.task.scheduler(optimizer)

    def run(self) -> Record:
        cfg, record = self.cfg, {}
        with self.progress_bar(total=cfg.iters, initial=self.iteration, desc="train") as bar:
            while self.iteration < cfg.iters:
                epoch, done = divmod(self.iteration, self.steps_per_epoch)
                self.train_set.set_epoch(epoch)
                self.sampler.set_epoch(epoch, start=done * cfg.batch_size)
                loader = self.loader(self.train_set, self.sampler, seed=cfg.seed + epoch, collate=self.task.collate,
                                     drop_last=True)
                for batch in loader:
                    self.train_step(batch)
                    bar.update(1)
                    it = self.iteration
                    if it == cfg.iters or (cfg.eval_every and it % cfg.eval_every == 0):
                        record = self.evaluation_record()
                        self.write_record(record)
                    elif cfg.checkpoint_every and it % cfg.checkpoint_every == 0:
                        self.save()
                    if it == cfg.iters:
                        break
        return record

    def train_step(self, batch) -> None:
        self.model.train()
        self.scheduler.step_update(self.iteration)
        inputs, targets = self.task.to_device(batch, self.dist.device)
        with self.autocast():
            loss, parts = self.ddp(inputs, targets)
        if self.loss_is_usable(loss, f"iteration {self.iteration + 1} (loss parts {parts})"):
            self.backward(loss)
            self.optimizer_step()
            self.loss_sum += loss.item()
            self.loss_count += 1
        else:
            self.skipped += 1
        self.iteration += 1

    def evaluation_record(self) -> Record:
        """The mean training loss since the last record and, with a validation split, the task's metrics."""
        totals = all_reduce_sum(torch.tensor([self.loss_sum, float(self.loss_count)], dtype=torch.float64))
        record: Record = {
            "iter": self.iteration, "lr": max(g["lr"] for g in self.optimizer.param_groups),
            "train_loss": totals[0].item() / max(totals[1].item(), 1.0), "skipped_steps": self.skipped,
        }
        self.loss_sum, self.loss_count = 0.0, 0
        if self.task.val_set is not None:
            broadcast_buffers(self.model)  # rank 0 saves its BatchNorm statistics: every shard is scored with them
            progress = self.cfg.progress and self.dist.is_main
            record.update(self.task.evaluate(self.model, self.task.val_set, self.dist, progress=progress))
            record["val_images"] = len(self.task.val_set)
        record["peak_mem_mb"] = peak_memory_mb(self.dist.device)
        return record

    def extra_state(self) -> Dict[str, Any]:
        return {
            "iteration": self.iteration, "best": self.best, "running": [self.loss_sum, self.loss_count, self.skipped],
            "task": self.task.name, "num_classes": self.task.num_classes,
            "classes": list(self.task.classes),
        }

    def load_extra_state(self, ckpt: Dict[str, Any]) -> None:
        self.iteration, self.best = ckpt["iteration"], ckpt["best"]
        self.loss_sum, self.loss_count, self.skipped = ckpt["running"]


def train_dense(cfg: DenseConfig) -> Record:
    """Run (or resume) a seg/det training run; returns the last record."""
    return run_training(cfg, DenseTrainer)


def load_dense(path: str, device: torch.device) -> Tuple[nn.Module, DenseConfig, Dict[str, Any]]:
    """A seg-train / det-train checkpoint's model (eval mode), config and raw contents."""
    ckpt = read_file(path)
    if ckpt.get("task") not in CONFIGS:
        raise ValueError(f"{path!r} is not a seg-train / det-train checkpoint (no task recorded)")
    cls = CONFIGS[ckpt["task"]]
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()}
    cfg = cls(**values)
    model = build_dense_model(cfg, ckpt["num_classes"], pretrained=False)
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
            if not hasattr(cfg, "eval_mode"):
                raise ValueError("--mode applies to segmentation checkpoints only")
            cfg.eval_mode = eval_mode
        task = make_task(cfg, train=False)
        task.check_checkpoint(ckpt)
        start = time.perf_counter()
        metrics = task.evaluate(model, task.val_set, dist, progress=progress and dist.is_main)
        metrics["seconds"] = time.perf_counter() - start
        metrics["images"] = len(task.val_set)
        return metrics
    finally:
        cleanup()
