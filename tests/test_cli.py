"""The `stylemix` command line: results, JSON output, exit codes and one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from helpers import make_library_lora, make_lora_file
from stylemix.cli import main
from stylemix.recipe import read_recipe


@pytest.fixture
def loras(tmp_path):
    root = tmp_path / "loras"
    make_library_lora(root, "watercolor", seed=1, trigger="wcstyle")
    make_library_lora(root, "pixelart", seed=2, trigger="pixstyle")
    return root


def cli(tmp_path, loras, *args):
    return main(["--model", "tiny", "--loras-dir", str(loras), *args])


def test_generate_writes_png_with_recipe_and_json(tmp_path, loras, capsys):
    out = tmp_path / "img.png"
    code = cli(tmp_path, loras, "generate", "a cat", "--lora", "watercolor=0.6", "--lora", "pixelart=0.4",
               "--steps", "2", "--size", "64x64", "--seed", "5", "--out", str(out), "--no-score", "--json")
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == [str(out)] and result["tiny_model"] is True
    assert result["prompt_used"] == "wcstyle, pixstyle, a cat"
    recipe = read_recipe(out)
    assert recipe.loras == {"watercolor": 0.6, "pixelart": 0.4} and recipe.seed == 5 and recipe.model == "tiny"
    blocked = tmp_path / "blocked.png"
    assert cli(tmp_path, loras, "generate", "a cat", "--lora", "watercolor=0.6", "--lora", "pixelart=0.4",
               "--block", "pixelart:up=0", "--steps", "2", "--size", "64x64", "--seed", "5", "--out", str(blocked),
               "--no-score") == 0
    assert read_recipe(blocked).block_weights == {"pixelart": {"up": 0.0}}
    assert set(recipe.lora_hashes) == {"watercolor", "pixelart"}
    # --from reproduces the image from its own PNG
    again = tmp_path / "again.png"
    assert cli(tmp_path, loras, "generate", "--from", str(out), "--out", str(again), "--no-score") == 0
    from PIL import Image
    assert Image.open(out).tobytes() == Image.open(again).tobytes()


def test_generate_batch(tmp_path, loras, capsys):
    out = tmp_path / "b.png"
    assert cli(tmp_path, loras, "generate", "a dog", "--batch", "2", "--steps", "1", "--size", "64x64",
               "--out", str(out), "--no-score") == 0
    assert (tmp_path / "b-1.png").is_file() and (tmp_path / "b-2.png").is_file()
    assert read_recipe(tmp_path / "b-2.png").seed == 1


@pytest.mark.parametrize("args,message", [
    (["generate", "x", "--lora", "watercolor=lots"], "the weight .lots. is not a number"),
    (["generate", "x", "--lora", "watercolor=3"], r"\[-2, 2\]"),
    (["generate", "x", "--lora", "missing=0.5", "--steps", "1", "--size", "64x64", "--no-score"], "No LoRA named 'missing'"),
    (["generate", "x", "--size", "big"], "WIDTHxHEIGHT"),
    (["generate", "x", "--size", "100x100"], "multiple of 8"),
    (["generate"], "Give a prompt"),
    (["generate", "x", "--block", "watercolor:sideways=0.5"], "unknown block 'sideways'"),
    (["generate", "x", "--block", "watercolor=0.5"], "LORA:BLOCK=MULTIPLIER"),
    (["loras", "show", "../etc"], "Invalid LoRA name"),
    (["loras", "import", "nowhere.safetensors", "--name", "x", "--no-check"], "neither a file nor a Hub repo"),
])
def test_user_mistakes_are_one_line_and_exit_1(tmp_path, loras, capsys, args, message):
    assert cli(tmp_path, loras, *args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("stylemix: error:")]) == 1
    assert any(__import__("re").search(message, line) for line in err), err


def test_loras_import_list_export_remove(tmp_path, loras, capsys):
    src = make_lora_file(tmp_path / "new.safetensors", seed=3)
    assert cli(tmp_path, loras, "loras", "import", str(src), "--name", "new", "--trigger", "nwstyle") == 0
    assert cli(tmp_path, loras, "loras", "list", "--check", "--json") == 0
    capsys.readouterr()
    assert cli(tmp_path, loras, "loras", "list", "--json") == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"new", "watercolor", "pixelart"} and listed["new"]["trigger_word"] == "nwstyle"
    assert cli(tmp_path, loras, "loras", "export", "new", str(tmp_path / "k.safetensors"), "--format", "kohya") == 0
    assert (tmp_path / "k.safetensors").stat().st_size > 0
    assert cli(tmp_path, loras, "loras", "remove", "new") == 0
    assert not (loras / "new").exists()


def test_subprocess_exit_codes_and_no_traceback(tmp_path, loras):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad_model = subprocess.run([sys.executable, "-m", "stylemix.cli", "--model", str(tmp_path / "nomodel"),
                                "--loras-dir", str(loras), "generate", "x", "--no-score"],
                               capture_output=True, text=True, env=env, timeout=300)
    assert bad_model.returncode == 1
    assert "Traceback" not in bad_model.stderr and "--model tiny" in bad_model.stderr
    usage = subprocess.run([sys.executable, "-m", "stylemix.cli", "frobnicate"], capture_output=True, text=True,
                           timeout=300)
    assert usage.returncode == 2


def test_generate_with_schedules_and_modes_reports_each_steps_weights(tmp_path, loras, capsys):
    out = tmp_path / "sched.png"
    code = cli(tmp_path, loras, "generate", "a cat", "--lora", "watercolor=0@0,1@1:interp=hold",
               "--lora", "pixelart=0.5:start=2", "--mode", "switch", "--switch-every", "2", "--steps", "4",
               "--size", "64x64", "--seed", "5", "--out", str(out), "--no-score", "--json")
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    # switch: watercolor (held at 0 until the last keyframe) on steps 0-1, pixelart (on from step 2) on 2-3
    assert result["step_weights"] == [{"watercolor": 0.0, "pixelart": 0.0}] * 2 + [{"watercolor": 0.0, "pixelart": 0.5}] * 2
    recipe = read_recipe(out)
    assert recipe.schedules == {"watercolor": "unet=0@0,1@1:interp=hold", "pixelart": "start=2"}
    assert (recipe.mode, recipe.switch_every) == ("switch", 2)
    assert cli(tmp_path, loras, "generate", "a cat", "--lora", "watercolor=1", "--preset", "style late",
               "--steps", "4", "--size", "64x64", "--out", str(tmp_path / "late.png"), "--no-score") == 0
    assert read_recipe(tmp_path / "late.png").schedules == {"watercolor": "unet=0@0.3,1@0.6:te=1"}


@pytest.mark.parametrize("args, message", [
    (["--lora", "watercolor=1@0.5,0@0.1"], "--lora 'watercolor=1@0.5,0@0.1': keyframes out of order"),
    (["--lora", "watercolor=0@0,1@9"], "schedule of LoRA 'watercolor': keyframe at step 9 is beyond the render's 2 steps"),
    (["--lora", "watercolor=1:te=0@0,1@1"], "the text encoder runs once per prompt"),
    (["--lora", "watercolor=1", "--mode", "switch", "--switch-every", "0"], "switch_every 0 must be"),
    (["--mode", "composite"], "composite mode needs at least one LoRA"),
])
def test_bad_schedules_are_one_line_errors_before_any_render(tmp_path, loras, capsys, args, message):
    code = cli(tmp_path, loras, "generate", "a cat", "--steps", "2", "--size", "64x64", "--no-score",
               "--out", str(tmp_path / "x.png"), *args)
    assert code != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
