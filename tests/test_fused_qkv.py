"""Fused QKV projections (stylemix.accel.fuse_qkv) on the real tiny model: LoRA mixing stays exact.

diffusers' `fuse_qkv_projections` gives each UNet attention one q/k/v (or k/v) matmul.  The mixer's
merge must land in that fused weight, and previews' few-step LoRA, which otherwise runs on peft's
unmerged path (skipped by the fused matmul), must be merged there.
"""

from __future__ import annotations

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

RECIPE = Recipe("a cat by a window", loras={"ink": 0.8, "neon": 0.3}, seed=5, steps=6, width=64, height=64,
                sampler="Euler")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    make_library_lora(root, "ink", seed=11)
    make_library_lora(root, "neon", seed=12)
    return root


def previewer(library) -> Previewer:
    loaded = LoadedModel(pipe=tiny_pipeline(), model_id="tiny", device=torch.device("cpu"), dtype=torch.float32)
    return Previewer(Mixer(loaded, LoraLibrary(library, base_model="tiny")),
                     PreviewConfig.from_env(tiny_model=True, env={}))


def pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_fused_renders_and_previews_match_unfused(library):
    plain, fused = previewer(library), previewer(library)
    fused.setup()
    fused.mixer.ensure_loaded(["ink", "neon"])
    fused.render_exact(RECIPE)  # a mix merged before fusing: fusing starts from the base weights anyway
    assert fuse_qkv(fused.mixer) > 0
    attn = fused.mixer.pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    fused_weight = attn.to_qkv.weight
    assert attn.to_q.get_base_layer().weight.data_ptr() == fused_weight.data_ptr()  # a view of its rows
    for w in (0.0, 0.8, 1.6):
        r = RECIPE.with_(loras={"ink": w, "neon": 0.3})
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
    assert fused.preview(RECIPE.with_(loras={"ink": 1.1, "neon": 0.3})) is not None
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
    off = fused.render_exact(RECIPE.with_(loras={"ink": 0.0, "neon": 0.0}))  # zero weights: the base image
    ref = plain.render_exact(RECIPE.with_(loras={"ink": 0.0, "neon": 0.0}))
    assert np.abs(pixels(off.images[0]) - pixels(ref.images[0])).max() <= 1


def test_fuse_is_opt_in_and_refused_without_merging(library, monkeypatch):
    monkeypatch.delenv("STYLEMIX_FUSE_QKV", raising=False)
    assert fuse_qkv_wanted() is False and fuse_qkv_wanted(True) is True
    monkeypatch.setenv("STYLEMIX_FUSE_QKV", "1")
    assert fuse_qkv_wanted() is True
    monkeypatch.setenv("STYLEMIX_FUSE_QKV", "maybe")
    with pytest.raises(StyleMixError, match="'maybe'"):
        fuse_qkv_wanted()
    p = previewer(library)
    p.mixer.merge = False
    with pytest.raises(StyleMixError, match="merged"):
        fuse_qkv(p.mixer)
