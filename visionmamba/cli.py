"""Command line: thin subcommands that parse flags into typed configs and call library functions."""
import argparse
import dataclasses
import json
import sys
import typing
from typing import Any, Dict, List, Optional

from . import __version__


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
            kwargs["type"] = base
        if f.name == "resume":
            kwargs.update(nargs="?", const="auto")
        parser.add_argument(flag, **kwargs)


TRAIN_HELP = {
    "data": "folder with train/<class>/ and val/<class>/ images",
    "output": "folder for checkpoints, log.jsonl, curves.png and config.json",
    "model": "model name (the recipe preset of that model applies unless --no-preset)",
    "model_args": 'extra model arguments as JSON, e.g. \'{"depth": 12}\'',
    "batch_size": "images per process per step",
    "lr": "base learning rate, scaled by global batch / 512",
    "resume": "continue from a checkpoint (no value: OUTPUT/last.pth if it exists)",
    "finetune": "start from these weights (official .pth or ours; pos-embed resampled)",
    "checkpoint_every": "optimizer steps between mid-epoch checkpoints (0: end of epoch only)",
    "skip_nonfinite": "skip steps whose loss is NaN/inf instead of stopping",
    "skip_corrupt": "skip unreadable images (counted) instead of stopping",
    "precision": "fp32, bf16 or fp16 autocast",
}


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine import NonFiniteLossError
    from .training import TrainConfig, resolve_config, train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    cfg = resolve_config(overrides, use_preset=args.preset)
    try:
        record = train(cfg)
    except NonFiniteLossError as err:
        print(f"visionmamba train: stopped: {err} The last good checkpoint is {cfg.output}/last.pth.", file=sys.stderr)
        return 3
    print(json.dumps(record))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .training import EvalConfig, evaluate_checkpoint

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig) if hasattr(args, f.name)}
    metrics = evaluate_checkpoint(EvalConfig(**values))
    print(
        f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
        f"({metrics['count']} images" + (f", {metrics['skipped_images']} unreadable skipped)" if metrics["skipped_images"] else ")")
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, epochs=args.epochs)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import convert_to_safetensors

    tensors, values = convert_to_safetensors(args.src, args.dst, use_ema=args.ema)
    print(f"wrote {args.dst}: {tensors} tensors, {values:,} values ({'EMA' if args.ema else 'model'} weights)")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .registry import OFFICIAL_ALIASES, RELEASED

    aliases = {ours: official for official, ours in OFFICIAL_ALIASES.items()}
    for name, (hub_id, filename, top1) in RELEASED.items():
        print(f"{name:32s} top-1 {top1:4.1f}  {hub_id}/{filename}")
        if args.aliases:
            print(f"    alias: {aliases[name]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .training import EvalConfig, TrainConfig

    parser = argparse.ArgumentParser(prog="visionmamba", description="Vision Mamba (Vim) in plain PyTorch")
    parser.add_argument("--version", action="version", version=f"visionmamba {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train on an ImageFolder data set with the official recipe (torchrun for DDP)")
    _add_dataclass_flags(p, TrainConfig, TRAIN_HELP)
    p.add_argument("--preset", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the official recipe preset of --model (default: on)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5/loss of a checkpoint (ours or official) on a class-folder data set")
    _add_dataclass_flags(p, EvalConfig, {"checkpoint": "our checkpoint or an official .pth", "ema": "evaluate the EMA weights"})
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="train a small Vim on the bundled handwritten digits and report test accuracy")
    p.add_argument("--output", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--epochs", type=int, default=None, help="override the demo's number of epochs")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("convert", help="write the weights of a checkpoint (.pth, ours or official) as safetensors")
    p.add_argument("src", help="input checkpoint: official .pth, one of ours, a state dict, or safetensors")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--ema", action="store_true", help="take the EMA weights (model_ema) instead of the raw ones")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("models", help="list the Vim variants and their released checkpoints")
    p.add_argument("--aliases", action="store_true", help="also print the official long model names")
    p.set_defaults(func=_cmd_models)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .data import CorruptImageError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, CorruptImageError) as err:
        print(f"visionmamba {args.command}: error: {err}", file=sys.stderr)
        return 2
