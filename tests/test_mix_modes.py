"""Mixing over time on the tiny model with real peft LoRAs: schedules, switch and composite change what
the U-Net computes at each step exactly as the compiled table says (stylemix/schedules.py, mixer.py)."""

import numpy as np
import pytest
import torch

from helpers import make_library_lora
from stylemix.lora.library import LoraLibrary
from stylemix.mixer import Mixer
from stylemix.models import LoadedModel, tiny_pipeline
from stylemix.recipe import Recipe, read_recipe, save_png
from stylemix.schedules import compile_plan

STYLES = ["anime", "watercolor", "pixelart"]
BASE = Recipe(prompt="a cat sitting by a window", steps=6, width=64, height=64, seed=3, sampler="Euler",
              add_trigger_words=False)


@pytest.fixture(scope="module")
def mixer(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    for i, name in enumerate(STYLES):
        make_library_lora(root, name, seed=300 + i, alpha=2.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (restored after this module: later tests compare images made with the default)
    loaded = LoadedModel(pipe=tiny_pipeline(), model_id="tiny", device=torch.device("cpu"), dtype=torch.float32)
    yield Mixer(loaded, LoraLibrary(root))
    torch.set_num_threads(threads)


def render(mixer, **changes):
    result = mixer.generate(BASE.with_(**changes))
    return np.asarray(result.images[0], dtype=np.int16), result


def test_constant_schedule_equals_the_plain_mix_bit_for_bit(mixer):
    plain, _ = render(mixer, loras={"anime": 0.7, "watercolor": 0.4})
    const, result = render(mixer, prompt=BASE.prompt + " <lora:anime:0.7@0,0.7@1> <lora:watercolor:0.4@0,0.4@5>")
    assert np.array_equal(plain, const)
    assert result.timings["schedule_rewrites"] == 0


def test_a_schedule_changes_the_image_and_the_recorded_weights_are_the_table(mixer):
    plain, _ = render(mixer, loras={"anime": 1.0})
    ramp, result = render(mixer, loras={"anime": 1.0}, schedules={"anime": "0@0,1@1"})
    assert np.abs(plain - ramp).max() > 0
    expected = compile_plan(result.recipe).table()
    assert result.step_weights == expected  # recorded by the step callback, not recomputed
    assert [w["anime"] for w in result.step_weights] == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert result.timings["schedule_rewrites"] == 5
    late, _ = render(mixer, loras={"anime": 1.0}, schedules={"anime": "start=3"})
    assert np.abs(late - plain).max() > 0 and np.abs(late - ramp).max() > 0


def test_off_for_every_step_is_the_base_image(mixer):
    base, _ = render(mixer)
    never, result = render(mixer, loras={"anime": 1.0}, schedules={"anime": "stop=0"})  # off from step 0
    assert np.array_equal(base, never)
    assert result.te_weights == {"anime": 0.0}  # the text encoder takes the first step's weight
    assert result.step_weights == [{"anime": 0.0}] * BASE.steps


def test_switch_with_k_at_least_the_steps_is_the_first_lora_alone(mixer):
    first, _ = render(mixer, loras={"watercolor": 0.8})
    switched, result = render(mixer, loras={"watercolor": 0.8, "pixelart": 0.9}, mode="switch", switch_every=6)
    assert np.array_equal(first, switched)
    assert all(w == {"watercolor": 0.8, "pixelart": 0.0} for w in result.step_weights)
    rotating, result = render(mixer, loras={"watercolor": 0.8, "pixelart": 0.9}, mode="switch", switch_every=2)
    assert [w["pixelart"] for w in result.step_weights] == [0, 0, 0.9, 0.9, 0, 0]
    assert not np.array_equal(rotating, switched)


def count_unet_passes(mixer):
    calls = []
    handle = mixer.pipe.unet.conv_in.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_composite_with_one_lora_equals_merge_and_runs_one_pass_per_lora(mixer):
    merged, _ = render(mixer, loras={"anime": 0.9})
    calls, handle = count_unet_passes(mixer)
    try:
        single, result = render(mixer, loras={"anime": 0.9}, mode="composite")
        assert len(calls) == BASE.steps and result.unet_passes == 1
        calls.clear()
        three, result = render(mixer, loras={"anime": 0.9, "watercolor": 0.5, "pixelart": 0.7}, mode="composite")
        assert len(calls) == 3 * BASE.steps and result.unet_passes == 3
    finally:
        handle.remove()
    assert np.abs(single - merged).max() <= 1  # within fp32 rounding (one pass, mean over one)
    mixed, _ = render(mixer, loras={"anime": 0.9, "watercolor": 0.5, "pixelart": 0.7})
    assert np.abs(three - mixed).max() > 0  # composite is not the merge
    assert mixer.pipe.unet._compiled_call_impl is None  # the U-Net is handed back as it was


def test_composite_averages_the_lora_predictions(mixer):
    """One step of composite equals the mean of the single-LoRA predictions, each at its weight."""
    unet, latents = mixer.pipe.unet, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, mixer.pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    recipe = BASE.with_(loras={"anime": 0.9, "watercolor": -0.5}, mode="composite").validate()
    plan = compile_plan(recipe)
    with torch.no_grad():
        singles = []
        for name, w in plan.row(0).items():
            mixer.set_weights({name: w}, te_weights=plan.te)
            mixer.apply()
            singles.append(unet(latents, 500, encoder_hidden_states=text, return_dict=False)[0])
        now = {"step": 0, "passes": 0}
        with mixer.lock, mixer._composite_unet(plan, {}, {}, now):
            out = unet(latents, 500, encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(out, (singles[0] + singles[1]) / 2, rtol=1e-5, atol=1e-6)
    assert now["passes"] == 2


def test_a_scheduled_png_loads_back_to_the_same_recipe_and_image(mixer, tmp_path):
    recipe = BASE.with_(prompt=BASE.prompt + " <lora:anime:0@0,1@0.5:interp=cosine> <lora:pixelart:0.6:step=1-4>",
                        mode="switch", switch_every=2)
    first, result = render(mixer, **{k: getattr(recipe, k) for k in ("prompt", "mode", "switch_every")})
    path = save_png(result.images[0], tmp_path / "x.png", result.recipe, result.prompt_used)
    loaded = read_recipe(path)
    assert loaded.schedules == result.recipe.schedules and loaded.mode == "switch"
    again = np.asarray(mixer.generate(loaded).images[0], dtype=np.int16)
    assert np.array_equal(first, again)


def test_previews_follow_the_same_fractions(mixer):
    from stylemix.preview import PreviewConfig, Previewer

    recipe = BASE.with_(steps=12, loras={"anime": 1.0}, schedules={"anime": "0@0,1@11:start=3"}).validate()
    previewer = Previewer(mixer, PreviewConfig(steps=4, taesd=None, fewstep_lora=None))
    cheap, _, _ = previewer.preview_recipe(recipe)
    assert cheap.steps == 4 and cheap.schedules == {"anime": "unet=0@0,1@1:start=0.2727272727"}
    out = previewer.preview(recipe)
    # step 1 of 4 sits at 1/3 of the render, past start=3 of 12 steps (3/11): on
    assert out is not None and [round(w["anime"], 3) for w in out.result.step_weights] == [0, 0.333, 0.667, 1.0]


def test_batched_merge_equals_per_layer_merge_and_nothing_is_kept_per_mix(mixer):
    """The GPU path (one baddbmm per group of layers) and the CPU path (one addmm per layer) write the
    same weights; neither keeps a stack per set of active LoRAs (that cache grew with every new mix)."""
    import dataclasses

    weights = {"anime": 0.7, "watercolor": -0.3, "pixelart": 1.1}

    def merged_weights():
        mixer.restore_base_weights()
        mixer.set_weights(weights)
        mixer.apply()
        return {l.key: l.module.get_base_layer().weight.detach().clone() for l in mixer._layers if l.want}

    cpu = merged_weights()
    real = mixer.loaded
    try:
        mixer.loaded = dataclasses.replace(real, device=torch.device("meta"))  # any non-CPU type takes the batched path
        batched = merged_weights()
    finally:
        mixer.loaded = real
    assert cpu.keys() == batched.keys() and len(cpu) > 0
    for key in cpu:
        torch.testing.assert_close(batched[key], cpu[key], rtol=1e-6, atol=1e-6)
    before = len(vars(mixer)), sum(len(v) for v in vars(mixer).values() if isinstance(v, (dict, list)))
    for i in range(12):  # twelve different mixes, each merged
        mixer.set_weights({n: 0.1 * (i + 1) * (j + 1) % 1.5 for j, n in enumerate(STYLES)})
        mixer.apply()
    after = len(vars(mixer)), sum(len(v) for v in vars(mixer).values() if isinstance(v, (dict, list)))
    assert after == before
