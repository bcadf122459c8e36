"""Command line: thin subcommands that parse flags and call library functions."""
import argparse
import sys
from typing import List, Optional

from . import __version__


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
    parser = argparse.ArgumentParser(prog="visionmamba", description="Vision Mamba (Vim) in plain PyTorch")
    parser.add_argument("--version", action="version", version=f"visionmamba {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"visionmamba {args.command}: error: {err}", file=sys.stderr)
        return 2
