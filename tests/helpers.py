"""Shared test helpers: real random LoRAs made with peft and saved in StyleMix's library layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig

from stylemix.lora.files import TEXT_TARGETS, UNET_TARGETS, WEIGHTS_NAME, save_lora_weights
from stylemix.models import tiny_components


def make_lora_file(path: Path, seed: int, rank: int = 4, alpha: float = 4.0, text_encoder: bool = True,
                   scale: float = 1.0) -> Path:
    """A random (init_lora_weights=False) LoRA for the tiny model, saved with StyleMix's saver."""
    comps = tiny_components()
    torch.manual_seed(seed)
    comps["unet"].add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                                         target_modules=UNET_TARGETS), adapter_name="x")
    te = None
    if text_encoder:
        te = comps["text_encoder"]
        te.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=TEXT_TARGETS),
                       adapter_name="x")
    if scale != 1.0:
        with torch.no_grad():
            for n, p in list(comps["unet"].named_parameters()) + (list(te.named_parameters()) if te else []):
                if "lora_B" in n:
                    p.mul_(scale)
    save_lora_weights(path, comps["unet"], te, adapter_name="x")
    return path


def make_library_lora(loras_dir: Path, name: str, seed: int, trigger: str | None = None, **kw) -> Path:
    """A LoRA folder `loras_dir/name/` as the library stores it (weights + stylemix.json)."""
    d = Path(loras_dir) / name
    d.mkdir(parents=True, exist_ok=True)
    make_lora_file(d / WEIGHTS_NAME, seed, **kw)
    meta = {"name": name, "trigger_word": trigger or f"{name}style", "base_model": "tiny",
            "rank": kw.get("rank", 4), "alpha": kw.get("alpha", 4.0)}
    (d / "stylemix.json").write_text(json.dumps(meta))
    return d


def add_own_centroids(service, names, images_per_style: int) -> None:
    """Give each named library LoRA a style centroid (tiny CLIP) from images it generates alone."""
    from stylemix.scores.clip_models import tiny_scorer
    from stylemix.recipe import Recipe
    from stylemix.scores.scoring import compute_centroid, save_centroid

    scorer = tiny_scorer()
    for name in names:
        refs = [service.mixer.generate(Recipe("a cat", loras={name: 1.0}, seed=s, steps=2, width=64, height=64,
                                              sampler="Euler")).images[0] for s in range(images_per_style)]
        save_centroid(service.library.get(name).folder, compute_centroid(scorer, refs))


def tiny_mixer(library_root: Path):
    """A mixer on a fresh tiny pipeline (CPU, fp32) over the LoRA library at `library_root`."""
    from stylemix.lora.library import LoraLibrary
    from stylemix.mixer import Mixer
    from stylemix.models import LoadedModel, tiny_pipeline

    loaded = LoadedModel(pipe=tiny_pipeline(), model_id="tiny", device=torch.device("cpu"), dtype=torch.float32)
    return Mixer(loaded, LoraLibrary(library_root))


def service_over(mixer, folder: Path):
    """A StyleMixService on `mixer` with an empty workspace under `folder` (the app's actions, no model load)."""
    from stylemix.paths import Workspace
    from stylemix.service import StyleMixService

    ws = Workspace.at(folder)
    for p in (ws.loras, ws.data, ws.jobs, ws.outputs):
        p.mkdir(parents=True)
    return StyleMixService(mixer=mixer, workspace=ws, banner="")


def counting_mixer_class():
    """A Mixer subclass that counts its `generate` calls in the class attribute `calls` (reset it before use)."""
    from stylemix.mixer import Mixer

    class Counting(Mixer):
        calls = 0

        def generate(self, recipe, progress=None):
            Counting.calls += 1
            return super().generate(recipe, progress)

    return Counting
