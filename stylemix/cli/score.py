"""`stylemix score IMAGE...`: CLIP score, style similarity and shares of existing images.

With `--save-centroid NAME` the images are instead the reference images of LoRA NAME, and
its style centroid is computed from them and stored in its folder (for LoRAs imported
without their training data), for the style judge in use (`--style-judge clip|csd`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from stylemix.errors import StyleMixError
from stylemix.paths import Workspace, check_name, inside
from stylemix.scores.selection import judge_arg


def register(sub) -> None:
    p = sub.add_parser("score", help="score images: CLIP score, style similarity and shares per LoRA",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (png, jpg, webp, ...)")
    p.add_argument("--prompt", default=None, help="the prompt the images were made from (for the CLIP score)")
    p.add_argument("--lora", action="append", default=None, metavar="NAME",
                   help="a LoRA of the library to measure (repeatable; default: every LoRA with a centroid)")
    p.add_argument("--clip-model", default=None,
                   help="open_clip model: ViT-B-32 (default), ViT-L-14, ... or 'tiny' (random demo CLIP; "
                        "the default when the base model is 'tiny')")
    p.add_argument("--pretrained", default="openai", help="open_clip weights tag, or a .safetensors file (then name the architecture with its "
                        "activation, e.g. --clip-model ViT-B-32-quickgelu for OpenAI weights) (default: openai)")
    p.add_argument("--base-image", action="append", default=None, metavar="IMAGE",
                   help="base-model image of the same prompt and seed, one per IMAGE in order (calibration's 0)")
    p.add_argument("--style-judge", default=None, metavar="clip|csd", type=judge_arg,
                   help="what measures style similarity and shares (default: $STYLEMIX_STYLE_JUDGE, else csd where "
                        "installed, else clip); the CLIP score is always CLIP's")
    p.add_argument("--save-centroid", default=None, metavar="NAME",
                   help="compute LoRA NAME's style centroid from the images (its reference images) and store it")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _clip_model(args) -> str:
    if args.clip_model:
        return args.clip_model
    base = args.model or os.environ.get("STYLEMIX_MODEL")
    return "tiny" if base == "tiny" else "ViT-B-32"


def _lora_meta(lora_dir: Path) -> dict:
    try:
        meta = json.loads((lora_dir / "stylemix.json").read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def run(args) -> int:
    from stylemix.scores.clip_models import ScorerUnavailable, load_scorer
    from stylemix.scores.scoring import (CENTROID_FILE, centroid_models, compute_centroid, load_centroid, open_image,
                                  save_centroid, score_images)
    from stylemix.scores.selection import pick_style_scorer, resolve_style_judge

    images = [open_image(p) for p in args.images]  # every file checked before any model loads
    base_images = [open_image(p) for p in args.base_image] if args.base_image else None
    if base_images is not None and not args.save_centroid and len(base_images) != len(images):
        raise StyleMixError(f"Got {len(base_images)} --base-image for {len(images)} images; give one per image.")
    loras = Workspace.default(args.loras_dir).loras
    clip_model = _clip_model(args)
    kind, _ = resolve_style_judge(args.style_judge)
    # CLIP loads only for what it measures: the CLIP score (--prompt) or style, when it is the judge.
    needs_clip = kind == "clip" or (args.prompt and not args.save_centroid)
    try:
        scorer = load_scorer(clip_model, args.pretrained, device=args.device) if needs_clip else None
        judge = pick_style_scorer(clip_model == "tiny", args.device, args.style_judge, clip_scorer=scorer,
                                  clip_model=clip_model, pretrained=args.pretrained)
    except ScorerUnavailable as e:
        raise StyleMixError(f"Scores unavailable: {e}") from e
    is_demo = bool(judge.is_demo or (scorer is not None and scorer.is_demo))

    if args.save_centroid:
        lora_dir = inside(loras, check_name(args.save_centroid, "LoRA name"))
        if not lora_dir.is_dir():
            raise StyleMixError(f"No LoRA named {args.save_centroid!r} in {loras}.")
        centroid = compute_centroid(judge, images, base_images=base_images)
        path = save_centroid(lora_dir, centroid)
        info = {"lora": args.save_centroid, "file": str(path), **centroid.info(), "style_judge": judge.name,
                "is_demo": judge.is_demo}
        print(json.dumps(info, indent=2) if args.json else
              f"Saved the style centroid of {args.save_centroid} ({centroid.n_images} images, judge {judge.name}, "
              f"self-similarity {centroid.self_similarity:.3f}) to {path}")
        return 0

    names = args.lora
    explicit = names is not None
    if not explicit:
        names = sorted(p.name for p in loras.iterdir() if (p / CENTROID_FILE).is_file()) if loras.is_dir() else []
    styles, triggers, skipped = {}, [], []
    for name in names:
        lora_dir = inside(loras, check_name(name, "LoRA name"))
        if not lora_dir.is_dir():
            raise StyleMixError(f"No LoRA named {name!r} in {loras}.")
        centroid = load_centroid(lora_dir, judge.name)
        if centroid is None:
            if explicit:
                have = ", ".join(centroid_models(lora_dir)) or "none"
                raise StyleMixError(
                    f"LoRA {name!r} has no style centroid for the judge {judge.name} (has: {have}). Compute one "
                    f"with `stylemix score REFERENCE_IMAGES... --save-centroid {name} --style-judge {judge.kind}`.")
            skipped.append(name)
            continue
        styles[name] = centroid
        trigger = _lora_meta(lora_dir).get("trigger_word")
        if isinstance(trigger, str) and trigger:
            triggers.append(trigger)

    results = score_images(scorer, images, args.prompt, styles, trigger_words=triggers, base_images=base_images,
                           style_scorer=judge)
    if args.json:
        print(json.dumps({"clip_model": scorer.name if scorer else None, "style_judge": judge.name,
                          "is_demo": is_demo, "skipped_loras": skipped,
                          "results": [{"image": str(p), **s.to_dict()} for p, s in zip(args.images, results)]},
                         indent=2))
        return 0
    if scorer is not None:
        print(f"CLIP model: {scorer.name}" + ("  -- DEMO VALUES, not real measurements" if scorer.is_demo else ""))
    print(f"Style judge: {judge.name}" + ("  -- DEMO VALUES, not real measurements" if judge.is_demo else ""))
    if skipped:
        print(f"(no centroid for {judge.name}: {', '.join(skipped)})")
    if not styles:
        print("(no LoRA with a style centroid: only CLIP scores)")
    for path, s in zip(args.images, results):
        line = f"{path}: " + (f"CLIP {s.clip_score:.4f} ({s.clip_score_100:.1f}/100)" if s.clip_score is not None
                              else "CLIP - (no --prompt)")
        if s.similarity and judge is not scorer:
            line += f" | {judge.kind.upper()}"
        for k in s.similarity:
            cal = s.calibrated[k]
            line += f" | {k}: sim {s.similarity[k]:.4f}" + (f", calibrated {cal:.2f}" if cal is not None else "")
        if s.shares:
            line += " | shares " + " / ".join(f"{k} {100 * v:.0f}%" for k, v in s.shares.items())
            if s.shares_basis == "raw":
                line += " (uncalibrated)"
        elif s.style_detected is False:  # no style above the noise floor (docs/scores.md), as `generate` says
            line += " | no style detected"
        print(line)
    return 0
