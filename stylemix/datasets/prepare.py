"""Turn an upload into a training set: `data/<style>/` in the Hugging Face imagefolder layout.

Per image, in order: decode (first frame) and EXIF-orient; composite transparency on a
background; reject too-small images and decompression bombs; choose its aspect-ratio bucket
(kohya's rule, stylemix.datasets.buckets; the square `size` x `size` with enable_bucket=False);
the blur filter, at the bucket's scale; near-duplicate removal (stylemix.datasets.dedup); resize
to cover the bucket and centre-crop (images.resize_to_bucket: area interpolation when shrinking,
whole-number NEAREST factors for pixel art when enlarging); caption (sidecar `name.txt` first,
else the captioner); trigger word first.

Every stored image's pixel size IS its bucket, and metadata.jsonl records it per image with the
original size (`bucket`, `original_size`): the trainer batches images of one size together.
The blur score is images.blur_score, at the scale the image will be trained on.  See docs/datasets.md.

The folder is built next to its final place and renamed in at the end, so a failed run leaves
nothing behind and an existing set is only replaced with `overwrite=True`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from PIL import Image, ImageColor, ImageOps

from stylemix.errors import StyleMixError
from stylemix.datasets.buckets import BucketChoice, BucketRule, bucket_name, cover, default_bucket_limits
from stylemix.datasets.dedup import NearDuplicates, fingerprint
from stylemix.datasets.images import ImageRejected, blur_score, is_image_name, resize_to_bucket, untrusted_image
from stylemix.paths import atomic_write_text, check_name, inside, read_json_object
from stylemix.datasets.uploads import Intake, UploadLimits, collect_upload, remove_tree

logger = logging.getLogger("stylemix")

Progress = Callable[[int, int, str], None]  # (done, total, message)

METADATA_NAME = "metadata.jsonl"
REPORT_NAME = "report.json"
DATASET_NAME = "dataset.json"
MAX_CAPTION_CHARS = 2000  # a caption longer than this is a pasted document, not a caption
ALLOWED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF"}  # MPO: multi-picture JPEG from cameras
MAX_BUCKET_RESO = 4096  # the largest max_bucket_reso accepted: twice the largest size


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DatasetConfig:
    """How an upload becomes a training set.  Every default is documented in docs/datasets.md."""

    size: int = 512  # the training resolution R: buckets hold at most R x R pixels; the square's side
    blur_threshold: float = 100.0  # keep when Laplacian variance (at the fair scale) > this; 0 keeps all
    pixel_art: str = "auto"  # auto | on | off: NEAREST enlarging, detected from a small palette in auto
    pixel_art_max_colors: int = 64  # auto: at most this many distinct colours (after compositing) -> pixel art
    background: str = "white"  # colour transparent pixels are composited on (any PIL colour: "black", "#808080")
    min_side: int = 16  # smaller images are rejected as too small (a 16x16 sprite is still accepted)
    max_image_pixels: int = 40_000_000  # header width*height above this -> decompression bomb, not decoded
    dedup_distance: int = 4  # near-duplicate: dHash Hamming distance <= this (of 64 bits) ...
    dedup_color_tolerance: float = 12.0  # ... and mean colour difference of 8x8 thumbnails <= this (0-255)
    limits: UploadLimits = field(default_factory=UploadLimits)  # archive/folder intake limits
    # Aspect-ratio buckets, kohya's options and names (stylemix.datasets.buckets).
    enable_bucket: bool = True  # False: every image centre-cropped to the square size x size
    min_bucket_reso: int | None = None  # None: kohya's 256, at most size/2 (buckets.default_bucket_limits)
    max_bucket_reso: int | None = None  # None: kohya's 1024, at most 2 x size and at least size
    bucket_reso_steps: int = 64  # bucket sides are multiples of this; SD1.5's UNet needs multiples of 64 px
    bucket_no_upscale: bool = False  # buckets from each image's own size, never enlarged (kohya's meaning)

    def __post_init__(self) -> None:
        # one check for the CLI, the app's form and API callers: a cleared box (None) or text is named as it came
        if (not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 64 or self.size % 64
                or self.size > 2048):
            raise StyleMixError(f"Invalid size {self.size!r}: use a multiple of 64 between 64 and 2048.")
        if (not isinstance(self.blur_threshold, (int, float)) or isinstance(self.blur_threshold, bool)
                or not self.blur_threshold >= 0 or self.blur_threshold == float("inf")):
            raise StyleMixError(f"Invalid blur threshold {self.blur_threshold!r}: use a number >= 0.")
        if self.pixel_art not in ("auto", "on", "off"):
            raise StyleMixError(f"Invalid pixel-art mode {self.pixel_art!r}: use auto, on or off.")
        try:
            ImageColor.getrgb(self.background)
        except (ValueError, AttributeError) as e:
            raise StyleMixError(f"Invalid background colour {self.background!r}: use a colour name "
                                "('white') or '#rrggbb'.") from e
        if self.min_side < 1 or self.max_image_pixels < 1:
            raise StyleMixError(f"Invalid image limits: min_side={self.min_side!r}, "
                                f"max_image_pixels={self.max_image_pixels!r}.")
        self._check_buckets()

    def _check_buckets(self) -> None:
        # kohya adjusts bad limits with a warning; we refuse them, naming the option and what it accepts
        for name in ("enable_bucket", "bucket_no_upscale"):
            if not isinstance(getattr(self, name), bool):
                raise StyleMixError(f"Invalid {name} {getattr(self, name)!r}: use true or false.")
        step = self.bucket_reso_steps
        if not _is_whole(step) or step < 64 or step % 64 or self.size % step:
            raise StyleMixError(f"Invalid bucket_reso_steps {step!r}: use a multiple of 64 that divides the "
                                f"size ({self.size}), such as 64.")
        low, high = default_bucket_limits(self.size, step)
        lo = self.min_bucket_reso
        if lo is not None and (not _is_whole(lo) or lo < step or lo % step or lo > self.size):
            raise StyleMixError(f"Invalid min_bucket_reso {lo!r}: use a multiple of bucket_reso_steps ({step}) from "
                                f"{step} to the size ({self.size}), or leave it out for {low}.")
        hi = self.max_bucket_reso
        if hi is not None and (not _is_whole(hi) or hi < self.size or hi % step or hi > MAX_BUCKET_RESO):
            raise StyleMixError(f"Invalid max_bucket_reso {hi!r}: use a multiple of bucket_reso_steps ({step}) from "
                                f"the size ({self.size}) to {MAX_BUCKET_RESO}, or leave it out for {high}.")
        if self.bucket_no_upscale and not self.enable_bucket:
            raise StyleMixError("Invalid bucket_no_upscale True with enable_bucket False: it makes a bucket from each "
                                "image's size, so it needs buckets; drop one of the two options.")

    def bucket_rule(self) -> BucketRule:
        """The buckets of this config, with the default limits filled in."""
        low, high = default_bucket_limits(self.size, self.bucket_reso_steps)
        return BucketRule(self.size, low if self.min_bucket_reso is None else self.min_bucket_reso,
                          high if self.max_bucket_reso is None else self.max_bucket_reso,
                          self.bucket_reso_steps, self.bucket_no_upscale)

    def choose_bucket(self, size: tuple[int, int], rule: BucketRule | None = None) -> BucketChoice | None:
        """Where an image of `size` goes: its bucket, or the square with enable_bucket=False; None: no bucket."""
        if not self.enable_bucket:
            return cover(size, (self.size, self.size))
        return (rule or self.bucket_rule()).choose(size)

    def recorded(self) -> dict:
        """The config as dataset.json records it: the bucket limits actually used, not None."""
        rule = self.bucket_rule()
        return {**asdict(self), "min_bucket_reso": rule.min_reso, "max_bucket_reso": rule.max_reso}


@dataclass
class ItemResult:
    """One input's outcome, as written to report.json."""

    input: str
    status: str  # "kept" or "rejected"
    reason: str | None = None  # blurry, duplicate, unreadable, truncated, too_small, not_an_image, ...
    detail: str = ""
    blur: float | None = None  # Laplacian variance at the fair scale
    file: str | None = None  # output file name inside the dataset folder
    original_size: list[int] | None = None
    bucket: list[int] | None = None  # [width, height] of the stored image
    pixel_art: bool | None = None
    caption: str | None = None
    caption_source: str | None = None  # sidecar | captioner | fallback

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}


@dataclass
class DatasetResult:
    path: Path
    style: str
    trigger_word: str
    items: list[ItemResult]
    summary: str
    captioner: str
    captioner_is_fallback: bool
    trigger_check: "TriggerCheck"

    @property
    def kept(self) -> list[ItemResult]:
        return [i for i in self.items if i.status == "kept"]

    @property
    def rejected(self) -> list[ItemResult]:
        return [i for i in self.items if i.status == "rejected"]

    @property
    def buckets(self) -> dict[str, int]:
        """{"320x768": images, ...}, the fullest bucket first."""
        return count_buckets(tuple(i.bucket) for i in self.kept)


class EmptyDatasetError(StyleMixError):
    """Every input was rejected; `.items` says why for each one.  Nothing was written."""

    def __init__(self, message: str, items: list[ItemResult]):
        super().__init__(message)
        self.items = items


# --------------------------------------------------------------------------- trigger word

_TRIGGER = re.compile(r"[a-z][a-z0-9_-]{1,31}")
# A CLIP BPE merge learned early is a frequent token: whole-word tokens ("style</w>") ranked
# below this id are, in practice, everyday English words the text encoder already knows well.
_COMMON_TOKEN_ID = 8000


@dataclass
class TriggerCheck:
    word: str
    tokens: list[str]  # CLIP BPE pieces, "</w>" marks the end of a word
    token_ids: list[int]
    warnings: list[str]

    @property
    def tokenization(self) -> str:
        return " + ".join(t.replace("</w>", "") for t in self.tokens)


def check_trigger_word(word: str) -> TriggerCheck:
    """Validate a trigger word and show how SD1.5's CLIP tokenizer splits it.

    Raises StyleMixError unless it is one word: 2-32 characters, a letter then letters, digits,
    '_' or '-' (CLIP lowercases text, so upper case is refused rather than silently changed).
    Warns when it is, or splits into, common English words: those already mean something to
    the text encoder and fight the new style.
    """
    from stylemix.models import clip_tokenizer

    if not isinstance(word, str) or not _TRIGGER.fullmatch(word):
        raise StyleMixError(
            f"Invalid trigger word {word!r}: use one lowercase word of 2-32 characters, starting with a "
            "letter, then letters, digits, '_' or '-' (for example 'kenflat' or 'pxlcity').")
    tok = clip_tokenizer()
    tokens = tok.tokenize(word)
    vocab = tok.get_vocab()
    ids = [vocab[t] for t in tokens]
    shown = " + ".join(t.replace("</w>", "") for t in tokens)
    common = [t.replace("</w>", "") for t in tokens
              if (t if t.endswith("</w>") else t + "</w>") in vocab
              and vocab[t if t.endswith("</w>") else t + "</w>"] < _COMMON_TOKEN_ID
              and len(t.replace("</w>", "")) >= 3 and t.replace("</w>", "").isalpha()]
    notes = []
    if len(tokens) == 1 and common:
        notes.append(f"Trigger word {word!r} is an ordinary English word for CLIP (one token): the model "
                     "already knows it, so it will mix old meaning into the style. Prefer a rare word.")
    elif common:
        notes.append(f"Trigger word {word!r} tokenizes as {shown}: the pieces {', '.join(map(repr, common))} "
                     "are common English words that would fight the style. Prefer a rare word such as 'sks'-like "
                     "made-up letters.")
    if len(tokens) > 4:
        notes.append(f"Trigger word {word!r} takes {len(tokens)} tokens ({shown}); a short rare word of 1-3 "
                     "tokens is easier to learn.")
    return TriggerCheck(word=word, tokens=tokens, token_ids=ids, warnings=notes)


def with_trigger(trigger: str, caption: str) -> str:
    """`trigger, caption` with the trigger exactly once, first; no trigger leaves the caption as it is.

    The one rule for both the dataset step and the trainer, so training captions match the dataset's.
    """
    if not trigger:
        return caption
    words = caption.strip()
    pattern = re.compile(rf"^\s*{re.escape(trigger)}\b[\s,:;.-]*", re.IGNORECASE)
    words = pattern.sub("", words).strip()
    return f"{trigger}, {words}" if words else trigger


# --------------------------------------------------------------------------- per-image steps


def composite(image: Image.Image, background: str) -> Image.Image:
    """RGB image; transparency (alpha channel or palette transparency) composited on `background`."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        r, g, b, _ = ImageColor.getcolor(background, "RGBA")
        bg = Image.new("RGBA", rgba.size, (r, g, b, 255))  # opaque: a training image has no alpha
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return image.convert("RGB")


def count_colors(image: Image.Image, limit: int) -> int:
    """Number of distinct colours, or limit+1 when there are more (cheap early stop)."""
    colors = image.getcolors(maxcolors=limit)
    return len(colors) if colors is not None else limit + 1


def is_pixel_art(image: Image.Image, config: DatasetConfig) -> bool:
    """Pixel art is enlarged with NEAREST.  auto: a small palette; on/off: forced."""
    if config.pixel_art != "auto":
        return config.pixel_art == "on"
    return count_colors(image, config.pixel_art_max_colors) <= config.pixel_art_max_colors


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str, **extra):
        super().__init__(detail)
        self.reason, self.detail, self.extra = reason, detail, extra


def decode(path: Path, config: DatasetConfig) -> tuple[Image.Image, tuple[int, int]]:
    """Open safely (stylemix.datasets.images.untrusted_image: header checked before decoding), first frame only,
    EXIF-oriented."""
    try:
        with untrusted_image(path, config.max_image_pixels, ALLOWED_FORMATS) as im:
            w, h = im.size
            try:
                im.seek(0)  # GIF / animated WEBP: the first frame
                im.load()
                out = ImageOps.exif_transpose(im)
                if out is im:
                    out = im.copy()
            except OSError as e:
                reason = "truncated" if "truncat" in str(e).lower() or "broken" in str(e).lower() else "unreadable"
                raise _Rejected(reason, f"the image data is damaged ({e})", original_size=[w, h]) from e
            except (ValueError, SyntaxError, EOFError) as e:
                raise _Rejected("unreadable", f"the image data is damaged ({e})", original_size=[w, h]) from e
    except ImageRejected as e:
        raise _Rejected(e.reason, e.detail, **({"original_size": list(e.size)} if e.size else {})) from e
    return out, (w, h)


# --------------------------------------------------------------------------- the pipeline


def _safe_stem(name: str) -> str:
    stem = Path(name.replace("\\", "/").split(":")[-1]).stem
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:40]
    return stem or "image"


def count_buckets(sizes: Iterable[tuple[int, int]]) -> dict[str, int]:
    """{"320x768": images, ...}, the fullest bucket first (then by name, for a stable order)."""
    counts = Counter(bucket_name(s) for s in sizes)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def summarize(items: list[ItemResult]) -> str:
    kept = sum(1 for i in items if i.status == "kept")
    reasons = Counter(i.reason for i in items if i.status == "rejected")
    line = f"Kept {kept} of {len(items)} inputs"
    if reasons:
        line += ": rejected " + ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in reasons.most_common())
    return line + "."


def prepare_dataset(sources: Iterable[str | os.PathLike], style: str, trigger_word: str, out_root: Path,
                    config: DatasetConfig | None = None, captioner=None, progress: Progress | None = None,
                    overwrite: bool = False) -> DatasetResult:
    """Build `out_root/<style>/` from images, folders and zip archives.

    captioner: an object with `.caption(list[PIL.Image]) -> list[str]` (see stylemix.datasets.captioning);
    None gives the neutral fallback caption (loudly).  progress(done, total, message) is called
    as images are processed.  Raises StyleMixError for a bad style/trigger, an existing set
    without `overwrite`, an empty upload, and EmptyDatasetError when every input is rejected.
    """
    from stylemix.datasets.captioning import FallbackCaptioner

    config = config or DatasetConfig()
    check_name(style, "style name")
    trigger = check_trigger_word(trigger_word)
    for note in trigger.warnings:
        logger.warning(note)
    out_root = Path(out_root)
    final = inside(out_root, style)
    if final.exists() and not overwrite:
        raise StyleMixError(f"Dataset {str(final)!r} already exists: choose another style name or "
                            "overwrite it (--overwrite).")
    if captioner is None:
        captioner = FallbackCaptioner(reason="no captioner given")
    if getattr(captioner, "is_fallback", False):
        logger.warning("Captions are the neutral %r plus the trigger word (%s); edit them afterwards for "
                       "better training.", getattr(captioner, "text", "fallback"),
                       getattr(captioner, "reason", "no captioner"))
    progress = progress or (lambda done, total, message: None)

    out_root.mkdir(parents=True, exist_ok=True)
    build = out_root / f".{style}.building-{uuid.uuid4().hex[:8]}"
    staging = build / ".upload"
    try:
        build.mkdir()
        progress(0, 1, "reading upload")
        intake = collect_upload(sources, staging, config.limits)
        items, kept_images = _filter_and_crop(intake, build, config, progress)
        if not kept_images:
            summary = summarize(items)
            raise EmptyDatasetError(f"No usable images in the upload. {summary}", items)
        _caption(items, kept_images, intake, captioner, trigger.word, progress)
        summary = summarize(items)
        kept = [i for i in items if i.status == "kept"]
        remove_tree(staging)
        lines = [json.dumps({"file_name": i.file, "text": i.caption, "original_size": i.original_size,
                             "bucket": i.bucket}, ensure_ascii=False) for i in kept]
        atomic_write_text(build / METADATA_NAME, "\n".join(lines) + "\n")
        atomic_write_text(build / REPORT_NAME, json.dumps(
            {"style": style, "summary": summary, "items": [i.to_json() for i in items]}, indent=1))
        atomic_write_text(build / DATASET_NAME, json.dumps({
            "style": style, "trigger_word": trigger.word, "trigger_tokens": trigger.tokens,
            "size": config.size, "count": len(kept), "rejected": len(items) - len(kept),
            "captioner": getattr(captioner, "name", type(captioner).__name__),
            "captioner_is_fallback": bool(getattr(captioner, "is_fallback", False)),
            "pixel_art_images": sum(1 for i in kept if i.pixel_art),
            "buckets": count_buckets(tuple(i.bucket) for i in kept),
            "config": config.recorded(),
            "summary": summary, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }, indent=1))
        _move_into_place(build, final, overwrite)
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    progress(len(items), len(items), summary)
    return DatasetResult(path=final, style=style, trigger_word=trigger.word, items=items, summary=summary,
                         captioner=getattr(captioner, "name", type(captioner).__name__),
                         captioner_is_fallback=bool(getattr(captioner, "is_fallback", False)),
                         trigger_check=trigger)


def _filter_and_crop(intake: Intake, build: Path, config: DatasetConfig,
                     progress: Progress) -> tuple[list[ItemResult], dict[int, Image.Image]]:
    items: list[ItemResult] = []
    kept_images: dict[int, Image.Image] = {}  # index in items -> stored image, for captioning
    duplicates = NearDuplicates(config.dedup_distance, config.dedup_color_tolerance)
    rule = config.bucket_rule()
    total = len(intake.items)
    for n, entry in enumerate(intake.items):
        progress(n, total, f"checking {entry.name}")
        if not entry.ok:
            items.append(ItemResult(entry.name, "rejected", entry.reason, entry.detail))
            continue
        try:
            image, _ = decode(entry.path, config)
            w, h = image.size  # as displayed (EXIF-rotated): the shape its bucket is chosen for
            if min(w, h) < config.min_side:
                raise _Rejected("too_small", f"{w}x{h} is below min_side={config.min_side}", original_size=[w, h])
            image = composite(image, config.background)
            choice = config.choose_bucket((w, h), rule)
            if choice is None:
                raise _Rejected("no_bucket", f"{w}x{h} fits no bucket: with bucket_no_upscale both sides must "
                                f"reach bucket_reso_steps ({rule.step}) once shrunk to at most "
                                f"{config.size}x{config.size} pixels", original_size=[w, h])
            score = blur_score(image, choice.bucket)
            if score <= config.blur_threshold:
                raise _Rejected("blurry", f"blur score {score:.1f} <= threshold {config.blur_threshold:g}",
                                blur=round(score, 2), original_size=[w, h])
            fp = fingerprint(image)
            other = duplicates.find(fp)
            if other is not None:
                raise _Rejected("duplicate", f"a near-duplicate of {other}", blur=round(score, 2),
                                original_size=[w, h])
            pixel = is_pixel_art(image, config)
            out = resize_to_bucket(image, choice.bucket, choice.resized, pixel)
        except _Rejected as e:
            items.append(ItemResult(entry.name, "rejected", e.reason, e.detail, **e.extra))
            continue
        duplicates.add(fp, entry.name)
        file_name = f"{len(kept_images):04d}_{_safe_stem(entry.name)}.png"
        out.save(build / file_name, format="PNG")
        kept_images[len(items)] = out
        items.append(ItemResult(entry.name, "kept", blur=round(score, 2), file=file_name, original_size=[w, h],
                                bucket=list(out.size), pixel_art=pixel,
                                caption_source=entry.caption_key))  # key replaced below
    return items, kept_images


def _caption(items: list[ItemResult], kept_images: dict[int, Image.Image], intake: Intake, captioner,
             trigger: str, progress: Progress) -> None:
    todo = []
    for idx in kept_images:
        key = items[idx].caption_source
        if key in intake.captions:
            items[idx].caption, items[idx].caption_source = with_trigger(trigger, intake.captions[key]), "sidecar"
        else:
            items[idx].caption_source = None
            todo.append(idx)
    source = "fallback" if getattr(captioner, "is_fallback", False) else "captioner"
    batch = max(1, int(getattr(captioner, "batch_size", 8)))
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        progress(start, len(todo), f"captioning {len(todo)} images")
        try:
            texts = captioner.caption([kept_images[i] for i in chunk])
        except Exception as e:  # a captioner crash must not lose the set: neutral caption, loudly
            from stylemix.datasets.captioning import FALLBACK_CAPTION

            logger.warning("Captioner failed (%s: %s); using the neutral caption for %d images.",
                           type(e).__name__, e, len(chunk))
            texts, source_here = [FALLBACK_CAPTION] * len(chunk), "fallback"
        else:
            source_here = source
        for i, text in zip(chunk, texts):
            items[i].caption = with_trigger(trigger, text or "")
            items[i].caption_source = source_here


def _move_into_place(build: Path, final: Path, overwrite: bool) -> None:
    """Rename the finished folder in; an old set is swapped out first and deleted after."""
    old = None
    if final.exists():
        if not overwrite:
            raise StyleMixError(f"Dataset {str(final)!r} appeared while preprocessing; nothing was replaced.")
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(build, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- caption editing


class MetadataRow(NamedTuple):
    line: int
    file_name: str
    text: str
    extra: dict  # the record's other keys: `original_size` and `bucket` ([w, h]) in sets made since buckets


def read_metadata(meta_path: Path) -> list[MetadataRow]:
    """(line number, file_name, text, other keys) for each record of a metadata.jsonl, or StyleMixError naming
    the bad line.

    The one parser of the dataset format; `load_captions` (caption editing) and
    `load_dataset_folder` (training) differ only in what they check on top of it.
    """
    rows = []
    for n, line in enumerate(meta_path.read_text(encoding="utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise StyleMixError(f"{meta_path.name} line {n}: not valid JSON ({e.msg}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"), str):
            raise StyleMixError(f"{meta_path.name} line {n}: expected {{\"file_name\": str, \"text\": str}}, "
                                f"got {line[:120]!r}.")
        for key in ("original_size", "bucket"):
            size = row.get(key)
            if size is not None and not (isinstance(size, list) and len(size) == 2
                                         and all(_is_whole(v) and v > 0 for v in size)):
                raise StyleMixError(f"{meta_path.name} line {n}: {key} must be [width, height] in pixels, got {size!r}.")
        rows.append(MetadataRow(n, row["file_name"], row["text"],
                                {k: v for k, v in row.items() if k not in ("file_name", "text")}))
    return rows


def load_captions(dataset_dir: str | os.PathLike) -> dict[str, str]:
    """{file_name: caption} from a dataset's metadata.jsonl, in file order."""
    path = Path(dataset_dir) / METADATA_NAME
    if not path.is_file():
        raise StyleMixError(f"No {METADATA_NAME} in {str(dataset_dir)!r}: is it a StyleMix dataset folder?")
    return {row.file_name: row.text for row in read_metadata(path)}


def bucket_counts(dataset_dir: str | os.PathLike) -> dict[str, int]:
    """{"320x768": images, ...} of a dataset folder, the fullest first: each record's `bucket`, or for a set made
    before buckets (no such key) its image's size, read from the file's header."""
    dataset_dir = Path(dataset_dir)
    sizes = []
    for row in read_metadata(dataset_dir / METADATA_NAME):
        if row.extra.get("bucket") is not None:
            sizes.append(tuple(row.extra["bucket"]))
            continue
        try:
            with Image.open(inside(dataset_dir, row.file_name)) as im:
                sizes.append(im.size)
        except (OSError, StyleMixError) as e:
            raise StyleMixError(f"{METADATA_NAME} line {row.line}: {row.file_name!r} is not a readable image ({e}).") from None
    return count_buckets(sizes)


def save_captions(dataset_dir: str | os.PathLike, captions: dict[str, str], keep_trigger: bool = True) -> dict[str, str]:
    """Replace some captions (by file name); the others are kept.  Returns the full mapping.

    With keep_trigger (default) each edited caption still starts with the dataset's trigger word.
    Unknown file names and non-text captions are refused before anything is written.
    """
    dataset_dir = Path(dataset_dir)
    current = load_captions(dataset_dir)
    extras = {row.file_name: row.extra for row in read_metadata(dataset_dir / METADATA_NAME)}  # kept as they are
    unknown = [f for f in captions if f not in current]
    if unknown:
        raise StyleMixError(f"Unknown image(s) {unknown[:5]} in {str(dataset_dir)!r}: captions not saved.")
    bad = [f for f, t in captions.items() if not isinstance(t, str) or not t.strip() or "\n" in t.strip()]
    if bad:
        raise StyleMixError(f"Caption(s) for {bad[:5]} must be one non-empty line of text: captions not saved.")
    trigger = None
    if keep_trigger and (dataset_dir / DATASET_NAME).is_file():
        trigger = json.loads((dataset_dir / DATASET_NAME).read_text()).get("trigger_word")
    for f, text in captions.items():
        text = " ".join(text.split())
        current[f] = with_trigger(trigger, text) if trigger else text
    lines = [json.dumps({"file_name": f, "text": t, **extras.get(f, {})}, ensure_ascii=False)
             for f, t in current.items()]
    atomic_write_text(dataset_dir / METADATA_NAME, "\n".join(lines) + "\n")
    return current


# --------------------------------------------------------------------------- reading a dataset for training


@dataclass
class DatasetInfo:
    """A validated dataset folder: image paths with their captions and pixel sizes, plus the folder's summary."""

    root: Path
    files: list[Path]
    captions: list[str]
    trigger_word: str
    summary: dict = field(default_factory=dict)  # dataset.json content (+ what we counted)
    # (width, height) of each stored image, read from the file: its bucket in a bucketed set (the metadata's
    # `bucket`, checked equal), size x size in a square one; images of one size can share a batch
    sizes: list[tuple[int, int]] = field(default_factory=list)

    def buckets(self) -> dict[str, int]:
        """{"320x768": images, ...}: how many stored images have each size, the fullest first."""
        return count_buckets(self.sizes)

    def __len__(self) -> int:
        return len(self.files)


def load_dataset_folder(data_dir: str | Path) -> DatasetInfo:
    """Validate `data_dir` and return its images and captions, or raise StyleMixError naming the problem.

    Everything is checked before any model is loaded, so a bad folder fails in a second with a
    message naming the bad file or line, not after minutes of model loading.
    """
    from PIL import UnidentifiedImageError

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise StyleMixError(f"Dataset folder {str(data_dir)!r} does not exist or is not a folder.")
    meta_path = root / METADATA_NAME
    if not meta_path.is_file():
        images = [p.name for p in root.iterdir() if is_image_name(p)]
        hint = (f"it has {len(images)} images but no captions; run `stylemix preprocess` on it first"
                if images else "it is empty; run `stylemix preprocess` on a folder of images first")
        raise StyleMixError(f"Dataset folder {str(root)!r} has no {METADATA_NAME}: {hint}.")
    info: dict = {}
    info_path = root / DATASET_NAME
    if info_path.is_file():
        info = read_json_object(info_path)
    files, captions, sizes = [], [], []
    for n, file_name, text, extra in read_metadata(meta_path):
        if len(text) > MAX_CAPTION_CHARS:
            raise StyleMixError(f"{meta_path.name} line {n}: caption longer than {MAX_CAPTION_CHARS} characters.")
        path = inside(root, file_name)  # refuses '../x.png' and symlinks out of the folder
        if not is_image_name(path) or not path.is_file():
            raise StyleMixError(f"{meta_path.name} line {n}: image {file_name!r} is missing or not an image file.")
        try:
            with Image.open(path) as im:
                size = im.size
                im.verify()  # header + structure; cheap, no full decode
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise StyleMixError(f"{meta_path.name} line {n}: {file_name!r} is not a readable image ({e}).") from None
        bucket = extra.get("bucket")
        if bucket is not None and tuple(bucket) != size:
            # the trainer batches by the stored size: an image edited after preprocessing must not pass unseen
            raise StyleMixError(f"{meta_path.name} line {n}: {file_name!r} is {size[0]}x{size[1]} but its bucket is "
                                f"{bucket[0]}x{bucket[1]}; run `stylemix preprocess` on the originals again.")
        files.append(path)
        captions.append(text.strip())
        sizes.append(size)
    if not files:
        raise StyleMixError(f"Dataset folder {str(root)!r} has no images listed in {METADATA_NAME}: nothing to train on.")
    trigger = info.get("trigger_word") or ""
    if not isinstance(trigger, str):
        raise StyleMixError(f"{info_path}: trigger_word must be a string.")
    summary = {**info, "count": len(files), "folder": root.name, "buckets": count_buckets(sizes)}
    return DatasetInfo(root=root, files=files, captions=captions, trigger_word=trigger, summary=summary, sizes=sizes)
