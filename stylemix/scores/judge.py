"""The style judge: which CLIP scores an image (the tiny demo CLIP or a real one), which model judges
style (CLIP or CSD, selection.py) and, for a set of LoRAs, their style centroids in that judge's space
and their trigger words.  The one place that makes these choices; the app, the CLI, the experiments
and the trainer (for a new LoRA's centroid) all come here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from stylemix.scores.clip_models import Scorer, ScorerUnavailable
# chosen in selection.py, re-exported here where callers have always found them
from stylemix.scores.selection import pick_scorer, pick_scorer_or_reason  # noqa: F401
from stylemix.errors import StyleMixError
from stylemix.scores.scoring import CENTROID_FILE, StyleCentroid, centroid_models, load_centroid, score_images

logger = logging.getLogger("stylemix")


@dataclass
class Styles:
    """The centroids and trigger words of some LoRAs, for one CLIP model."""

    centroids: dict[str, StyleCentroid] = field(default_factory=dict)
    triggers: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # LoRAs without a centroid for this CLIP model
    problems: list[str] = field(default_factory=list)  # "name: why" for LoRAs that could not be read


def load_styles(library, names: Sequence[str], clip_name: str, cache: dict | None = None, require: bool = False,
                keep_going: bool = False) -> Styles:
    """Each LoRA's trigger word and style centroid for `clip_name` (the style judge's name).

    require: a LoRA without a centroid is an error (its share could not be measured).
    keep_going: a LoRA that cannot be read becomes a note in `problems` instead of an error.
    cache: a dict kept by the caller between calls (centroids keyed by the LoRA's file, mtime and weights'
    hash, and the judge's name, which for CSD holds its weights' hash).
    """
    out = Styles()
    for name in names:
        try:
            entry = library.get(name)
            if entry.trigger_word:
                out.triggers.append(entry.trigger_word)
            meta = getattr(entry, "meta", None)
            centroid = _centroid(entry.folder, clip_name, cache, meta.get("sha256") if isinstance(meta, dict) else None)
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
                f"LoRA {name!r} has no style centroid for the judge {clip_name} (has: {have}), so its share cannot "
                f"be measured. Compute one with `stylemix score REFERENCE_IMAGES... --save-centroid {name}` "
                "(with the same --style-judge).")
        out.missing.append(name)
    return out


def _centroid(folder: Path, clip_name: str, cache: dict | None, lora_sha256: str | None = None) -> StyleCentroid | None:
    if cache is None:
        return load_centroid(folder, clip_name)
    path = folder / CENTROID_FILE
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    key = ("centroid", str(path), stamp, lora_sha256, clip_name)
    if key not in cache:
        cache[key] = load_centroid(folder, clip_name)
    return cache[key]


@dataclass
class StyleJudge:
    """A CLIP scorer (the CLIP score), a style judge (CLIP or CSD) and, in the judge's space, the style
    centroids of a fixed set of LoRAs: scores any image for all of them."""

    scorer: Scorer
    centroids: dict  # LoRA name -> scoring.StyleCentroid
    triggers: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # LoRAs without a centroid for this judge
    style_scorer: object = None  # a Scorer or csd.CsdScorer; None: `scorer` judges style too

    @property
    def judge(self):
        """The model style similarity and shares come from."""
        return self.style_scorer or self.scorer

    @property
    def style_judge(self) -> str:
        """The style judge's name, recorded with every score (scoring.check_one_judge compares them)."""
        return self.judge.name

    @property
    def is_demo(self) -> bool:
        return bool(self.scorer.is_demo or self.judge.is_demo)

    @classmethod
    def for_mixer(cls, mixer, names: Sequence[str], clip_model: str | None = None, pretrained: str = "openai",
                  require: bool = False, style_judge: str | None = None) -> "StyleJudge":
        """The judge for `names` on the mixer's device (tiny random CLIP/CSD for the tiny model, loudly).

        style_judge: "clip" or "csd" (None: $STYLEMIX_STYLE_JUDGE, else CSD where installed, else CLIP).
        """
        from stylemix.scores.selection import pick_style_scorer

        tiny = mixer.loaded.is_tiny or clip_model == "tiny"
        scorer = pick_scorer(tiny, mixer.loaded.device, clip_model, pretrained)
        judge = pick_style_scorer(tiny, mixer.loaded.device, style_judge, clip_scorer=scorer)
        styles = load_styles(mixer.library, names, judge.name, require=require)
        if styles.missing:
            logger.warning("No style centroid for %s with the judge %s: their similarity and shares are not "
                           "measured.", ", ".join(styles.missing), judge.name)
        return cls(scorer, styles.centroids, styles.triggers, styles.missing,
                   style_scorer=None if judge is scorer else judge)

    def score(self, images: Sequence, prompt: str, base_images: Sequence | None = None,
              weights: dict[str, float] | None = None) -> list:
        """scoring.ImageScores per image (base_images: base-model images paired one to one, for calibration;
        weights: the mix the images were made with, so a LoRA at weight 0 gets no share)."""
        return score_images(self.scorer, images, prompt, self.centroids, trigger_words=self.triggers,
                            base_images=base_images, weights=weights, style_scorer=self.style_scorer)


def judges_side_by_side(mixer, names: Sequence[str], kinds: Sequence[str] = ("clip", "csd"),
                        clip_model: str | None = None, pretrained: str = "openai"
                        ) -> tuple[dict[str, StyleJudge], dict[str, str]]:
    """({kind: StyleJudge}, {kind: why unavailable}): one judge per kind for the same LoRAs, to show their
    numbers side by side (e.g. the Experiments tab).  Each judge's scores stay in their own columns:
    never averaged or compared with the other's (scoring.check_one_judge)."""
    judges, unavailable = {}, {}
    for kind in kinds:
        try:
            judges[kind] = StyleJudge.for_mixer(mixer, names, clip_model, pretrained, style_judge=kind)
        except ScorerUnavailable as e:
            unavailable[kind] = str(e)
    return judges, unavailable
