"""Compose: generate a mix, make its base-model anchor, score it, save PNGs with their recipe.

The one path from a recipe to saved, scored images: `stylemix generate` and the app
(`StyleMixService.compose`) both call `compose`; they differ only in where files go and
whether base images are kept between calls.  Scoring never raises: generation already
succeeded, so a missing CLIP model or a bad centroid file becomes a note in the returned
dict ("unavailable", "problems") and the images are kept.  Style numbers come from the style
judge (`style_judge`: "clip" or "csd", default $STYLEMIX_STYLE_JUDGE, else CSD where installed),
named in the dict; the CLIP score is always CLIP's.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from stylemix.scores.clip_models import DEFAULT_CLIP_MODEL, DEFAULT_PRETRAINED
from stylemix.errors import StyleMixError
from stylemix.scores.judge import load_styles, pick_scorer_or_reason
from stylemix.recipe import Recipe, read_recipe, save_png
from stylemix.scores.scoring import CENTROID_FILE, DEMO_LABEL, score_images
from stylemix.scores.selection import pick_style_scorer_or_reason

logger = logging.getLogger("stylemix")


def score_result(mixer, result, clip_model: str = DEFAULT_CLIP_MODEL, pretrained: str = DEFAULT_PRETRAINED,
                 cache: dict | None = None, base_images: Sequence | None = None,
                 style_judge: str | None = None) -> dict:
    """Score every image of a `MixResult` against its prompt and the styles in its mix.

    Returns {"clip_model", "style_judge", "is_demo", "images": [ImageScores.to_dict(), ...],
    "missing_centroids", "problems"} (+ "label" for demo values), or {"unavailable": why} when no
    CLIP or no style judge can be loaded (an explicit CSD that is not installed, a damaged install).
    With the tiny base model the tiny random CLIP (and CSD) is used, whatever `clip_model` says.
    style_judge: "clip" or "csd"; None: $STYLEMIX_STYLE_JUDGE, else CSD where installed, else CLIP.
    cache: a dict kept by the caller between calls, for centroids (keyed by file and CLIP model).
    base_images: base-model images of the same prompt and seeds, one per image, for calibration
    (else each centroid's stored base similarity is the low anchor).
    """
    scorer, why = pick_scorer_or_reason(mixer.loaded.is_tiny, mixer.loaded.device, clip_model, pretrained)
    if scorer is None:
        return {"unavailable": why}
    try:
        judge, why = pick_style_scorer_or_reason(mixer.loaded.is_tiny, mixer.loaded.device, style_judge,
                                                 clip_scorer=scorer)
    except StyleMixError as e:  # an unknown judge name from $STYLEMIX_STYLE_JUDGE
        judge, why = None, str(e)
    if judge is None:
        return {"unavailable": why}
    cache = cache if cache is not None else {}
    in_mix = [name for name, weight in result.weights_used.items() if weight]  # a LoRA at weight 0 is not in the mix
    found = load_styles(mixer.library, in_mix, judge.name, cache=cache, keep_going=True)
    styles, triggers, missing, problems = found.centroids, found.triggers, found.missing, found.problems
    try:
        scores = score_images(scorer, result.images, result.recipe.prompt, styles, trigger_words=triggers,
                              base_images=base_images, style_scorer=judge)
    except StyleMixError as e:  # e.g. a centroid of the wrong size for this judge
        logger.warning("Scoring failed: %s", e)
        return {"unavailable": str(e)}
    is_demo = bool(scorer.is_demo or judge.is_demo)
    out = {"clip_model": scorer.name, "style_judge": judge.name, "is_demo": is_demo,
           "images": [s.to_dict() for s in scores], "missing_centroids": missing, "problems": problems}
    if is_demo:
        out["label"] = DEMO_LABEL
    return out


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
    return recipe.with_(loras={}, block_weights={}, schedules={}, mode="merge", total_strength=None, lora_hashes={})


MAX_RECIPE_JSON_BYTES = 200_000  # a recipe is a few hundred bytes; a bigger "recipe" file is not read whole


def read_recipe_file(path: str | Path) -> Recipe:
    """The recipe in a StyleMix/A1111 PNG or a recipe JSON file (at most MAX_RECIPE_JSON_BYTES of it)."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return read_recipe(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.read(MAX_RECIPE_JSON_BYTES))
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise StyleMixError(f"{path}: not a readable recipe JSON ({e}).") from None
    return Recipe.from_dict(data)


class BaseImageCache:
    """Base-model images by recipe, the low anchor of calibrated similarity: made once per prompt,
    seed and settings, then reused while the sliders move (the newest `size` recipes are kept)."""

    def __init__(self, size: int = 16) -> None:
        self.size, self.images = size, OrderedDict()

    def get(self, mixer, recipe: Recipe) -> list:
        key = json.dumps(base_recipe(recipe).with_(model=None).to_dict(), sort_keys=True)
        if key not in self.images:
            self.images[key] = mixer.generate(base_recipe(recipe)).images
            while len(self.images) > self.size:
                self.images.popitem(last=False)
        self.images.move_to_end(key)
        return self.images[key]


def score_mix(mixer, result, clip_model: str = DEFAULT_CLIP_MODEL, calibrate: bool = True,
              base_cache: BaseImageCache | None = None, cache: dict | None = None,
              style_judge: str | None = None) -> dict:
    """`score_result` with base-model images of the same prompt and seeds as the anchor, when a style in
    the mix has a centroid (calibrate=False: the centroids' stored anchors are used instead)."""
    base = None
    if calibrate and wants_base_images(mixer, result):
        base = base_cache.get(mixer, result.recipe) if base_cache is not None else \
            mixer.generate(base_recipe(result.recipe)).images
    return score_result(mixer, result, clip_model=clip_model, cache=cache, base_images=base, style_judge=style_judge)


@dataclass
class ComposeOutput:
    image_paths: list[Path]
    result: object  # mixer.MixResult
    scores: dict | None = None  # {"images": [...], "clip_model", "style_judge", "is_demo"} or {"unavailable": why}
    recipe_path: Path | None = None


def compose(mixer, recipe: Recipe, image_paths: Callable[[object], list[Path]], generate: Callable | None = None,
            progress=None, score: bool = True, clip_model: str = DEFAULT_CLIP_MODEL, calibrate: bool = True,
            base_cache: BaseImageCache | None = None, cache: dict | None = None,
            recipe_path: Path | None = None, style_judge: str | None = None) -> ComposeOutput:
    """Generate `recipe`, score it, and save each image as a PNG carrying its own recipe (and scores).

    image_paths(result): where each image goes (one path per image).  generate(recipe, progress):
    what renders (default `mixer.generate`; the app's previewer stops its previews first).
    recipe_path: also write the recipe as JSON there.  style_judge: "clip" or "csd" (see score_result).
    """
    result = (generate or mixer.generate)(recipe, progress=progress)
    scores = score_mix(mixer, result, clip_model, calibrate, base_cache, cache, style_judge) if score else None
    paths = []
    for i, (img, path) in enumerate(zip(result.images, image_paths(result))):
        extra = {"scores": scores["images"][i]} if scores and scores.get("images") else None
        paths.append(save_png(img, path, result.recipe.with_(seed=result.seeds[i], batch_size=1),
                              result.prompt_used, extra))
    if recipe_path is not None:
        Path(recipe_path).write_text(json.dumps(result.recipe.to_dict(), indent=2))
    return ComposeOutput(image_paths=paths, result=result, scores=scores, recipe_path=recipe_path)
