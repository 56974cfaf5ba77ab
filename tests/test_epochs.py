"""Comparing the epochs of one LoRA (stylemix/experiments/epochs.py) on the tiny model: 64 px, 1 step.

Versions are library LoRAs named `<name>@eNN`.  The experiment itself takes its versions as
(epoch, library name), so most tests pass ordinary names; the service tests use real `@eNN`
names and need the library to list them (see `versions_listed`).
"""

import json
from pathlib import Path

import pytest

from helpers import make_library_lora, tiny_mixer
from stylemix.errors import StyleMixError
from stylemix.experiments.epochs import find_versions, parse_version, run_epochs, version_name

SETTINGS = {"steps": 1, "width": 64, "height": 64, "sampler": "Euler"}


@pytest.fixture(scope="module")
def mixer(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    # versions share their LoRA's trigger word (the prompt is then the same in every row)
    for name, seed in (("mystyle", 1), ("mystyle_e02", 2), ("mystyle_e10", 3),
                       ("twin_e01", 4), ("twin_e02", 4)):  # the twins are the same file: the same scores
        make_library_lora(root, name, seed=seed, trigger="mystyle")
    m = tiny_mixer(root)
    _add_centroid(m, "mystyle")  # the final LoRA of every test here: similarities are to its style
    return m


def _add_centroid(mixer, name):
    from stylemix.recipe import Recipe
    from stylemix.scores.clip_models import tiny_scorer
    from stylemix.scores.scoring import compute_centroid, save_centroid

    refs = mixer.generate(Recipe("a house", loras={name: 1.0}, batch_size=3, **SETTINGS)).images
    save_centroid(mixer.library.get(name).folder, compute_centroid(tiny_scorer(), refs))


def test_versions_are_found_by_name_and_ordered_by_epoch():
    names = ["mystyle", "mystyle@e10", "mystyle@e02", "mystyle@e100", "other@e03", "mystyle2@e04",
             "mystyle@e5", "mystyle@ex1", "my@e02"]
    # e2 < e10 < e100 as numbers, not as text; one-digit epochs and other LoRAs' versions are not its versions
    assert find_versions("mystyle", names) == [(2, "mystyle@e02"), (10, "mystyle@e10"), (100, "mystyle@e100")]
    assert find_versions("my", names) == [(2, "my@e02")]
    assert find_versions("nothing", names) == []
    assert parse_version("watercolor@e05") == ("watercolor", 5) and parse_version("watercolor") is None
    assert version_name("watercolor", 5) == "watercolor@e05" and version_name("w", 123) == "w@e123"


def test_each_epoch_rendered_and_scored_final_last(mixer, tmp_path):
    seen = []
    res = run_epochs(mixer, "mystyle", [(10, "mystyle_e10"), (2, "mystyle_e02")], tmp_path / "run",
                     ["a cat"], [0], SETTINGS, progress=lambda d, t, m: seen.append((d, t)))
    assert [r["epoch"] for r in res.rows] == ["base", "e02", "e10", "final"]  # one row per epoch, plus base
    assert [r["lora"] for r in res.rows] == ["", "mystyle_e02", "mystyle_e10", "mystyle"]
    assert [r["weight"] for r in res.rows] == [0.0, 1.0, 1.0, 1.0] and all(r["n"] == 1 for r in res.rows)
    assert seen[-1] == (4, 4)
    assert res.has_centroid and res.note == "" and res.is_demo
    assert all(isinstance(r["clip_mean"], float) and isinstance(r["style_sim_mean"], float) for r in res.rows)
    assert res.rows[0]["style_cal_mean"] is None  # the base image is calibration's 0 itself
    # calibrated against the base image of the same prompt and seed, on the final LoRA's centroid's scale
    from stylemix.scores.scoring import calibrate, load_centroid

    centroid = load_centroid(mixer.library.get("mystyle").folder, res.clip_model)
    base_sim = res.rows[0]["style_sim_mean"]
    for r in res.rows[1:]:
        assert r["style_cal_mean"] == calibrate(r["style_sim_mean"], base_sim, centroid.self_similarity)
    # the final LoRA's own images are the most like its centroid (its centroid came from it)
    assert res.rows[-1]["style_sim_mean"] > res.rows[0]["style_sim_mean"]
    # every version was really rendered: different files give different pixels and different scores
    pixels = {r["row"]: Path(res.out_dir / r["file"]).read_bytes() for r in res.images}
    assert len(set(pixels.values())) == 4
    assert len({r["clip_mean"] for r in res.rows}) == 4
    for f in ("plot", "contact", "json"):
        assert Path(res.files[f]).is_file(), f
    saved = json.loads(Path(res.files["json"]).read_text())
    assert saved["rows"] == json.loads(json.dumps(res.rows))
    from stylemix.recipe import read_recipe

    recipe = read_recipe(res.out_dir / "images/e10/p0_s0.png")
    assert recipe.loras == {"mystyle_e10": 1.0} and recipe.steps == 1 and recipe.sampler == "Euler"


def test_identical_versions_give_identical_scores(mixer, tmp_path):
    res = run_epochs(mixer, "mystyle", [(1, "twin_e01"), (2, "twin_e02")], tmp_path / "run", ["a cat"], [3],
                     SETTINGS, weight=0.7)
    e1, e2 = res.rows[1], res.rows[2]
    assert (e1["clip_mean"], e1["style_sim_mean"], e1["style_cal_mean"]) == \
        (e2["clip_mean"], e2["style_sim_mean"], e2["style_cal_mean"])
    assert e1["clip_mean"] != res.rows[-1]["clip_mean"]  # ... and not the final LoRA's
    assert e1["weight"] == 0.7
    from stylemix.recipe import read_recipe

    assert read_recipe(res.out_dir / "images/e02/p0_s3.png").loras == {"twin_e02": 0.7}


def test_without_a_centroid_clip_scores_only_and_said(mixer, tmp_path):
    res = run_epochs(mixer, "mystyle_e10", [(2, "mystyle_e02")], tmp_path / "run", ["a cat"], [0], SETTINGS)
    assert not res.has_centroid and "no style centroid" in res.note and "--save-centroid mystyle_e10" in res.note
    assert all(r["style_sim_mean"] is None and r["style_cal_mean"] is None for r in res.rows)
    assert all(isinstance(r["clip_mean"], float) for r in res.rows)


def test_refused_before_any_image(mixer, tmp_path):
    with pytest.raises(StyleMixError, match="train with --save-every-epochs N to compare epochs"):
        run_epochs(mixer, "mystyle", [], tmp_path / "a", ["a cat"], [0], SETTINGS)
    with pytest.raises(StyleMixError, match=r"given twice: \[2, 2\]"):
        run_epochs(mixer, "mystyle", [(2, "mystyle_e02"), (2, "mystyle_e10")], tmp_path / "b", ["a cat"], [0],
                   SETTINGS)
    with pytest.raises(ValueError, match="weight of LoRA 'mystyle_e02' is 3"):
        run_epochs(mixer, "mystyle", [(2, "mystyle_e02")], tmp_path / "c", ["a cat"], [0], SETTINGS, weight=3.0)
    assert not any((tmp_path / d).exists() for d in "abc")
