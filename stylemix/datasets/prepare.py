"""Turn an upload into a training set: `data/<style>/` in the Hugging Face imagefolder layout.

Per image, in order: decode (first frame) and EXIF-orient; composite transparency on a
background; reject too-small images and decompression bombs; the blur filter; near-duplicate
removal; centre-crop and resize to `size` (LANCZOS when shrinking, NEAREST for pixel art when
enlarging); caption (sidecar `name.txt` first, else the captioner); trigger word first.

The blur score is the variance of the 3x3 Laplacian of the luminance (OpenCV's default), taken
at a *fair scale*: images larger than the training size are first shrunk so their short side
is `size` (the resolution the model will see: a sharp 2000 px photo is not punished for its
soft per-pixel detail), and smaller images are measured at their own resolution (enlarging adds
no detail, and interpolation would make every small sprite look blurry).  See docs/datasets.md.

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
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageColor, ImageOps

from stylemix.errors import StyleMixError
from stylemix.datasets.images import ImageRejected, is_image_name, untrusted_image
from stylemix.paths import atomic_write_text, check_name, inside, read_json_object
from stylemix.datasets.uploads import Intake, UploadLimits, collect_upload, remove_tree

logger = logging.getLogger("stylemix")

Progress = Callable[[int, int, str], None]  # (done, total, message)

METADATA_NAME = "metadata.jsonl"
REPORT_NAME = "report.json"
DATASET_NAME = "dataset.json"
MAX_CAPTION_CHARS = 2000  # a caption longer than this is a pasted document, not a caption
ALLOWED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF"}  # MPO: multi-picture JPEG from cameras


@dataclass
class DatasetConfig:
    """How an upload becomes a training set.  Every default is documented in docs/datasets.md."""

    size: int = 512  # output side in pixels (square); a multiple of 64 as SD1.5's VAE needs multiples of 8x8
    blur_threshold: float = 100.0  # keep when Laplacian variance (at the fair scale) > this; 0 keeps all
    pixel_art: str = "auto"  # auto | on | off: NEAREST enlarging, detected from a small palette in auto
    pixel_art_max_colors: int = 64  # auto: at most this many distinct colours (after compositing) -> pixel art
    background: str = "white"  # colour transparent pixels are composited on (any PIL colour: "black", "#808080")
    min_side: int = 16  # smaller images are rejected as too small (a 16x16 sprite is still accepted)
    max_image_pixels: int = 40_000_000  # header width*height above this -> decompression bomb, not decoded
    dedup_distance: int = 4  # near-duplicate: dHash Hamming distance <= this (of 64 bits) ...
    dedup_color_tolerance: float = 12.0  # ... and mean colour difference of 8x8 thumbnails <= this (0-255)
    limits: UploadLimits = field(default_factory=UploadLimits)  # archive/folder intake limits

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


def blur_score(image: Image.Image, size: int = 512) -> float:
    """Variance of the 3x3 Laplacian of the luminance, at the fair scale (see the module doc)."""
    gray = image.convert("L")
    short = min(gray.size)
    if short > size:  # shrink to the training resolution, never enlarge
        scale = size / short
        gray = gray.resize((max(3, round(gray.width * scale)), max(3, round(gray.height * scale))),
                           Image.Resampling.LANCZOS)
    a = np.asarray(gray, dtype=np.float64)
    if a.shape[0] < 3 or a.shape[1] < 3:
        return 0.0
    lap = a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4.0 * a[1:-1, 1:-1]
    # Perfectly flat areas (a sprite's plain background, a flat-shaded fill) say nothing about
    # sharpness but dilute the variance: measure where the 3x3 neighbourhood is not constant.
    # Camera images have no exactly flat areas, so for them this is the classic measure.
    win = np.lib.stride_tricks.sliding_window_view(a, (3, 3))
    detail = win.max(axis=(-1, -2)) != win.min(axis=(-1, -2))
    if detail.sum() >= max(9, 0.01 * detail.size):
        lap = lap[detail]
    return float(lap.var())


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


def resize_crop(image: Image.Image, size: int, pixel_art: bool) -> Image.Image:
    """Centre-crop to a square and resize to size x size.

    Shrinking always uses LANCZOS.  Enlarging pixel art uses NEAREST on a square cropped on the
    pixel grid, so every output pixel is one of the input's colours (no blended edges); other
    images are enlarged with LANCZOS too.
    """
    w, h = image.size
    side = min(w, h)
    if pixel_art and side < size:
        left, top = (w - side) // 2, (h - side) // 2
        return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.NEAREST)
    return ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: sign of horizontal gradients on a 9x8 grey thumbnail."""
    a = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (a[:, 1:] > a[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def _color_thumb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)


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
        lines = [json.dumps({"file_name": i.file, "text": i.caption}, ensure_ascii=False) for i in kept]
        atomic_write_text(build / METADATA_NAME, "\n".join(lines) + "\n")
        atomic_write_text(build / REPORT_NAME, json.dumps(
            {"style": style, "summary": summary, "items": [i.to_json() for i in items]}, indent=1))
        atomic_write_text(build / DATASET_NAME, json.dumps({
            "style": style, "trigger_word": trigger.word, "trigger_tokens": trigger.tokens,
            "size": config.size, "count": len(kept), "rejected": len(items) - len(kept),
            "captioner": getattr(captioner, "name", type(captioner).__name__),
            "captioner_is_fallback": bool(getattr(captioner, "is_fallback", False)),
            "pixel_art_images": sum(1 for i in kept if i.pixel_art),
            "config": {k: v for k, v in asdict(config).items()},
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
    kept_images: dict[int, Image.Image] = {}  # index in items -> cropped image, for captioning
    seen: list[tuple[int, np.ndarray, str]] = []  # (dhash, colour thumbnail, input name) of kept images
    total = len(intake.items)
    for n, entry in enumerate(intake.items):
        progress(n, total, f"checking {entry.name}")
        if not entry.ok:
            items.append(ItemResult(entry.name, "rejected", entry.reason, entry.detail))
            continue
        try:
            image, (w, h) = decode(entry.path, config)
            if min(w, h) < config.min_side:
                raise _Rejected("too_small", f"{w}x{h} is below min_side={config.min_side}", original_size=[w, h])
            image = composite(image, config.background)
            score = blur_score(image, config.size)
            if score <= config.blur_threshold:
                raise _Rejected("blurry", f"blur score {score:.1f} <= threshold {config.blur_threshold:g}",
                                blur=round(score, 2), original_size=[w, h])
            h64, thumb = dhash(image), _color_thumb(image)
            for other_hash, other_thumb, other_name in seen:
                if (bin(h64 ^ other_hash).count("1") <= config.dedup_distance
                        and float(np.abs(thumb - other_thumb).mean()) <= config.dedup_color_tolerance):
                    raise _Rejected("duplicate", f"a near-duplicate of {other_name}", blur=round(score, 2),
                                    original_size=[w, h])
            pixel = is_pixel_art(image, config)
            out = resize_crop(image, config.size, pixel)
        except _Rejected as e:
            items.append(ItemResult(entry.name, "rejected", e.reason, e.detail, **e.extra))
            continue
        seen.append((h64, thumb, entry.name))
        file_name = f"{len(kept_images):04d}_{_safe_stem(entry.name)}.png"
        out.save(build / file_name, format="PNG")
        kept_images[len(items)] = out
        items.append(ItemResult(entry.name, "kept", blur=round(score, 2), file=file_name, original_size=[w, h],
                                pixel_art=pixel, caption_source=entry.caption_key))  # key replaced below
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


def read_metadata(meta_path: Path) -> list[tuple[int, str, str]]:
    """(line number, file_name, text) for each record of a metadata.jsonl, or StyleMixError naming the bad line.

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
        rows.append((n, row["file_name"], row["text"]))
    return rows


def load_captions(dataset_dir: str | os.PathLike) -> dict[str, str]:
    """{file_name: caption} from a dataset's metadata.jsonl, in file order."""
    path = Path(dataset_dir) / METADATA_NAME
    if not path.is_file():
        raise StyleMixError(f"No {METADATA_NAME} in {str(dataset_dir)!r}: is it a StyleMix dataset folder?")
    return {file_name: text for _, file_name, text in read_metadata(path)}


def save_captions(dataset_dir: str | os.PathLike, captions: dict[str, str], keep_trigger: bool = True) -> dict[str, str]:
    """Replace some captions (by file name); the others are kept.  Returns the full mapping.

    With keep_trigger (default) each edited caption still starts with the dataset's trigger word.
    Unknown file names and non-text captions are refused before anything is written.
    """
    dataset_dir = Path(dataset_dir)
    current = load_captions(dataset_dir)
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
    lines = [json.dumps({"file_name": f, "text": t}, ensure_ascii=False) for f, t in current.items()]
    atomic_write_text(dataset_dir / METADATA_NAME, "\n".join(lines) + "\n")
    return current


# --------------------------------------------------------------------------- reading a dataset for training


@dataclass
class DatasetInfo:
    """A validated dataset folder: image paths with their captions, plus the folder's summary."""

    root: Path
    files: list[Path]
    captions: list[str]
    trigger_word: str
    summary: dict = field(default_factory=dict)  # dataset.json content (+ what we counted)

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
    files, captions = [], []
    for n, file_name, text in read_metadata(meta_path):
        if len(text) > MAX_CAPTION_CHARS:
            raise StyleMixError(f"{meta_path.name} line {n}: caption longer than {MAX_CAPTION_CHARS} characters.")
        path = inside(root, file_name)  # refuses '../x.png' and symlinks out of the folder
        if not is_image_name(path) or not path.is_file():
            raise StyleMixError(f"{meta_path.name} line {n}: image {file_name!r} is missing or not an image file.")
        try:
            with Image.open(path) as im:
                im.verify()  # header + structure; cheap, no full decode
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise StyleMixError(f"{meta_path.name} line {n}: {file_name!r} is not a readable image ({e}).") from None
        files.append(path)
        captions.append(text.strip())
    if not files:
        raise StyleMixError(f"Dataset folder {str(root)!r} has no images listed in {METADATA_NAME}: nothing to train on.")
    trigger = info.get("trigger_word") or ""
    if not isinstance(trigger, str):
        raise StyleMixError(f"{info_path}: trigger_word must be a string.")
    summary = {**info, "count": len(files), "folder": root.name}
    return DatasetInfo(root=root, files=files, captions=captions, trigger_word=trigger, summary=summary)
