"""`stylemix evaluate [--config FILE] [--out DIR] [--map STYLE=LORA ...]`: the seed protocol, reproducible.

Runs (or resumes) the experiment of a protocol TOML file (default: the seed report's 110 images)
and writes results.csv, summary.csv/.md, contact sheets and a plot into --out.  With
`--num-processes N` (or under `accelerate launch` / torchrun) the images are split between N processes,
one GPU each (or the CPU); every image, score and the summary are those of a one-process run.

`stylemix evaluate --epochs LORA [--weight W]` compares instead the saved epochs of one LoRA
(LORA@eNN, from `stylemix train --save-every-epochs N`) and the final LoRA, on the protocol
file's prompts, seeds and settings (experiments/epochs.py): epochs.json, plot.png, contact.png.

`--modes merge,switch,composite` and `--preset NAME` compare ways of running each mix: every mix of the
file that sets no mode, preset or schedules of its own runs once per mode and once per schedule preset
(configurations `<mix>@switch`, `<mix>@style-late`...), on the same prompts and seeds.
"""

from __future__ import annotations

import json
import os
import sys

from stylemix.errors import StyleMixError
from stylemix.scores.selection import judge_arg


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="run the seed report's experiment (or another protocol file), resumable",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, metavar="FILE",
                   help="protocol TOML file (default: the shipped seed protocol, stylemix/configs/seed_protocol.toml)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: outputs/evaluate/<protocol name>); rerun to resume")
    p.add_argument("--map", action="append", default=[], metavar="STYLE=LORA",
                   help="use library LoRA LORA for protocol style STYLE (repeatable)")
    p.add_argument("--epochs", default=None, metavar="LORA",
                   help="compare the saved epochs of LoRA LORA (LORA@eNN) on the protocol's prompts, seeds and "
                        "settings, instead of running the protocol")
    p.add_argument("--weight", type=float, default=1.0, help="with --epochs: every epoch's weight (default 1)")
    p.add_argument("--modes", default=None, metavar="MODE,...",
                   help="run each plain mix once per mode: merge, switch, composite (replaces the file's "
                        "protocol.modes)")
    p.add_argument("--preset", action="append", default=None, metavar="NAME",
                   help="also run each plain mix with this schedule preset, e.g. \"style late\" (repeatable; "
                        "replaces the file's protocol.presets)")
    p.add_argument("--style-judge", default=None, metavar="clip|csd", type=judge_arg,
                   help="what measures style similarity and shares (default: $STYLEMIX_STYLE_JUDGE, else csd where "
                        "installed, else clip; docs/scores.md)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved mapping and image count, make nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    from stylemix.launch import add_launch_arguments

    add_launch_arguments(p, "make the images")
    p.set_defaults(func=run)


def parse_map(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        style, sep, lora = item.partition("=")
        if not sep or not style.strip() or not lora.strip():
            raise StyleMixError(f"--map {item!r}: expected STYLE=LORA, e.g. --map pixelart=pixel_art_v2.")
        out[style.strip()] = lora.strip()
    return out


def compare_modes(config, modes: str | None, presets: list[str] | None):
    """The protocol with --modes / --preset's comparison (each checked, then the whole protocol again)."""
    from stylemix.schedules import MODES, PRESETS

    if modes is not None:
        config.modes = [m.strip() for m in modes.split(",") if m.strip()]
        bad = next((m for m in config.modes if m not in MODES), None)
        if bad or not config.modes:
            raise StyleMixError(f"--modes {modes!r}: {'unknown mode ' + repr(bad) if bad else 'no mode'}; "
                                f"give some of {','.join(MODES)}.")
    if presets is not None:
        config.presets = [p.strip() for p in presets]
        bad = next((p for p in config.presets if p not in PRESETS), None)
        if bad is not None:
            raise StyleMixError(f"--preset {bad!r} is not known; choose one of: "
                                f"{', '.join(repr(p) for p in PRESETS)}.")
    if modes is None and presets is None:
        return config
    return config.validate(f"protocol {config.name!r} with --modes/--preset")


def run(args) -> int:
    from stylemix import launch
    from stylemix.cli.common import open_mixer, tqdm_progress, workspace
    from stylemix.experiments.protocol import ProtocolConfig, resolve_styles, run_protocol

    config = ProtocolConfig.load(args.config)  # a bad file fails before any model loads
    config = compare_modes(config, args.modes, args.preset)
    overrides = parse_map(args.map)
    several = launch.launch_from_args(args)
    if several.distributed and launch.world_size() == 1:  # start this same command on N processes, and wait
        if args.epochs or args.dry_run:
            raise StyleMixError("--num-processes splits the protocol's images; --epochs and --dry-run run in one "
                                "process: leave it out.")
        several.run("stylemix.cli", args.argv)
        return 0
    state = launch.distributed_state(args.device)  # started by the launcher: this process's share
    if state is not None and not args.device:
        args.device = str(state.device)  # one GPU per process
    if args.epochs:
        return run_epochs_cli(args, config)
    out = args.out or str(workspace(args).outputs / "evaluate" / config.name)
    mixer = open_mixer(args)
    if args.dry_run:
        mapping = resolve_styles(config, mixer.library, overrides)
        n = len(config.configurations()) * len(config.prompts) * len(config.seeds)
        print(json.dumps({"mapping": mapping, "images": n, "out": out,
                          "configurations": [c.id for c in config.configurations()],
                          "settings": config.settings(mixer.loaded.is_tiny)}, indent=2))
        return 0
    bar, progress = tqdm_progress(0, "evaluate")

    def report(done, total, message):
        progress(done, total)
        bar.set_postfix_str(message[:40])
        if not sys.stderr.isatty() and (done == total or done % 10 == 0):
            print(f"stylemix: evaluate {done}/{total} {message}", file=sys.stderr)

    judge = None
    if args.style_judge:
        from stylemix.scores.judge import StyleJudge

        judge = StyleJudge.for_mixer(mixer, list(resolve_styles(config, mixer.library, overrides).values()),
                                     config.clip_model, config.pretrained, style_judge=args.style_judge)
    try:
        res = run_protocol(mixer, config, out, overrides, progress=report, judge=judge)
    finally:
        bar.close()
    if not res.files:
        return 0  # another process of `accelerate launch` writes the summaries
    if args.json:
        print(json.dumps({"out": str(res.out_dir), "total": res.total, "generated": res.generated,
                          "rescored": res.rescored, "mapping": res.mapping, "files": res.files,
                          "is_demo": res.is_demo, "processes": res.processes, "seconds": res.seconds}, indent=2))
    else:
        split = f", split over {res.processes} processes" if res.processes > 1 else ""
        print(f"{res.total} images ({res.generated} generated now{split}) in {res.out_dir}")
        print(f"summary: {res.files['summary_md']}")
        if res.is_demo:
            print("NOTE: demo values (tiny model / tiny random CLIP), not real measurements.")
    return 0


def run_epochs_cli(args, config) -> int:
    """`--epochs LORA`: the LoRA's versions and the final LoRA on the protocol's prompts, seeds and settings."""
    import time
    from pathlib import Path

    from stylemix.cli.common import open_mixer, workspace
    from stylemix.experiments.epochs import epoch_rows, find_versions, parse_version, run_epochs
    from stylemix.paths import check_name
    from stylemix.scores.judge import StyleJudge

    # a version's name stands for its LoRA (watercolor@e05: the epochs of watercolor)
    name = check_name((parse_version(args.epochs) or (args.epochs, 0))[0], "LoRA name")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise StyleMixError("--epochs runs in one process: start it without `accelerate launch`.")
    if args.map:
        raise StyleMixError("--map maps the protocol's styles; --epochs uses none: leave --map out.")
    if args.modes is not None or args.preset is not None:
        raise StyleMixError("--modes and --preset compare the protocol's mixes; --epochs renders one LoRA alone: "
                            "leave them out.")
    out = Path(args.out or workspace(args).outputs / "evaluate" / f"epochs-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):  # no resume: a run's rows must all come from one run
        raise StyleMixError(f"{out} is not empty: give --epochs a new --out folder.")
    mixer = open_mixer(args)
    mixer.library.get(name)  # a missing LoRA is named as such, not as one without versions
    versions = find_versions(name, mixer.library.names())
    rows = epoch_rows(name, versions)  # refuses a LoRA without versions, naming the training option
    settings = config.settings(mixer.loaded.is_tiny)
    if args.dry_run:
        print(json.dumps({"lora": name, "versions": [n for _, n in versions], "weight": args.weight,
                          "images": len(rows) * len(config.prompts) * len(config.seeds), "out": str(out),
                          "settings": settings}, indent=2))
        return 0
    judge = StyleJudge.for_mixer(mixer, [name], config.clip_model, config.pretrained, style_judge=args.style_judge)

    def report(done, total, message):
        if done == total or done % 10 == 0:
            print(f"stylemix: epochs {done}/{total} {message}", file=sys.stderr)

    res = run_epochs(mixer, name, versions, out, config.prompts, config.seeds, settings, args.weight,
                     progress=report, judge=judge)
    if args.json:
        print(json.dumps({"out": str(out), "lora": name, "weight": res.weight, "rows": res.rows, "files": res.files,
                          "has_centroid": res.has_centroid, "note": res.note, "is_demo": res.is_demo}, indent=2))
        return 0
    print(f"Epochs of {name} at weight {res.weight:g}, {len(config.prompts)} prompts x {len(config.seeds)} seeds "
          f"(CLIP {res.clip_model}):")
    for r in res.rows:
        print(f"  {r['epoch']:>6}  CLIP {_num(r['clip_mean'])}  style similarity {_num(r['style_sim_mean'])}  "
              f"calibrated {_num(r['style_cal_mean'])}")
    if res.note:
        print(res.note)
    print(f"plot: {res.files['plot']}  contact sheet: {res.files['contact']}")
    if res.is_demo:
        print("NOTE: demo values (tiny model / tiny random CLIP), not real measurements.")
    return 0


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"
