"""A1111 habits: <lora:name:w[:lbw=...]> prompt tags, LoRA Block Weight ids, CLI option positions."""

import json
import re

import numpy as np
import pytest

from helpers import make_library_lora, tiny_mixer
from stylemix.a1111 import (LBW_IDS, LBW_IDS_17, LBW_IDS_26, LBW_PRESETS, lbw_block, lbw_text, lbw_weights,
                            parse_prompt_tags)
from stylemix.cli import build_parser, main
from stylemix.experiments.mix_export import block_multiplier
from stylemix.mixer import block_of
from stylemix.models import tiny_components
from stylemix.recipe import (Recipe, a1111_parameters, format_block_weights, parse_a1111_parameters,
                             parse_block_weights, read_recipe)

# --------------------------------------------------------------------------- parsing


def test_tags_are_taken_out_of_the_prompt_and_tidied():
    prompt, tags = parse_prompt_tags("a cat, <lora:watercolor:0.6>, by a window <lyco:ink> <LoRA:px:-0.25>")
    assert prompt == "a cat, by a window"
    assert [(t.name, t.weight) for t in tags] == [("watercolor", 0.6), ("ink", 1.0), ("px", -0.25)]
    assert parse_prompt_tags("<lora:a:1>a cat")[0] == "a cat"
    assert parse_prompt_tags("<lora:a:1>,  a cat,<lora:b:1>")[0] == "a cat"
    assert parse_prompt_tags("a cat\n<lora:a:1>, by night")[0] == "a cat\nby night"
    # no tags: the prompt is left exactly as written (spaces, commas and all)
    assert parse_prompt_tags(" a cat ,, x <not a tag>") == (" a cat ,, x <not a tag>", [])


def test_lbw_forms_named_positional_preset_and_numbers():
    seventeen = "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"
    for tag in ("<lora:w:0.8:lbw=OUTD>", "<lora:w:0.8:lbw=outd>", "<lora:w:0.8:OUTD>", f"<lora:w:0.8:lbw={seventeen}>",
                f"<lora:w:0.8:{seventeen}>", "<lora:w:0.8:lbw=1, 0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0>"):
        _, [t] = parse_prompt_tags(f"a cat {tag}")
        assert t.weight == 0.8 and t.block_weights == lbw_weights("OUTD"), tag
    _, [t] = parse_prompt_tags("<lora:w:lbw=INS>")  # weight left out: 1, as A1111
    assert t.weight == 1.0 and t.block_weights["IN02"] == 1.0


@pytest.mark.parametrize("prompt, message", [
    ("<lora:x:3>", r"'<lora:x:3>': weight 3 is outside \[-2, 2\]"),
    ("<lora:x:-2.5>", r"weight -2.5 is outside"),
    ("<lora::1>", r"Malformed LoRA tag '<lora::1>': it names no LoRA"),
    ("<lora:x:abc>", r"LoRA tag '<lora:x:abc>': the weight 'abc' is not a number"),
    ("<lora:x:>", r"LoRA tag '<lora:x:>': a weight is empty"),
    ("a cat <lora:x:0.5", r"Malformed LoRA tag '<lora:x:0.5': it has no closing '>'"),
    ("<lora:x:1:0.5:3>", r"'<lora:x:1:0.5:3>': '3': a tag takes at most two weights"),
    ("<lora:x:1:te=0.5>", r"te is given twice"),
    ("<lora:x:te=0@0,1@1>", r"the text encoder runs once per prompt.*one number"),
    ("<lora:x:1:stop=ten>", r"stop='ten' is not a number"),
    ("<lora:x:1:dyn=8>", r"'dyn=8' is not supported"),
    ("<lora:x:1:lbw=FOO>", r"lbw='FOO': unknown preset; use one of NONE, ALL, INS"),
    ("<lora:x:1:lbw=1,0,1>", r"not 3 value\(s\)"),
    ("<lora:x:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,R>", r"'R' is not a number"),
    ("<lora:x:1:lbw=9,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0>", r"9 is outside \[-4, 4\]"),
    ("<lora:x:1> and <lora:x:0.5>", r"LoRA 'x' is tagged twice"),
    ("<lora:../../etc:1>", r"Invalid LoRA name '../../etc'"),
])
def test_bad_tags_are_clear_errors_naming_them(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt_tags(prompt)
    with pytest.raises(ValueError, match=message):  # the same through a recipe
        Recipe(prompt=prompt).validate()


def test_presets_expand_to_the_extensions_17_values():
    assert LBW_IDS_17 == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05",
                          "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
    assert len(LBW_IDS_26) == 26 and len(LBW_IDS) == 26
    expected = {"INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0", "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
                "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0", "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
                "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0", "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
                "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"}
    for name, values in expected.items():
        w = lbw_weights(name)
        assert [w[i] for i in LBW_IDS_17] == [float(v) for v in values.split(",")], name
        # the 9 ids only LoCon/LyCORIS layers have get 0 from a 17-value form, as the extension's to26 does
        assert all(w[i] == 0 for i in LBW_IDS_26 if i not in LBW_IDS_17)
        assert lbw_text(w) == values  # written back as the 17 numbers
    assert all(len(v) == 17 for v in LBW_PRESETS.values())


def test_26_value_form_sets_every_ldm_block():
    values = [round(0.1 * i, 1) for i in range(26)]
    w = lbw_weights(",".join(map(str, values)))
    assert list(w) == list(LBW_IDS_26) and [w[i] for i in LBW_IDS_26] == values
    assert w["IN00"] == 0.1 and w["IN03"] == 0.4 and w["M00"] == 1.3 and w["OUT02"] == 1.6
    assert lbw_weights(lbw_text(w)) == w


# --------------------------------------------------------------------------- module -> LBW id


def test_lbw_ids_of_the_tiny_unets_real_modules():
    unet = tiny_components()["unet"]
    names = [n for n, _ in unet.named_modules() if n]
    ids = {n: lbw_block("unet", n) for n in names}
    # attention layers: IN(1+3b+a) and OUT(3b+a), exactly the 16 U-Net ids of the 17-value form
    assert ids["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == "IN01"
    assert ids["down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"] == "IN05"
    assert ids["down_blocks.2.attentions.0.proj_in"] == "IN07"
    assert ids["mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"] == "M00"
    assert ids["up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"] == "OUT03"
    assert ids["up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_q"] == "OUT11"
    attention = {i for n, i in ids.items() if re.search(r"attentions\.\d+\.transformer_blocks\.\d+\.attn\d\.to_q$", n)}
    assert attention == set(LBW_IDS_17) - {"BASE"}
    # resnets, samplers and conv_in (LoCon/LyCORIS layers): the LDM index of the block holding them
    assert ids["conv_in"] == "IN00"
    assert ids["down_blocks.0.resnets.1.conv1"] == "IN02"
    assert ids["down_blocks.0.downsamplers.0.conv"] == "IN03"
    assert ids["down_blocks.1.resnets.0.time_emb_proj"] == "IN04"
    assert ids["down_blocks.2.downsamplers.0.conv"] == "IN09"
    assert ids["down_blocks.3.resnets.0.conv2"] == "IN10" and ids["down_blocks.3.resnets.1.conv1"] == "IN11"
    assert ids["mid_block.resnets.1.conv2"] == "M00"
    assert ids["up_blocks.0.resnets.0.conv1"] == "OUT00" and ids["up_blocks.0.resnets.2.conv_shortcut"] == "OUT02"
    assert ids["up_blocks.0.upsamplers.0.conv"] == "OUT02" and ids["up_blocks.2.upsamplers.0.conv"] == "OUT08"
    assert ids["up_blocks.3.resnets.2.time_emb_proj"] == "OUT11"
    convs = {i for n, i in ids.items() if re.search(r"(conv1|conv|conv_in)$", n)}
    assert convs == set(LBW_IDS_26) - {"BASE"}
    # outside every LDM input/middle/output block: no LBW id, so lbw= leaves them at full weight
    assert ids["time_embedding.linear_1"] is None and ids["conv_out"] is None
    assert lbw_block("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj") == "BASE"


def test_block_of_puts_the_lbw_id_first_and_mix_export_follows_it():
    assert block_of("unet", "down_blocks.1.attentions.0.proj_in") == ("IN04", "down.1", "down")
    assert block_of("unet", "down_blocks.1.downsamplers.0.conv") == ("IN06", "down.1", "down")
    assert block_of("unet", "conv_in") == ("IN00", "other")
    assert block_of("unet", "time_embedding.linear_1") == ("other",)
    assert block_of("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj") == ("BASE", "text_encoder")
    key = "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q"  # OUT05
    assert block_multiplier(key, {"up": 0.5, "up.1": 0.25, "OUT05": 0.0}) == 0.0  # the LBW id is most specific
    assert block_multiplier(key, {"up": 0.5, "OUT04": 0.0}) == 0.5
    assert block_multiplier("text_encoder.text_model.encoder.layers.0.mlp.fc1", {"BASE": 0.3}) == 0.3


def test_lbw_in_per_block_weight_text_and_recipes():
    parsed = parse_block_weights("anime:up=0.5, ink:lbw=1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0, px:IN04=0 wc:lbw=OUTS")
    assert parsed["anime"] == {"up": 0.5} and parsed["px"] == {"IN04": 0.0}
    assert parsed["ink"] == lbw_weights("OUTD") and parsed["wc"] == lbw_weights("OUTS")
    assert parse_block_weights(["ink:lbw=OUTD", "ink:text_encoder=0"])["ink"] == {**lbw_weights("OUTD"),
                                                                                   "text_encoder": 0.0}
    assert parse_block_weights(format_block_weights(parsed)) == parsed
    with pytest.raises(ValueError, match=r"unknown block 'IN12'; use .*OUT00-OUT11"):
        parse_block_weights("anime:IN12=0")
    with pytest.raises(ValueError, match="unknown block 'OUT99'"):
        Recipe(prompt="a cat", loras={"a": 1}, block_weights={"a": {"OUT99": 1}}).validate()


def test_recipe_takes_tags_json_and_a1111_text_alike():
    r = Recipe(prompt="a cat <lora:wc:0.5:lbw=IND>, <lora:px:-1>", loras={"wc": 1.0, "anime": 0.3},
               block_weights={"wc": {"up": 0}}).validate()
    assert r.prompt == "a cat" and r.loras == {"wc": 0.5, "anime": 0.3, "px": -1.0}
    assert r.block_weights == {"wc": lbw_weights("IND")}  # the tag's lbw replaces the LoRA's block weights
    assert r.validate().to_dict() == r.to_dict()  # idempotent
    j = Recipe.from_dict(json.loads(json.dumps({"prompt": "<lora:wc:0.5:lbw=IND> a cat, <lora:px:-1>",
                                                "loras": {"anime": 0.3}})))
    assert j.prompt == "a cat" and j.loras == {"anime": 0.3, "wc": 0.5, "px": -1.0}
    p = parse_a1111_parameters("a cat <lora:wc:0.5:lbw=IND> <lora:px:-1>\nNegative prompt: dog\n"
                               "Steps: 3, Sampler: Euler, CFG scale: 7, Seed: 9, Size: 64x64")
    assert p.prompt == "a cat" and p.loras == {"wc": 0.5, "px": -1.0} and p.block_weights == j.block_weights
    text = a1111_parameters(j)
    assert "<lora:wc:0.5:lbw=1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0> <lora:px:-1>" in text
    back = parse_a1111_parameters(text)
    assert back.loras == {"anime": 0.3, "wc": 0.5, "px": -1.0} and back.block_weights == j.block_weights
    with pytest.raises(ValueError, match="weight 7 is outside"):
        Recipe.from_dict({"prompt": "a cat <lora:wc:7>"})


# --------------------------------------------------------------------------- real behaviour on the tiny model

STYLES = ["anime", "watercolor"]


@pytest.fixture(scope="module")
def library_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    for i, name in enumerate(STYLES):
        make_library_lora(root, name, seed=300 + i, trigger=f"{name[:3]}style")
    return root


@pytest.fixture(scope="module")
def mixer(library_root):
    return tiny_mixer(library_root)


BASE = Recipe(prompt="a cat sitting by a window", steps=3, width=64, height=64, seed=5, sampler="Euler",
              add_trigger_words=False)


def image(mixer, **changes):
    result = mixer.generate(BASE.with_(**changes))
    return np.asarray(result.images[0], dtype=np.int16), result


def test_a_prompt_tag_sets_the_weight_like_recipe_loras(mixer):
    tagged, res = image(mixer, prompt="a cat sitting <lora:watercolor:0.7>, by a window", loras={"watercolor": 0.1})
    plain, _ = image(mixer, prompt="a cat sitting, by a window", loras={"watercolor": 0.7})
    assert np.array_equal(tagged, plain)
    assert res.prompt_used == "a cat sitting, by a window" and res.weights_used == {"watercolor": 0.7}
    assert "<lora" not in res.recipe.prompt and res.recipe.loras == {"watercolor": 0.7}
    other, _ = image(mixer, prompt="a cat sitting, by a window", loras={"watercolor": 0.1})
    assert not np.array_equal(tagged, other)


def test_lbw_base_only_changes_just_the_text_encoder_and_all_zero_is_the_base_image(mixer):
    base, _ = image(mixer)
    full, _ = image(mixer, prompt=BASE.prompt + " <lora:anime:1>")
    base_only = ",".join(["1"] + ["0"] * 16)
    te_only, res = image(mixer, prompt=BASE.prompt + f" <lora:anime:1:lbw={base_only}>")
    coarse, _ = image(mixer, loras={"anime": 1.0}, block_weights={"anime": {"down": 0, "mid": 0, "up": 0}})
    assert np.array_equal(te_only, coarse)  # the U-Net part is off, the text-encoder part on
    assert not np.array_equal(te_only, base) and not np.array_equal(te_only, full)
    assert res.recipe.block_weights["anime"]["BASE"] == 1.0
    zero, _ = image(mixer, prompt=BASE.prompt + " <lora:anime:1:lbw=NONE>")
    zero26, _ = image(mixer, prompt=BASE.prompt + " <lora:anime:1.5:lbw=" + ",".join(["0"] * 26) + ">")
    assert np.array_equal(zero, base) and np.array_equal(zero26, base)  # bit for bit
    outd, _ = image(mixer, prompt=BASE.prompt + " <lora:anime:1:lbw=OUTD>")
    coarse_outd, _ = image(mixer, loras={"anime": 1.0}, block_weights={
        "anime": {"down": 0, "mid": 0, "up.0": 0, "up.1": 1, "up.2": 0, "up.3": 0,
                  "OUT06": 1}})  # OUTD: BASE and OUT03-OUT06 (up_blocks.1 and up_blocks.2.attentions.0)
    assert np.array_equal(outd, coarse_outd)


def test_unknown_tag_name_lists_the_known_loras(mixer):
    with pytest.raises(Exception, match=r"No LoRA named 'nope'.*known: anime, watercolor"):
        image(mixer, prompt="a cat <lora:nope:0.5>")


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv", [
    ["--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--loras-dir", "L", "generate", "a cat"],
    ["generate", "a cat", "--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--loras-dir", "L"],
    ["--model", "x", "--loras-dir", "other", "generate", "--model", "tiny", "a cat", "--device", "cpu",
     "--dtype", "fp32", "--loras-dir", "L"],  # after the subcommand wins
])
def test_global_options_before_or_after_the_subcommand(argv):
    args = build_parser().parse_args(argv)
    assert (args.model, args.device, args.dtype, args.loras_dir) == ("tiny", "cpu", "fp32", "L")
    assert args.prompt == "a cat"


def test_global_options_defaults_and_nested_subcommands():
    args = build_parser().parse_args(["generate", "a cat"])
    assert (args.model, args.device, args.dtype, args.loras_dir, args.safety_checker) == (None,) * 4 + (False,)
    args = build_parser().parse_args(["loras", "list", "--loras-dir", "L"])
    assert args.loras_dir == "L"


def test_cli_generate_with_options_after_and_a_tag_in_the_prompt(tmp_path, library_root, capsys):
    out = tmp_path / "tag.png"
    code = main(["generate", "a cat <lora:watercolor:0.7:lbw=OUTS>", "--model", "tiny", "--loras-dir",
                 str(library_root), "--steps", "2", "--size", "64x64", "--out", str(out), "--no-score", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_used"] == "watstyle, a cat" and result["weights_used"] == {"watercolor": 0.7}
    recipe = read_recipe(out)
    assert recipe.prompt == "a cat" and recipe.loras == {"watercolor": 0.7}
    assert recipe.block_weights == {"watercolor": lbw_weights("OUTS")}
    assert main(["generate", "a cat <lora:nope:1>", "--model", "tiny", "--loras-dir", str(library_root),
                 "--steps", "1", "--size", "64x64", "--out", str(tmp_path / "x.png"), "--no-score"]) == 1
    err = capsys.readouterr().err
    assert "No LoRA named 'nope'" in err and "anime, watercolor" in err
    assert main(["generate", "a cat <lora:watercolor:9>", "--model", "tiny", "--loras-dir", str(library_root),
                 "--no-score"]) == 1
    assert "'<lora:watercolor:9>': weight 9 is outside [-2, 2]" in capsys.readouterr().err
