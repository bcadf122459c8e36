"""Export to deployment formats. ONNX: the scan runs as the plain reference loop (pure tensor ops), which
the exporter unrolls over the sequence, so an exported graph has one fixed input resolution (export one
file per resolution; dynamic height/width is not feasible this way)."""
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from visionmamba.models.factory import load_for_inference


def export_onnx(
    model_name: str, path: Path, *, img_size: int = 224, checkpoint: Optional[str] = None, use_ema: bool = False,
    check: bool = True, model_args: Optional[Dict[str, Any]] = None,
) -> Dict[str, float]:
    """Write ``path`` for (1, 3, img_size, img_size) inputs; with ``check``, compare onnxruntime to PyTorch."""
    if checkpoint:
        model = load_for_inference(checkpoint, model_name, use_ema=use_ema, img_size=img_size).model
    else:
        import timm

        model = timm.create_model(model_name, img_size=img_size, **(model_args or {})).eval()
    model.set_scan_backend("reference")
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        expected = model(x)
        torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=["logits"], dynamo=True, external_data=False)
    report = {"max_abs_diff": float("nan")}
    if check:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        report["max_abs_diff"] = (got - expected).abs().max().item()
    return report


# format name -> exporter (the CLI's --format choices)
EXPORTERS: Dict[str, Callable[..., Dict[str, float]]] = {"onnx": export_onnx}
