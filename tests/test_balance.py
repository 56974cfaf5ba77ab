"""Automatic balancing (synthetic share functions and the tiny model) and weight maps."""

import json

import numpy as np
import pytest
import torch

from helpers import make_library_lora
from stylemix.experiments.balance import BalanceConfig, balance, balance_mix
from stylemix.errors import StyleMixError
from stylemix.lora.library import LoraLibrary
from stylemix.mixer import Mixer
from stylemix.models import LoadedModel, tiny_pipeline
from stylemix.recipe import Recipe
from stylemix.experiments.weight_maps import (StyleJudge, draw_share_map, line_points, weight_map_2d, weight_map_lines,
                                  write_map)


def power_shares(strength, p=1.5, clip=lambda w: 0.3):
    """Synthetic, deterministic: share_i proportional to (k_i w_i)^p, like LoRAs of unequal strength."""
    calls = []

    def evaluate(w):
        calls.append(dict(w))
        raw = {n: (strength[n] * max(v, 0.0)) ** p for n, v in w.items()}
        s = sum(raw.values())
        return {n: v / s for n, v in raw.items()}, clip(w)

    return evaluate, calls


def test_balance_reaches_target_shares_on_a_synthetic_share_function():
    evaluate, calls = power_shares({"watercolor": 1.0, "pixelart": 3.0})
    target = {"watercolor": 0.6, "pixelart": 0.4}
    best, naive, path, reached = balance(evaluate, target, config=BalanceConfig(share_tolerance=0.01))
    assert naive.weights == {"watercolor": 0.6, "pixelart": 0.4} and naive.error > 0.3  # the naive choice is far off
    assert reached and best.error <= 0.01
    assert len(path) == len(calls) <= 6  # generations counted: one per evaluation
    assert path[0] is naive and best in path
    assert sum(best.weights.values()) == pytest.approx(1.0, abs=1e-3)  # total strength kept
    exact = 3 * 1.5 ** (2 / 3)  # w_wc / w_px where (w_wc / 3 w_px)^1.5 = 0.6 / 0.4
    assert best.weights["watercolor"] == pytest.approx(exact / (1 + exact), abs=0.01)  # the weak LoRA gets most


def test_balance_three_way_and_clip_constraint():
    strength = {"a": 1.0, "b": 2.0, "c": 0.5}
    # CLIP falls when the total strength is high: the search must shrink it to stay above the floor
    evaluate, _ = power_shares(strength, p=1.0, clip=lambda w: 0.33 - 0.05 * sum(w.values()))
    target = {"a": 0.5, "b": 0.2, "c": 0.3}
    best, naive, path, reached = balance(evaluate, target, clip_floor=0.3, config=BalanceConfig(
        share_tolerance=0.02, max_evaluations=12, total_strength=1.0))
    assert not naive.clip_ok  # total 1.0 gives CLIP 0.28 < 0.30
    assert reached and best.clip_ok and best.error <= 0.02
    assert sum(best.weights.values()) <= 0.6 + 1e-6
    # never worse than naive, and stops at its budget when unreachable
    evaluate, calls = power_shares(strength, clip=lambda w: 0.0)
    best, naive, path, reached = balance(evaluate, target, clip_floor=0.3, config=BalanceConfig(max_evaluations=4))
    assert not reached and len(calls) == len(path) == 4


def test_balance_refuses_bad_targets():
    evaluate, calls = power_shares({"a": 1, "b": 1})
    for bad, match in [({"a": 1.0}, "two"), ({"a": 0.7, "b": 0.7}, "add up"), ({"a": 1.5, "b": -0.5}, "a")]:
        with pytest.raises(StyleMixError, match=match):
            balance(evaluate, bad)
    assert not calls  # nothing generated for a bad request


# --------------------------------------------------------------------------- on the tiny model

STYLES = ["watercolor", "pixelart", "anime"]
RECIPE = Recipe(prompt="a cat by a window", steps=2, width=64, height=64, seed=1, sampler="Euler")


@pytest.fixture(scope="module")
def mixer(tmp_path_factory):
    from stylemix.scores.clip_models import load_scorer
    from stylemix.scores.scoring import compute_centroid, save_centroid

    root = tmp_path_factory.mktemp("loras")
    for i, name in enumerate(STYLES):
        make_library_lora(root, name, seed=40 + i, scale=3.0)
    loaded = LoadedModel(pipe=tiny_pipeline(), model_id="tiny", device=torch.device("cpu"), dtype=torch.float32)
    m = Mixer(loaded, LoraLibrary(root))
    scorer = load_scorer(tiny=True)
    base = m.generate(RECIPE.with_(batch_size=3, seed=10)).images
    for name in STYLES:  # reference images of each style: that LoRA alone
        imgs = m.generate(RECIPE.with_(loras={name: 1.0}, batch_size=3, seed=10)).images
        save_centroid(root / name, compute_centroid(scorer, imgs, base_images=base))
    return m


def test_weight_map_2d_and_path_drawing(mixer, tmp_path):
    judge = StyleJudge.for_mixer(mixer, ["watercolor", "pixelart"])
    seen = []
    wmap = weight_map_2d(mixer, RECIPE, "watercolor", "pixelart", [0.0, 0.5, 1.0], [0.0, 1.0], judge=judge,
                         progress=lambda d, t, m: seen.append((d, t)))
    assert len(wmap.cells) == 6 and seen[-1] == (6, 6)
    assert wmap.cells[0].weights == {"watercolor": 0.0, "pixelart": 0.0}
    assert wmap.cells[2].weights == {"watercolor": 1.0, "pixelart": 0.0}
    # the all-zero cell is the base image itself, the calibration's 0: no style at all
    assert wmap.cells[0].calibrated == {"watercolor": 0.0, "pixelart": 0.0}
    assert wmap.cells[0].shares == {}  # nothing in the mix: nothing to share
    # a LoRA at weight 0 never gets a share; the others share 1, or nothing when no style shows
    for c in wmap.cells[1:]:
        assert set(c.shares) <= {n for n, w in c.weights.items() if w}, (c.weights, c.shares)
        assert abs(sum(c.shares.values()) - 1) < 1e-6 or c.shares == {}
    assert wmap.cells[2].shares == {"watercolor": 1.0}  # watercolor alone at 1: all of the style shown is its own
    assert all(c.clip_score is not None for c in wmap.cells)
    imgs = [np.asarray(c.image) for c in wmap.cells]
    assert len({i.tobytes() for i in imgs}) == 6  # every weight pair gives its own image
    files = write_map(wmap, tmp_path / "map", path_points=[{"watercolor": 0.6, "pixelart": 0.4},
                                                          {"watercolor": 0.8, "pixelart": 0.25}])
    assert json.loads(open(files["json"]).read())["cells"][5]["weights"] == {"watercolor": 1.0, "pixelart": 1.0}
    plain, with_path = draw_share_map(wmap), draw_share_map(wmap, [{"watercolor": 0.6, "pixelart": 0.4}])
    assert plain.tobytes() != with_path.tobytes()
    with pytest.raises(StyleMixError, match="twice"):
        weight_map_2d(mixer, RECIPE, "anime", "anime", [0, 1])
    with pytest.raises(ValueError, match="anime"):
        weight_map_2d(mixer, RECIPE, "anime", "pixelart", [0, 3.0])  # checked before any image is made


def test_three_way_lines(mixer, tmp_path):
    assert line_points({"a": 1.0}, {"b": 0.5, "c": 0.5}, 3) == [
        {"a": 1.0, "b": 0.0, "c": 0.0}, {"a": 0.5, "b": 0.25, "c": 0.25}, {"a": 0.0, "b": 0.5, "c": 0.5}]
    judge = StyleJudge.for_mixer(mixer, STYLES)
    wmap = weight_map_lines(mixer, RECIPE, [({"watercolor": 1.0}, {"pixelart": 0.5, "anime": 0.5}),
                                            ({"anime": 1.0}, {"watercolor": 1.0})], n=3, judge=judge)
    assert wmap.kind == "lines" and len(wmap.cells) == 6 and set(wmap.names) == set(STYLES)
    assert all(abs(sum(c.shares.values()) - 1) < 1e-6 or c.shares == {} for c in wmap.cells)
    assert all(set(c.shares) <= {n for n, w in c.weights.items() if w} for c in wmap.cells)  # weight 0: no share
    write_map(wmap, tmp_path / "lines")
    assert (tmp_path / "lines" / "map.png").is_file() and (tmp_path / "lines" / "grid.png").is_file()


def test_balance_mix_on_the_tiny_model_reports_generations(mixer):
    cfg = BalanceConfig(max_evaluations=3, preview_steps=2, preview_size=64, preview_seeds=(0,),
                        clip_tolerance=1.0)
    res = balance_mix(mixer, RECIPE, {"watercolor": 0.5, "pixelart": 0.3, "anime": 0.2}, cfg)
    assert 1 <= res.evaluations <= 3 and res.evaluations == len(res.path)
    assert res.generations == 1 + 3 + res.evaluations  # base image, three singles, the search
    assert res.images == res.generations  # one seed: one image per generation
    assert res.best.error <= res.naive.error
    assert set(res.best_single) == {"watercolor", "pixelart", "anime"}


def test_balance_needs_centroids(workspace):
    make_library_lora(workspace.loras, "plain1", seed=1)
    make_library_lora(workspace.loras, "plain2", seed=2)
    loaded = LoadedModel(pipe=tiny_pipeline(), model_id="tiny", device=torch.device("cpu"), dtype=torch.float32)
    m = Mixer(loaded, LoraLibrary(workspace.loras))
    with pytest.raises(StyleMixError, match="plain1.*no style centroid"):
        balance_mix(m, RECIPE, {"plain1": 0.5, "plain2": 0.5})


def test_cli_map_and_balance(mixer, tmp_path, capsys):
    from stylemix.cli import main

    g = ["--model", "tiny", "--device", "cpu", "--loras-dir", str(mixer.library.root)]
    gen = ["--prompt", "a cat", "--steps", "2", "--size", "64x64"]
    assert main(g + ["mix", "map", "--lora", "watercolor", "--lora", "pixelart", "--values", "0,1",
                     "--out", str(tmp_path / "m"), *gen]) == 0
    assert json.loads((tmp_path / "m" / "map.json").read_text())["axes"] == [[0.0, 1.0], [0.0, 1.0]]
    assert main(g + ["mix", "map", "--line", "watercolor=1:pixelart=0.5,anime=0.5", "--points", "2",
                     "--out", str(tmp_path / "l"), *gen]) == 0
    assert len(json.loads((tmp_path / "l" / "map.json").read_text())["cells"]) == 2
    assert main(g + ["mix", "balance", "--target", "watercolor=0.6", "--target", "pixelart=0.4",
                     "--max-generations", "2", "--preview-size", "64", "--preview-steps", "2",
                     "--map-values", "0,1", "--out", str(tmp_path / "b"), *gen]) == 0
    assert "search generations" in capsys.readouterr().out
    assert (tmp_path / "b" / "balance.json").is_file() and (tmp_path / "b" / "map.png").is_file()
    assert main(g + ["mix", "balance", "--target", "watercolor=0.9", "--target", "pixelart=0.4", *gen]) == 1
    assert "add up to 1" in capsys.readouterr().err
