"""What every training run shares: :class:`Trainer` (DDP, precision, checkpoints, resume, records) and
:func:`run_training`, which joins the process group and runs one.

Nothing is lost: checkpoints are written atomically and carry the model, optimizer, scheduler, scaler, RNG
states, the config and the versions, so a killed run resumes exactly where its last checkpoint stopped. A
non-finite loss is detected on every rank alike, before the optimizer touches the weights.
"""
import contextlib
import json
import os
import platform
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, Optional, Sequence, Tuple, Type

import numpy as np
import timm
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from visionmamba.data.folders import ResumableSampler
from visionmamba.files import FolderLock, OutputError, atomic_write
from visionmamba.models.weights import extract_state_dict, read_file
from visionmamba.ops.memory import available_memory_mb
from visionmamba.train.config import RunConfig
from visionmamba.train.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from visionmamba.train.records import Record, append_record, plot_records, summary
from visionmamba.version import __version__


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad step was applied."""


def autocast_for(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """A zero-argument factory of the autocast context for ``precision`` (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def rng_state() -> Dict[str, Any]:
    """Every RNG a run draws from (torch CPU and CUDA, numpy, python), as tensors and plain values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def versions() -> Dict[str, str]:
    return {"visionmamba": __version__, "torch": str(torch.__version__), "timm": timm.__version__, "python": platform.python_version()}


@dataclass(frozen=True)
class RunPolicy:
    """What one training command decides that the shared run does not: how records are keyed and plotted,
    which entry picks best.pth, what a checkpoint must hold, what a resumed run must share."""

    command: str  # for messages: "train", "seg-train", ...
    step_key: str  # what records are keyed by ("epoch", "iter")
    metric: str  # the record entry best.pth is chosen by
    panels: Sequence[Tuple[str, Sequence[str]]]  # curves.png: (y label, record keys) per panel
    resume_keys: Sequence[str]  # what a checkpoint holds besides model, optimizer, scheduler, rng
    same_run_keys: Sequence[str]  # config entries a resumed run must share
    find_unused_parameters: bool = False  # for DDP: parameters some batches leave without a gradient
    nonfinite_hint: str = "Lower the learning rate, use --precision fp32, or pass --skip-nonfinite to skip such steps."


class Trainer:
    """One training run (one instance per process). Subclasses set :attr:`policy`, build the data, model and
    optimization and write the loop with :meth:`loss_is_usable`, :meth:`backward`, :meth:`optimizer_step` and
    :meth:`write_record`; checkpoints, resume, DDP, precision and records are here."""

    policy: RunPolicy

    def __init__(self, cfg: RunConfig, dist: DistInfo) -> None:
        self.cfg, self.dist, self.out = cfg, dist, Path(cfg.output)
        self.build_data()
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        model = self.build_model()
        torch.manual_seed(cfg.seed + dist.rank)  # per-rank randomness (drop path) from here on
        self.check_memory(model)
        self.model = model.to(dist.device)
        self.ddp = self.model
        if dist.distributed:
            device_ids = [dist.local_rank] if dist.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids, find_unused_parameters=self.policy.find_unused_parameters)
        self.ema: Optional[nn.Module] = None
        self.optimizer, self.scheduler = self.build_optimization()
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.precision == "fp16")
        self.autocast = autocast_for(cfg.precision, dist.device)
        self.sampler = ResumableSampler(self.train_sampler())
        self.steps_per_epoch = len(self.sampler.base) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.train_set)} training images over {dist.world_size} process(es) make no full batch of "
                f"{cfg.batch_size}; lower --batch-size"
            )
        self.best = -1.0

    # --------------------------------------------------------------------------------- built by subclasses
    def build_data(self) -> None:
        """Set ``self.train_set`` (and whatever evaluation needs)."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_optimization(self) -> Tuple[torch.optim.Optimizer, Any]:
        """(optimizer, timm scheduler)."""
        raise NotImplementedError

    def train_sampler(self) -> Sampler:
        """Each rank's shard of the training set, reshuffled per epoch."""
        return DistributedSampler(
            self.train_set, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True, seed=self.cfg.seed
        )

    def run(self) -> Record:
        """The loop from the current state to the end; returns the last record."""
        raise NotImplementedError

    def memory_needed_mb(self, model: nn.Module) -> float:
        """About how much memory a training step needs in each process (MB); 0: unknown."""
        return 0.0

    def steps_applied_and_skipped(self) -> Tuple[int, int]:
        """(optimizer steps applied, steps skipped for a non-finite loss) so far in the run."""
        raise NotImplementedError

    def extra_state(self) -> Dict[str, Any]:
        """What the subclass adds to a checkpoint."""
        return {}

    def load_extra_state(self, ckpt: Dict[str, Any]) -> None:
        pass

    def check_memory(self, model: nn.Module) -> None:
        """Refuse a run that cannot fit before it starts (processes on one machine share its memory)."""
        needed = self.memory_needed_mb(model)
        sharing = 1 if self.dist.device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        available = available_memory_mb(self.dist.device) / sharing
        if needed > available:
            fitting = max(int(self.cfg.batch_size * available / needed), 0)
            raise ValueError(
                f"this run needs about {needed / 1024:.1f} GB per process but only {available / 1024:.1f} GB are free on "
                f"{self.dist.device}; lower --batch-size (about {fitting} would fit) or the image size"
            )

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> Record:
        """Write config.json and run to the end; returns the last record. A run in which every step was skipped
        for a non-finite loss ends with :class:`NonFiniteLossError`: its weights never changed."""
        if self.dist.is_main:
            atomic_write(self.out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n"))
        record = self.run()
        applied, skipped = self.steps_applied_and_skipped()
        if applied == 0 and skipped > 0:
            raise NonFiniteLossError(f"every one of the run's {skipped} step(s) had a non-finite loss and was skipped; "
                                     f"the weights never changed. {self.policy.nonfinite_hint}")
        return record

    def loader(self, dataset: Dataset, sampler: Iterable[int], *, seed: int, collate: Callable, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=self.cfg.workers, collate_fn=collate,
            drop_last=drop_last, pin_memory=self.dist.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
        )

    def progress_bar(self, *, total: int, initial: int, desc: str) -> tqdm:
        show = self.cfg.progress and self.dist.is_main
        return tqdm(total=total, initial=initial, desc=desc, disable=not show, dynamic_ncols=True)

    def loss_is_usable(self, loss: torch.Tensor, where: str) -> bool:
        """True when the loss is finite on every rank. Otherwise every rank alike raises
        :class:`NonFiniteLossError` or, with ``skip_nonfinite``, returns False (the step is to be skipped)."""
        bad = all_reduce_sum(torch.tensor([0.0 if torch.isfinite(loss.detach()).item() else 1.0]))
        if bad.item() == 0:
            return True
        if self.cfg.skip_nonfinite:
            return False
        raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at {where}; the step was not applied. {self.policy.nonfinite_hint}")

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def optimizer_step(self, clip: Optional[float] = None) -> None:
        """Clip the (unscaled) gradients, step through the scaler, clear the gradients, update the EMA."""
        if clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)

    def write_record(self, record: Record) -> None:
        """Log the record (log.jsonl, curves.png, one printed line), save last.pth, and best.pth if it is the best."""
        if self.dist.is_main:
            policy = self.policy
            records = append_record(self.out / "log.jsonl", record, policy.step_key)
            plot_records(records, self.out / "curves.png", policy.step_key, policy.panels)
            print(summary(record, policy.step_key), flush=True)
        self.save()
        if record.get(self.policy.metric, -1.0) > self.best:
            self.best = record[self.policy.metric]
            self.save("best.pth")
        barrier()

    # ------------------------------------------------------------------------------------- checkpoints
    def state(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
            "config": asdict(self.cfg), "world_size": self.dist.world_size, "versions": versions(), **self.extra_state(),
        }

    def save(self, name: str = "last.pth") -> None:
        if self.dist.is_main:
            state = self.state()
            atomic_write(self.out / name, lambda tmp: torch.save(state, tmp))

    def resume(self, path: str) -> None:
        ckpt = read_file(path)
        missing = [k for k in ("model", "optimizer", "scheduler", "rng", *self.policy.resume_keys) if k not in ckpt]
        if missing:
            raise ValueError(
                f"{path!r} is not a {self.policy.command} checkpoint of visionmamba (no {missing[0]!r}); "
                "use --finetune to start from its weights"
            )
        self.check_same_run(ckpt, path)
        self.model.load_state_dict(extract_state_dict(ckpt))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.load_extra_state(ckpt)
        set_rng_state(ckpt["rng"])


    def check_same_run(self, ckpt: Dict[str, Any], path: str) -> None:
        """Refuse to resume a checkpoint of another setup: another model, image size, class list or batch
        geometry would train on swapped labels, skip images, or fail to load."""
        recorded = ckpt.get("config") or {}
        differences = [
            f"{key} {recorded[key]!r} in the checkpoint, {getattr(self.cfg, key)!r} now"
            for key in self.policy.same_run_keys if key in recorded and _plain(recorded[key]) != _plain(getattr(self.cfg, key))
        ]
        if "world_size" in ckpt and ckpt["world_size"] != self.dist.world_size:
            differences.append(f"{ckpt['world_size']} process(es) in the checkpoint, {self.dist.world_size} now")
        if ckpt.get("classes") and list(ckpt["classes"]) != list(self.class_names()):
            differences.append(f"classes {list(ckpt['classes'])[:5]}... in the checkpoint, {list(self.class_names())[:5]}... now")
        if differences:
            raise ValueError(
                f"cannot resume from {path!r}, it belongs to another setup: " + "; ".join(differences) + ". Use the "
                "checkpoint's settings (its config.json), or start a new run in another --output"
            )

    def class_names(self) -> Sequence[str]:
        """The classes the model predicts (compared with a checkpoint's on resume)."""
        return ()


def _plain(value: Any) -> str:
    """A config value as JSON (tuples and lists alike), to compare a recorded config with the current one."""
    return json.dumps(value, sort_keys=True, default=str)


RUN_FILES = ("last.pth", "best.pth", "log.jsonl", "curves.png", "config.json")


def claim_output(cfg: RunConfig) -> None:
    """Make sure the output folder holds no other run, or that the user said what to do with it: ``--resume``
    continues it, ``--overwrite`` deletes its files first. Otherwise a one-line ValueError."""
    out = Path(cfg.output)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if not existing or cfg.resume:
        return
    if not cfg.overwrite:
        raise ValueError(
            f"{str(out)!r} already holds a run ({', '.join(existing)}); pass --resume to continue it, --overwrite to "
            "replace it, or choose another --output"
        )
    for name in existing:
        (out / name).unlink()


@contextlib.contextmanager
def output_claimed(cfg: RunConfig, dist: DistInfo) -> Iterator[None]:
    """Hold the output folder's lock (rank 0) for the whole run and check what it holds; every rank fails alike."""
    lock, error = None, None
    if dist.is_main:
        try:
            lock = FolderLock(cfg.output).__enter__()
            claim_output(cfg)
        except (OutputError, ValueError) as err:
            error = err
    if all_reduce_sum(torch.tensor([1.0 if error else 0.0])).item() > 0:
        if lock is not None:
            lock.__exit__(None, None, None)
        raise error if error is not None else ValueError("the output folder could not be claimed (see rank 0)")
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def run_training(cfg: RunConfig, trainer_cls: Type[Trainer]) -> Record:
    """Join the process group, claim the output folder, seed every RNG per rank, build the run, resume it if
    asked (``cfg.resume``: a path, or "auto" for OUTPUT/last.pth when it exists), train; returns the last record."""
    cfg.validate()
    dist = init_distributed(cfg.device)
    try:
        with output_claimed(cfg, dist):
            torch.manual_seed(cfg.seed + dist.rank)
            np.random.seed(cfg.seed + dist.rank)
            random.seed(cfg.seed + dist.rank)
            trainer = trainer_cls(cfg, dist)
            if cfg.resume:
                path = Path(cfg.output) / "last.pth" if cfg.resume == "auto" else Path(cfg.resume)
                if cfg.resume != "auto" or path.is_file():
                    trainer.resume(str(path))
            return trainer.train()
    finally:
        cleanup()
