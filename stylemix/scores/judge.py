"""The style judge: which CLIP scores an image (the tiny demo CLIP or a real one) and, for a set of
LoRAs, their style centroids and trigger words.  The one place that makes these choices; the app,
the CLI, the experiments and the trainer (for a new LoRA's centroid) all come here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from stylemix.scores.clip_models import DEFAULT_CLIP_MODEL, DEFAULT_PRETRAINED, Scorer, ScorerUnavailable, load_scorer
from stylemix.errors import StyleMixError
from stylemix.scores.scoring import CENTROID_FILE, StyleCentroid, centroid_models, load_centroid, score_images

logger = logging.getLogger("stylemix")


def pick_scorer(tiny: bool, device: str | torch.device | None = None, clip_model: str | None = None,
                pretrained: str = DEFAULT_PRETRAINED) -> Scorer:
    """The CLIP that judges images of a model: the tiny random demo CLIP for the tiny base model (or
    clip_model "tiny"), else `clip_model` (default ViT-B-32/openai).  Raises ScorerUnavailable."""
    if tiny:
        return load_scorer(device=device, tiny=True)
    return load_scorer(clip_model or DEFAULT_CLIP_MODEL, pretrained, device=device)


def pick_scorer_or_reason(tiny: bool, device: str | torch.device | None = None, clip_model: str | None = None,
                          pretrained: str = DEFAULT_PRETRAINED) -> tuple[Scorer | None, str | None]:
    """(scorer, None), or (None, "why scores are unavailable"): for callers that go on without scores."""
    try:
        return pick_scorer(tiny, device, clip_model, pretrained), None
    except ScorerUnavailable as e:
        logger.warning("Scores unavailable: %s", e)
        return None, str(e)


@dataclass
class Styles:
    """The centroids and trigger words of some LoRAs, for one CLIP model."""

    centroids: dict[str, StyleCentroid] = field(default_factory=dict)
    triggers: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # LoRAs without a centroid for this CLIP model
    problems: list[str] = field(default_factory=list)  # "name: why" for LoRAs that could not be read


def load_styles(library, names: Sequence[str], clip_name: str, cache: dict | None = None, require: bool = False,
                keep_going: bool = False) -> Styles:
    """Each LoRA's trigger word and style centroid for `clip_name`.

    require: a LoRA without a centroid is an error (its share could not be measured).
    keep_going: a LoRA that cannot be read becomes a note in `problems` instead of an error.
    cache: a dict kept by the caller between calls (centroids keyed by file, mtime and CLIP model).
    """
    out = Styles()
    for name in names:
        try:
            entry = library.get(name)
            if entry.trigger_word:
                out.triggers.append(entry.trigger_word)
            centroid = _centroid(entry.folder, clip_name, cache)
        except StyleMixError as e:
            if not keep_going:
                raise
            out.problems.append(f"{name}: {e}")
            continue
        if centroid is not None:
            out.centroids[name] = centroid
            continue
        if require:
            have = ", ".join(centroid_models(entry.folder)) or "none"
            raise StyleMixError(
                f"LoRA {name!r} has no style centroid for CLIP {clip_name} (has: {have}), so its share "
                f"cannot be measured. Compute one with `stylemix score REFERENCE_IMAGES... --save-centroid {name}`.")
        out.missing.append(name)
    return out


def _centroid(folder: Path, clip_name: str, cache: dict | None) -> StyleCentroid | None:
    if cache is None:
        return load_centroid(folder, clip_name)
    path = folder / CENTROID_FILE
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    key = ("centroid", str(path), stamp, clip_name)
    if key not in cache:
        cache[key] = load_centroid(folder, clip_name)
    return cache[key]


@dataclass
class StyleJudge:
    """A CLIP scorer with the style centroids of a fixed set of LoRAs: scores any image for all of them."""

    scorer: Scorer
    centroids: dict  # LoRA name -> scoring.StyleCentroid
    triggers: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # LoRAs without a centroid for this CLIP model

    @classmethod
    def for_mixer(cls, mixer, names: Sequence[str], clip_model: str | None = None, pretrained: str = "openai",
                  require: bool = False) -> "StyleJudge":
        """The judge for `names` on the mixer's device (tiny random CLIP for the tiny model, loudly)."""
        scorer = pick_scorer(mixer.loaded.is_tiny or clip_model == "tiny", mixer.loaded.device, clip_model, pretrained)
        styles = load_styles(mixer.library, names, scorer.name, require=require)
        if styles.missing:
            logger.warning("No style centroid for %s: their similarity and shares are not measured.",
                           ", ".join(styles.missing))
        return cls(scorer, styles.centroids, styles.triggers, styles.missing)

    def score(self, images: Sequence, prompt: str, base_images: Sequence | None = None,
              weights: dict[str, float] | None = None) -> list:
        """scoring.ImageScores per image (base_images: base-model images paired one to one, for calibration;
        weights: the mix the images were made with, so a LoRA at weight 0 gets no share)."""
        return score_images(self.scorer, images, prompt, self.centroids, trigger_words=self.triggers,
                            base_images=base_images, weights=weights)
