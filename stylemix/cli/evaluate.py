"""`stylemix evaluate [--config FILE] [--out DIR] [--map STYLE=LORA ...]`: the seed protocol, reproducible.

Runs (or resumes) the experiment of a protocol TOML file (default: the seed report's 110 images)
and writes results.csv, summary.csv/.md, contact sheets and a plot into --out.  Under
`accelerate launch` the images are split between the GPUs.
"""

from __future__ import annotations

import json
import os
import sys

from stylemix.errors import StyleMixError


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="run the seed report's experiment (or another protocol file), resumable",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, metavar="FILE",
                   help="protocol TOML file (default: the shipped seed protocol, stylemix/configs/seed_protocol.toml)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: outputs/evaluate/<protocol name>); rerun to resume")
    p.add_argument("--map", action="append", default=[], metavar="STYLE=LORA",
                   help="use library LoRA LORA for protocol style STYLE (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved mapping and image count, make nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def parse_map(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        style, sep, lora = item.partition("=")
        if not sep or not style.strip() or not lora.strip():
            raise StyleMixError(f"--map {item!r}: expected STYLE=LORA, e.g. --map pixelart=pixel_art_v2.")
        out[style.strip()] = lora.strip()
    return out


def run(args) -> int:
    from stylemix.cli.common import open_mixer, tqdm_progress, workspace
    from stylemix.experiments.protocol import ProtocolConfig, resolve_styles, run_protocol

    config = ProtocolConfig.load(args.config)  # a bad file fails before any model loads
    overrides = parse_map(args.map)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.device:
        from accelerate import PartialState

        args.device = str(PartialState().device)  # one GPU per process
    out = args.out or str(workspace(args).outputs / "evaluate" / config.name)
    mixer = open_mixer(args)
    if args.dry_run:
        mapping = resolve_styles(config, mixer.library, overrides)
        n = len(config.configurations()) * len(config.prompts) * len(config.seeds)
        print(json.dumps({"mapping": mapping, "images": n, "out": out,
                          "settings": config.settings(mixer.loaded.is_tiny)}, indent=2))
        return 0
    bar, progress = tqdm_progress(0, "evaluate")

    def report(done, total, message):
        progress(done, total)
        bar.set_postfix_str(message[:40])
        if not sys.stderr.isatty() and (done == total or done % 10 == 0):
            print(f"stylemix: evaluate {done}/{total} {message}", file=sys.stderr)

    try:
        res = run_protocol(mixer, config, out, overrides, progress=report)
    finally:
        bar.close()
    if not res.files:
        return 0  # another process of `accelerate launch` writes the summaries
    if args.json:
        print(json.dumps({"out": str(res.out_dir), "total": res.total, "generated": res.generated,
                          "rescored": res.rescored, "mapping": res.mapping, "files": res.files,
                          "is_demo": res.is_demo}, indent=2))
    else:
        print(f"{res.total} images ({res.generated} generated now) in {res.out_dir}")
        print(f"summary: {res.files['summary_md']}")
        if res.is_demo:
            print("NOTE: demo values (tiny model / tiny random CLIP), not real measurements.")
    return 0
