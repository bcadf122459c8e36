"""Using a trained Vim: predict labels, extract features at any size (see
:func:`visionmamba.models.factory.load_for_inference` for loading any checkpoint)."""
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torchvision import transforms
from tqdm import tqdm

from visionmamba.data.folders import CorruptImageError, eval_transform, load_rgb
from visionmamba.files import atomic_write, prepare_output_dir, refuse_existing
from visionmamba.models.factory import InferenceModel
from visionmamba.models.pos_embed import split_class_token
from visionmamba.models.vim import VisionMamba
from visionmamba.ops.memory import peak_rss_mb
from visionmamba.tools.precision import autocast


def resize_transform(size: Tuple[int, int], data_config: Dict[str, Any]):
    """The whole image resized to (H, W) (no crop), normalised like the model's inputs: for dense features."""
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(tuple(data_config["mean"]), tuple(data_config["std"])),
    ])


def _batches(paths: List[Path], size: int) -> Iterator[List[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


Skipped = List[Tuple[Path, str]]


def read_images(paths: List[Path], transform: Callable, *, skip_corrupt: bool) -> Tuple[Optional[torch.Tensor], List[Path], Skipped]:
    """(the readable images as one batch or None, their paths, [(unreadable path, why)]); without
    ``skip_corrupt`` the first unreadable image raises :class:`CorruptImageError`."""
    images, kept, skipped = [], [], []
    for path in paths:
        try:
            images.append(transform(load_rgb(str(path))))
            kept.append(path)
        except CorruptImageError as err:
            if not skip_corrupt:
                raise
            skipped.append((path, str(err)))
    return (torch.stack(images) if images else None), kept, skipped


@torch.no_grad()
def predict(loaded: InferenceModel, paths: List[Path], *, topk: int = 5, batch_size: int = 32, skip_corrupt: bool = False,
            progress: bool = False, precision: str = "fp32") -> List[Dict[str, Any]]:
    """Top-k labels and softmax scores per image: [{"path", "predictions": [{"label", "index", "score"}]}], and
    with ``skip_corrupt`` [{"path", "error"}] for each unreadable image. ``precision``: fp32 or bf16 autocast."""
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    transform = eval_transform(loaded.data_config)
    device = next(loaded.model.parameters()).device
    autocast(precision, device)  # refused here, before any image is read
    results: List[Dict[str, Any]] = []
    for batch in tqdm(list(_batches(paths, batch_size)), desc="predict", disable=not progress):
        images, kept, skipped = read_images(batch, transform, skip_corrupt=skip_corrupt)
        results += [{"path": str(path), "error": why} for path, why in skipped]
        if images is None:
            continue
        with autocast(precision, device):
            logits = loaded.model(images.to(device))
        probs = logits.float().softmax(-1)
        scores, indices = probs.topk(min(topk, probs.shape[-1]), dim=-1)
        for path, s, i in zip(kept, scores.tolist(), indices.tolist()):
            results.append({"path": str(path), "predictions": [
                {"label": loaded.labels[k], "index": k, "score": v} for v, k in zip(s, i)
            ]})
    return results


FEATURE_KINDS = ("pooled", "tokens", "map", "intermediates")


def check_layers(model: VisionMamba, layers: Optional[Sequence[int]]) -> None:
    depth = len(model.layers)
    bad = [i for i in layers or () if not -depth <= i < depth]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has {depth} blocks (0..{depth - 1}, or -{depth}..-1 "
                         "counting from the end)")


@torch.no_grad()
def extract_features(
    model: VisionMamba, images: torch.Tensor, kind: str, layers: Optional[Sequence[int]] = None
) -> Dict[str, torch.Tensor]:
    """Features of a batch (b, 3, H, W), as named tensors with a leading batch axis.

    pooled: "pooled" (b, D), the final-normed class token; tokens: "tokens" (b, M + 1, D), every token after
    the final norm (class token at M // 2); map: "map" (b, D, H/s, W/s), the final-normed patch tokens as a
    grid; intermediates: "layer{i}" (b, D, H/s, W/s) per selected block (residual stream after block i).
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
    check_layers(model, layers)
    if kind == "intermediates":
        indices = list(layers) if layers else [len(model.layers) - 1]
        maps = model.forward_intermediates(images, indices=indices, intermediates_only=True)
        return {f"layer{i}": m for i, m in zip(sorted(i % len(model.layers) for i in indices), maps)}
    tokens = model.forward_features(images)
    if kind == "tokens":
        return {"tokens": tokens}
    if kind == "pooled":
        return {"pooled": model.forward_head(tokens, pre_logits=True)}
    grid = model.patch_embed.grid_for(images.shape[-2], images.shape[-1])
    patches = split_class_token(tokens)[1]
    return {"map": patches.reshape(patches.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()}


def output_names(paths: List[Path]) -> Dict[Path, Path]:
    """Each image's features file, relative to the output folder: the image's path relative to the folder all
    inputs share, with the suffix ``.safetensors`` (``a/x.jpg`` and ``b/x.jpg`` stay apart). Two images that
    would share a file (``x.jpg`` beside ``x.png``) are an error."""
    resolved = {p: p.resolve() for p in paths}
    common = Path(os.path.commonpath([r.parent for r in resolved.values()]))
    names = {p: r.relative_to(common).with_suffix(".safetensors") for p, r in resolved.items()}
    seen: Dict[Path, Path] = {}
    for path, name in names.items():
        if name in seen and seen[name] != path:
            raise ValueError(f"{str(seen[name])!r} and {str(path)!r} would both be written to {str(name)!r}; rename "
                             "one of them or use --per-batch")
        seen[name] = path
    return names


def write_features(
    loaded: InferenceModel, paths: List[Path], out: Path, *, size: Tuple[int, int], kind: str, layers: Optional[Sequence[int]] = None,
    batch_size: int = 8, per_batch: bool = False, dtype: torch.dtype = torch.float32, skip_corrupt: bool = False,
    progress: bool = True, precision: str = "fp32", overwrite: bool = False,
) -> Dict[str, Any]:
    """Extract features of every image at ``size`` and write safetensors files (``dtype``: theirs; ``precision``:
    the model's, fp32 or bf16 autocast); returns a summary. Files already there are refused before any work
    unless ``overwrite`` (with ``per_batch``, batch files of an earlier run that this one does not rewrite
    are removed at the end, so the folder holds one run)."""
    from safetensors.torch import save_file

    loaded.model.patch_embed.check_size(*size)
    check_layers(loaded.model, layers)
    names = {} if per_batch else output_names(paths)
    batch_files = [out / f"batch_{n:05d}.safetensors" for n in range(-(-len(paths) // batch_size))] if per_batch else []
    stale = sorted(set(out.glob("batch_*.safetensors")) - set(batch_files)) if per_batch and out.is_dir() else []
    refuse_existing([*(out / n for n in names.values()), *batch_files, *stale], overwrite=overwrite, what="features file")
    transform = resize_transform(size, loaded.data_config)
    device = next(loaded.model.parameters()).device
    autocast(precision, device)  # refused before the output folder is made
    prepare_output_dir(out)
    start, written, skipped, shapes = time.perf_counter(), [], [], {}
    meta = {"model": loaded.name, "kind": kind, "size": f"{size[0]}x{size[1]}"}
    for n, batch in enumerate(tqdm(list(_batches(paths, batch_size)), desc="features", disable=not progress)):
        images, kept, unreadable = read_images(batch, transform, skip_corrupt=skip_corrupt)
        skipped += unreadable
        if images is None:
            continue
        with autocast(precision, device):
            computed = extract_features(loaded.model, images.to(device), kind, layers)
        feats = {k: v.to(dtype).cpu() for k, v in computed.items()}
        shapes = {k: tuple(v.shape[1:]) for k, v in feats.items()}
        if per_batch:
            tensors = {f"{i}.{k}": v[i].contiguous() for i in range(len(kept)) for k, v in feats.items()}
            sources = {f"{i}": str(p) for i, p in enumerate(kept)}
            atomic_write(batch_files[n], lambda tmp: save_file(tensors, tmp, metadata={**meta, **sources}))
            written.append(batch_files[n])
            continue
        for i, path in enumerate(kept):
            tensors = {k: v[i].contiguous() for k, v in feats.items()}
            atomic_write(out / names[path], lambda tmp: save_file(tensors, tmp, metadata={**meta, "source": str(path)}))
            written.append(out / names[path])
    if len(skipped) == len(paths):
        raise CorruptImageError(f"none of the {len(paths)} image(s) could be read; the first: {skipped[0][1]}")
    for path in set(stale + batch_files) - set(written):  # an earlier run's batch files (overwrite only)
        path.unlink(missing_ok=True)
    return {"files": len(written), "images": len(paths) - len(skipped), "skipped": skipped, "seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(), "shapes": shapes}
