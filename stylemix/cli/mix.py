"""`stylemix mix export|map|balance|clash`: mixing beyond weighted sums.

  export   a mix of N LoRAs as one LoRA file (exact, or SVD-compressed with its error)
  map      a weight map: 2-D grid for two LoRAs, or lines through weight space for 3-4
  balance  find weights whose images reach target style shares (CLIP score kept)
  clash    where two LoRAs' weight updates overlap, per layer and block (heat map)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stylemix.errors import StyleMixError
from stylemix.recipe import parse_block_weights


def _weights(items: list[str], what: str = "--lora") -> dict[str, float]:
    out = {}
    for item in items or []:
        name, sep, w = item.rpartition("=")
        try:
            out[name] = float(w)
        except ValueError:
            name = ""
        after = item.partition("=")[2]
        if "@" in after or ":" in after:  # a schedule (docs/mixing-modes.md): one file holds one weight per LoRA
            raise StyleMixError(f"{what} {item!r}: a schedule cannot be baked into one LoRA file; give one weight "
                                f"per LoRA here (schedules work in `stylemix generate`).")
        if not sep or not name:
            raise StyleMixError(f"{what} {item!r}: expected NAME=NUMBER, e.g. {what} watercolor=0.6.")
    return out


def _blocks(items: list[str]) -> dict[str, dict[str, float]]:
    return parse_block_weights(items)


def _values(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StyleMixError(f"--values {text!r}: expected numbers separated by commas, e.g. 0,0.25,0.5,0.75,1.") from None
    if not vals:
        raise StyleMixError("--values needs at least one number.")
    return vals


def _recipe(args, loras=None):
    from stylemix.recipe import Recipe

    w, h = 512, 512
    if args.size:
        try:
            w, h = (int(x) for x in args.size.lower().split("x"))
        except ValueError:
            raise StyleMixError(f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 512x512.") from None
    r = Recipe(prompt=args.prompt, loras=loras or {}, seed=args.seed, steps=args.steps, width=w, height=h,
               block_weights=_blocks(args.block))
    if args.sampler:
        r.sampler = args.sampler
    return r.validate()


def _gen_args(p, steps=20, size=None) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--size", default=size, metavar="WxH")
    p.add_argument("--sampler", default=None)
    p.add_argument("--block", action="append", default=[], metavar="LORA:BLOCK=MULT",
                   help="per-block multiplier, e.g. anime:up.1=0.5 (repeatable)")


def register(sub) -> None:
    p = sub.add_parser("mix", help="export a mix as one LoRA, weight maps, automatic balancing, clash maps",
                       description=__doc__.split("\n\n")[0])
    msub = p.add_subparsers(dest="mix_command", metavar="ACTION", required=True)

    e = msub.add_parser("export", help="a mix of N LoRAs as one LoRA file (exact: rank r1+...+rN)")
    e.add_argument("--lora", action="append", required=True, metavar="NAME=WEIGHT")
    e.add_argument("--block", action="append", default=[], metavar="LORA:BLOCK=MULT")
    e.add_argument("--rank", type=int, default=None, help="compress to this rank by SVD (the error is reported)")
    e.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers")
    e.add_argument("--out", default=None, metavar="FILE.safetensors", help="write the file here")
    e.add_argument("--add", default=None, metavar="NAME", help="add the mix to the LoRA library as NAME")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=run_export)

    m = msub.add_parser("map", help="weight map: grid for two LoRAs, or lines for three and four")
    m.add_argument("--lora", action="append", default=[], metavar="NAME",
                   help="grid: the two LoRAs (columns, rows)")
    m.add_argument("--fixed", action="append", default=[], metavar="NAME=WEIGHT",
                   help="grid: further LoRAs of an N-way mix, held at this weight")
    m.add_argument("--values", default="0,0.25,0.5,0.75,1", help="grid weights, comma separated")
    m.add_argument("--line", action="append", default=[], metavar="A=1,B=0:A=0,B=0.5,C=0.5",
                   help="a line from one weight vector to another (repeatable; instead of --lora)")
    m.add_argument("--points", type=int, default=5, help="points per line")
    m.add_argument("--out", required=True, metavar="DIR")
    _gen_args(m, steps=20, size="256x256")
    m.set_defaults(func=run_map)

    b = msub.add_parser("balance", help="find weights that reach target style shares")
    b.add_argument("--target", action="append", required=True, metavar="NAME=SHARE",
                   help="target share of a LoRA's style, e.g. watercolor=0.6 (shares add up to 1)")
    b.add_argument("--clip-tolerance", type=float, default=0.02)
    b.add_argument("--share-tolerance", type=float, default=0.03)
    b.add_argument("--max-generations", type=int, default=10, help="search budget (previews)")
    b.add_argument("--total-strength", type=float, default=None, help="sum of weights (default 1)")
    b.add_argument("--preview-size", type=int, default=256)
    b.add_argument("--preview-steps", type=int, default=8)
    b.add_argument("--map-values", default=None, help="also draw the path on a weight map of these values (2 LoRAs)")
    b.add_argument("--out", default=None, metavar="DIR", help="write balance.json (and map.png with --map-values)")
    b.add_argument("--json", action="store_true")
    _gen_args(b)
    b.set_defaults(func=run_balance)

    c = msub.add_parser("clash", help="per-layer overlap of two LoRAs' weight updates, as a heat map")
    c.add_argument("lora_a")
    c.add_argument("lora_b")
    c.add_argument("--out", default=None, metavar="FILE.png", help="heat map PNG")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=run_clash)


def _library(args):
    from stylemix.cli.common import workspace
    from stylemix.lora.library import LoraLibrary

    return LoraLibrary(workspace(args).loras)


def run_export(args) -> int:
    from stylemix.experiments.mix_export import add_mix_to_library, export_mix, mix_trigger_words, write_mix

    if not args.out and not args.add:
        raise StyleMixError("Say where the mix goes: --out FILE.safetensors and/or --add NAME.")
    if args.out and not args.out.endswith(".safetensors"):
        raise StyleMixError(f"--out {args.out!r} must end in .safetensors.")
    lib = _library(args)
    weights = _weights(args.lora)
    result = export_mix(lib, weights, _blocks(args.block), rank=args.rank)
    info = result.info()
    info["trigger_words"] = mix_trigger_words(lib, weights)
    if args.out:
        info["file"] = str(write_mix(result, Path(args.out), args.format, name=Path(args.out).stem))
    if args.add:
        info["library_name"] = add_mix_to_library(lib, result, args.add, info["trigger_words"]).name
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        how = "exact" if result.relative_error == 0 else f"relative error {result.relative_error:.4f} " \
                                                         f"(worst layer {result.worst_layer_error:.4f})"
        print(f"Mix of {', '.join(f'{n}={w:g}' for n, w in result.weights.items())}: rank {result.rank}, {how}.")
        for k in ("file", "library_name"):
            if k in info:
                print(f"{'written to' if k == 'file' else 'added to the library as'} {info[k]}")
        if info["trigger_words"]:
            print(f"prompt it with: {', '.join(info['trigger_words'])}")
    return 0


def _progress(label):
    def progress(done, total, msg):
        print(f"stylemix: {label} {done}/{total} {msg}", file=sys.stderr)
    return progress


def run_map(args) -> int:
    from stylemix.cli.common import open_mixer
    from stylemix.scores.judge import StyleJudge
    from stylemix.experiments.weight_maps import weight_map_2d, weight_map_lines, write_map

    recipe = _recipe(args)
    if args.line and args.lora:
        raise StyleMixError("Give either --lora A --lora B (a grid) or --line ... (lines), not both.")
    lines = []
    for item in args.line:
        start, sep, end = item.partition(":")
        if not sep:
            raise StyleMixError(f"--line {item!r}: expected START:END, e.g. a=1,b=0:a=0,b=1.")
        lines.append((_weights(start.split(","), "--line"), _weights(end.split(","), "--line")))
    if not lines and len(args.lora) != 2:
        raise StyleMixError("A grid map needs exactly two --lora NAME (use --line for three or four LoRAs).")
    mixer = open_mixer(args)
    names = list(dict.fromkeys(args.lora + list(_weights(args.fixed)) + [k for s, e in lines for k in [*s, *e]]))
    judge = StyleJudge.for_mixer(mixer, names)
    if lines:
        wmap = weight_map_lines(mixer, recipe, lines, args.points, judge, _progress("map"))
    else:
        vals = _values(args.values)
        wmap = weight_map_2d(mixer, recipe, args.lora[0], args.lora[1], vals, vals, _weights(args.fixed), judge,
                             _progress("map"))
    files = write_map(wmap, args.out)
    print(f"weight map: {files['map']}\nimages: {files['grid']}")
    if judge.missing:
        print(f"(no style centroid for {', '.join(judge.missing)}: shares not measured)")
    return 0


def run_balance(args) -> int:
    from stylemix.experiments.balance import BalanceConfig, balance_mix
    from stylemix.cli.common import open_mixer

    target = _weights(args.target, "--target")
    cfg = BalanceConfig(share_tolerance=args.share_tolerance, clip_tolerance=args.clip_tolerance,
                        max_evaluations=args.max_generations, total_strength=args.total_strength,
                        preview_steps=args.preview_steps, preview_size=args.preview_size)
    recipe = _recipe(args)
    mixer = open_mixer(args)
    res = balance_mix(mixer, recipe, target, cfg, progress=_progress("balance"))
    info = res.to_dict()
    if args.out:
        from stylemix.paths import atomic_write_text

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "balance.json", json.dumps(info, indent=2))
        if args.map_values and len(target) == 2:
            from stylemix.experiments.weight_maps import weight_map_2d, write_map

            a, b = list(target)
            vals = _values(args.map_values)
            small = recipe.with_(steps=cfg.preview_steps, width=cfg.preview_size, height=cfg.preview_size)
            from stylemix.scores.judge import StyleJudge

            wmap = weight_map_2d(mixer, small, a, b, vals, vals, judge=StyleJudge.for_mixer(mixer, [a, b]))
            write_map(wmap, out, path_points=[s.weights for s in res.path])
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        w = ", ".join(f"{k}={v:g}" for k, v in res.best.weights.items())
        sh = ", ".join(f"{k} {100 * v:.0f}%" for k, v in res.best.shares.items())
        nv = ", ".join(f"{k} {100 * v:.0f}%" for k, v in res.naive.shares.items())
        print(f"{'reached' if res.reached else 'closest found'}: {w} -> {sh} (error {res.best.error:.3f})")
        print(f"naive weights = targets -> {nv} (error {res.naive.error:.3f})")
        print(f"{res.evaluations} search generations, {res.generations} in all ({res.images} preview images)")
    return 0


def run_clash(args) -> int:
    from stylemix.experiments.clash import clash_map, draw_heatmap

    if args.out and not args.out.endswith(".png"):
        raise StyleMixError(f"--out {args.out!r} must end in .png.")
    cm = clash_map(_library(args), args.lora_a, args.lora_b)
    if args.out:
        draw_heatmap(cm, args.out)
    if args.json:
        print(json.dumps(cm.to_dict(), indent=2))
        return 0
    print(f"{args.lora_a} vs {args.lora_b}: overall cosine "
          + ("-" if cm.overall is None else f"{cm.overall:+.3f}") + f" over {len(cm.layers)} shared layers")
    for b, c in cm.blocks.items():
        print(f"  {b:13s} " + ("-" if c is None else f"{c:+.3f}"))
    worst = [b for b, c in cm.worst_blocks(2) if c < -0.1]
    if worst:
        print(f"they fight most in {', '.join(worst)}: try --block {args.lora_a}:{worst[0]}=0.5")
    if args.out:
        print(f"heat map: {args.out}")
    return 0
