"""One epoch of training and one pass of evaluation; the loops under ``visionmamba train`` / ``eval``."""
import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from visionmamba.train.distributed import all_reduce_sum


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad step was applied."""


@dataclass
class StepContext:
    """What a training step needs besides the model and the batch."""

    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    mixup: Optional[Callable] = None
    ema: Optional[nn.Module] = None
    scaler: Optional[torch.amp.GradScaler] = None
    clip_grad: Optional[float] = None
    skip_nonfinite: bool = False
    accum_steps: int = 1  # batches whose gradients add up to one optimizer step


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    images: int = 0
    steps: int = 0
    skipped_steps: int = 0
    skipped_images: int = 0
    seconds: float = 0.0


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    ctx: StepContext,
    *,
    epoch: int,
    start_step: int = 0,
    stats: Optional[EpochStats] = None,
    total_steps: Optional[int] = None,
    on_step: Optional[Callable[[int, EpochStats], None]] = None,
    progress: bool = True,
) -> EpochStats:
    """Train over ``loader`` (already positioned after ``start_step`` batches of this epoch).

    ``stats`` carries the sums of the batches before ``start_step`` (after a resume); the returned
    stats are summed over all ranks. Gradients of ``ctx.accum_steps`` batches add up to one optimizer
    step; ``on_step(batches_done_in_epoch, stats)`` runs after every optimizer step (checkpointing hooks
    in there; ``reduce_stats`` gives the all-rank sums so far).
    Every rank takes the same decision on a non-finite loss: skip the step (``skip_nonfinite``) or
    raise :class:`NonFiniteLossError` before the optimizer touches the weights.
    """
    model.train()
    stats = stats if stats is not None else EpochStats()
    start = time.perf_counter() - stats.seconds
    bar = tqdm(total=total_steps, initial=start_step, desc=f"epoch {epoch}", disable=not progress, dynamic_ncols=True)
    step, poisoned = start_step, False
    ctx.optimizer.zero_grad(set_to_none=True)
    for images, targets, skipped in loader:
        step += 1
        bar.update(1)
        stats.skipped_images += skipped
        images, targets = images.to(ctx.device, non_blocking=True), targets.to(ctx.device, non_blocking=True)
        if ctx.mixup is not None and len(images) % 2:  # timm's batch mixup needs an even batch
            images, targets = images[:-1], targets[:-1]
        if len(images) == 0:
            continue
        if ctx.mixup is not None:
            images, targets = ctx.mixup(images, targets)
        boundary = step % ctx.accum_steps == 0
        # DDP averages gradients across ranks only on the last batch of an accumulation.
        sync = boundary or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with ctx.autocast():
                loss = ctx.loss_fn(model(images), targets)
            bad = all_reduce_sum(torch.tensor([0.0 if torch.isfinite(loss.detach()).item() else 1.0]))
            if bad.item() > 0:
                if not ctx.skip_nonfinite:
                    bar.close()
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step} of the epoch; the step was not "
                        "applied. Lower the learning rate, use --precision fp32, enable --clip-grad, or pass "
                        "--skip-nonfinite to skip such steps."
                    )
                poisoned = True
            else:
                scaled = loss / ctx.accum_steps
                (ctx.scaler.scale(scaled) if ctx.scaler is not None else scaled).backward()
                stats.loss_sum += loss.item() * len(images)
                stats.images += len(images)
        if not boundary:
            continue
        if poisoned:  # the whole accumulation is dropped, on every rank alike
            ctx.optimizer.zero_grad(set_to_none=True)
            stats.skipped_steps += 1
            poisoned = False
            continue
        if ctx.scaler is not None:
            if ctx.clip_grad:
                ctx.scaler.unscale_(ctx.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), ctx.clip_grad)
            ctx.scaler.step(ctx.optimizer)
            ctx.scaler.update()
        else:
            if ctx.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), ctx.clip_grad)
            ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        if ctx.ema is not None:
            ctx.ema.update(model.module if hasattr(model, "module") else model)
        stats.steps += 1
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{ctx.optimizer.param_groups[0]['lr']:.2e}")
        if on_step is not None:
            stats.seconds = time.perf_counter() - start
            on_step(step, stats)
    ctx.optimizer.zero_grad(set_to_none=True)  # an incomplete accumulation at the end of the epoch is dropped
    bar.close()
    stats.seconds = time.perf_counter() - start
    return reduce_stats(stats)


def reduce_stats(stats: EpochStats) -> EpochStats:
    """Image, loss and skip sums over all ranks (a collective: every rank must call it)."""
    totals = all_reduce_sum(torch.tensor([stats.loss_sum, stats.images, stats.skipped_images], dtype=torch.float64))
    return EpochStats(
        loss_sum=totals[0].item(), images=int(totals[1].item()), steps=stats.steps,
        skipped_steps=stats.skipped_steps, skipped_images=int(totals[2].item()), seconds=stats.seconds,
    )


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
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.tensor(
            [
                F.cross_entropy(logits, targets, reduction="sum").item(),
                (top[:, 0] == targets).sum().item(),
                (top == targets[:, None]).any(dim=1).sum().item(),
                len(targets),
            ],
            dtype=torch.float64,
        )
    sums = all_reduce_sum(sums)
    count = max(sums[3].item(), 1.0)
    skipped_total = int(all_reduce_sum(torch.tensor([float(skipped)]))[0].item())
    return {
        "loss": sums[0].item() / count,
        "top1": 100.0 * sums[1].item() / count,
        "top5": 100.0 * sums[2].item() / count,
        "count": int(sums[3].item()),
        "skipped_images": skipped_total,
    }


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux: VmHWM, which can be reset; elsewhere ru_maxrss)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

