"""PNG recipes: A1111 `parameters` plus StyleMix JSON, written and read back; hostile PNGs."""

import json
import zlib

import pytest
from PIL import Image, PngImagePlugin

from stylemix.errors import StyleMixError
from stylemix.recipe import Recipe, a1111_parameters, parse_a1111_parameters, read_recipe, save_png

RECIPE = Recipe(prompt="a cat by a window", negative_prompt="blurry", loras={"watercolor": 0.6, "pixelart": 0.4},
                seed=1234, steps=20, guidance=7.0, width=512, height=768, sampler="Euler a", model="tiny",
                lora_hashes={"watercolor": "abcdef012345", "pixelart": "0123456789ab"},
                block_weights={"pixelart": {"up": 0.5}})


def test_png_round_trip_restores_the_exact_recipe(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", RECIPE, prompt_used="wcstyle, a cat by a window")
    assert read_recipe(path) == RECIPE
    text = Image.open(path).text["parameters"]
    assert text.splitlines()[0] == "wcstyle, a cat by a window <lora:watercolor:0.6> <lora:pixelart:0.4>"
    assert text.splitlines()[1] == "Negative prompt: blurry"
    assert "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x768, Model: tiny" in text
    assert 'Lora hashes: "watercolor: abcdef012345, pixelart: 0123456789ab"' in text


def test_a1111_parameters_from_other_tools_are_read():
    text = ("masterpiece, a castle <lora:ghibli_v2:0.8>\nNegative prompt: lowres, bad hands\n"
            "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 42, Size: 512x512, Model hash: abc, "
            'Model: v1-5, Lora hashes: "ghibli_v2: 1234"')
    r = parse_a1111_parameters(text)
    assert (r.prompt, r.negative_prompt, r.loras) == ("masterpiece, a castle", "lowres, bad hands", {"ghibli_v2": 0.8})
    assert (r.steps, r.guidance, r.seed, r.sampler, r.width) == (30, 6.5, 42, "DPM++ 2M Karras", 512)
    assert parse_a1111_parameters(a1111_parameters(RECIPE)).loras == RECIPE.loras


def hostile_png(tmp_path, key, value):
    info = PngImagePlugin.PngInfo()
    info.add_text(key, value)
    path = tmp_path / "h.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("payload,match", [
    ({"version": 1, "recipe": {"prompt": "x", "loras": {"../../etc": 1.0}}}, "Invalid LoRA name"),
    ({"version": 1, "recipe": {"prompt": "x", "loras": {"a": 1e9}}}, r"\[-2, 2\]"),
    ({"version": 1, "recipe": {"prompt": "x", "steps": 10**9}}, "steps"),
    ({"version": 1, "recipe": {"prompt": "x", "width": 1_000_000}}, "width"),
    ({"version": 1, "recipe": ["not", "a", "dict"]}, "no recipe"),
    ({"version": 1}, "no recipe"),
])
def test_hostile_stylemix_chunks_are_refused(tmp_path, payload, match):
    with pytest.raises(StyleMixError, match=match):
        read_recipe(hostile_png(tmp_path, "stylemix", json.dumps(payload)))


def test_oversized_broken_and_missing_chunks(tmp_path):
    with pytest.raises(StyleMixError, match="too large"):
        read_recipe(hostile_png(tmp_path, "stylemix", "x" * 300_000))
    with pytest.raises(StyleMixError, match="unusable"):
        read_recipe(hostile_png(tmp_path, "stylemix", "{not json"))
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    with pytest.raises(StyleMixError, match="carries no StyleMix or A1111 recipe"):
        read_recipe(plain)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + zlib.compress(b"garbage"))
    with pytest.raises(StyleMixError, match="not an image"):
        read_recipe(junk)


# --------------------------------------------------------------------------- limits: one check for the CLI and the app


@pytest.mark.parametrize("changes,message", [
    ({"steps": 100000}, "steps 100000 must be an integer from 1 to 150."),
    ({"steps": 2.5}, "steps 2.5 must be an integer from 1 to 150."),
    ({"seed": None}, "seed (empty) must be an integer in [0, 2^63)."),
    ({"seed": -1}, "seed -1 must be an integer in [0, 2^63)."),
    ({"guidance": 50.0}, "guidance 50 must be a number from 0 to 30."),
    ({"loras": {"watercolor": 5}}, "weight of LoRA 'watercolor' is 5; it must be a number in [-2, 2]."),
    ({"loras": {"watercolor": None}}, "weight of LoRA 'watercolor' is (empty); it must be a number in [-2, 2]."),
    ({"width": 60}, "width 60 must be a multiple of 8 from 64 to 2048."),
])
def test_bad_values_are_named_with_their_limits(changes, message):
    with pytest.raises(ValueError) as e:
        Recipe(prompt="a cat", **changes).validate()
    assert str(e.value) == message


def test_sizes_and_whole_numbers_from_forms():
    from stylemix.recipe import parse_size, whole_number

    assert parse_size("512x768") == (512, 768) and parse_size(" 64 X 64 ") == (64, 64)
    for bad in ("abc", "", None, "5x5x5", "64x"):
        with pytest.raises(ValueError, match=r"^size .*: write it as WIDTHxHEIGHT, e\.g\. 512x512\.$"):
            parse_size(bad)
    assert whole_number(25.0) == 25 and isinstance(whole_number(25.0), int)
    assert whole_number(2.5) == 2.5 and whole_number(None) is None and whole_number(True) is True


@pytest.mark.parametrize("cli_args,field,value", [
    (["--steps", "100000"], "steps", 100000),
    (["--guidance", "50"], "guidance", 50),
    (["--seed", "-1"], "seed", -1),
    (["--size", "abc"], "size", "abc"),
    (["--lora", "watercolor=5"], "weights", '{"watercolor": 5}'),
])
def test_the_app_refuses_what_the_cli_refuses_in_the_same_words(capsys, cli_args, field, value):
    from stylemix.cli import main
    from ui.compose_tab import compose_recipe

    assert main(["generate", "a cat", *cli_args]) == 1
    cli = capsys.readouterr().err.strip().removeprefix("stylemix: error: ").removeprefix("--")
    form = dict(prompt_="a cat", negative_="", weights_json="{}", seed_value=1, steps_=2, size_="64x64",
                sampler_="Euler", guidance_=7.5, strength_=0, triggers_=True, blocks_="")
    form[{"steps": "steps_", "guidance": "guidance_", "seed": "seed_value", "size": "size_",
          "weights": "weights_json"}[field]] = value
    with pytest.raises(ValueError) as e:
        compose_recipe(**form)
    assert str(e.value) == cli
