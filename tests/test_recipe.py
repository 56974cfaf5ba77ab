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
