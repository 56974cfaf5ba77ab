"""Scores for a mixer's result: the glue between `stylemix.mixer` and `stylemix.scoring`.

Used by `stylemix generate` and the app.  Never raises for a scoring problem: generation
already succeeded, so a missing CLIP model or a bad centroid file becomes a note in the
returned dict ("unavailable", "problems") and the images are kept.
"""

from __future__ import annotations

import logging
from typing import Sequence

from stylemix.clip_models import DEFAULT_CLIP_MODEL, DEFAULT_PRETRAINED, load_scorer_or_reason
from stylemix.errors import StyleMixError
from stylemix.scoring import CENTROID_FILE, DEMO_LABEL, StyleCentroid, load_centroid, score_images

logger = logging.getLogger("stylemix")


def score_result(mixer, result, clip_model: str = DEFAULT_CLIP_MODEL, pretrained: str = DEFAULT_PRETRAINED,
                 cache: dict | None = None, base_images: Sequence | None = None) -> dict:
    """Score every image of a `MixResult` against its prompt and the styles in its mix.

    Returns {"clip_model", "is_demo", "images": [ImageScores.to_dict(), ...], "missing_centroids",
    "problems"} (+ "label" for demo values), or {"unavailable": why} when no CLIP can be loaded.
    With the tiny base model the tiny random CLIP is used, whatever `clip_model` says.
    cache: a dict kept by the caller between calls, for centroids (keyed by file and CLIP model).
    base_images: base-model images of the same prompt and seeds, one per image, for calibration
    (else each centroid's stored base similarity is the low anchor).
    """
    loaded = mixer.loaded
    if loaded.is_tiny:
        scorer, why = load_scorer_or_reason(device=loaded.device, tiny=True)
    else:
        scorer, why = load_scorer_or_reason(clip_model, pretrained, device=loaded.device)
    if scorer is None:
        return {"unavailable": why}
    cache = cache if cache is not None else {}
    styles: dict[str, StyleCentroid] = {}
    triggers, missing, problems = [], [], []
    for name, weight in result.weights_used.items():
        if not weight:
            continue  # a LoRA at weight 0 is not in the mix
        try:
            entry = mixer.library.get(name)
            if entry.trigger_word:
                triggers.append(entry.trigger_word)
            centroid = _cached_centroid(cache, entry.folder, scorer.name)
        except StyleMixError as e:
            problems.append(f"{name}: {e}")
            continue
        if centroid is None:
            missing.append(name)
        else:
            styles[name] = centroid
    try:
        scores = score_images(scorer, result.images, result.recipe.prompt, styles, trigger_words=triggers,
                              base_images=base_images)
    except StyleMixError as e:  # e.g. a centroid of the wrong size for this CLIP model
        logger.warning("Scoring failed: %s", e)
        return {"unavailable": str(e)}
    out = {"clip_model": scorer.name, "is_demo": scorer.is_demo, "images": [s.to_dict() for s in scores],
           "missing_centroids": missing, "problems": problems}
    if scorer.is_demo:
        out["label"] = DEMO_LABEL
    return out


def _cached_centroid(cache: dict, folder, clip_name: str) -> StyleCentroid | None:
    path = folder / CENTROID_FILE
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    key = ("centroid", str(path), stamp, clip_name)
    if key not in cache:
        cache[key] = load_centroid(folder, clip_name)
    return cache[key]


def wants_base_images(mixer, result) -> bool:
    """True when a style in the mix has a centroid, so a base-model image would calibrate it."""
    for name, weight in result.weights_used.items():
        if weight:
            try:
                if (mixer.library.get(name).folder / CENTROID_FILE).is_file():
                    return True
            except StyleMixError:
                continue
    return False


def base_recipe(recipe):
    """The same prompt, seed and settings with no LoRA: the calibration's zero point."""
    return recipe.with_(loras={}, block_weights={}, total_strength=None, lora_hashes={})
