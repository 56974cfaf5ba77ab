"""`stylemix judge install csd [--from FILE] | status`: the style judges (docs/scores.md).

`install csd` converts CSD's released weights (the Hub's tomg-group-umd/CSD-ViT-L
`pytorch_model.bin`, or a local file) once into a checked safetensors file; from then on CSD is
the default style judge.  `status` says which judges are installed and which one scores.
"""

from __future__ import annotations

import json

from stylemix.errors import StyleMixError

INSTALLABLE = ("csd",)  # CLIP's weights come from the Hub cache as safetensors: nothing to convert


def register(sub) -> None:
    p = sub.add_parser("judge", help="install and inspect the style judges (CLIP, CSD)",
                       description=__doc__.split("\n\n")[0])
    cmds = p.add_subparsers(dest="judge_command", metavar="ACTION", required=True)
    c = cmds.add_parser("install", help="convert a judge's released weights into the local cache (once)")
    c.add_argument("judge", help="the judge to install: csd")
    c.add_argument("--from", dest="source", default=None, metavar="FILE",
                   help="a local copy of the released weights (.bin/.pth/.pt pickle, read with weights_only, or "
                        ".safetensors) instead of the Hub's tomg-group-umd/CSD-ViT-L pytorch_model.bin")
    c.add_argument("--dir", default=None, help="judge folder (default: $STYLEMIX_JUDGE_DIR or <HF_HOME>/stylemix/judges)")
    c.add_argument("--json", action="store_true")
    c = cmds.add_parser("status", help="which judges are installed and which one scores")
    c.add_argument("--dir", default=None, help="judge folder (default: $STYLEMIX_JUDGE_DIR or <HF_HOME>/stylemix/judges)")
    c.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from stylemix.scores.selection import check_judge_name

    if args.judge_command == "install":
        name = check_judge_name(args.judge)
        if name not in INSTALLABLE:
            raise StyleMixError(f"The {name} judge needs no install (its weights are read from the Hugging Face "
                                f"cache as safetensors); installable: {', '.join(INSTALLABLE)}.")
        return _install(args)
    return _status(args)


def _install(args) -> int:
    from stylemix.scores.csd_install import install_csd, weights_path

    record = install_csd(args.source, args.dir)
    if args.json:
        print(json.dumps({**record, "path": str(weights_path(args.dir))}, indent=2))
    else:
        print(f"Installed CSD ({record['arch']}/{record['sha256'][:12]}, {record['tensors']} tensors) to "
              f"{weights_path(args.dir)}\n  sha256 {record['sha256']}\n  from {record['source']} "
              f"({record['source_size'] / 1e6:.0f} MB)\nCSD is now the default style judge "
              "(choose with --style-judge clip|csd or $STYLEMIX_STYLE_JUDGE).")
    return 0


def _status(args) -> int:
    from stylemix.scores.clip_models import ScorerUnavailable
    from stylemix.scores.csd_install import read_record, weights_path
    from stylemix.scores.selection import STYLE_JUDGES, resolve_style_judge

    kind, why = resolve_style_judge(None, args.dir)
    try:
        record, problem = read_record(args.dir), None
    except ScorerUnavailable as e:
        record, problem = None, str(e)
    info = {"style_judge": kind, "why": why, "judges": STYLE_JUDGES,
            "csd": {"installed": record is not None, "path": str(weights_path(args.dir)),
                    **({k: record[k] for k in ("sha256", "source", "source_size", "installed") if k in record}
                       if record else {"problem": problem})}}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"style judge: {kind} ({why})")
    for name, text in STYLE_JUDGES.items():
        print(f"  {name}: {text}")
    if record:
        print(f"csd: installed at {info['csd']['path']} (sha256 {record['sha256'][:12]}..., from {record['source']})")
    else:
        print(f"csd: {problem}")
    return 0
