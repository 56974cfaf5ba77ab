"""Real checkpoints (SD1.5, CLIP ViT-B-32): downloaded from the Hub, so skipped by default.

Run with `.venv/bin/pytest -m slow`: they run when the weights are cached or the hub can be reached
(tests/conftest.py), and skip with the reason otherwise.
"""

import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_model():
    import conftest
    from stylemix.models import ModelLoadError, load_model

    # Offline (conftest: default runs, or an unreachable hub) the cached checkpoint is still used.
    try:
        return load_model(os.environ.get("STYLEMIX_REAL_MODEL", "stable-diffusion-v1-5/stable-diffusion-v1-5"))
    except ModelLoadError as e:
        pytest.skip(f"{e} ({conftest.HUB_UNREACHABLE})" if conftest.HUB_UNREACHABLE else str(e))


def test_real_sd15_mix_relations(real_model, tmp_path):
    """A LoRA trained on nothing but random init still moves the real model's image, exactly undone at 0."""
    import torch
    from peft import LoraConfig

    from stylemix.lora.library import LoraLibrary
    from stylemix.lora.files import TEXT_TARGETS, UNET_TARGETS, save_lora_weights
    from stylemix.mixer import Mixer
    from stylemix.models import tiny_components  # noqa: F401  (same code path as tiny)
    from stylemix.recipe import Recipe

    pipe = real_model.pipe
    unet = type(pipe.unet).from_config(pipe.unet.config)
    te = type(pipe.text_encoder)(pipe.text_encoder.config)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=UNET_TARGETS), "x")
    te.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=TEXT_TARGETS), "x")
    (tmp_path / "loras" / "rand").mkdir(parents=True)
    save_lora_weights(tmp_path / "loras" / "rand" / "pytorch_lora_weights.safetensors", unet, te, "x")
    mixer = Mixer(real_model, LoraLibrary(tmp_path / "loras"))
    r = Recipe("a cat sitting by a window", steps=10, seed=1)
    img = lambda **k: np.asarray(mixer.generate(r.with_(**k)).images[0], dtype=np.int16)  # noqa: E731
    base, a, b = img(), img(loras={"rand": 0.1}), img(loras={"rand": 0.05})
    assert np.abs(a - base).max() > 0 and np.abs(a - b).max() > 0
    assert np.array_equal(img(loras={"rand": 0.0}), base)


def test_real_clip_scores_are_on_the_reports_scale(real_model):
    from stylemix.scores.clip_models import load_scorer_or_reason
    from stylemix.mixer import Mixer
    from stylemix.lora.library import LoraLibrary
    from stylemix.recipe import Recipe
    from stylemix.scores.scoring import clip_scores

    scorer, why = load_scorer_or_reason(device=real_model.device)
    if scorer is None:
        pytest.skip(why)
    mixer = Mixer(real_model, LoraLibrary("/nonexistent-loras"))
    image = mixer.generate(Recipe("a cat sitting by a window", steps=20, seed=1)).images[0]
    score = clip_scores(scorer, [image], "a cat sitting by a window")[0]
    assert 0.2 < score < 0.4  # the seed report's base model: 0.31 with ViT-B-32
