"""Using a trained Vim: predict labels, extract features at any size (see
:func:`visionmamba.models.factory.load_for_inference` for loading any checkpoint)."""
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torchvision import transforms
from tqdm import tqdm

from visionmamba.data.folders import eval_transform, load_rgb
from visionmamba.files import atomic_write
from visionmamba.models.factory import InferenceModel
from visionmamba.models.vim import VisionMamba
from visionmamba.ops.memory import peak_rss_mb


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


@torch.no_grad()
def predict(loaded: InferenceModel, paths: List[Path], *, topk: int = 5, batch_size: int = 32, progress: bool = False) -> List[Dict[str, Any]]:
    """Top-k labels and softmax scores per image: [{"path", "predictions": [{"label", "index", "score"}]}]."""
    transform = eval_transform(loaded.data_config)
    device = next(loaded.model.parameters()).device
    results = []
    for batch in tqdm(list(_batches(paths, batch_size)), desc="predict", disable=not progress):
        images = torch.stack([transform(load_rgb(str(p))) for p in batch]).to(device)
        probs = loaded.model(images).float().softmax(-1)
        scores, indices = probs.topk(min(topk, probs.shape[-1]), dim=-1)
        for path, s, i in zip(batch, scores.tolist(), indices.tolist()):
            results.append({"path": str(path), "predictions": [
                {"label": loaded.labels[k], "index": k, "score": v} for v, k in zip(s, i)
            ]})
    return results


FEATURE_KINDS = ("pooled", "tokens", "map", "intermediates")


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
    if kind == "intermediates":
        indices = list(layers) if layers else [len(model.layers) - 1]
        maps = model.forward_intermediates(images, indices=indices, intermediates_only=True)
        return {f"layer{i}": m for i, m in zip(sorted(i % len(model.layers) for i in indices), maps)}
    tokens = model.forward_features(images)
    if kind == "tokens":
        return {"tokens": tokens}
    if kind == "pooled":
        return {"pooled": model.forward_head(tokens, pre_logits=True)}
    grid = model.patch_embed.grid_for(*images.shape[-2:])
    mid = model.cls_index(grid[0] * grid[1])
    patches = torch.cat([tokens[:, :mid], tokens[:, mid + 1 :]], dim=1)
    return {"map": patches.reshape(patches.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()}


def write_features(
    loaded: InferenceModel, paths: List[Path], out: Path, *, size: Tuple[int, int], kind: str, layers: Optional[Sequence[int]] = None,
    batch_size: int = 8, per_batch: bool = False, dtype: torch.dtype = torch.float32, progress: bool = True,
) -> Dict[str, Any]:
    """Extract features of every image at ``size`` and write safetensors files; returns a summary."""
    from safetensors.torch import save_file

    loaded.model.patch_embed.check_size(*size)
    transform = resize_transform(size, loaded.data_config)
    device = next(loaded.model.parameters()).device
    out.mkdir(parents=True, exist_ok=True)
    start, written = time.perf_counter(), []
    for n, batch in enumerate(tqdm(list(_batches(paths, batch_size)), desc="features", disable=not progress)):
        images = torch.stack([transform(load_rgb(str(p))) for p in batch]).to(device)
        feats = {k: v.to(dtype).cpu() for k, v in extract_features(loaded.model, images, kind, layers).items()}
        meta = {"model": loaded.name, "kind": kind, "size": f"{size[0]}x{size[1]}"}
        if per_batch:
            tensors = {f"{i}.{k}": v[i].contiguous() for i in range(len(batch)) for k, v in feats.items()}
            target = out / f"batch_{n:05d}.safetensors"
            names = {f"{i}": str(p) for i, p in enumerate(batch)}
            atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata={**meta, **names}))
            written.append(target)
        else:
            for i, path in enumerate(batch):
                tensors = {k: v[i].contiguous() for k, v in feats.items()}
                target = out / f"{path.stem}.safetensors"
                atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata={**meta, "source": str(path)}))
                written.append(target)
    return {"files": len(written), "images": len(paths), "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
            "shapes": {k: tuple(v.shape[1:]) for k, v in feats.items()}}
