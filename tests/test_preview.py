"""Live previews (stylemix/preview.py) and compiled renders (stylemix/accel.py) on the real tiny model.

The few-step LoRA and TAESD are the tiny model's random stand-ins, loaded and run exactly as real
ones would be (peft adapters, diffusers' AutoencoderTiny).  No timing assertions:
speed is measured in bench/bench_live.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from helpers import make_library_lora
from stylemix.accel import fuse_qkv, fuse_qkv_wanted
from stylemix.errors import StyleMixError
from stylemix.lora.library import LoraLibrary
from stylemix.mixer import Mixer
from stylemix.models import LoadedModel, tiny_pipeline
from stylemix.preview import FEWSTEP_ADAPTER, PreviewConfig, Previewer
from stylemix.recipe import Recipe

RECIPE = Recipe("a cat by a window", loras={"ink": 0.8, "neon": 0.3}, seed=5, steps=8, width=128, height=128,
                sampler="Euler")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    make_library_lora(root, "ink", seed=11)
    make_library_lora(root, "neon", seed=12)
    return root


def new_mixer(library) -> Mixer:
    loaded = LoadedModel(pipe=tiny_pipeline(), model_id="tiny", device=torch.device("cpu"), dtype=torch.float32)
    return Mixer(loaded, LoraLibrary(library, base_model="tiny"))


@pytest.fixture
def previewer(library) -> Previewer:
    return Previewer(new_mixer(library), PreviewConfig.from_env(tiny_model=True, env={}))


def pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def count_calls(module: torch.nn.Module) -> list:
    """A forward hook that records each call (a real hook on the real module)."""
    calls = []
    module.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls


def test_preview_is_a_cheaper_labelled_recipe(previewer):
    cheap, options, label = previewer.preview_recipe(RECIPE.with_(width=512, height=384, steps=20))
    assert (cheap.width, cheap.height, cheap.steps, cheap.guidance) == (256, 192, 4, 1.0)  # LCM: no CFG
    assert options.extra_adapters == {FEWSTEP_ADAPTER: 1.0} and options.decoder is not None
    assert label == "Preview — 4 steps, 256×192 (LCM-LoRA, TAESD)"
    assert cheap.seed == RECIPE.seed and cheap.loras == RECIPE.loras  # only the cost changes, never the mix
    # without a few-step LoRA or TAESD: fewer steps at a smaller size, the recipe's own sampler and CFG
    plain = Previewer(previewer.mixer, PreviewConfig(fewstep_lora="none", taesd="none"))
    cheap, options, label = plain.preview_recipe(RECIPE.with_(steps=20))
    assert (cheap.width, cheap.steps, cheap.guidance, cheap.sampler) == (64, 5, RECIPE.guidance, RECIPE.sampler)
    assert not options.extra_adapters and options.decoder is None and label == "Preview — 5 steps, 64×64"


def test_previews_differ_with_weights_and_use_taesd(previewer):
    vae_calls = count_calls(previewer.mixer.pipe.vae.decoder)
    first = previewer.preview(RECIPE)
    taesd_calls = count_calls(previewer._decoder.decoder)
    second = previewer.preview(RECIPE.with_(loras={"ink": 0.0, "neon": 1.2}))
    assert first.image.size == second.image.size == (64, 64)
    assert np.abs(pixels(first.image) - pixels(second.image)).max() > 0
    assert vae_calls == [] and taesd_calls == [1]  # previews decode with TAESD, never the VAE
    previewer.render_exact(RECIPE)
    assert vae_calls == [1] and taesd_calls == [1]  # the exact render uses the real VAE only
    again = previewer.preview(RECIPE.with_(loras={"ink": 0.0, "neon": 1.2}))
    assert np.array_equal(pixels(again.image), pixels(second.image))  # same mix, same preview


def test_full_render_after_previews_is_bit_identical_to_never_previewed(previewer, library):
    for w in (0.1, 0.9, 1.7):
        assert previewer.preview(RECIPE.with_(loras={"ink": w, "neon": 0.3})) is not None
    after = previewer.render_exact(RECIPE)
    never = new_mixer(library).generate(RECIPE)  # a pipeline that never loaded the few-step LoRA
    assert np.array_equal(pixels(after.images[0]), pixels(never.images[0]))


def test_fewstep_lora_runs_during_previews_only_and_never_touches_the_weights(previewer):
    mixer = previewer.mixer
    previewer.setup()
    # a layer only the few-step LoRA touches (ResNet conv): it must run during previews and never be merged
    layer = next(l for l in mixer._layers if l.name.endswith("resnets.0.conv1") and l.component == "unet")
    assert layer.adapters == {FEWSTEP_ADAPTER}
    weight = layer.module.get_base_layer().weight
    base = weight.detach().clone()
    fewstep_calls = count_calls(layer.module.lora_A[FEWSTEP_ADAPTER])
    seen = []
    mixer.pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(torch.equal(weight, base)))
    previewer.preview(RECIPE)
    assert len(fewstep_calls) == len(seen) == 4  # every preview step ran the few-step LoRA ...
    assert all(seen)  # ... on top of the base weight, never merged into it
    seen.clear()
    fewstep_calls.clear()
    previewer.render_exact(RECIPE)
    assert len(seen) == RECIPE.steps and fewstep_calls == []  # the exact render never runs it
    # no kept copy of the layers only the few-step LoRA touches: it costs no memory beyond its own weights
    assert layer.key not in mixer.state.original
    assert torch.equal(weight, base) and weight.data_ptr() == layer.module.get_base_layer().weight.data_ptr()


def test_preview_is_what_diffusers_makes_with_the_same_adapters(previewer, library):
    """The preview's mix (style LoRAs merged, few-step LoRA on peft's path) against plain diffusers
    `set_adapters` with all three, the few-step LoRA's scheduler and no CFG, decoded by the same TAESD."""
    from diffusers import LCMScheduler

    from stylemix.lora.files import WEIGHTS_NAME
    from stylemix.mixer import decode_latents
    from stylemix.models import tiny_pipeline
    from stylemix.preview import tiny_fewstep_lora

    recipe = RECIPE.with_(loras={"ink": 0.8, "neon": -0.4})
    shown = previewer.preview(recipe)
    cheap = shown.recipe
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    for name in ("ink", "neon"):
        pipe.load_lora_weights(str(library / name / WEIGHTS_NAME), adapter_name=name)
    pipe.load_lora_weights(str(tiny_fewstep_lora()), adapter_name="fewstep")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)

    def plain(fewstep_weight: float):
        pipe.set_adapters(["ink", "neon", "fewstep"], [0.8, -0.4, fewstep_weight])
        latents = pipe(shown.result.prompt_used, num_inference_steps=cheap.steps, guidance_scale=1.0,
                       width=cheap.width, height=cheap.height, output_type="latent",
                       generator=[torch.Generator("cpu").manual_seed(cheap.seed)]).images
        return pixels(decode_latents(pipe, latents, previewer._decoder)[0])

    same, without = (np.abs(pixels(shown.image) - plain(w)).astype(float) for w in (1.0, 0.0))
    assert same.max() <= 1  # merged vs unmerged style LoRAs: float rounding only (0 here)
    assert without.max() > same.max() and without.mean() > 5 * same.mean()  # the few-step LoRA does act


def test_newest_request_interrupts_an_older_preview_between_steps(previewer):
    old_recipe = RECIPE.with_(loras={"ink": 0.2})
    slow = Previewer(previewer.mixer, PreviewConfig(steps=30, fewstep_lora="tiny", taesd="tiny"))
    steps, started = [], threading.Event()

    def on_step(module, args):
        steps.append(1)
        started.set()

    slow.mixer.pipe.unet.register_forward_pre_hook(on_step)
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("old", slow.preview(old_recipe, "me")))
    t.start()
    assert started.wait(120)
    results["new"] = slow.preview(RECIPE, "me")  # a newer value on the same channel
    t.join(120)
    assert results["old"] is None and results["new"] is not None
    old_steps = len(steps) - 30  # the new preview ran all 30
    assert 1 <= old_steps < 30, old_steps  # the old one stopped between steps, well before its end
    assert slow.stats["interrupted"] == 1 and slow.stats["max_running"] == 1


def test_exact_render_stops_previews_and_a_late_preview_of_it_is_skipped(previewer):
    with previewer.exact(RECIPE, "me"):
        assert previewer.preview(RECIPE.with_(loras={"ink": 1.0}), "other") is None  # waits for nobody
    # the drag's last event, arriving after the release, would overwrite the exact image: skipped
    assert previewer.preview(RECIPE.with_(seed=99), "me") is None
    assert previewer.preview(RECIPE.with_(loras={"ink": 0.5}), "me") is not None  # a new drag previews again


def test_config_from_environment_and_errors_name_the_value():
    cfg = PreviewConfig.from_env(tiny_model=False, env={"STYLEMIX_PREVIEW_LORA": "latent-consistency/lcm-lora-sdv1-5",
                                                        "STYLEMIX_PREVIEW_TAESD": "madebyollin/taesd",
                                                        "STYLEMIX_PREVIEW_STEPS": "3"})
    assert cfg.kind().scheduler == "LCMScheduler" and cfg.taesd == "madebyollin/taesd" and cfg.steps == 3
    assert PreviewConfig.from_env(tiny_model=False, env={}).kind() is None  # absent: the plain fast path
    assert PreviewConfig.from_env(tiny_model=True, env={"STYLEMIX_PREVIEW_LORA": "none"}).kind() is None
    with pytest.raises(StyleMixError, match="my/fast-lora"):
        PreviewConfig(fewstep_lora="my/fast-lora")  # kind unknown: say which setting to add
    with pytest.raises(StyleMixError, match="'abc'"):
        PreviewConfig.from_env(tiny_model=True, env={"STYLEMIX_PREVIEW_SCALE": "abc"})
    with pytest.raises(StyleMixError, match="'fast'"):
        PreviewConfig(fewstep_lora="x/y-lcm", fewstep_kind="fast").kind()


def test_missing_preview_lora_is_a_readable_error(library):
    p = Previewer(new_mixer(library), PreviewConfig(fewstep_lora="/nonexistent/lcm.safetensors"))
    with pytest.raises(StyleMixError, match="/nonexistent/lcm.safetensors"):
        p.setup()


def test_renders_from_many_threads_run_the_model_on_one(library):
    """CUDA graphs are recorded per thread: every request's denoising loop on a compiled pipeline must
    run on its one model thread, whatever thread asked, with the asker's context (Gradio's progress bar)."""
    import contextvars

    from torch._dynamo.testing import CompileCounter

    from stylemix.accel import compile_pipeline

    mixer = new_mixer(library)
    compile_pipeline(mixer.pipe, backend=CompileCounter())  # dynamo's counting backend: runs eagerly
    ran_on = []
    mixer.pipe.unet.register_forward_pre_hook(lambda m, a: ran_on.append(threading.get_ident()))
    request = contextvars.ContextVar("request")
    seen, errors = [], []

    def ask(i):
        request.set(f"user{i}")
        try:
            mixer.generate(RECIPE.with_(steps=2, width=64, height=64, seed=i),
                           progress=lambda done, total: seen.append((request.get(None), done)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len(ran_on) == 3 * 2  # 3 renders of 2 steps (CFG's two halves go in one batch)
    assert set(ran_on) == {mixer.loaded.model_thread.ident}  # one thread ...
    assert mixer.loaded.model_thread.ident not in {t.ident for t in threads}  # ... not any asker's
    assert sorted(seen) == [(f"user{i}", d) for i in range(3) for d in (1, 2)]  # each asker's own context
    with pytest.raises(StyleMixError):  # a failure inside comes back to the asker
        mixer.loaded.model_thread.run(lambda: (_ for _ in ()).throw(StyleMixError("inside")))


def test_weight_changes_cause_no_recompile(library):
    """100 LoRA weight changes on a compiled tiny UNet: 0 new graphs, and the weights keep their storage."""
    from torch._dynamo.testing import CompileCounter

    from stylemix.accel import compile_pipeline, compile_wanted

    assert not compile_wanted(torch.device("cpu")) and compile_wanted(torch.device("cuda"))
    mixer = new_mixer(library)
    mixer.set_weights({"ink": 0.5, "neon": 0.5})
    mixer.apply()
    counter = CompileCounter()  # dynamo's own test backend: counts every graph it compiles, runs eagerly
    compile_pipeline(mixer.pipe, backend=counter, vae=False)
    x, ehs, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.tensor(500)
    weights = [layer.module.get_base_layer().weight for layer in mixer._layers]
    ptrs = [w.data_ptr() for w in weights]
    with torch.no_grad():
        before = mixer.pipe.unet(x, t, encoder_hidden_states=ehs)[0]
        graphs = counter.frame_count
        assert graphs >= 1
        for i in range(1, 101):
            mixer.set_weights({"ink": round(0.01 * i, 2), "neon": round(1 - 0.01 * i, 2)})
            assert mixer.apply() > 0
            if i % 10 == 0:  # a forward every 10 changes keeps the test short on 2 cores
                out = mixer.pipe.unet(x, t, encoder_hidden_states=ehs)[0]
    assert counter.frame_count == graphs  # no recompiles
    assert [w.data_ptr() for w in weights] == ptrs  # same storage: CUDA graphs would replay as recorded
    assert not torch.equal(out, before)  # and the compiled UNet does see the new weights


# ~190 s on a fresh 2-core machine (inductor's C++ compile, cold cache): a long run, selected with -m slow; the
# default run keeps the dynamo-level checks (test_weight_changes_cause_no_recompile, CompileCounter)
@pytest.mark.slow
def test_inductor_compiled_renders_match_eager_and_never_recompile(library, tmp_path, monkeypatch):
    """The real backend, inductor (C++ on the CPU; CUDA graphs need a GPU, bench/bench_live.py):
    compiled full renders and previews match the eager ones, and after one render of each shape
    neither 20 weight changes nor switching between previews and full renders compiles anything."""
    import shutil

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("inductor on the CPU needs a C++ compiler")
    from stylemix.accel import compile_counters, compile_pipeline

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # not the user's /tmp cache
    recipe = RECIPE.with_(steps=4, width=64, height=64)
    eager = Previewer(new_mixer(library), PreviewConfig.from_env(tiny_model=True, env={}))
    compiled = Previewer(new_mixer(library), PreviewConfig.from_env(tiny_model=True, env={}))
    compile_pipeline(compiled.mixer.pipe, mode=None)
    first_preview, first_full = compiled.preview(recipe), compiled.render_exact(recipe)  # compiles both shapes
    assert first_preview is not None
    before = compile_counters()
    assert before["graphs_compiled"] > 0  # dynamo did compile (a graph per shape and per path)
    for i in range(20):
        r = recipe.with_(loras={"ink": round(0.1 * i, 2), "neon": 0.3})
        if i % 5 == 0:
            shown, ref = compiled.preview(r), eager.preview(r)  # a drag's preview, then its release
            assert np.abs(pixels(shown.image) - pixels(ref.image)).max() <= 2
            full, ref = compiled.render_exact(r), eager.render_exact(r)
            assert np.abs(pixels(full.images[0]) - pixels(ref.images[0])).max() <= 2
        else:
            compiled.mixer.set_weights(r.loras)
            compiled.mixer.apply()
    assert compile_counters()["graphs_compiled"] == before["graphs_compiled"]  # no recompile, either kind
    assert not np.array_equal(pixels(full.images[0]), pixels(first_full.images[0]))  # the weights did reach it


# --------------------------------------------------------------------------- fused QKV (stylemix.accel.fuse_qkv)
# diffusers' fuse_qkv_projections gives each UNet attention one q/k/v (or k/v) matmul: the mixer's merge
# must land in that fused weight, and the few-step LoRA, otherwise on peft's unmerged path (which the
# fused matmul skips), must be merged there.

SMALL = RECIPE.with_(steps=6, width=64, height=64)


def new_previewer(library) -> Previewer:
    return Previewer(new_mixer(library), PreviewConfig.from_env(tiny_model=True, env={}))


def test_fused_renders_and_previews_match_unfused(library):
    plain, fused = new_previewer(library), new_previewer(library)
    fused.setup()
    fused.mixer.ensure_loaded(["ink", "neon"])
    fused.render_exact(SMALL)  # a mix merged before fusing: fusing starts from the base weights anyway
    assert fuse_qkv(fused.mixer) > 0
    attn = fused.mixer.pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    fused_weight = attn.to_qkv.weight
    assert attn.to_q.get_base_layer().weight.data_ptr() == fused_weight.data_ptr()  # a view of its rows
    for w in (0.0, 0.8, 1.6):
        r = SMALL.with_(loras={"ink": w, "neon": 0.3})
        a, b = plain.preview(r), fused.preview(r)  # a drag's preview, then its release
        assert np.abs(pixels(a.image) - pixels(b.image)).max() <= 1, w  # few-step LoRA merged when fused
        a, b = plain.render_exact(r), fused.render_exact(r)
        assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).max() <= 1, w
    # during a preview the fused rows of to_q hold W + the style LoRAs + the few-step LoRA (peft's own delta)
    seen = []
    hook = fused.mixer.pipe.unet.register_forward_pre_hook(
        lambda m, a: seen.append(fused_weight[:attn.to_q.out_features].detach().clone()))
    fewstep_calls = []
    attn.to_q.lora_A[FEWSTEP_ADAPTER].register_forward_hook(lambda m, i, o: fewstep_calls.append(1))
    assert fused.preview(SMALL.with_(loras={"ink": 1.1, "neon": 0.3})) is not None
    hook.remove()
    q, key = attn.to_q, ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    original = fused.mixer.state.original[key][1]
    expected = original + sum(q.get_delta_weight(a) for a in ("sm_" + fused.mixer._adapters["ink"][1][:16],
                                                             "sm_" + fused.mixer._adapters["neon"][1][:16],
                                                             FEWSTEP_ADAPTER))
    assert seen and torch.allclose(seen[0], expected, atol=1e-6)
    assert fewstep_calls == []  # merged, so peft's own path never ran (a fused matmul would have skipped it)
    base = fused_weight.detach().clone()
    fused.mixer.set_weights({"ink": 1.2})
    fused.mixer.apply()
    assert not torch.equal(fused_weight, base)  # a weight change lands in the fused matmul's weight
    off = fused.render_exact(SMALL.with_(loras={"ink": 0.0, "neon": 0.0}))  # zero weights: the base image
    ref = plain.render_exact(SMALL.with_(loras={"ink": 0.0, "neon": 0.0}))
    assert np.abs(pixels(off.images[0]) - pixels(ref.images[0])).max() <= 1


def test_fuse_is_opt_in_and_refused_without_merging(library, monkeypatch):
    monkeypatch.delenv("STYLEMIX_FUSE_QKV", raising=False)
    assert fuse_qkv_wanted() is False and fuse_qkv_wanted(True) is True
    monkeypatch.setenv("STYLEMIX_FUSE_QKV", "1")
    assert fuse_qkv_wanted() is True
    monkeypatch.setenv("STYLEMIX_FUSE_QKV", "maybe")
    with pytest.raises(StyleMixError, match="'maybe'"):
        fuse_qkv_wanted()
    p = new_previewer(library)
    p.mixer.merge = False
    with pytest.raises(StyleMixError, match="merged"):
        fuse_qkv(p.mixer)
