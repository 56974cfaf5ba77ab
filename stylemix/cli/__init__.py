"""`stylemix` command line.  Each subcommand lives in its own module with `register(sub)`.

User mistakes end as one line on stderr and exit code 1 (argparse usage errors: 2);
a traceback is shown only with STYLEMIX_DEBUG=1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from stylemix.errors import StyleMixError

# module name in stylemix.cli -> registers one or more subcommands
COMMAND_MODULES = ["generate", "loras", "serve", "preprocess", "train", "jobs", "score", "evaluate", "mix"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stylemix", description="Train and mix style LoRAs for Stable Diffusion 1.5.")
    parser.add_argument("--model", default=None,
                        help="base model: hub id, local diffusers folder, SD1.5 .safetensors checkpoint, or 'tiny' "
                             "(default: $STYLEMIX_MODEL or SD1.5)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: picked automatically)")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: picked from the device)")
    parser.add_argument("--safety-checker", action="store_true",
                        help="load the model's safety checker (off by default; real models only)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the UNet and VAE decoder (default: `serve` compiles on CUDA, where it is "
                             "measured to help; one-off commands do not, a compile costs more than one image)")
    parser.add_argument("--loras-dir", default=None, help="LoRA library folder (default: $STYLEMIX_LORAS or ./loras)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"stylemix.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"stylemix.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="stylemix: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (StyleMixError, ValueError, FileNotFoundError, PermissionError) as e:
        if os.environ.get("STYLEMIX_DEBUG"):
            raise
        print(f"stylemix: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stylemix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
