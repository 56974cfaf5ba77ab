"""The mixer's weight relations on the tiny model with real peft LoRAs (tests/helpers.py)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import make_library_lora
from stylemix.errors import StyleMixError
from stylemix.lora.library import LoraLibrary
from stylemix.mixer import Mixer, block_of
from stylemix.models import LoadedModel, tiny_pipeline
from stylemix.recipe import SAMPLERS, Recipe

STYLES = ["anime", "watercolor", "cartoon", "pixelart"]


@pytest.fixture(scope="module")
def library_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    for i, name in enumerate(STYLES):
        make_library_lora(root, name, seed=100 + i, alpha=2.0, trigger=f"{name[:3]}style")
    return root


@pytest.fixture(scope="module")
def mixer(library_root):
    loaded = LoadedModel(pipe=tiny_pipeline(), model_id="tiny", device=torch.device("cpu"), dtype=torch.float32)
    return Mixer(loaded, LoraLibrary(library_root))


BASE = Recipe(prompt="a cat sitting by a window", steps=3, width=64, height=64, seed=7, sampler="Euler")


def image(mixer, **changes):
    return np.asarray(mixer.generate(BASE.with_(**changes)).images[0], dtype=np.int16)


def test_different_weights_give_different_images(mixer):
    a = image(mixer, loras={"watercolor": 0.6, "pixelart": 0.4})
    b = image(mixer, loras={"watercolor": 0.5, "pixelart": 0.5})
    assert np.abs(a - b).max() > 0  # the seed report's identical 0.6/0.4 vs 0.5/0.5 rows
    c = image(mixer, loras={"watercolor": 0.6, "pixelart": 0.4})
    assert np.array_equal(a, c)  # same seed and weights: identical


def test_all_zero_weights_give_the_base_image_exactly(mixer, library_root):
    image(mixer, loras={n: 0.7 for n in STYLES})  # leave all four adapters active first
    zero = image(mixer, loras={n: 0.0 for n in STYLES})
    fresh = tiny_pipeline()  # a pipeline that never saw a LoRA
    base = Mixer(LoadedModel(fresh, "tiny", torch.device("cpu"), torch.float32), LoraLibrary(library_root))
    assert np.array_equal(zero, image(base))
    assert np.array_equal(zero, image(mixer))


def test_weight_zero_disables_that_lora(mixer):
    assert np.array_equal(image(mixer, loras={"anime": 0.8, "cartoon": 0.0}), image(mixer, loras={"anime": 0.8}))
    assert not np.array_equal(image(mixer, loras={"anime": 0.8, "cartoon": 0.3}), image(mixer, loras={"anime": 0.8}))


def test_four_loras_each_weight_matters_and_changes_do_not_reload(mixer, monkeypatch):
    mixer.ensure_loaded(STYLES)
    calls = []
    original = mixer.pipe.load_lora_weights
    monkeypatch.setattr(mixer.pipe, "load_lora_weights", lambda *a, **k: calls.append(a) or original(*a, **k))
    ref = {n: 0.5 for n in STYLES}
    img_ref = image(mixer, loras=ref)
    for name in STYLES:
        assert not np.array_equal(image(mixer, loras={**ref, name: -0.5}), img_ref), name
    assert calls == []
    assert sorted(mixer.loaded_names()) == sorted(STYLES)


def test_matches_diffusers_set_adapters(mixer):
    """The fast weight path computes what diffusers' own set_adapters computes."""
    weights = {"anime": 0.9, "watercolor": -0.4, "pixelart": 1.5}
    ours = image(mixer, loras=weights)
    ids = [mixer._adapters[n][0] for n in weights]
    mixer.restore_base_weights()  # hand the pipeline back to plain diffusers/peft
    mixer.pipe.set_adapters(ids, list(weights.values()))
    gen = torch.Generator().manual_seed(BASE.seed)
    pos, neg = mixer.pipe.encode_prompt("anistyle, watstyle, pixstyle, " + BASE.prompt, "cpu", 1, True)
    theirs = mixer.pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=BASE.steps,
                        width=64, height=64, generator=[gen]).images[0]
    mixer.pipe.scheduler = mixer._scheduler("Euler")
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1


def test_total_strength_scales_weights(mixer):
    scaled = mixer.generate(BASE.with_(loras={"anime": 0.9, "pixelart": 0.9}, total_strength=1.0))
    assert scaled.weights_used == pytest.approx({"anime": 0.5, "pixelart": 0.5})
    direct = image(mixer, loras={"anime": 0.5, "pixelart": 0.5})
    assert np.array_equal(np.asarray(scaled.images[0], dtype=np.int16), direct)


def test_trigger_words(mixer):
    r = mixer.generate(BASE.with_(loras={"anime": 1.0, "cartoon": 0.0, "watercolor": 0.5}))
    assert r.prompt_used == "anistyle, watstyle, " + BASE.prompt
    off = mixer.generate(BASE.with_(loras={"anime": 1.0}, add_trigger_words=False))
    assert off.prompt_used == BASE.prompt
    already = mixer.generate(BASE.with_(prompt="anistyle, a cat", loras={"anime": 1.0}))
    assert already.prompt_used == "anistyle, a cat"


def test_prompt_embeddings_are_cached(mixer, monkeypatch):
    calls = []
    original = mixer.pipe.encode_prompt
    monkeypatch.setattr(mixer.pipe, "encode_prompt", lambda *a, **k: (a[0] is not None and calls.append(a[0])) or original(*a, **k))
    prompt = "a lighthouse at dusk"
    image(mixer, prompt=prompt, loras={"anime": 0.3})
    image(mixer, prompt=prompt, loras={"anime": 0.3}, seed=8)
    assert len(calls) == 1
    image(mixer, prompt=prompt, loras={"anime": 0.4})  # text-encoder LoRA weight changed: re-encode
    assert len(calls) == 2


def test_block_weights(mixer):
    full = image(mixer, loras={"anime": 1.0})
    same = image(mixer, loras={"anime": 1.0}, block_weights={"anime": {"down": 1.0}})
    no_up = image(mixer, loras={"anime": 1.0}, block_weights={"anime": {"up": 0.0}})
    assert np.array_equal(full, same) and not np.array_equal(full, no_up)
    assert block_of("unet", "up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q") == ("OUT06", "up.2", "up")
    assert block_of("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k") == ("M00", "mid")


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_and_is_deterministic(mixer, sampler):
    a = image(mixer, sampler=sampler, loras={"cartoon": 0.7})
    assert np.array_equal(a, image(mixer, sampler=sampler, loras={"cartoon": 0.7}))


def test_bad_requests(mixer, library_root, tmp_path):
    with pytest.raises(ValueError, match="watercolor.*\\[-2, 2\\]"):
        mixer.generate(BASE.with_(loras={"watercolor": 2.5}))
    with pytest.raises(StyleMixError, match="No LoRA named 'nope'"):
        mixer.generate(BASE.with_(loras={"nope": 0.5}))
    with pytest.raises(ValueError, match="multiple of 8"):
        mixer.generate(BASE.with_(width=100))
    with pytest.raises(ValueError, match="sampler"):
        mixer.generate(BASE.with_(sampler="Heun++"))


def test_incompatible_lora_is_listed_not_offered(tmp_path):
    root = tmp_path / "loras"
    make_library_lora(root, "fits", seed=1)
    bad = root / "sd2style"
    bad.mkdir()
    # An SD2-like text-encoder LoRA: 1024-wide projections do not fit SD1.5's text encoder
    save_file({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 1024),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(1024, 4)},
              str(bad / "pytorch_lora_weights.safetensors"))
    loaded = LoadedModel(tiny_pipeline(), "tiny", torch.device("cpu"), torch.float32)
    mixer = Mixer(loaded, LoraLibrary(root))
    entries = {e.name: e for e in mixer.library.list()}
    assert entries["fits"].compatible
    assert not entries["sd2style"].compatible and "SD2" in entries["sd2style"].problem
    with pytest.raises(StyleMixError, match="cannot be used with this base model"):
        mixer.generate(BASE.with_(loras={"sd2style": 1.0}))


def test_retrained_lora_is_reloaded(tmp_path):
    root = tmp_path / "loras"
    make_library_lora(root, "style", seed=1)
    loaded = LoadedModel(tiny_pipeline(), "tiny", torch.device("cpu"), torch.float32)
    mixer = Mixer(loaded, LoraLibrary(root))
    first = image(mixer, loras={"style": 1.0})
    make_library_lora(root, "style", seed=2)  # replaced on disk, new sha256
    assert not np.array_equal(first, image(mixer, loras={"style": 1.0}))


def test_merged_and_unmerged_paths_agree_and_unmerge_is_exact(library_root):
    """merge=True writes W + sum w*s*BA into the layers; peft's unmerged path gives the same image."""
    weights = {"anime": 0.7, "watercolor": -0.3, "cartoon": 1.2, "pixelart": 0.4}
    pipe = tiny_pipeline()
    before = {n: m.weight.detach().clone() for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    merged = Mixer(LoadedModel(pipe, "tiny", torch.device("cpu"), torch.float32), LoraLibrary(library_root))
    a = image(merged, loras=weights)
    assert merged.state.merged and all(l.module.disable_adapters for l in merged._layers)
    merged.restore_base_weights()
    after = {n: getattr(pipe.unet.get_submodule(n), "base_layer", pipe.unet.get_submodule(n)).weight for n in before}
    assert all(torch.equal(before[n], after[n]) for n in before)  # the original weights, bit for bit
    plain = Mixer(LoadedModel(tiny_pipeline(), "tiny", torch.device("cpu"), torch.float32),
                  LoraLibrary(library_root), merge=False)
    b = image(plain, loras=weights)
    assert np.abs(a - b).max() <= 1
    assert not plain.state.merged


def test_weights_replaced_by_hand_under_an_old_stylemix_json_are_reloaded(tmp_path):
    import shutil

    root = tmp_path / "loras"
    import json

    from stylemix.lora.library import sha256_file

    folder = make_library_lora(root, "style", seed=1)
    meta = json.loads((folder / "stylemix.json").read_text())
    meta["sha256"] = sha256_file(folder / "pytorch_lora_weights.safetensors")  # as library-written folders have
    (folder / "stylemix.json").write_text(json.dumps(meta))
    make_library_lora(tmp_path / "other", "style", seed=2)
    loaded = LoadedModel(tiny_pipeline(), "tiny", torch.device("cpu"), torch.float32)
    mixer = Mixer(loaded, LoraLibrary(root))
    first = image(mixer, loras={"style": 1.0})
    # only the weights file changes; stylemix.json (and any sha256 in it) stays as it was
    shutil.copyfile(tmp_path / "other" / "style" / "pytorch_lora_weights.safetensors",
                    root / "style" / "pytorch_lora_weights.safetensors")
    assert not np.array_equal(first, image(mixer, loras={"style": 1.0}))


def test_a_second_mixer_on_a_shared_pipeline_renders_the_base_model_without_the_firsts_loras(library_root):
    """Two services in one process share the cached pipeline (models.load_model): a mixer that never loaded
    the LoRAs another one merged must still render the base model, not the other's mix."""
    loaded = LoadedModel(pipe=tiny_pipeline(), model_id="tiny", device=torch.device("cpu"), dtype=torch.float32)
    first = Mixer(loaded, LoraLibrary(library_root))
    base = image(first)
    assert np.abs(image(first, loras={"anime": 1.0, "watercolor": 0.7}) - base).max() > 0  # merged into the weights
    second = Mixer(loaded, LoraLibrary(library_root))
    assert np.array_equal(image(second), base)
    assert np.array_equal(image(first), base)  # and the first one takes its turn again as before
