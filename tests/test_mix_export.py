"""Exact mix export: the exported file alone reproduces the live mix, in diffusers and kohya layout."""

import json

import numpy as np
import pytest
import torch

from helpers import make_library_lora
from stylemix.lora import files as lora_files
from stylemix.lora.layouts import layout
from stylemix.errors import StyleMixError
from stylemix.lora.library import LoraLibrary
from stylemix.experiments.mix_export import add_mix_to_library, compress, export_mix, mix_lora_states, write_mix
from stylemix.mixer import Mixer
from stylemix.models import LoadedModel, tiny_pipeline
from stylemix.recipe import Recipe

NAMES = ["anime", "watercolor", "cartoon", "pixelart"]
BASE = Recipe(prompt="a cat by a window", steps=2, width=64, height=64, seed=3, sampler="Euler",
              add_trigger_words=False)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    # different ranks and alphas, one without a text encoder part: the export must handle each scale
    make_library_lora(root, "anime", seed=11, rank=4, alpha=2.0)
    make_library_lora(root, "watercolor", seed=12, rank=2, alpha=8.0)
    make_library_lora(root, "cartoon", seed=13, rank=2, alpha=1.5, text_encoder=False)
    make_library_lora(root, "pixelart", seed=14, rank=4, alpha=1.0)
    return LoraLibrary(root)


@pytest.fixture(scope="module")
def mixer(library):
    loaded = LoadedModel(pipe=tiny_pipeline(), model_id="tiny", device=torch.device("cpu"), dtype=torch.float32)
    return Mixer(loaded, library)


def fresh_image(lora_file, recipe: Recipe) -> np.ndarray:
    """The exported file alone, at weight 1, in a fresh plain diffusers pipeline (no StyleMix code)."""
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora_file), adapter_name="mix")
    out = pipe(recipe.prompt, num_inference_steps=recipe.steps, guidance_scale=recipe.guidance,
               width=recipe.width, height=recipe.height, generator=[torch.Generator("cpu").manual_seed(recipe.seed)])
    return np.asarray(out.images[0], dtype=np.int16)


def live_image(mixer, recipe: Recipe) -> np.ndarray:
    return np.asarray(mixer.generate(recipe).images[0], dtype=np.int16)


@pytest.mark.parametrize("weights, blocks, fmt", [
    ({"anime": 0.7, "watercolor": 0.5}, {}, "diffusers"),
    ({"anime": 0.6, "watercolor": -0.4, "cartoon": 0.8},
     {"anime": {"down": 0.0, "up.1": 1.5, "text_encoder": 0.5}, "cartoon": {"mid": 2.0}}, "diffusers"),
    ({"anime": 0.3, "watercolor": 0.3, "cartoon": 0.5, "pixelart": 0.9}, {"pixelart": {"up": 0.5}}, "kohya"),
])
def test_exported_file_reproduces_the_live_mix(mixer, library, tmp_path, weights, blocks, fmt):
    recipe = BASE.with_(loras=weights, block_weights=blocks)
    live = live_image(mixer, recipe)
    assert np.abs(live - live_image(mixer, BASE)).max() > 8  # the mix visibly changes the image
    result = export_mix(library, weights, blocks)
    assert result.rank == sum(library.get(n).meta["rank"] for n in weights)
    assert result.relative_error == 0.0
    path = write_mix(result, tmp_path / f"mix-{fmt}.safetensors", fmt=fmt)
    state, _ = lora_files.read_lora_file(path)
    if fmt == "kohya":
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in state)
    assert np.abs(fresh_image(path, recipe) - live).max() <= 1


def test_weighted_sum_is_exact_per_layer(library):
    weights = {"anime": 0.7, "cartoon": -1.2}
    mixed, rank = mix_lora_states([(n, *lora_files.read_lora_file(library.get(n).weights)) for n in weights], weights,
                                  {"cartoon": {"up.2": 0.25}})
    assert rank == 4 + 2
    for mod, (a, b) in lora_files.lora_modules(mixed).items():
        expect = torch.zeros(b.shape[0], a.shape[1])
        for n, w in weights.items():
            state, md = lora_files.read_lora_file(library.get(n).weights)
            mods = lora_files.lora_modules(state)
            if mod in mods:
                a_i, b_i = mods[mod]
                mult = 0.25 if (n == "cartoon" and ".up_blocks.2." in mod) else 1.0
                expect += w * mult * lora_files.module_scales(md, [mod])[mod] * b_i @ a_i
        assert torch.allclose(b @ a, expect, atol=1e-6), mod


def test_svd_compression_reports_its_error(library):
    full = export_mix(library, {"anime": 0.5, "watercolor": 0.5, "pixelart": 0.5})
    assert full.rank == 10
    small = export_mix(library, {"anime": 0.5, "watercolor": 0.5, "pixelart": 0.5}, rank=3)
    assert small.rank == 3 and 0 < small.relative_error < 1 and small.worst_layer
    lossless = export_mix(library, {"anime": 0.5, "watercolor": 0.5, "pixelart": 0.5}, rank=10)
    assert lossless.relative_error == 0.0
    # the reported error is the true Frobenius error of the compressed file
    num = den = 0.0
    full_mods, small_mods = lora_files.lora_modules(full.state), lora_files.lora_modules(small.state)
    for mod, (a, b) in full_mods.items():
        a2, b2 = small_mods[mod]
        d = (b.double() @ a.double())
        num += float(((d - b2.double() @ a2.double()) ** 2).sum())
        den += float((d**2).sum())
    assert small.relative_error == pytest.approx((num / den) ** 0.5, rel=1e-4)
    # rank 10 of a rank-10 update kept as is: compression at full rank is exact
    state, rel, _, _ = compress(full.state, 10)
    for mod, (a, b) in lora_files.lora_modules(state).items():
        fa, fb = full_mods[mod]
        assert torch.allclose(b @ a, fb @ fa, atol=1e-5)


def test_mix_added_to_library_loads_as_a_lora(mixer, library):
    weights = {"watercolor": 0.8, "pixelart": 0.4}
    entry = add_mix_to_library(library, export_mix(library, weights), "wc_px_mix")
    assert entry.meta["mix"]["weights"] == weights and entry.meta["rank"] == 6
    recipe = BASE.with_(loras=weights)
    assert np.abs(live_image(mixer, BASE.with_(loras={"wc_px_mix": 1.0})) - live_image(mixer, recipe)).max() <= 1
    with pytest.raises(StyleMixError, match="already exists"):
        add_mix_to_library(library, export_mix(library, weights), "wc_px_mix")
    with pytest.raises(StyleMixError, match="watercolor"):
        add_mix_to_library(library, export_mix(library, weights), "watercolor")


def test_bad_inputs_are_refused(library, tmp_path):
    with pytest.raises(StyleMixError, match="ghost"):
        export_mix(library, {"ghost": 0.5})
    with pytest.raises(StyleMixError, match="weight 0"):
        export_mix(library, {"anime": 0.0})
    with pytest.raises(ValueError, match="anime"):
        export_mix(library, {"anime": 7.0})
    with pytest.raises(StyleMixError, match="pixelart"):
        export_mix(library, {"anime": 0.5}, {"pixelart": {"up": 0.5}})
    with pytest.raises(StyleMixError, match="rank"):
        export_mix(library, {"anime": 0.5}, rank=0)
    result = export_mix(library, {"anime": 0.5})
    with pytest.raises(StyleMixError, match="bin"):
        write_mix(result, tmp_path / "x.bin")
    with pytest.raises(StyleMixError, match="onnx"):
        write_mix(result, tmp_path / "x.safetensors", fmt="onnx")
    assert not list(tmp_path.iterdir())  # nothing written by a refused export
    header = json.loads(result.header["stylemix_mix"])
    assert header["weights"] == {"anime": 0.5}


def test_cli_mix_export_and_clash(library, tmp_path, capsys):
    from stylemix.cli import main

    g = ["--model", "tiny", "--device", "cpu", "--loras-dir", str(library.root)]
    out = tmp_path / "m.safetensors"
    assert main(g + ["mix", "export", "--lora", "anime=0.5", "--lora", "pixelart=0.5", "--block", "anime:up.1=0.5",
                     "--format", "kohya", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rank"] == 8 and info["exact"] and info["block_weights"] == {"anime": {"up.1": 0.5}}
    assert layout(lora_files.read_lora_file(out)[0]) == "kohya"
    assert main(g + ["mix", "export", "--lora", "anime=0.5", "--lora", "pixelart=0.5", "--rank", "2",
                     "--add", "small_mix"]) == 0
    assert "relative error" in capsys.readouterr().out and library.get("small_mix").meta["rank"] == 2
    assert main(g + ["mix", "export", "--lora", "anime=0.5", "--block", "anime:left=1", "--out", str(out)]) == 1
    assert "unknown block 'left'" in capsys.readouterr().err
    assert main(g + ["mix", "export", "--lora", "anime", "--out", str(out)]) == 1
    assert "NAME=NUMBER" in capsys.readouterr().err
    assert main(g + ["mix", "clash", "anime", "pixelart", "--out", str(tmp_path / "c.png")]) == 0
    assert "overall cosine" in capsys.readouterr().out and (tmp_path / "c.png").is_file()


def test_export_refuses_a_schedule_with_a_reason(tmp_path, capsys):
    from stylemix.cli import main

    code = main(["--model", "tiny", "--loras-dir", str(tmp_path / "loras"), "mix", "export", "--lora",
                 "watercolor=0@0,1@0.5", "--lora", "pixelart=0.4", "--out", str(tmp_path / "m.safetensors")])
    assert code == 1 and "a schedule cannot be baked into one LoRA file" in capsys.readouterr().err
