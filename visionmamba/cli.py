"""Command line: thin subcommands that parse flags into typed configs and call library functions.

Each subcommand has one ``_add_<command>(sub)`` that declares its flags and one ``_cmd_<command>(args)``
that runs it; the library code it calls is imported when the command runs.
"""
import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional

from visionmamba.train.config import DetConfig, EvalConfig, SegConfig, TrainConfig
from visionmamba.version import __version__


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (a wrong value is one line from argparse, exit 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def device_arg(text: str) -> str:
    """An argparse type: a device this machine has ("auto", "cpu", "cuda", "cuda:N"; only a CUDA one needs
    torch to be checked)."""
    if text in ("auto", "cpu"):
        return text
    from visionmamba.ops.devices import resolve_device

    try:
        resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, helps: Dict[str, str]) -> None:
    """One ``--flag`` per dataclass field, typed from its annotation; unset flags stay absent."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if typing.get_origin(hint) is typing.Union else hint
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: Dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{helps.get(f.name, '')} (default: {default})")
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is tuple:
            kwargs.update(nargs=len(typing.get_args(base)), type=typing.get_args(base)[0], metavar=f.name.upper())
        elif typing.get_origin(base) is dict:
            kwargs.update(type=json.loads, metavar="JSON")
        else:
            kwargs["type"] = device_arg if f.name == "device" else base
        if f.name == "resume":
            kwargs.update(nargs="?", const="auto")
        parser.add_argument(flag, **kwargs)


def _dataclass_values(cls: type, args: argparse.Namespace) -> Dict[str, Any]:
    """The fields of ``cls`` given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it says it itself (the dataclass flags, and options
    whose default depends on the checkpoint)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _parser(sub, name: str, what: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=what, description=what, formatter_class=HelpFormatter)


def _flag(p: argparse.ArgumentParser, name: str, what: str, default: bool = False) -> None:
    """An on/off option in the one style of every command: ``--name`` / ``--no-name``."""
    p.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=what)


def _output(p: argparse.ArgumentParser, what: str, *, default: Optional[str] = None, required: bool = False) -> None:
    """``--output`` (``--out`` kept as its old spelling) and ``--overwrite``: one rule for every command that
    writes, an existing output is refused before any work unless ``--overwrite``."""
    p.add_argument("--output", "--out", dest="output", default=default, required=required, help=what)
    _flag(p, "--overwrite", "replace an existing output (otherwise refused before any work)")


def _positional_alias(args: argparse.Namespace, positional: str, option: str) -> Any:
    """The value of ``--option``, or of the positional argument it replaced (kept for old command lines)."""
    given, old = getattr(args, option), getattr(args, positional)
    if given is not None and old is not None and given != old:
        raise ValueError(f"--{option} {given!r} and the positional {old!r} disagree: give one of them")
    value = given if given is not None else old
    if value is None:
        raise ValueError(f"pass --{option} (see `visionmamba {args.command} --help`)")
    return value


def _model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model name (default: the one our checkpoints carry; official .pth files need it)")
    p.add_argument("--checkpoint", help="our checkpoint or an official .pth / safetensors (no default: without it the "
                                        "weights would be random)")
    _flag(p, "--ema", "use the EMA weights of the checkpoint")


# ------------------------------------------------------------------------------------------- training
TRAIN_HELP = {
    "data": "folder with train/<class>/ and val/<class>/ images (or one folder of <class>/ images: no validation)",
    "output": "folder for checkpoints, log.jsonl, curves.png and config.json",
    "model": "model name (the recipe preset of that model applies unless --no-preset)",
    "model_args": 'extra model arguments as JSON, e.g. \'{"depth": 12}\'',
    "batch_size": "images per process per batch",
    "accum_steps": "batches whose gradients add up to one optimizer step (same global batch on fewer GPUs)",
    "lr": "base learning rate, scaled by global batch / 512",
    "resume": "continue from a checkpoint (no value: OUTPUT/last.pth if it exists) with the run's own options; "
              "flags given win",
    "finetune": "start from these weights (official .pth or ours; pos-embed resampled)",
    "checkpoint_every": "optimizer steps between mid-epoch checkpoints (0: end of epoch only)",
    "skip_nonfinite": "skip steps whose loss is NaN/inf instead of stopping",
    "skip_corrupt": "skip unreadable images (counted) instead of stopping",
    "precision": "fp32, bf16 or fp16 autocast",
}

DENSE_HELP = {
    "data": "data root (segmentation: ADE20K layout ROOT/images/<split>, ROOT/annotations/<split>; "
            "detection: COCO layout ROOT/<split>, ROOT/annotations/instances_<split>.json)",
    "output": "folder for checkpoints, log.jsonl, curves.png and config.json",
    "model": "backbone model name",
    "model_args": 'extra backbone arguments as JSON, e.g. \'{"depth": 12}\'',
    "finetune": "ImageNet-pretrained Vim weights for the backbone (official .pth or ours)",
    "out_indices": "four blocks feeding the pyramid (default: the last of each quarter of the depth)",
    "crop_size": "training crop (a multiple of 32); detection: also the test-time size",
    "scale_range": "random resize range, as a fraction of the crop size",
    "iters": "optimizer steps",
    "batch_size": "images per process per step",
    "layer_decay": "layer-wise lr decay of the backbone blocks (1: none)",
    "checkpoint_every": "iterations between checkpoints",
    "eval_every": "iterations between evaluations (0: at the end only)",
    "resume": "continue from a checkpoint (no value: OUTPUT/last.pth if it exists) with the run's own options; "
              "flags given win",
    "skip_nonfinite": "skip steps whose loss is NaN/inf instead of stopping",
    "precision": "fp32, bf16 or fp16 autocast",
    "num_classes": "segmentation classes (150 for ADE20K)",
    "reduce_zero_label": "label 0 means 'other' (ignored) and classes start at 1, as in ADE20K",
    "decoder_channels": "UperNet channels (default: the backbone width)",
    "aux_weight": "weight of the auxiliary FCN head's loss (0: no auxiliary head)",
    "eval_mode": "'slide' (crop-size windows, 2/3 stride) or 'whole' image inference",
    "fpn_channels": "FPN channels",
    "anchor_sizes": "one anchor size per level (strides 4, 8, 16, 32, 64)",
    "detector_args": "more torchvision MaskRCNN arguments as JSON, e.g. '{\"box_batch_size_per_image\": 128}'",
}


def _report_training(command: str, train_fn, cfg) -> int:
    """Train; print the last record as JSON (exit 0), or why a non-finite loss stopped the run (exit 3), or how
    to continue after Ctrl-C (exit 130)."""
    from visionmamba.train.trainer import NonFiniteLossError

    last = Path(cfg.output) / "last.pth"
    try:
        record = train_fn(cfg)
    except NonFiniteLossError as err:
        kept = f"The last good checkpoint is {last}." if last.is_file() else "No checkpoint was written yet."
        print(f"visionmamba {command}: stopped: {err} {kept}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        where = f"the last checkpoint is {last}; continue with the same command and --resume" if last.is_file() else (
            "no checkpoint was written yet")
        print(f"visionmamba {command}: interrupted; {where}", file=sys.stderr)
        return 130
    print(json.dumps(record))
    return 0


def _preset_help(helps: Dict[str, str]) -> Dict[str, str]:
    """``helps`` with, for each option a --model preset sets, the preset values (they replace the default)."""
    from visionmamba.train.config import PRESETS

    out = dict(helps)
    for name in sorted({k for preset in PRESETS.values() for k in preset}):
        values = ", ".join(f"{model} {preset[name]}" for model, preset in PRESETS.items() if name in preset)
        out[name] = f"{helps.get(name, '')}; the --model preset sets it: {values}".lstrip("; ")
    return out


def _add_train(sub) -> None:
    p = _parser(sub, "train", "train on an ImageFolder data set with the official recipe (torchrun for DDP)")
    _add_dataclass_flags(p, TrainConfig, _preset_help(TRAIN_HELP))
    p.add_argument("--preset", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the official recipe preset of --model (default: on)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from visionmamba.train.classification import train
    from visionmamba.train.config import resolve

    return _report_training("train", train, resolve(TrainConfig, _dataclass_values(TrainConfig, args), use_preset=args.preset))


def _add_dense_train(sub, name: str, cls: type, what: str) -> None:
    p = _parser(sub, name, what)
    _add_dataclass_flags(p, cls, DENSE_HELP)
    p.set_defaults(func=_cmd_dense_train, config_cls=cls)


def _cmd_dense_train(args: argparse.Namespace) -> int:
    from visionmamba.train.config import resolve
    from visionmamba.train.dense import train_dense

    cls = args.config_cls
    return _report_training(args.command, train_dense, resolve(cls, _dataclass_values(cls, args)))


# ----------------------------------------------------------------------------------------- evaluation
def _add_eval(sub) -> None:
    p = _parser(sub, "eval", "top-1/top-5/loss of a checkpoint (ours or official) on a class-folder data set")
    _add_dataclass_flags(p, EvalConfig, {
        "data": "a folder of <class>/ images (e.g. ImageNet's val/), or a root holding val/<class>/",
        "checkpoint": "our checkpoint or an official .pth (required); or a file of `export` / `quantize` (.onnx: ONNX "
                      "Runtime, .xml: OpenVINO), scored the same way", "model": "model name (needed for official files)",
        "ema": "evaluate the EMA weights", "img_size": "evaluation size (default: the checkpoint's)",
    })
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from visionmamba.train.classification import evaluate_checkpoint
    from visionmamba.train.config import resolve

    cfg = resolve(EvalConfig, _dataclass_values(EvalConfig, args))
    load = None
    if cfg.checkpoint and Path(cfg.checkpoint).suffix in (".onnx", ".xml"):
        from visionmamba.tools.quantize import load_runtime_file

        if cfg.model or cfg.ema or cfg.img_size or cfg.precision != "fp32":
            raise ValueError("a runtime file carries its model, weights, size and precision: drop --model, --ema, "
                             "--img-size and --precision")
        load = lambda device: load_runtime_file(cfg.checkpoint)  # noqa: E731
    metrics = evaluate_checkpoint(cfg, load)
    skipped = metrics["skipped_images"]
    print(
        f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
        f"({metrics['count']} images" + (f", {skipped} unreadable skipped)" if skipped else ")")
    )
    return 0


def _add_dense_eval(sub, name: str, what: str) -> None:
    p = _parser(sub, name, what)
    p.add_argument("--checkpoint", required=True, help=f"a {name.replace('eval', 'train')} checkpoint")
    p.add_argument("--data", help="data root (default: the one it was trained with)")
    p.add_argument("--split", help="split to evaluate (default: its validation split)")
    p.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:N or auto")
    if name == "seg-eval":
        p.add_argument("--mode", choices=["slide", "whole"], help="inference mode (default: the training config's)")
        _flag(p, "--per-class", "also print every class's IoU")
    p.set_defaults(func=_cmd_dense_eval)


def _cmd_dense_eval(args: argparse.Namespace) -> int:
    from visionmamba.train.dense import evaluate_dense

    metrics = evaluate_dense(args.checkpoint, args.data, args.split, device=args.device,
                             eval_mode=getattr(args, "mode", None), progress=True)
    done = f"({metrics['images']} images, {metrics['seconds']:.0f} s)"
    if "mIoU" in metrics:
        print(f"mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  aAcc {metrics['aAcc']:.2f}  {done}")
        if args.per_class:
            for i, iou in enumerate(metrics["IoU"]):
                print(f"  class {i:3d}: IoU " + ("absent" if iou is None else f"{iou:.2f}"))
    else:
        print("  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith(("bbox", "segm"))) + f"  {done}")
    return 0


# --------------------------------------------------------------------------------------------- demos
def _add_demo(sub) -> None:
    p = _parser(sub, "demo", "train a small Vim on the bundled handwritten digits and report test accuracy")
    _output(p, "run folder", default="runs/demo")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs (default: the demo's 25)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from visionmamba.tools.demo import run_demo

    run_demo(args.output, epochs=args.epochs, overwrite=args.overwrite)
    return 0


def _add_scenes(sub) -> None:
    p = _parser(sub, "scenes", "write the digit-scenes data set (ADE20K and COCO layouts) from scikit-learn's digits")
    p.add_argument("out", nargs="?", help=argparse.SUPPRESS)  # the old positional spelling of --output
    _output(p, "output folder (no default; the old positional OUT is accepted too)")
    p.add_argument("--train", type=positive_int, default=1000, help="training scenes")
    p.add_argument("--val", type=positive_int, default=200, help="validation scenes")
    p.add_argument("--seed", type=int, default=0, help="random seed of the scenes")
    p.add_argument("--size", type=positive_int, default=128, help="canvas side in pixels")
    p.set_defaults(func=_cmd_scenes)


def _cmd_scenes(args: argparse.Namespace) -> int:
    from visionmamba.data.digits import write_scenes

    out = Path(_positional_alias(args, "out", "output"))
    counts = write_scenes(out, train=args.train, val=args.val, seed=args.seed, size=args.size, overwrite=args.overwrite)
    print(f"wrote {counts['training']} training / {counts['validation']} validation scenes to {out} "
          "(ADE20K layout at the root, COCO layout under coco/)")
    return 0


def _add_dense_demo(sub) -> None:
    p = _parser(sub, "dense-demo", "train and evaluate segmentation and detection on the bundled digit scenes")
    p.add_argument("--task", choices=["seg", "det", "both"], default="both", help="which task(s) to run")
    _output(p, "run folder", default="runs/dense-demo")
    p.add_argument("--iters", type=positive_int, help="iterations, evaluated at the end only (default: the demo's, "
                                                      "with evaluations between)")
    p.set_defaults(func=_cmd_dense_demo)


def _cmd_dense_demo(args: argparse.Namespace) -> int:
    from visionmamba.tools.demo import run_dense_demo

    run_dense_demo(args.output, ["seg", "det"] if args.task == "both" else [args.task], iters=args.iters,
                   overwrite=args.overwrite)
    return 0


# ---------------------------------------------------------------------------------- using a model
def _add_predict(sub) -> None:
    p = _parser(sub, "predict", "top-k labels of images (ImageNet names, or the class folders a model was trained on)")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    _model_source(p)
    p.add_argument("--topk", type=positive_int, default=5, help="labels per image")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=positive_int, default=32, help="images per batch")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:N or auto")
    _flag(p, "--json", "print JSON instead of a table")
    _flag(p, "--skip-corrupt", "skip unreadable images (listed) instead of stopping")
    _precision_arg(p)
    p.set_defaults(func=_cmd_predict)


def _precision_arg(p) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast with bfloat16 activations (refused on devices without bf16 arithmetic)")


def _cmd_predict(args: argparse.Namespace) -> int:
    from visionmamba.files import list_images
    from visionmamba.models.factory import load_for_inference
    from visionmamba.tools.inference import predict

    images = list_images(args.images)
    loaded = load_for_inference(args.checkpoint, args.model, use_ema=args.ema, device=args.device)
    results = predict(loaded, images, topk=args.topk, batch_size=args.batch_size,
                      skip_corrupt=args.skip_corrupt, progress=False, precision=args.precision)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        width = max(len(r["path"]) for r in results)
        for r in results:
            if "error" in r:
                print(f"{r['path']:{width}s}  skipped: {r['error']}")
            for rank, pred in enumerate(r.get("predictions", []), 1):
                print(f"{r['path'] if rank == 1 else '':{width}s}  {rank}. {pred['score']:6.2%}  {pred['label']}")
    if all("error" in r for r in results):
        print(f"visionmamba predict: error: none of the {len(results)} image(s) could be read", file=sys.stderr)
        return 2
    return 0


def _add_features(sub) -> None:
    p = _parser(sub, "features", "features at any resolution, written as safetensors")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    _model_source(p)
    p.add_argument("--img-size", "--res", dest="img_size", type=positive_int, nargs="+", metavar="S",
                   help="S, or H W; each fitting the patch grid (default: the size the checkpoint was trained at)")
    p.add_argument("--kind", choices=["pooled", "tokens", "map", "intermediates"], default="map", help="what to write")
    p.add_argument("--layers", type=int, nargs="+", help="blocks for --kind intermediates (default: the last)")
    _output(p, "output folder", required=True)
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=positive_int, default=8, help="images per batch")
    _flag(p, "--per-batch", "one file per batch (tensors named <index>.<kind>)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype of the stored features")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:N or auto")
    _flag(p, "--skip-corrupt", "skip unreadable images (counted) instead of stopping")
    _precision_arg(p)
    p.set_defaults(func=_cmd_features)


def _cmd_features(args: argparse.Namespace) -> int:
    import torch

    from visionmamba.files import list_images
    from visionmamba.models.factory import load_for_inference
    from visionmamba.tools.inference import write_features

    if args.img_size and len(args.img_size) > 2:
        raise ValueError(f"--img-size takes one size (S) or two (H W), got {len(args.img_size)}: {args.img_size}")
    images = list_images(args.images)
    loaded = load_for_inference(args.checkpoint, args.model, use_ema=args.ema, device=args.device)
    size = (args.img_size[0], args.img_size[-1]) if args.img_size else loaded.image_size
    summary = write_features(
        loaded, images, Path(args.output), size=size, kind=args.kind, layers=args.layers,
        batch_size=args.batch_size, per_batch=args.per_batch, skip_corrupt=args.skip_corrupt,
        dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype], precision=args.precision,
        overwrite=args.overwrite,
    )
    for path, why in summary["skipped"]:
        print(f"skipped: {why}", file=sys.stderr)
    shapes = ", ".join(f"{k} {tuple(v)}" for k, v in summary["shapes"].items())
    skipped = f" ({len(summary['skipped'])} unreadable skipped)" if summary["skipped"] else ""
    print(f"wrote {summary['files']} file(s) for {summary['images']} image(s){skipped} to {args.output} at "
          f"{size[0]}x{size[1]}: {shapes}; {summary['seconds']:.1f} s, peak memory {summary['peak_rss_mb']:.0f} MB")
    return 0


def _add_benchmark(sub) -> None:
    p = _parser(sub, "benchmark", "images/s and peak memory vs resolution, with a table of ratios, CSV and plot")
    p.add_argument("--model", "--models", dest="models", nargs="+",
                   default=["vim_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_patch16_224:naive"],
                   help="timm names; ':naive' turns off fused attention, ':onednn' routes plain linears through oneDNN, "
                        "':onnx' / ':openvino' export the model and run it in ONNX Runtime / OpenVINO with our kernels, "
                        "':onnx-standard' / ':openvino-standard' the standard-ops file, ':onnx-int8' / ':openvino-int8' "
                        "the fused file in int8 (quantize's tools), ':onnx-fallback' the fused file without our kernels")
    p.add_argument("--img-size", "--res", dest="res", type=positive_int, nargs="+", default=[224, 512], help="image sizes")
    p.add_argument("--batch-size", "--batch", dest="batch", type=positive_int, default=8, help="images per batch")
    p.add_argument("--device", default="cpu", type=device_arg, choices=["cpu", "cuda"], help="where to measure")
    _precision_arg(p)
    _flag(p, "--train", "time training steps instead of inference")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats per point")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads per point")
    _output(p, "folder for benchmark.csv and benchmark.png", default="runs/benchmark")
    p.set_defaults(func=_cmd_benchmark)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from visionmamba.tools.benchmark import ratio_table, run_benchmark

    points = run_benchmark(
        args.models, args.res, batch=args.batch, device=args.device, precision=args.precision, train=args.train,
        repeats=args.repeats, threads=args.threads, out=Path(args.output), overwrite=args.overwrite,
    )
    print(ratio_table(points))
    print(f"CSV: {args.output}/benchmark.csv, plot: {args.output}/benchmark.png")
    if all(p.status != "ok" for p in points):
        print(f"visionmamba benchmark: error: every point failed (first: {points[0].status})", file=sys.stderr)
        return 1
    return 0


def _add_export(sub) -> None:
    p = _parser(sub, "export", "export to ONNX or torch.export: one file for every batch size and fitting image size")
    p.add_argument("--format", choices=["onnx", "torch-export"], default="onnx",
                   help="onnx: for ONNX Runtime and other runtimes; torch-export: a .pt2 program with our kernels")
    p.add_argument("--ops", choices=["fused", "standard"], default="fused",
                   help="onnx only. fused: our nodes (our kernels in ONNX Runtime and OpenVINO) with standard bodies for "
                        "other runtimes; standard: standard ONNX operators only, for any runtime and its own tools")
    p.add_argument("--model", help="model name (default: the one our checkpoints carry; needed for official files "
                                   "and without --checkpoint)")
    p.add_argument("--checkpoint", help="our checkpoint or an official .pth / safetensors (default: none, random "
                                        "weights, said in one line)")
    _flag(p, "--ema", "export the EMA weights of the checkpoint")
    p.add_argument("--img-size", "--res", dest="img_size", type=positive_int,
                   help="the size the model is built for (its position table) and the first size checked (default: "
                        "the size the checkpoint was trained at, 224 for the released weights)")
    _output(p, "output file (.onnx or .pt2); with --bundle none (no default)")
    p.add_argument("--bundle", metavar="DIR", help="write a deploy bundle into the new or empty folder DIR: both ONNX "
                                                   "forms, ONNX Runtime's library and OpenVINO's extension built here, a "
                                                   "README on loading them (no default: no bundle)")
    _flag(p, "--check", "compare with PyTorch at two batch sizes and three image sizes before writing", default=True)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from visionmamba.deploy.export import EXPORTERS, export_bundle
    from visionmamba.messages import notice

    if args.bundle and (args.output or args.format != "onnx" or args.ops != "fused"):
        raise ValueError("--bundle writes both ONNX forms into its folder: leave out --output, --format and --ops")
    if not args.bundle and not args.output:
        raise ValueError("pass --output FILE (or --bundle DIR)")
    if not args.checkpoint:
        notice("no --checkpoint: the exported model has freshly initialised (random) weights")
    if args.bundle:
        report = export_bundle(args.model, Path(args.bundle), img_size=args.img_size, checkpoint=args.checkpoint,
                               use_ema=args.ema, check=args.check)
        print(f"wrote the bundle {args.bundle}: " + ", ".join(sorted(report["manifest"]["sha256"])) + ", README.md, "
              f"manifest.json (exported in {report['export_s']:.1f} s)")
        return 0
    options = {"ops": args.ops} if args.format == "onnx" else {}
    if args.format != "onnx" and args.ops != "fused":
        raise ValueError("--ops is an option of --format onnx (a torch-export program holds our kernels)")
    report = EXPORTERS[args.format](args.model, Path(args.output), img_size=args.img_size, checkpoint=args.checkpoint,
                                    use_ema=args.ema, check=args.check, overwrite=args.overwrite, **options)
    print(f"wrote {args.output} ({args.format}; any batch size, any image size that fits the patch grid; "
          f"exported in {report['export_s']:.1f} s)")
    if args.check:
        diffs = report["max_abs_diff"]
        print(f"max abs difference from PyTorch {max(diffs.values()):.1e} over batch x size {', '.join(diffs)}")
    return 0


QUANTIZE_DEFAULTS = {"images": 300, "min_images": 32, "min_agreement": 99.0}  # tools/quantize.py's (a test keeps them equal)


def _add_quantize(sub) -> None:
    DEFAULT_IMAGES, MIN_IMAGES, MIN_AGREEMENT = QUANTIZE_DEFAULTS.values()
    p = _parser(sub, "quantize", "post-training static int8 for ONNX Runtime or OpenVINO, calibrated on a folder of images")
    _model_source(p)
    p.add_argument("--calib", required=True, help=f"folder of calibration images (any layout, e.g. a class-folder training "
                                                  f"set; at least {MIN_IMAGES}), read with the model's preprocessing")
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx",
                   help="onnx: a QDQ file for ONNX Runtime (onnxruntime.quantization); openvino: an .xml + .bin (NNCF)")
    _output(p, "output file (.onnx; .xml for openvino, its weights in the .bin beside it)", required=True)
    p.add_argument("--images", type=positive_int, default=DEFAULT_IMAGES,
                   help="calibration images, spread over the folder's sorted files (all, when it holds fewer)")
    p.add_argument("--img-size", "--res", dest="img_size", type=positive_int,
                   help="input size (default: the size the checkpoint was trained at)")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=positive_int, default=8, help="calibration batch")
    p.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT,
                   help="percent of calibration images whose top-1 class must match the float model's, or nothing is written")
    _flag(p, "--force", "write the file even when it misses --min-agreement")
    p.add_argument("--keep-float", nargs="*", metavar="MODULE",
                   help="modules left in float, as shell patterns of their PyTorch names: 'head', '*.out_proj', "
                        "'layers.23.*', 'patch_embed.proj'; none after it: all int8 (default: '*.out_proj' for onnx, whose tool has no "
                        "outlier smoothing; none for openvino, whose NNCF preset smooths them)")
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from visionmamba.tools.quantize import quantize

    if not args.checkpoint:
        raise ValueError("pass --checkpoint FILE: quantizing random weights measures nothing")
    report = quantize(args.model, args.checkpoint, args.calib, args.format, Path(args.output), images=args.images,
                      img_size=args.img_size, use_ema=args.ema, batch_size=args.batch_size,
                      min_agreement=args.min_agreement, force=args.force, overwrite=args.overwrite,
                      keep_float=args.keep_float)
    print(f"wrote {args.output} (int8, {args.format}; calibrated on {report.images} images in {report.quantize_s:.1f} s): "
          f"top-1 agrees with the float model on {report.agreement:.1f}% of them, max logit difference "
          f"{report.max_abs_diff:.3f}")
    return 0


# ------------------------------------------------------------------------------------- model files
def _add_info(sub) -> None:
    p = _parser(sub, "info", "model card: parameters, compute, eval transform, released weights")
    p.add_argument("name", nargs="?", help=argparse.SUPPRESS)  # the old positional spelling of --model
    p.add_argument("--model", help="model name, `visionmamba models` lists them (no default; the old positional "
                                   "NAME is accepted too)")
    p.add_argument("--img-size", "--res", dest="img_size", type=positive_int, default=224, help="image size")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from visionmamba.models.factory import check_model_name
    from visionmamba.models.info import model_card

    name = _positional_alias(args, "name", "model")
    check_model_name(name)
    print(model_card(name, args.img_size))
    return 0


def _add_convert(sub) -> None:
    p = _parser(sub, "convert", "write the weights of a checkpoint (.pth, ours or official) as safetensors, with what "
                                "rebuilds the model (name, arguments, classes, preprocessing)")
    p.add_argument("src", help="input checkpoint: official .pth, one of ours, a state dict, or safetensors")
    p.add_argument("dst", nargs="?", help=argparse.SUPPRESS)  # the old positional spelling of --output
    _output(p, "output .safetensors file (no default; the old positional DST is accepted too)")
    p.add_argument("--model", help="model name to record (default: the one our checkpoints carry; official files "
                                   "do not say)")
    _flag(p, "--ema", "take the EMA weights (model_ema) instead of the raw ones")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from visionmamba.files import check_output_file, require_file
    from visionmamba.models.factory import check_model_name
    from visionmamba.models.weights import convert_to_safetensors

    dst = Path(_positional_alias(args, "dst", "output"))
    require_file(args.src, "checkpoint")
    check_output_file(dst, overwrite=args.overwrite)
    if args.model:
        check_model_name(args.model)
    tensors, values = convert_to_safetensors(args.src, dst, use_ema=args.ema, facts={"model_name": args.model})
    print(f"wrote {dst}: {tensors} tensors, {values:,} values ({'EMA' if args.ema else 'model'} weights)")
    return 0


def _add_models(sub) -> None:
    p = _parser(sub, "models", "list the Vim variants and their released checkpoints")
    _flag(p, "--aliases", "also print the official long model names")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from visionmamba.models.registry import OFFICIAL_ALIASES, RELEASED

    aliases = {ours: official for official, ours in OFFICIAL_ALIASES.items()}
    for name, (hub_id, filename, top1) in RELEASED.items():
        print(f"{name:32s} top-1 {top1:4.1f}  {hub_id}/{filename}")
        if args.aliases:
            print(f"    alias: {aliases[name]}")
    return 0


def _add_env(sub) -> None:
    p = _parser(sub, "env", "versions, CPU, compiler, GPUs and the backend each device gets: for bug reports")
    _flag(p, "--json", "print the report as JSON")
    p.set_defaults(func=_cmd_env)


def _cmd_env(args: argparse.Namespace) -> int:
    from visionmamba.tools.env_report import format_report, report

    data = report()
    print(json.dumps(data, indent=2) if args.json else format_report(data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionmamba", description="Vision Mamba (Vim) in plain PyTorch")
    parser.add_argument("--version", action="version", version=f"visionmamba {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_dense_train(sub, "seg-train", SegConfig, "train Vim + UperNet on ADE20K-layout data (official recipe; torchrun for DDP)")
    _add_dense_train(sub, "det-train", DetConfig, "train Vim + Mask R-CNN on COCO-layout data (official recipe; torchrun for DDP)")
    _add_dense_eval(sub, "seg-eval", "mIoU of a seg-train checkpoint")
    _add_dense_eval(sub, "det-eval", "COCO box/mask AP of a det-train checkpoint")
    _add_scenes(sub)
    _add_dense_demo(sub)
    _add_predict(sub)
    _add_features(sub)
    _add_benchmark(sub)
    _add_export(sub)
    _add_quantize(sub)
    _add_info(sub)
    _add_convert(sub)
    _add_models(sub)
    _add_env(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run a subcommand. A user error (bad value, missing or unreadable file, an output that cannot be written)
    is one line on stderr and exit 2; Ctrl-C is one line and exit 130; a bug keeps its traceback."""
    args = build_parser().parse_args(argv)  # --help and argument errors end here, before torch is imported
    from visionmamba.data.folders import CorruptImageError
    from visionmamba.files import OutputError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, CorruptImageError, OutputError) as err:
        message = err.strerror if isinstance(err, OutputError) and err.strerror else err  # without "[Errno N]"
        print(f"visionmamba {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"visionmamba {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`visionmamba env | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exiting flushes nowhere
        return 141
