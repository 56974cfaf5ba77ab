"""`stylemix generate PROMPT [--lora NAME=WEIGHT ...]`: one mix, saved as PNGs with their recipe."""

from __future__ import annotations

import json
import time
from pathlib import Path

from stylemix.errors import StyleMixError
from stylemix.compose import compose, read_recipe_file
from stylemix.a1111 import lbw_weights
from stylemix.a1111 import parse_lora_args as tag_args
from stylemix.recipe import DEFAULT_SAMPLER, SAMPLERS, Recipe, parse_block_weights
from stylemix.schedules import DEFAULT_SWITCH_EVERY, MODES, PRESETS, apply_preset
from stylemix.scores.selection import judge_arg
from stylemix.recipe import parse_size as recipe_size


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt and a LoRA mix")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (optional with --from)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=WEIGHT",
                   help="a LoRA from the library and its weight in [-2, 2]; repeat for a mix.  The weight may be a "
                        "schedule, as in a <lora:...> tag: loractl keyframes NAME=0@0,1@0.5, te=/unet=, LoRA Block "
                        "Weight's start=/stop=/step=A-B and interp= (NAME=1:start=0.3; docs/mixing-modes.md)")
    p.add_argument("--mode", default=None, choices=list(MODES),
                   help="merge: one weighted sum (default); switch: one LoRA at a time, rotating every "
                        "--switch-every steps; composite: one U-Net pass per LoRA per step, predictions averaged")
    p.add_argument("--switch-every", type=int, default=None, metavar="K",
                   help=f"switch mode: steps each LoRA stays on (default {DEFAULT_SWITCH_EVERY})")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="start the mix's schedules from a preset (docs/mixing-modes.md)")
    p.add_argument("--from", dest="from_file", default=None, metavar="PNG_OR_JSON",
                   help="start from the recipe in a StyleMix/A1111 PNG or a recipe JSON file")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default 7.5)")
    p.add_argument("--size", default=None, metavar="WxH", help="image size, multiples of 8 (default 512x512)")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS), help=f"default {DEFAULT_SAMPLER!r}")
    p.add_argument("--batch", type=int, default=None, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--block", action="append", default=[], metavar="LORA:BLOCK=MULT",
                   help="per-block weight multiplier, e.g. anime:up.1=0.5 (blocks: down, down.0-3, mid, up, "
                        "up.0-3, text_encoder, A1111 LBW ids BASE, IN00-IN11, M00, OUT00-OUT11; the most specific wins), "
                        "or LORA:lbw=PRESET_OR_17_NUMBERS; <lora:NAME:W:lbw=...> prompt tags work too (docs/a1111.md)")
    p.add_argument("--total-strength", type=float, default=None,
                   help="scale the weights so their absolute sum is this (keeps stacked LoRAs from frying)")
    p.add_argument("--no-triggers", action="store_true", help="do not put trigger words in front of the prompt")
    p.add_argument("--out", default=None, help="output PNG path (default: outputs/<time>-<seed>.png)")
    p.add_argument("--no-score", action="store_true", help="skip CLIP scores")
    p.add_argument("--clip-model", default="ViT-B-32", help="CLIP model for the scores (ViT-B-32 or ViT-L-14)")
    p.add_argument("--style-judge", default=None, metavar="clip|csd", type=judge_arg,
                   help="what measures style similarity and shares (default: $STYLEMIX_STYLE_JUDGE, else csd where "
                        "installed, else clip); the CLIP score is always CLIP's")
    p.add_argument("--no-base-calibration", action="store_true",
                   help="do not make base-model images of the same prompt and seeds to calibrate style similarity "
                        "(the styles' stored anchors are used instead)")
    p.add_argument("--json", action="store_true", help="print a machine-readable result")
    p.set_defaults(func=run)


def parse_lora_args(items: list[str]) -> tuple[dict[str, float], dict[str, str], dict[str, dict[str, float]]]:
    """--lora NAME=ARGS items -> (weights, schedules, lbw block weights); ARGS as in <lora:NAME:ARGS>."""
    loras: dict[str, float] = {}
    schedules: dict[str, str] = {}
    blocks: dict[str, dict[str, float]] = {}
    for item in items:
        name, sep, args = item.partition("=")
        name = name.strip()
        if not name:
            raise StyleMixError(f"--lora {item!r}: name a LoRA, as in NAME=0.6.")
        try:  # a plain number goes to the recipe as it is: Recipe.validate names a bad one in the app's words
            loras[name] = float(args) if sep else 1.0
            continue
        except ValueError:
            pass
        try:
            weight, lbw, schedule = tag_args(args.split(":") if sep else ["1"])
        except ValueError as e:
            raise StyleMixError(f"--lora {item!r}: {e}") from None
        loras[name] = weight
        if not schedule.is_plain:
            schedules[name] = schedule.text()
        if lbw:
            blocks[name] = lbw
    return loras, schedules, blocks


def parse_size(text: str) -> tuple[int, int]:
    try:
        return recipe_size(text)
    except ValueError as e:
        raise StyleMixError(f"--{e}") from None


def build_recipe(args) -> Recipe:
    if args.from_file:
        recipe = read_recipe_file(args.from_file)
    else:
        if not args.prompt:
            raise StyleMixError("Give a prompt, or --from a PNG/JSON recipe.")
        recipe = Recipe(prompt=args.prompt)
    changes = {}
    if args.prompt and args.from_file:
        changes["prompt"] = args.prompt
    if args.lora:
        changes["loras"], changes["schedules"], lbw = parse_lora_args(args.lora)
        if lbw:
            changes["block_weights"] = lbw
    if args.block:
        changes["block_weights"] = {**changes.get("block_weights", {}), **parse_block_weights(args.block)}
    if args.preset:
        loras = changes.get("loras", recipe.loras)
        schedules, lbw = apply_preset(args.preset, loras)
        changes["schedules"] = {**changes.get("schedules", recipe.schedules), **schedules}
        blocks = changes.get("block_weights", recipe.block_weights)
        changes["block_weights"] = {**blocks, **{n: lbw_weights(v) for n, v in lbw.items()}}
    if args.mode:
        changes["mode"] = args.mode
    if args.switch_every is not None:
        changes["switch_every"] = args.switch_every
    for attr, val in (("negative_prompt", args.negative), ("seed", args.seed), ("steps", args.steps),
                      ("guidance", args.guidance), ("sampler", args.sampler), ("batch_size", args.batch),
                      ("total_strength", args.total_strength)):
        if val is not None:
            changes[attr] = val
    if args.size:
        changes["width"], changes["height"] = parse_size(args.size)
    if args.no_triggers:
        changes["add_trigger_words"] = False
    return recipe.with_(**changes).validate()


def run(args) -> int:
    from stylemix.cli.common import open_mixer, tqdm_progress, workspace

    recipe = build_recipe(args)
    out = Path(args.out) if args.out else workspace(args).outputs / f"{time.strftime('%Y%m%d-%H%M%S')}-{recipe.seed}.png"
    if out.suffix.lower() != ".png":
        raise StyleMixError(f"--out {out}: StyleMix writes PNG files (the recipe lives in PNG text chunks).")
    mixer = open_mixer(args)

    def image_paths(result) -> list[Path]:
        n = len(result.images)
        return [out if n == 1 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(n)]

    bar, progress = tqdm_progress(recipe.steps, "generating", disable=args.json)
    with bar:
        composed = compose(mixer, recipe, image_paths, progress=progress, score=not args.no_score,
                           clip_model=args.clip_model, calibrate=not args.no_base_calibration,
                           style_judge=args.style_judge)
    result, scores, paths = composed.result, composed.scores, [str(p) for p in composed.image_paths]
    if args.json:
        print(json.dumps({"images": paths, "recipe": result.recipe.to_dict(), "prompt_used": result.prompt_used,
                          "weights_used": result.weights_used, "seeds": result.seeds,
                          "model": mixer.loaded.model_id, "tiny_model": mixer.loaded.is_tiny,
                          "scores": scores, "timings": result.timings,
                          # what each LoRA's U-Net weight was at each step (recorded by the step callback)
                          "step_weights": result.step_weights, "te_weights": result.te_weights,
                          "unet_passes_per_step": result.unet_passes}, indent=2))
    else:
        for p in paths:
            print(p)
        if scores and scores.get("images"):
            for p, s in zip(paths, scores["images"]):
                print(f"  {Path(p).name}: {format_scores(s)}")
        elif scores:
            print(f"  scores unavailable: {scores.get('unavailable')}")
    return 0


def format_scores(s: dict) -> str:
    parts = [f"CLIP {s['clip_score']:.4f}" if s.get("clip_score") is not None else "CLIP n/a (empty prompt)"]
    shares = s.get("shares") or {}
    if shares:
        basis = "" if s.get("shares_basis") == "calibrated" else " (uncalibrated)"
        parts.append(" / ".join(f"{name} {100 * share:.0f}%" for name, share in shares.items()) + basis)
    elif s.get("style_detected") is False:  # no style above the noise floor: no shares (docs/scores.md)
        parts.append("no style detected")
    if s.get("is_demo"):
        parts.append("(demo values: tiny random CLIP)")
    return ", ".join(parts)
