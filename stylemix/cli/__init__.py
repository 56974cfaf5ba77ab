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
COMMAND_MODULES = ["generate", "loras", "serve", "preprocess", "train", "jobs", "score", "evaluate", "mix",
                   "judge"]


# Options every subcommand shares, accepted before or after it: `stylemix --model tiny generate "a cat"`
# and `stylemix generate "a cat" --model tiny` mean the same.
GLOBAL_OPTIONS: list[tuple[tuple[str, ...], dict]] = [
    (("--model",), dict(default=None, help="base model: hub id, local diffusers folder, SD1.5 .safetensors "
                                           "checkpoint, or 'tiny' (default: $STYLEMIX_MODEL or SD1.5)")),
    (("--device",), dict(default=None, help="cuda, mps or cpu (default: picked automatically)")),
    (("--dtype",), dict(default=None, help="fp32, fp16 or bf16 (default: picked from the device)")),
    (("--safety-checker",), dict(action="store_true",
                                 help="load the model's safety checker (off by default; real models only)")),
    (("--compile",), dict(action=argparse.BooleanOptionalAction, default=None,
                          help="torch.compile the UNet and VAE decoder (default: `serve` compiles on CUDA, where it is "
                               "measured to help; one-off commands do not, a compile costs more than one image)")),
    (("--loras-dir",), dict(default=None, help="LoRA library folder (default: $STYLEMIX_LORAS or ./loras)")),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stylemix", description="Train and mix style LoRAs for Stable Diffusion 1.5.")
    for flags, kwargs in GLOBAL_OPTIONS:
        parser.add_argument(*flags, **kwargs)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"stylemix.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"stylemix.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(sub)
    _add_global_options_to_subcommands(parser)
    return parser


def _add_global_options_to_subcommands(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand (at any depth) the global options, defaulting to SUPPRESS so that an
    option not repeated after the subcommand keeps the value given before it (or the default)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for subparser in set(action.choices.values()):
            taken = set(subparser._option_string_actions)
            group = subparser.add_argument_group("global options (also accepted before the command)")
            for flags, kwargs in GLOBAL_OPTIONS:
                if not taken.intersection(flags):  # a subcommand's own option of that name wins
                    group.add_argument(*flags, **{**kwargs, "default": argparse.SUPPRESS})
            _add_global_options_to_subcommands(subparser)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="stylemix: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a command restarts on several processes with
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
