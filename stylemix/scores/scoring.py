"""Scores for generated images: CLIP score, style similarity per style, each style's share of a mix.

Definitions (docs/scores.md gives them with their sources):

- CLIP score: cosine between the CLIP image embedding and the text embedding of the prompt
  with trigger words removed (Hessel et al. 2021, CLIPScore; raw cosine is the seed report's
  scale, ~0.31 for SD1.5 with ViT-B-32).  `clip_score_100` = 100 * max(cos, 0), the scale of
  torchmetrics' `CLIPScore`.
- Style centroid of a LoRA: normalised mean of the normalised CLIP image embeddings of its
  training (or reference) images, stored in the LoRA folder with the CLIP model it came from.
- Style similarity: cosine of an image's embedding to a centroid.  Calibrated: 0 at the
  similarity base-model images reach, 1 at the leave-one-out similarity of the style's own
  images, so styles with tight and loose image sets can be compared.
- Shares of a mix: among the LoRAs in the mix (weight not 0), each style's calibrated similarity
  above the noise floor over the sum of those; none above it: "no style detected", no shares.

Style similarity, centroids and shares come from the style judge: CLIP's image embeddings, or CSD's
style descriptors (csd.py; chosen in selection.py).  The CLIP score is always CLIP's.  Every score
names its judge (`style_judge`); numbers of different judges are never compared (`check_one_judge`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

import torch

from stylemix.scores.clip_models import Scorer
from stylemix.errors import StyleMixError
from stylemix.datasets.images import IMAGE_EXTENSIONS, open_image, is_image_name  # noqa: F401  (open_image: re-exported)
from stylemix.paths import atomic_write_bytes

logger = logging.getLogger("stylemix")

CENTROID_FILE = "style_centroid.safetensors"
CENTROID_FORMAT = "stylemix-style-centroid"
DEMO_LABEL = "demo values (tiny random CLIP, not a real measurement)"
# A calibrated similarity at or below this is not told apart from the base model: a tenth of the way
# from what base-model images show (0) to the style's own images (1).  Without it, a mix whose styles
# barely show would still read "100% watercolor" from noise.
NOISE_FLOOR = 0.1




class StyleScorer(Protocol):
    """What the style judge needs of a model: clip_models.Scorer (CLIP) and csd.CsdScorer (CSD) both fit."""

    name: str  # the judge's name, the key of its centroids: "ViT-B-32/openai", "CSD-ViT-L/<sha256[:12]>"
    is_demo: bool
    device: torch.device

    def embed_images(self, images: Sequence) -> torch.Tensor: ...


# --------------------------------------------------------------------------- definitions


def strip_trigger_words(prompt: str | None, trigger_words: Sequence[str] = ()) -> str:
    """`prompt` without the trigger words (whole words, any case) and the commas they leave behind."""
    text = prompt or ""
    for word in trigger_words:
        if word and word.strip():
            text = re.sub(rf"(?<!\w){re.escape(word.strip())}(?!\w)", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s*,(\s*,)+", ",", text)  # "a, , b" -> "a, b"
    return re.sub(r"\s+,", ",", text).strip(" ,")


def clip_scores(scorer: Scorer, images: Sequence, prompt: str, trigger_words: Sequence[str] = ()) -> list[float]:
    """Raw CLIP cosine of each image with `prompt`, trigger words removed first (they would inflate it)."""
    text = strip_trigger_words(prompt, trigger_words)
    if not text:
        raise StyleMixError(f"Prompt {prompt!r} is empty once trigger words are removed: nothing to score against.")
    return (scorer.embed_images(images) @ scorer.embed_texts([text])[0]).tolist()


def clip_score_100(cosine: float) -> float:
    """torchmetrics' CLIPScore scale: 100 * max(cos, 0)."""
    return 100.0 * max(float(cosine), 0.0)


def calibrate(similarity: float, base_similarity: float, self_similarity: float) -> float | None:
    """0 at the base model's similarity, 1 at the style's own images'; None when those coincide.

    Not clipped: below 0 means less of the style than the base model shows, above 1 more than
    the training images themselves.  None (not NaN) when self <= base, where no scale exists.
    """
    span = float(self_similarity) - float(base_similarity)
    if span <= 1e-6:
        return None
    return (float(similarity) - float(base_similarity)) / span


def mix_shares(values: Mapping[str, float | None], floor: float = 0.0) -> dict[str, float]:
    """Each value above `floor` over the sum of those, the others 0; {} when no value is above
    `floor` (nothing to share: never 100% of noise, never NaN).  `floor` is at least 0."""
    above = {k: float(v) for k, v in values.items()
             if v is not None and math.isfinite(v) and v > max(floor, 0.0)}
    total = sum(above.values())
    if total <= 0:
        return {}
    return {k: above.get(k, 0.0) / total for k in values}


# --------------------------------------------------------------------------- style centroids


@dataclass
class StyleCentroid:
    """Where a style sits in CLIP image space, and the two anchors of its calibrated scale."""

    vector: torch.Tensor  # [D] unit-norm, float32, cpu
    clip_model: str  # the style judge's name it was computed with (a Scorer/CsdScorer name); other
    # judges' spaces are not comparable.  (Named clip_model from before CSD; the file keys it so.)
    n_images: int  # how many images it averages
    self_similarity: float  # mean leave-one-out cosine of those images: the calibrated scale's 1
    base_similarity: float | None = None  # mean cosine of base-model images to it: the scale's 0, if known
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def info(self) -> dict:
        """Its numbers without the vector (for stylemix.json's "style" entry and the file's metadata)."""
        d = {k: v for k, v in asdict(self).items() if k != "vector"}
        d["dim"] = int(self.vector.numel())
        return d


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def leave_one_out_similarity(embeddings: torch.Tensor) -> float:
    """Mean over images of the cosine between each unit embedding and the centroid of the others."""
    n = embeddings.shape[0]
    if n < 2:
        raise StyleMixError(f"A style centroid needs at least 2 images to calibrate against; got {n}.")
    total = embeddings.sum(0, keepdim=True)
    others = _unit(total - embeddings)  # row i: direction of the mean of all images but i
    return float((embeddings * others).sum(-1).mean())


def compute_centroid(scorer: StyleScorer, images: Sequence, base_images: Sequence | None = None) -> StyleCentroid:
    """The style centroid of `images` (training or reference images of one style), in `scorer`'s space
    (a CLIP Scorer or a CsdScorer: one centroid per judge).

    base_images: optional base-model images (e.g. the trainer's validation prompts and seeds
    without the LoRA); their mean similarity is stored as the calibration's low anchor.
    """
    emb = scorer.embed_images(images)
    self_sim = leave_one_out_similarity(emb)
    vector = _unit(emb.mean(0)).cpu()
    base = None
    if base_images:
        base = float((scorer.embed_images(base_images).cpu() @ vector).mean())
    return StyleCentroid(vector=vector, clip_model=scorer.name, n_images=len(emb),
                         self_similarity=self_sim, base_similarity=base)


def save_centroid(lora_dir: str | Path, centroid: StyleCentroid) -> Path:
    """Store `centroid` in `lora_dir/style_centroid.safetensors`, beside those of other CLIP models.

    One file per LoRA holds one vector per CLIP model, so switching CLIP models never discards
    a centroid computed from training images that may no longer exist.
    """
    from safetensors.torch import save

    lora_dir = Path(lora_dir)
    if not lora_dir.is_dir():
        raise StyleMixError(f"LoRA folder {lora_dir} does not exist; cannot store a style centroid there.")
    path = lora_dir / CENTROID_FILE
    entries: dict[str, StyleCentroid] = {}
    if path.exists():
        try:
            entries = _read_centroids(path)
        except StyleMixError as e:
            logger.warning("Replacing unreadable %s: %s", path, e)
    entries[centroid.clip_model] = centroid
    tensors, index = {}, {}
    for i, (name, c) in enumerate(sorted(entries.items())):
        tensors[f"centroid.{i}"] = c.vector.detach().float().cpu().contiguous()
        index[name] = {**c.info(), "tensor": f"centroid.{i}"}
    metadata = {"format": CENTROID_FORMAT, "version": "1", "centroids": json.dumps(index)}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def load_centroid(lora_dir: str | Path, clip_model: str) -> StyleCentroid | None:
    """The centroid stored for `clip_model` (a Scorer.name), or None when absent or only for other models."""
    path = Path(lora_dir) / CENTROID_FILE
    if not path.is_file():
        return None
    return _read_centroids(path).get(clip_model)


def centroid_models(lora_dir: str | Path) -> list[str]:
    """The CLIP models a LoRA has centroids for (to explain why one is missing)."""
    path = Path(lora_dir) / CENTROID_FILE
    return sorted(_read_centroids(path)) if path.is_file() else []


def _read_centroids(path: Path) -> dict[str, StyleCentroid]:
    from safetensors import safe_open

    from stylemix.lora.files import check_safetensors_header

    check_safetensors_header(path)  # refuses pickles and truncated files before anything is parsed
    bad = f"{path}: not a valid StyleMix style centroid file"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CENTROID_FORMAT:
                raise StyleMixError(f"{bad} (format {meta.get('format')!r}).")
            index = json.loads(meta.get("centroids", "{}"))
            out = {}
            for name, info in index.items():
                vec = f.get_tensor(info["tensor"]).float()
                if vec.ndim != 1 or vec.numel() != int(info["dim"]) or not torch.isfinite(vec).all() or vec.norm() == 0:
                    raise StyleMixError(f"{bad} (vector for {name!r} is not a finite non-zero 1-D vector).")
                base = info.get("base_similarity")
                out[name] = StyleCentroid(vector=_unit(vec), clip_model=name, n_images=int(info["n_images"]),
                                          self_similarity=float(info["self_similarity"]),
                                          base_similarity=None if base is None else float(base),
                                          created=str(info.get("created", "")))
            return out
    except StyleMixError:
        raise
    except Exception as e:  # bad JSON, missing keys, wrong types
        raise StyleMixError(f"{bad} ({type(e).__name__}: {e}).") from None


# --------------------------------------------------------------------------- scoring images


@dataclass
class ImageScores:
    """Every score of one image.  Style dicts are keyed by LoRA name."""

    clip_score: float | None  # raw cosine image/prompt-without-triggers; None without a prompt
    clip_score_100: float | None  # torchmetrics CLIPScore scale: 100 * max(cos, 0)
    clip_model: str  # the CLIP model of the CLIP score (and of style numbers when the judge is CLIP)
    is_demo: bool  # tiny random CLIP or CSD: numbers only demonstrate the pipeline
    prompt_scored: str | None = None  # the text the CLIP score used (trigger words removed)
    similarity: dict[str, float] = field(default_factory=dict)  # cosine to each style centroid
    calibrated: dict[str, float | None] = field(default_factory=dict)  # 0 = base model, 1 = the style's own images
    base_similarity: dict[str, float | None] = field(default_factory=dict)  # the low anchor used, per style
    shares: dict[str, float] = field(default_factory=dict)  # LoRAs in the mix -> share, sums to 1; {} = none
    shares_basis: str | None = None  # "calibrated", or "raw" when some style had no low anchor; None: no mix
    style_detected: bool | None = None  # calibrated: whether any style is above NOISE_FLOOR; raw: None
    style_judge: str | None = None  # the judge of similarity/calibrated/shares (a centroid key); None: not recorded

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.is_demo:
            d["label"] = DEMO_LABEL
        return d

    def summary(self) -> str:
        """One line for a caption: "CLIP 0.312 (ViT-B-32/openai) | watercolor 62% / pixel_art 38%"."""
        parts = [f"CLIP {self.clip_score:.3f}" if self.clip_score is not None else "CLIP -"]
        parts[0] += f" ({self.clip_model})"
        if self.shares:
            parts.append(" / ".join(f"{k} {100 * v:.0f}%" for k, v in self.shares.items()))
            if self.shares_basis == "raw":
                parts[-1] += " (uncalibrated)"
        elif self.style_detected is False:
            parts.append("no style detected")
        if len(parts) > 1 and self.style_judge and self.style_judge != self.clip_model:
            parts[-1] += f" (judge {self.style_judge})"
        line = " | ".join(parts)
        return f"{line} [DEMO VALUES]" if self.is_demo else line


def score_images(scorer: Scorer | None, images: Sequence, prompt: str | None, styles: Mapping[str, StyleCentroid],
                 trigger_words: Sequence[str] = (), base_images: Sequence | None = None,
                 base_similarities: Mapping[str, float] | None = None,
                 weights: Mapping[str, float] | None = None,
                 style_scorer: StyleScorer | None = None) -> list[ImageScores]:
    """Score each image: CLIP score against `prompt`, and similarity, calibrated similarity and
    share for each style in `styles` (LoRA name -> centroid computed with the style judge).

    scorer: the CLIP of the CLIP score (None: no CLIP score).  style_scorer: the style judge (a
    CsdScorer, or a CLIP Scorer; default `scorer`): every centroid must be in its space.

    The calibration's low anchor, per style, is the first of:
      1. `base_images`: base-model images of the same prompt and seed, paired with `images`
         (what the mixer can generate); each image is calibrated against its own pair;
      2. `base_similarities[name]`: a similarity the caller measured;
      3. the centroid's stored `base_similarity`;
    and when none exists that style's calibrated value is None.

    Shares are among the styles in the mix: `weights` (LoRA name -> weight) leaves out a style at
    weight 0 (it is still measured: similarity and calibrated); None: every style is in the mix.
    They use calibrated values when every style in the mix has one, and only values above
    NOISE_FLOOR (none above it: no shares, `style_detected` False).  Else raw similarities, for two
    or more styles (`shares_basis == "raw"`: raw cosines of real images are all ~0.5-0.8, so such
    shares stay near even; one style's raw share would be 100% whatever the image shows).
    """
    images = list(images)
    judge = style_scorer or scorer
    if judge is None:
        raise StyleMixError("score_images needs a CLIP scorer or a style judge.")
    n = len(images)
    clip, text = [None] * n, None
    if prompt and scorer is not None:
        text = strip_trigger_words(prompt, trigger_words) or None
        if text:
            clip_emb = scorer.embed_images(images)
            clip = (clip_emb @ scorer.embed_texts([text])[0]).tolist()
    # The CLIP embeddings are reused when CLIP is also the judge; CSD embeds only when there are styles.
    if judge is scorer and text:
        emb = clip_emb
    else:
        emb = judge.embed_images(images) if styles else None
    if base_images is not None:
        base_images = list(base_images)
        if len(base_images) != n:
            raise StyleMixError(f"Got {len(base_images)} base-model images for {n} images; they must pair one to one.")
    base_emb = judge.embed_images(base_images) if base_images is not None and n and styles else None
    sims: dict[str, list[float]] = {}
    anchors: dict[str, list[float | None]] = {}
    for name, c in styles.items():
        if c.clip_model != judge.name:
            raise StyleMixError(f"The style centroid of {name!r} was computed with the judge {c.clip_model!r}, "
                                f"not {judge.name!r}: similarities of different judges are not comparable.")
        if c.vector.numel() != emb.shape[-1]:
            raise StyleMixError(f"The style centroid of {name!r} has {c.vector.numel()} dimensions, "
                                f"the judge {judge.name} gives {emb.shape[-1]}.")
        vec = c.vector.to(emb.device, emb.dtype)
        sims[name] = (emb @ vec).tolist()
        if base_emb is not None:
            anchors[name] = (base_emb @ vec).tolist()
        elif base_similarities and base_similarities.get(name) is not None:
            anchors[name] = [float(base_similarities[name])] * n
        else:
            anchors[name] = [c.base_similarity] * n
    in_mix = [k for k in styles if weights is None or weights.get(k)]
    out = []
    for i in range(n):
        sim = {k: sims[k][i] for k in styles}
        base = {k: anchors[k][i] for k in styles}
        cal = {k: calibrate(sim[k], base[k], styles[k].self_similarity) if base[k] is not None else None
               for k in styles}
        shares, basis, detected = _shares(in_mix, sim, cal)
        out.append(ImageScores(
            clip_score=clip[i], clip_score_100=None if clip[i] is None else clip_score_100(clip[i]),
            clip_model=scorer.name if scorer is not None else None,
            is_demo=bool(judge.is_demo or (scorer is not None and scorer.is_demo)), prompt_scored=text,
            similarity=sim, calibrated=cal, base_similarity=base,
            shares=shares, shares_basis=basis, style_detected=detected, style_judge=judge.name))
    return out


def check_one_judge(rows: Iterable) -> str | None:
    """The one style judge of `rows` (ImageScores or their dicts, e.g. an experiment's results), or None
    when none records one.  Raises StyleMixError when they come from different judges: their similarities
    live in different spaces, so an average, a ranking or a comparison of them means nothing.

    A row without `style_judge` (written before CSD) counts as its `clip_model`'s, which judged it then.
    """
    judges: dict[str, int] = {}
    for row in rows:
        get = row.get if isinstance(row, Mapping) else (lambda k, _r=row: getattr(_r, k, None))
        judge = get("style_judge") or get("clip_model")
        if judge:
            judges[str(judge)] = judges.get(str(judge), 0) + 1
    if len(judges) > 1:
        counts = ", ".join(f"{k} ({v} rows)" for k, v in sorted(judges.items()))
        raise StyleMixError(f"These scores come from different style judges: {counts}. Scores of different judges "
                            "are never compared or averaged; rescore them all with one judge (--style-judge).")
    return next(iter(judges), None)


def _shares(in_mix: list[str], sim: dict[str, float], cal: dict[str, float | None]
            ) -> tuple[dict[str, float], str | None, bool | None]:
    """(shares, shares_basis, style_detected) of one image among the styles in the mix."""
    if not in_mix:
        return {}, None, None
    if all(cal[k] is not None for k in in_mix):
        shares = mix_shares({k: cal[k] for k in in_mix}, NOISE_FLOOR)
        return shares, "calibrated", bool(shares)
    if len(in_mix) < 2:
        return {}, "raw", None
    return mix_shares({k: sim[k] for k in in_mix}), "raw", None


# --------------------------------------------------------------------------- images from disk


def images_in_folder(folder: str | Path) -> list:
    """Every image file directly in `folder` (sorted by name), opened with `open_image`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StyleMixError(f"Image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if is_image_name(p) and p.is_file())
    if not files:
        raise StyleMixError(f"No images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}.")
    return [open_image(p) for p in files]
