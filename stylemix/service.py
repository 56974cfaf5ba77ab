"""What the web app does, as plain Python: one shared model and mixer, per-user files.

`app.py` only lays out the page and calls these methods; everything here is testable without
gradio.  One `StyleMixService` exists per running app (created in `app.main`, never at import
time); all users share its pipeline and its lock, and each user's files live under a folder
named by their owner token, which only the server chooses.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from stylemix.errors import StyleMixError
from stylemix.library import LoraLibrary, model_linear_shapes
from stylemix.mixer import Mixer, MixResult
from stylemix.models import ModelLoadError, load_model
from stylemix.paths import Workspace, check_name, inside
from stylemix.recipe import Recipe, save_png
from stylemix.scoring_service import base_recipe, score_result, wants_base_images

logger = logging.getLogger("stylemix")


def new_owner_token() -> str:
    """An unguessable per-browser id; a user's uploads, datasets and jobs are filed under it."""
    return "u" + secrets.token_hex(12)


@dataclass
class ComposeOutput:
    image_paths: list[Path]
    result: MixResult
    scores: dict | None = None  # {"images": [...], "clip_model": ..., "is_demo": ...} or {"unavailable": why}
    recipe_path: Path | None = None


@dataclass
class StyleMixService:
    mixer: Mixer
    workspace: Workspace
    banner: str  # what model runs and what that means, shown on every page
    fallback_reason: str | None = None  # set when the requested model failed and tiny runs instead
    scorer_cache: dict = field(default_factory=dict)
    # Base-model images by recipe, the low anchor of calibrated similarity: made once per prompt,
    # seed and settings, then reused while the sliders move.
    base_images: OrderedDict = field(default_factory=OrderedDict)

    @classmethod
    def start(cls, model: str | None, workspace: Workspace, device: str | None = None,
              dtype: str | None = None) -> "StyleMixService":
        """Load the model; if it cannot be loaded, run on `tiny` and say so in the banner (never silently)."""
        reason = None
        try:
            loaded = load_model(model, device, dtype)
        except ModelLoadError as e:
            reason = str(e)
            logger.error("%s -- starting on the built-in tiny model instead.", reason)
            loaded = load_model("tiny", device, dtype)
        library = LoraLibrary(workspace.loras, shapes=model_linear_shapes(loaded.pipe), base_model=loaded.model_id)
        banner = f"**Model:** {loaded.description}."
        if reason:
            banner = f"⚠️ **The requested model could not be loaded:** {reason}  \n" + banner
        if loaded.is_tiny:
            banner += (" This is StyleMix's built-in offline model: the real SD1.5 architecture with random "
                       "weights, so pictures look like coloured noise and every score is a demo value. "
                       "Start with `--model stable-diffusion-v1-5/stable-diffusion-v1-5` for real images.")
        return cls(mixer=Mixer(loaded, library), workspace=workspace, banner=banner, fallback_reason=reason)

    # ---------------------------------------------------------------- library

    @property
    def library(self) -> LoraLibrary:
        return self.mixer.library

    def usable_loras(self) -> list[dict]:
        """LoRAs that fit the loaded model, for the sliders; incompatible ones are listed, not offered."""
        return [e.summary() for e in self.library.list() if e.compatible]

    def all_loras(self) -> list[dict]:
        return [e.summary() for e in self.library.list()]

    # ---------------------------------------------------------------- compose

    def user_dir(self, owner: str, kind: str) -> Path:
        """outputs/<owner>/, data/<owner>/ ...: the only places a user's files go."""
        check_name(owner, "session id")
        base = {"outputs": self.workspace.outputs, "data": self.workspace.data, "uploads": self.workspace.outputs.parent
                / "uploads"}[kind]
        path = inside(base, owner)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def compose(self, owner: str, recipe: Recipe, progress=None, score: bool = True) -> ComposeOutput:
        result = self.mixer.generate(recipe, progress=progress)
        scores = self.score(result) if score else None
        out_dir = self.user_dir(owner, "outputs")
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{secrets.token_hex(3)}"
        paths = []
        for i, img in enumerate(result.images):
            extra = {"scores": scores["images"][i]} if scores and scores.get("images") else None
            paths.append(save_png(img, out_dir / f"{stamp}-{result.seeds[i]}.png",
                                  result.recipe.with_(seed=result.seeds[i], batch_size=1), result.prompt_used, extra))
        recipe_path = out_dir / f"{stamp}-recipe.json"
        recipe_path.write_text(json.dumps(result.recipe.to_dict(), indent=2))
        return ComposeOutput(image_paths=paths, result=result, scores=scores, recipe_path=recipe_path)

    def score(self, result: MixResult) -> dict:
        base = None
        if wants_base_images(self.mixer, result):
            key = json.dumps(base_recipe(result.recipe).with_(model=None).to_dict(), sort_keys=True)
            if key not in self.base_images:
                self.base_images[key] = self.mixer.generate(base_recipe(result.recipe)).images
                while len(self.base_images) > 16:
                    self.base_images.popitem(last=False)
            self.base_images.move_to_end(key)
            base = self.base_images[key]
        return score_result(self.mixer, result, cache=self.scorer_cache, base_images=base)
