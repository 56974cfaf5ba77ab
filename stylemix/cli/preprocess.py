"""`stylemix preprocess SRC... --style NAME --trigger WORD`: build a training set from images."""

from __future__ import annotations

import argparse
from pathlib import Path

from stylemix.errors import StyleMixError


def register(sub) -> None:
    p = sub.add_parser(
        "preprocess", help="turn images, folders or zip archives into a style training set",
        description="Filter (blur, duplicates), fit each image to its aspect-ratio bucket (or a square), caption "
                    "and tag images with a trigger word; writes data/<style>/ (images, metadata.jsonl, report.json, "
                    "dataset.json).")
    p.add_argument("sources", nargs="+", metavar="SRC", help="image files, folders or .zip archives")
    p.add_argument("--style", required=True, help="dataset name: the folder data/<style>/")
    p.add_argument("--trigger", required=True, help="trigger word put first in every caption, e.g. 'kenflat'")
    p.add_argument("--size", type=int, default=512,
                   help="training resolution R, a multiple of 64: buckets hold at most R x R pixels, the square is "
                        "R x R (default 512)")
    b = p.add_argument_group("aspect-ratio buckets (kohya's rule and option names; on by default)")
    b.add_argument("--no-buckets", dest="enable_bucket", action="store_false",
                   help="centre-crop every image to the square --size x --size instead")
    b.add_argument("--min-bucket-reso", type=int, default=None,
                   help="shortest bucket side, a multiple of --bucket-reso-steps up to --size (default 256, "
                        "or size/2 for sizes under 512)")
    b.add_argument("--max-bucket-reso", type=int, default=None,
                   help="longest bucket side, a multiple of --bucket-reso-steps from --size to 4096 (default 1024; "
                        "2 x size under 512, the size above 1024)")
    b.add_argument("--bucket-reso-steps", type=int, default=64,
                   help="bucket sides are multiples of this, a multiple of 64 dividing --size (default 64)")
    b.add_argument("--bucket-no-upscale", action="store_true",
                   help="make each bucket from the image's own size (shrunk to R x R pixels if larger), never enlarge")
    p.add_argument("--blur-threshold", type=float, default=100.0,
                   help="keep images whose Laplacian variance is above this (default 100; 0 keeps all)")
    p.add_argument("--captioner", default=None,
                   help="BLIP model (hub id or folder; default Salesforce/blip-image-captioning-base), "
                        "'tiny' (random, offline) or 'none' (neutral captions)")
    p.add_argument("--pixel-art", choices=["auto", "on", "off"], default="auto",
                   help="enlarge by whole-number NEAREST factors to keep pixels crisp (default auto: small palettes)")
    p.add_argument("--background", default="white", help="colour behind transparent pixels (default white)")
    p.add_argument("--out-dir", default=None, help="parent folder of the dataset (default: the workspace data/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
    p.add_argument("--batch-size", type=int, default=8, help="images per captioning batch (default 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stylemix.datasets.captioning import load_captioner
    from stylemix.datasets.prepare import DatasetConfig, check_trigger_word, prepare_dataset
    from stylemix.paths import Workspace

    config = DatasetConfig(size=args.size, blur_threshold=args.blur_threshold, pixel_art=args.pixel_art,
                           background=args.background, enable_bucket=args.enable_bucket,
                           min_bucket_reso=args.min_bucket_reso, max_bucket_reso=args.max_bucket_reso,
                           bucket_reso_steps=args.bucket_reso_steps, bucket_no_upscale=args.bucket_no_upscale)
    trigger = check_trigger_word(args.trigger)  # fail fast, before a model load
    print(f"trigger word {trigger.word!r} tokenizes as: {trigger.tokenization}")
    if args.batch_size < 1:
        raise StyleMixError(f"Invalid --batch-size {args.batch_size!r}: use 1 or more.")
    out_root = Path(args.out_dir) if args.out_dir else Workspace.default().data
    target = out_root / args.style
    if target.exists() and not args.overwrite:  # checked again inside; this saves loading BLIP first
        raise StyleMixError(f"Dataset {str(target)!r} already exists: choose another --style or add --overwrite.")
    captioner = load_captioner(args.captioner, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    bar = tqdm(total=1, unit="img", desc="preprocess", leave=True)

    def progress(done: int, total: int, message: str) -> None:
        bar.total = max(total, 1)
        bar.n = min(done, bar.total)
        bar.set_postfix_str(message[-40:], refresh=False)
        bar.refresh()

    try:
        result = prepare_dataset(args.sources, args.style, args.trigger, out_root, config,
                                 captioner=captioner, progress=progress, overwrite=args.overwrite)
    finally:
        bar.close()
    if result.captioner_is_fallback:
        print("WARNING: captions are neutral placeholders (no captioner could be loaded); edit them in "
              f"{result.path / 'metadata.jsonl'}.")
    print(result.summary)
    print("images per bucket: " + ", ".join(f"{name}: {n}" for name, n in result.buckets.items()))
    for item in result.rejected:
        print(f"  rejected {item.input}: {item.reason} ({item.detail})")
    print(f"dataset written to {result.path}")
    return 0
