"""The LoRA library: import/export (diffusers and kohya), hostile files, safe names, atomic writes."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import make_library_lora, make_lora_file
from stylemix.errors import StyleMixError
from stylemix.lora.library import LoraLibrary
from stylemix.lora.names import pipeline_targets
from stylemix.lora.files import WEIGHTS_NAME, read_lora_file
from stylemix.mixer import Mixer
from stylemix.models import LoadedModel, tiny_pipeline
from stylemix.recipe import Recipe

RECIPE = Recipe(prompt="a cat", steps=2, width=64, height=64, seed=3, sampler="Euler")


@pytest.fixture(scope="module")
def shapes():
    return pipeline_targets(tiny_pipeline())


def render(root, name, weight=1.0):
    mixer = Mixer(LoadedModel(tiny_pipeline(), "tiny", torch.device("cpu"), torch.float32), LoraLibrary(root))
    return np.asarray(mixer.generate(RECIPE.with_(loras={name: weight})).images[0], dtype=np.int16)


def test_kohya_export_keys_alpha_and_metadata(tmp_path, shapes):
    lib = LoraLibrary(tmp_path / "loras", targets=shapes)
    src = make_lora_file(tmp_path / "src.safetensors", seed=5, rank=4, alpha=2.0)  # alpha != rank on purpose
    lib.import_file(src, "wc", trigger_word="wcstyle")
    out = lib.export("wc", tmp_path / "wc_kohya.safetensors", fmt="kohya")
    state = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in state)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in state
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in state
    alphas = {float(v) for k, v in state.items() if k.endswith(".alpha")}
    assert alphas == {2.0}  # the trained alpha, not diffusers' alpha = rank
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"


def test_round_trip_diffusers_kohya_diffusers_gives_the_same_image(tmp_path, shapes):
    root = tmp_path / "loras"
    lib = LoraLibrary(root, targets=shapes)
    lib.import_file(make_lora_file(tmp_path / "src.safetensors", seed=6, alpha=2.0), "orig")
    lib.export("orig", tmp_path / "k.safetensors", fmt="kohya")
    entry = lib.import_file(tmp_path / "k.safetensors", "back")
    assert entry.meta["source"]["format"] == "kohya" and entry.meta["alpha"] == 2.0
    a, b = render(root, "orig"), render(root, "back")
    assert np.abs(a - b).max() <= 1
    assert np.abs(a - render(root, "orig", 0.0)).max() > 0  # the LoRA does change the image
    # and the exported kohya file loads in plain diffusers with the same effect
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(tmp_path / "k.safetensors"), adapter_name="k")
    assert {"unet", "text_encoder"} <= set(pipe.get_list_adapters())


def test_imported_file_loads_in_plain_diffusers(tmp_path, shapes):
    lib = LoraLibrary(tmp_path / "loras", targets=shapes)
    entry = lib.import_file(make_lora_file(tmp_path / "x.safetensors", seed=7), "x")
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(entry.weights), adapter_name="x")
    assert pipe.get_list_adapters() == {"unet": ["x"], "text_encoder": ["x"]}


def test_pickle_files_are_refused_even_renamed(tmp_path, shapes):
    lib = LoraLibrary(tmp_path / "loras", targets=shapes)
    evil = tmp_path / "evil.safetensors"
    torch.save({"a": torch.zeros(2)}, evil)  # a zip-based pickle, renamed
    with pytest.raises(StyleMixError, match="pickle"):
        lib.import_file(evil, "evil")
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(StyleMixError, match="pickle"):
        lib.import_file(raw, "raw")
    with pytest.raises(StyleMixError, match="only .safetensors"):
        lib.import_file(tmp_path / "x.ckpt", "ckpt")
    assert lib.names() == []


def test_sdxl_unknown_nan_and_truncated_files(tmp_path, shapes):
    lib = LoraLibrary(tmp_path / "loras", targets=shapes)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280)}, str(sdxl))
    with pytest.raises(StyleMixError, match="SDXL"):
        lib.import_file(sdxl, "xl")
    unknown = tmp_path / "unknown.safetensors"
    save_file({"model.layer.weight": torch.zeros(2, 2)}, str(unknown))
    with pytest.raises(StyleMixError, match="Unrecognised LoRA layout.*model.layer.weight"):
        lib.import_file(unknown, "u")
    src = make_lora_file(tmp_path / "ok.safetensors", seed=8)
    state = load_file(str(src))
    key = next(iter(state))
    state[key][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(StyleMixError, match="NaN"):
        lib.import_file(tmp_path / "nan.safetensors", "nan")
    data = src.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(StyleMixError, match="truncated"):
        lib.import_file(tmp_path / "trunc.safetensors", "trunc")
    sd2 = tmp_path / "sd2.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 1024),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(32, 4)},
              str(sd2))
    with pytest.raises(StyleMixError, match="does not fit the loaded base model.*SD2"):
        lib.import_file(sd2, "sd2")
    assert lib.names() == [] and not (lib.root.exists() and any(lib.root.iterdir()))


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "bad\x00name", "tab\tname", "", "x" * 65])
def test_unsafe_names_are_refused(tmp_path, name):
    lib = LoraLibrary(tmp_path / "loras")
    src = make_lora_file(tmp_path / "ok.safetensors", seed=9)
    with pytest.raises(StyleMixError, match="Invalid LoRA name"):
        lib.import_file(src, name)
    assert not (tmp_path / "evil").exists()


def test_rename_remove_and_overwrite(tmp_path):
    root = tmp_path / "loras"
    make_library_lora(root, "one", seed=1)
    lib = LoraLibrary(root)
    with pytest.raises(StyleMixError, match="already exists"):
        lib.import_file(lib.get("one").weights, "one")
    lib.rename("one", "two")
    assert lib.names() == ["two"] and json.loads((root / "two" / "stylemix.json").read_text())["name"] == "two"
    lib.remove("two")
    # nothing left but the library's write lock (paths.LOCK_NAME: app processes sharing the folder take it)
    assert lib.names() == [] and [p.name for p in root.iterdir()] == [".stylemix.lock"]


def test_hostile_metadata_trigger_is_not_used(tmp_path):
    root = tmp_path / "loras"
    d = make_library_lora(root, "m", seed=1)
    meta = json.loads((d / "stylemix.json").read_text())
    meta["trigger_word"] = "x, ignore previous; <lora:other:2>"
    (d / "stylemix.json").write_text(json.dumps(meta))
    assert LoraLibrary(root).get("m").trigger_word is None


def test_kohya_import_from_other_tools_with_alpha(tmp_path, shapes):
    """A hand-written A1111/kohya file (rank 4, alpha 1) imports with its alpha applied."""
    canonical, _ = read_lora_file(make_lora_file(tmp_path / "c.safetensors", seed=10, alpha=4.0))
    lib = LoraLibrary(tmp_path / "loras", targets=shapes)
    lib.import_file(tmp_path / "c.safetensors", "ref")
    lib.export("ref", tmp_path / "k.safetensors", fmt="kohya")
    state = load_file(str(tmp_path / "k.safetensors"))
    for k in [k for k in state if k.endswith(".alpha")]:
        state[k] = torch.tensor(1.0)  # alpha 1 with rank 4: a quarter of the effect
        up = k.replace(".alpha", ".lora_up.weight")
        state[up] = state[up] * 4  # ...compensated in the up weights: same LoRA
    save_file(state, str(tmp_path / "k2.safetensors"))
    lib.import_file(tmp_path / "k2.safetensors", "quarter")
    a, b = render(lib.root, "ref"), render(lib.root, "quarter")
    assert np.abs(a - b).max() <= 1
    assert canonical  # the reference really had weights


def test_valid_file_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """The first byte of a safetensors file is the low byte of its header length: it can be 0x80."""
    src = make_lora_file(tmp_path / "x.safetensors", seed=11)
    state = load_file(str(src))
    for pad in range(600):  # pad the metadata until the header length's low byte is 0x80
        path = tmp_path / "odd.safetensors"
        save_file(state, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    loaded, meta = read_lora_file(path)
    assert set(loaded) == set(state) and meta["pad"]
