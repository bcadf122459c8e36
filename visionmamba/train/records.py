"""A run's records: the JSON-lines log (one record per epoch or evaluation), its curves, a one-line summary."""
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from visionmamba.files import atomic_write

Record = Dict[str, Any]

# What a summary line shows of a record, in this order: (key, format).
SUMMARY_FIELDS: Sequence[Tuple[str, str]] = (
    ("lr", "lr {:.2e}"), ("train_loss", "train loss {:.4f}"), ("val_loss", "val loss {:.4f}"),
    ("top1", "top-1 {:.2f}%"), ("top5", "top-5 {:.2f}%"), ("ema_top1", "EMA top-1 {:.2f}%"),
    ("mIoU", "mIoU {:.2f}"), ("mAcc", "mAcc {:.2f}"), ("aAcc", "aAcc {:.2f}"), ("bbox_AP", "bbox_AP {:.2f}"),
    ("bbox_AP50", "bbox_AP50 {:.2f}"), ("segm_AP", "segm_AP {:.2f}"), ("segm_AP50", "segm_AP50 {:.2f}"),
    ("img_per_s", "{:.0f} img/s"), ("peak_mem_mb", "peak {:.0f} MB"),
)


def read_log(path: Path) -> List[Record]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_record(path: Path, record: Record, key: str) -> List[Record]:
    """Rewrite the JSON-lines log atomically with ``record`` last; records at or after its ``key`` (left by a
    run killed after logging and resumed from an earlier checkpoint) are dropped. Returns all records."""
    records = [r for r in read_log(path) if r[key] < record[key]] + [record]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))
    return records


def summary(record: Record, key: str) -> str:
    """One line: ``<key> <n>: lr ..., train loss ..., <metrics>, peak ... MB[, skipped ...]``."""
    parts = [fmt.format(record[name]) for name, fmt in SUMMARY_FIELDS if name in record]
    skipped = [f"{record[k]} {what}" for k, what in (("skipped_steps", "steps"), ("skipped_images", "images"))
               if record.get(k)]
    if skipped:
        parts.append("skipped " + " / ".join(skipped))
    return f"{key} {record[key]}: " + ", ".join(parts)


def plot_records(records: List[Record], path: Path, x: str, panels: Sequence[Tuple[str, Sequence[str]]]) -> None:
    """One panel per (y label, keys): each key that every record has, against ``x``; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r[x] for r in records]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (label, keys) in zip(axes[0], panels):
        for key in keys:
            if all(key in r for r in records):
                ax.plot(xs, [r[key] for r in records], marker="o", label=key.replace("_", " "))
        ax.set_xlabel(x), ax.set_ylabel(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
