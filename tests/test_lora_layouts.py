"""Every SD1.5 LoRA layout in use: imported, described, mixed exactly, exported, or refused clearly.

Files are built in each tool's own layout (tests/layout_files.py; LyCORIS files by LyCORIS
itself), and each layer's ΔW is rebuilt from the raw file tensors by the test's own code.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from layout_files import LDM_NAMES, kohya_lora, layer_modules, lycoris_file, reference_deltas
from stylemix.errors import StyleMixError
from stylemix.lora.library import LoraLibrary
from stylemix.lora.names import pipeline_targets
from stylemix.lora.names import kohya_names, ldm_to_diffusers, resolve_kohya, sd15_targets
from stylemix.mixer import Mixer
from stylemix.models import LoadedModel, tiny_pipeline
from stylemix.recipe import Recipe

RECIPE = Recipe(prompt="a cat", steps=2, width=64, height=64, seed=3, sampler="Euler")


def setup(tmp_path):
    pipe = tiny_pipeline()
    lib = LoraLibrary(tmp_path / "loras", targets=pipeline_targets(pipe))
    mixer = Mixer(LoadedModel(pipe, "tiny", torch.device("cpu"), torch.float32), lib)
    # the layers as plain modules, and their weights, before any LoRA touches them (peft wraps them later)
    modules = layer_modules(pipe, attn=True, conv=True, te=True)
    mixer.test_layers = (modules, {p: m.weight.detach().clone() for p, m in modules.items()})
    return pipe, lib, mixer


def assert_mix_exact(pipe, mixer, weights: dict[str, float], deltas: dict[str, dict[str, torch.Tensor]]):
    """After the mix is applied, every affected layer's weight is W + Σ wᵢ·ΔWᵢ (fp32 rounding)."""
    modules, originals = mixer.test_layers
    mixer.set_weights(weights)
    mixer.apply()
    affected = set().union(*(deltas[n].keys() for n in weights))
    assert affected
    for p in affected:
        w = modules[p].weight.detach()
        expected = originals[p].double().reshape(w.shape[0], -1)
        for name, wt in weights.items():
            if p in deltas[name]:
                expected = expected + wt * deltas[name][p].double()
        torch.testing.assert_close(w.reshape(w.shape[0], -1).double(), expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{p}: {m}")


def image(mixer, weights):
    return np.asarray(mixer.generate(RECIPE.with_(loras=weights)).images[0], dtype=np.int16)


def base_image():
    pipe = tiny_pipeline()
    mixer = Mixer(LoadedModel(pipe, "tiny", torch.device("cpu"), torch.float32), LoraLibrary("/nonexistent"))
    return image(mixer, {})


def test_kohya_networks_lora_and_locon_with_blockwise_dims_mix_exactly(tmp_path):
    pipe, lib, mixer = setup(tmp_path)
    # kohya's default networks.lora: every attention/ff Linear, the 1x1 proj_in/proj_out convs and the text
    # encoder's attention and MLP; block-wise dims and alphas, some layers without an alpha (alpha = rank)
    rank = lambda p: 2 if ".ff." in p else (8 if p.startswith("text_encoder") else 4)  # noqa: E731
    alpha = lambda p: None if "attn2" in p else (1.0 if ".ff." in p else 3.0)  # noqa: E731
    f1, m1 = kohya_lora(tmp_path / "kohya.safetensors", pipe, seed=1, rank=rank, alpha=alpha,
                        metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4",
                                  "ss_base_model_version": "sd_v1", "ss_sd_model_name": "v1-5-pruned.safetensors",
                                  "ss_output_name": "watercolor",
                                  "ss_tag_frequency": json.dumps({"10_wc": {"wcstyle": 12, "a cat": 3}})})
    # a LoCon: also the resnets' 3x3 convs, shortcuts, time embedding projections and samplers, with
    # LyCORIS's CP decomposition (lora_mid) on the 3x3 convs
    f2, m2 = kohya_lora(tmp_path / "locon.safetensors", pipe, seed=2, rank=4, alpha=2.0, conv_rank=3, conv=True,
                        te=False, cp=True, dtype=torch.bfloat16)
    e1 = lib.import_file(f1, "watercolor")
    e2 = lib.import_file(f2, "locon")
    s1, s2 = e1.summary(), e2.summary()
    assert (s1["kind"], s1["covers"], s1["ranks"]) == ("LoRA", ["UNet attention", "text encoder"], [2, 4, 8])
    assert (s2["kind"], s2["covers"], s2["ranks"]) == ("LoCon", ["UNet all"], [3, 4])
    assert s1["trigger_word"] == "wcstyle" and s1["made_for"] == "v1-5-pruned.safetensors"
    assert s1["kohya"]["ss_output_name"] == "watercolor" and s1["kohya"]["ss_tag_frequency"]["wcstyle"] == 12
    assert e1.compatible and e2.compatible
    deltas = {"watercolor": reference_deltas(f1, m1), "locon": reference_deltas(f2, m2)}
    assert any("resnets" in p for p in deltas["locon"]) and any("samplers" in p for p in deltas["locon"])
    assert_mix_exact(pipe, mixer, {"watercolor": 0.7, "locon": -0.4}, deltas)
    assert_mix_exact(pipe, mixer, {"watercolor": 1.3, "locon": 0.5}, deltas)  # re-weighting stays exact

    base = base_image()
    mix = image(mixer, {"watercolor": 0.7, "locon": 0.6})
    assert np.abs(mix - base).max() > 0
    assert np.abs(image(mixer, {"watercolor": 0.7, "locon": 0.2}) - mix).max() > 0
    assert np.array_equal(image(mixer, {"watercolor": 0.0, "locon": 0.0}), base)


def test_lycoris_loha_and_lokr_files_mix_exactly(tmp_path):
    pipe, lib, mixer = setup(tmp_path)
    made = tiny_pipeline()  # LyCORIS wraps the modules it trains: make the files on another pipeline
    f1, m1, own1 = lycoris_file(tmp_path / "loha.safetensors", made, "loha", seed=3, use_tucker=True)
    f2, m2, own2 = lycoris_file(tmp_path / "lokr.safetensors", tiny_pipeline(), "lokr", seed=4, factor=4,
                                decompose_both=True, use_tucker=True)
    deltas = {"loha": reference_deltas(f1, m1), "lokr": reference_deltas(f2, m2)}
    # our reading of the file is LyCORIS's own: its modules' ΔW equal the test's rebuild from the file
    for own, mapping, name in ((own1, m1, "loha"), (own2, m2, "lokr")):
        for lora_name, d in own.items():
            torch.testing.assert_close(d.reshape(d.shape[0], -1), deltas[name][mapping[lora_name]],
                                       rtol=1e-4, atol=1e-5)
    assert any(k.endswith("hada_t1") for k in load_file(str(f1)))  # Tucker (CP) convs are in the file
    assert any(k.endswith("lokr_t2") for k in load_file(str(f2)))
    s1, s2 = lib.import_file(f1, "loha").summary(), lib.import_file(f2, "lokr").summary()
    assert s1["kind"] == "LoHa" and s2["kind"] == "LoKr"
    assert s1["covers"] == ["UNet all", "text encoder"] and s1["ranks"] == [4]
    assert_mix_exact(pipe, mixer, {"loha": 0.8, "lokr": 0.5}, deltas)
    assert np.abs(image(mixer, {"loha": 0.8, "lokr": 0.5}) - base_image()).max() > 0
    assert np.array_equal(image(mixer, {"loha": 0.0, "lokr": 0.0}), base_image())


def test_ldm_names_unet_only_text_encoder_only_and_older_diffusers(tmp_path):
    pipe, lib, mixer = setup(tmp_path)
    f1, m1 = kohya_lora(tmp_path / "a1111.safetensors", pipe, seed=5, rank=4, alpha=4.0, conv=True, te=False,
                        names=LDM_NAMES)
    assert set(m1) == {f"lora_unet_{k}" for k in LDM_NAMES}
    f2, m2 = kohya_lora(tmp_path / "te.safetensors", pipe, seed=6, rank=4, alpha=1.0, attn=False)
    # older diffusers: attention processors (`…processor.to_q_lora.down.weight`) and `lora_linear_layer`
    g = torch.Generator().manual_seed(7)
    old, m3 = {}, {}
    for p, m in layer_modules(pipe, attn=True, conv=False, te=True).items():
        if p.endswith(("attn1.to_q", "attn2.to_v")):
            mod = p[: -len(".to_q")] if p.endswith("to_q") else p[: -len(".to_v")]
            proc = f"{mod}.processor.{p.rsplit('.', 1)[1]}_lora"
            old[f"{proc}.down.weight"] = torch.randn(4, m.in_features, generator=g)
            old[f"{proc}.up.weight"] = torch.randn(m.out_features, 4, generator=g)
            m3[p] = old[f"{proc}.up.weight"].double() @ old[f"{proc}.down.weight"].double()
        elif p.endswith("layers.0.self_attn.q_proj"):
            old[f"{p}.lora_linear_layer.down.weight"] = torch.randn(4, m.in_features, generator=g)
            old[f"{p}.lora_linear_layer.up.weight"] = torch.randn(m.out_features, 4, generator=g)
            m3[p] = old[f"{p}.lora_linear_layer.up.weight"].double() @ old[f"{p}.lora_linear_layer.down.weight"].double()
    save_file(old, str(tmp_path / "old.safetensors"))
    s1 = lib.import_file(f1, "a1111").summary()
    s2 = lib.import_file(f2, "te").summary()
    s3 = lib.import_file(tmp_path / "old.safetensors", "old").summary()
    assert s1["covers"] == ["UNet all"] and s2["covers"] == ["text encoder"] and s3["kind"] == "LoRA"
    deltas = {"a1111": reference_deltas(f1, m1), "te": reference_deltas(f2, m2), "old": {k: v.float() for k, v in m3.items()}}
    assert_mix_exact(pipe, mixer, {"a1111": 0.6, "te": 1.0, "old": 0.3}, deltas)


def test_exports_round_trip_and_load_in_plain_diffusers(tmp_path):
    pipe, lib, mixer = setup(tmp_path)
    made = tiny_pipeline()
    f1, m1, _ = lycoris_file(tmp_path / "loha.safetensors", made, "loha", seed=8, use_tucker=True)
    f2, m2 = kohya_lora(tmp_path / "locon.safetensors", pipe, seed=9, rank=lambda p: 2 if "conv" in p else 4,
                        alpha=3.0, conv=True)
    lib.import_file(f1, "loha")
    lib.import_file(f2, "locon")
    for name, (f, m) in {"loha": (f1, m1), "locon": (f2, m2)}.items():
        ref = reference_deltas(f, m)
        for fmt in ("kohya", "diffusers"):
            out = lib.export(name, tmp_path / f"{name}-{fmt}.safetensors", fmt=fmt)
            back = lib.import_file(out, f"{name}-{fmt}")
            assert back.meta["source"]["format"] == fmt
            _, lib2, mixer2 = setup(tmp_path / f"{name}-{fmt}")
            lib2.import_file(out, "x")
            assert_mix_exact(mixer2.pipe, mixer2, {"x": 1.0}, {"x": ref})
        # the library's canonical file loads in a fresh plain diffusers pipeline, per-layer ranks included
        fresh = tiny_pipeline()
        modules = layer_modules(fresh, attn=True, conv=True, te=True)  # before peft wraps them
        before = {p: modules[p].weight.detach().clone() for p in ref}
        fresh.load_lora_weights(str(lib.get(name).weights), adapter_name="x")
        fresh.fuse_lora(lora_scale=1.0, adapter_names=["x"])
        for p, d in ref.items():
            w = modules[p].weight.detach()
            torch.testing.assert_close(w.reshape(w.shape[0], -1), before[p].reshape(w.shape[0], -1) + d,
                                       rtol=1e-4, atol=1e-5)


def _kohya_pair(pipe, path="unet.down_blocks.0.attentions.0.proj_in"):
    m = layer_modules(pipe, conv=True)[path]
    name = "lora_unet_" + path[len("unet."):].replace(".", "_")
    return name, {f"{name}.lora_down.weight": torch.randn(4, m.in_channels, 1, 1),
                  f"{name}.lora_up.weight": torch.randn(m.out_channels, 4, 1, 1), f"{name}.alpha": torch.tensor(4.0)}


@pytest.mark.parametrize("case, message", [
    ("truncated_loha", "missing one of its hada_w"),
    ("no_module", "matches no layer of the SD1.5"),
    ("wrong_shape", "does not fit the loaded base model"),
    ("sdxl_and_sd15", "mixes SDXL keys"),
    ("sdxl_ldm", "for SDXL"),
    ("nan_factor", "NaN"),
    ("up_without_down", "no lora_down weight"),
    ("kohya_dora", "DoRA.*not a weighted sum"),
    ("peft_dora", "DoRA.*not a weighted sum"),
    ("oft", "OFT"),
])
def test_bad_files_are_refused_with_one_message_and_nothing_written(tmp_path, case, message):
    pipe, lib, _ = setup(tmp_path)
    name, state = _kohya_pair(pipe)
    if case == "truncated_loha":
        q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        state = {f"{q}.hada_w1_a": torch.randn(32, 2), f"{q}.hada_w1_b": torch.randn(2, 32),
                 f"{q}.hada_w2_a": torch.randn(32, 2), f"{q}.alpha": torch.tensor(2.0)}
    elif case == "no_module":
        state = {k.replace("down_blocks_0", "down_blocks_7"): v for k, v in state.items()}
    elif case == "wrong_shape":
        state[f"{name}.lora_down.weight"] = torch.randn(4, 768, 1, 1)
    elif case == "sdxl_and_sd15":
        state["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(4, 32)
        state["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(4, 32)
    elif case == "sdxl_ldm":
        state = {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.randn(4, 640),
                 "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight": torch.randn(640, 4)}
    elif case == "nan_factor":
        state[f"{name}.lora_up.weight"][0, 0, 0, 0] = float("nan")
    elif case == "up_without_down":
        del state[f"{name}.lora_down.weight"]
    elif case == "kohya_dora":
        state[f"{name}.dora_scale"] = torch.ones(1, 32, 1, 1)
    elif case == "peft_dora":
        p = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        state = {f"{p}.lora_A.weight": torch.randn(4, 32), f"{p}.lora_B.weight": torch.randn(32, 4),
                 f"{p}.lora_magnitude_vector": torch.ones(32)}
    elif case == "oft":
        state = {f"{name}.oft_blocks": torch.randn(4, 8, 8), f"{name}.alpha": torch.tensor(1.0)}
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(StyleMixError, match=message) as err:
        lib.import_file(tmp_path / "bad.safetensors", "bad")
    assert "\n" not in str(err.value)
    assert lib.names() == [] and not (lib.root.exists() and any(lib.root.iterdir()))


def test_every_sd15_layer_has_one_kohya_and_one_ldm_name():
    """On the full-size SD1.5 architecture: each attention, resnet and sampler layer is reachable under its
    kohya name and its LDM name, and no two names meet on one layer."""
    targets = sd15_targets()
    table = kohya_names(targets)
    unet = [k for k in targets if k.startswith("unet.") and (".attentions." in k or ".resnets." in k or "samplers" in k)]
    assert len(unet) > 250  # 16 attention blocks x 12 layers, 22 resnets, 6 samplers
    for key in unet:
        assert resolve_kohya("lora_unet_" + key[len("unet."):].replace(".", "_"), table) == key
    from stylemix.lora.names import _all_ldm_names

    mapped = [ldm_to_diffusers(n) for n in _all_ldm_names()]
    hits = [f"unet.{m}" for m in mapped if m is not None and f"unet.{m}" in targets]
    assert len(hits) == len(set(hits))
    assert set(unet) <= set(hits)
    for ldm, diff in LDM_NAMES.items():
        assert resolve_kohya(f"lora_unet_{ldm}", table) == f"unet.{diff}"
    # the text encoder under both transformers' module names
    te = "text_encoder.text_model.encoder.layers.11.mlp.fc2"
    assert resolve_kohya("lora_te_text_model_encoder_layers_11_mlp_fc2", table) == te
    assert resolve_kohya("lora_te_encoder_layers_11_mlp_fc2", table) == te


def test_full_size_sd2_shapes_are_named(tmp_path):
    """A LoRA for SD2 (1024-wide text context) is refused against SD1.5 widths, saying why."""
    lib = LoraLibrary(tmp_path / "loras", targets=sd15_targets())
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{k}.lora_down.weight": torch.zeros(4, 1024), f"{k}.lora_up.weight": torch.zeros(320, 4)},
              str(tmp_path / "sd2.safetensors"))
    with pytest.raises(StyleMixError, match="SD2"):
        lib.import_file(tmp_path / "sd2.safetensors", "sd2")


def test_cli_imports_a_lycoris_file_lists_it_and_generates_with_it(tmp_path, capsys):
    from stylemix.cli import main

    f, _, _ = lycoris_file(tmp_path / "loha.safetensors", tiny_pipeline(), "loha", seed=10)
    root = tmp_path / "loras"
    args = ["--model", "tiny", "--loras-dir", str(root)]
    assert main(args + ["loras", "import", str(f), "--name", "ink", "--trigger", "inkstyle"]) == 0
    capsys.readouterr()
    assert main(args + ["loras", "list", "--check", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert (entry["name"], entry["kind"], entry["covers"], entry["compatible"]) == (
        "ink", "LoHa", ["UNet all", "text encoder"], True)
    assert entry["kohya"]["ss_network_module"] == "lycoris.kohya"
    out = tmp_path / "ink.png"
    assert main(args + ["generate", "a cat", "--lora", "ink=0.8", "--steps", "2", "--size", "64x64",
                        "--out", str(out), "--no-score"]) == 0
    assert out.is_file()


def test_diffusers_kohya_export_with_lora_te1_names_imports_as_sd15(tmp_path):
    """diffusers' own `convert_state_dict_to_kohya` writes an SD1.5 LoRA with `lora_te1_` text-encoder keys
    (SDXL's name): it is still an SD1.5 LoRA, and imports exactly."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    from helpers import make_lora_file

    pipe, lib, mixer = setup(tmp_path)
    peft_state = load_file(str(make_lora_file(tmp_path / "peft.safetensors", seed=11, rank=4, alpha=4.0)))
    kohya = convert_state_dict_to_kohya(peft_state)
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(tmp_path / "k.safetensors"))
    modules = layer_modules(pipe, attn=True, conv=True, te=True)
    mapping = {}
    for p in modules:
        comp, _, rest = p.partition(".")
        mapping[("lora_unet_" if comp == "unet" else "lora_te1_") + rest.replace(".", "_")] = p
    entry = lib.import_file(tmp_path / "k.safetensors", "dk")
    assert entry.summary()["covers"] == ["UNet attention", "text encoder"]
    assert_mix_exact(pipe, mixer, {"dk": 0.9}, {"dk": reference_deltas(tmp_path / "k.safetensors", mapping)})


def test_mix_export_and_clash_map_of_conv_layouts(tmp_path):
    """A mix of a LoCon and a LoHa exports as one LoRA that reproduces the live mix exactly, and the clash
    map reads their conv layers."""
    from stylemix.experiments.clash import clash_map
    from stylemix.experiments.mix_export import export_mix, write_mix

    pipe, lib, mixer = setup(tmp_path)
    f1, m1 = kohya_lora(tmp_path / "locon.safetensors", pipe, seed=12, rank=3, alpha=2.0, conv=True, cp=True)
    f2, m2, _ = lycoris_file(tmp_path / "loha.safetensors", tiny_pipeline(), "loha", seed=13, use_tucker=True)
    lib.import_file(f1, "locon")
    lib.import_file(f2, "loha")
    out = write_mix(export_mix(lib, {"locon": 0.5, "loha": -0.7}), tmp_path / "mix.safetensors")
    _, lib2, mixer2 = setup(tmp_path / "two")
    lib2.import_file(out, "mix")
    d1, d2 = reference_deltas(f1, m1), reference_deltas(f2, m2)
    expected = {p: 0.5 * d1.get(p, 0) + -0.7 * d2.get(p, 0) for p in set(d1) | set(d2)}
    assert_mix_exact(mixer2.pipe, mixer2, {"mix": 1.0}, {"mix": expected})
    cmap = clash_map(lib, "locon", "loha")
    assert any("resnets" in layer.module for layer in cmap.layers) and cmap.overall is not None
