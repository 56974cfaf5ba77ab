"""Service-level checks of the one-implementation-per-concern code, without gradio or a model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from stylemix.compose import MAX_RECIPE_JSON_BYTES, read_recipe_file
from stylemix.datasets.prepare import load_captions, load_dataset_folder, with_trigger
from stylemix.errors import StyleMixError
from stylemix.experiments.protocol import ProtocolResult
from stylemix.datasets.images import IMAGE_EXTENSIONS, is_image_name
from stylemix.scores.judge import load_styles


def test_experiment_summary_comes_back_as_data_even_with_commas():
    summary = [{"config": "a", "prompt": "a cat, by a window", "clip_mean": 0.25, "n": 2, "lo": None}]
    result = ProtocolResult(Path("."), 1, 1, 0, {}, {}, True, summary, "# md")
    header, rows = result.summary_table()
    assert header == ["config", "prompt", "clip_mean", "n", "lo"]
    assert rows == [["a", "a cat, by a window", "0.250000", "2", ""]]


def test_recipe_file_json_is_read_and_capped(tmp_path):
    good = tmp_path / "r.json"
    good.write_text(json.dumps({"prompt": "a cat", "seed": 3}))
    assert read_recipe_file(good).seed == 3
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"prompt": "x" * (MAX_RECIPE_JSON_BYTES + 10)}))
    with pytest.raises(StyleMixError, match="not a readable recipe JSON"):
        read_recipe_file(big)  # cut at the cap: never read whole, so not valid JSON


def test_one_trigger_rule():
    assert with_trigger("knyflt", "a cat") == "knyflt, a cat"
    assert with_trigger("knyflt", "Knyflt, a cat") == "knyflt, a cat"
    assert with_trigger("", " a cat ") == " a cat "  # no trigger: the caption as it is


def test_one_image_extension_list():
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"} == set(IMAGE_EXTENSIONS)
    assert is_image_name("A.PNG") and not is_image_name("a.txt")


def test_both_dataset_readers_share_one_parser(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{not json\n')
    for read in (load_captions, load_dataset_folder):
        with pytest.raises(StyleMixError, match="line 2: not valid JSON"):
            read(tmp_path)


def test_style_loading_raises_or_notes_problems(tmp_path):
    def get(name):
        if name == "gone":
            raise StyleMixError("No LoRA 'gone'.")
        return SimpleNamespace(trigger_word=f"{name}word", folder=tmp_path / name)

    library = SimpleNamespace(get=get)
    found = load_styles(library, ["a", "gone"], "tiny-clip", cache={}, keep_going=True)
    assert found.triggers == ["aword"] and found.missing == ["a"] and found.problems == ["gone: No LoRA 'gone'."]
    with pytest.raises(StyleMixError, match="No LoRA"):
        load_styles(library, ["gone"], "tiny-clip")
    with pytest.raises(StyleMixError, match="no style centroid"):
        load_styles(library, ["a"], "tiny-clip", require=True)


def test_first_page_banner_is_one_line_with_details_folded():
    """The model's state is one line; a load failure's raw error is a detail (as text), never in that line."""
    from stylemix.models import load_model
    from stylemix.service import model_banner
    from ui.home import start_here

    tiny = load_model("tiny", "cpu", "fp32")
    reason = ("Cannot load base model 'sd15' (OSError: We couldn't connect to 'https://huggingface.co' to load "
              "the files, and couldn't find them in the cached files.). Check the name and your connection.")
    line, details = model_banner(tiny, reason, examples=True, on_zero_gpu=False)
    assert "\n" not in line and "OSError" not in line and "could not be loaded" in line and "demo" in line
    assert "OSError: We couldn't connect" in details[0]  # the reason, whole, as the first detail
    assert any("kenney_flat" in d for d in details) and any("--model" in d for d in details)
    line, details = model_banner(tiny, None, examples=False, on_zero_gpu=False)
    assert "\n" not in line and "random weights" in line and not any("kenney_flat" in d for d in details)
    assert "Compose" in start_here(["kenney_flat", "pixel_city"]) and "`kenney_flat`" in start_here(["kenney_flat"])
    assert "Dataset" in start_here([]) and "kenney" not in start_here([])


def test_demo_captions_are_marked_as_random_words(workspace, tmp_path):
    import numpy as np
    from PIL import Image

    from stylemix.service import StyleMixService

    service = StyleMixService.start("tiny", workspace, examples=False)
    rng = np.random.default_rng(1)
    files = []
    for i in range(3):
        files.append(tmp_path / f"i{i}.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(files[-1])
    service.prepare_dataset("u" + "7" * 24, [str(f) for f in files], "demoset", "zqxdemo", 64, "off", 0.0)
    view = service.dataset_view("u" + "7" * 24, "demoset")
    assert view["captioner"] == "tiny" and view["captioner_is_demo"] is True
