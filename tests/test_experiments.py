"""The seed protocol on the tiny model: config, files, resume, N-way mixes, errors."""

import csv
import json
from pathlib import Path

import pytest
import torch

from helpers import counting_mixer_class, make_library_lora, service_over
from stylemix.errors import StyleMixError
from stylemix.experiments.protocol import ProtocolConfig, mean_ci, resolve_styles, run_protocol
from stylemix.lora.library import LoraLibrary
from stylemix.mixer import Mixer
from stylemix.models import LoadedModel, tiny_pipeline

SMALL = """
name = "small"
[styles]
anime = "auto"
watercolor = "auto"
pixelart = "px_v2"
[triggers]
anime = "anistyle"
[protocol]
singles = ["anime", "pixelart"]
prompts = ["a cat by a window", "a city at night"]
seeds = [5]
[[mixes]]
weights = { watercolor = 0.6, pixelart = 0.4 }
[[mixes]]
weights = { anime = 0.4, watercolor = 0.3, pixelart = 0.3 }
[generation]
steps = 2
width = 64
height = 64
sampler = "Euler"
"""


Counting = counting_mixer_class()  # counts generate calls


@pytest.fixture(scope="module")
def mixer(tmp_path_factory):
    from stylemix.scores.clip_models import load_scorer
    from stylemix.scores.scoring import compute_centroid, save_centroid

    root = tmp_path_factory.mktemp("loras")
    make_library_lora(root, "my_anime", seed=1, trigger="anistyle")  # found by trigger word
    make_library_lora(root, "watercolor", seed=2, trigger="wcstyle")  # found by name
    make_library_lora(root, "px_v2", seed=3, trigger="pixstyle")  # mapped explicitly
    loaded = LoadedModel(pipe=tiny_pipeline(), model_id="tiny", device=torch.device("cpu"), dtype=torch.float32)
    m = Counting(loaded, LoraLibrary(root))
    scorer = load_scorer(tiny=True)
    from stylemix.recipe import Recipe
    r = Recipe(prompt="a house", steps=2, width=64, height=64, batch_size=2, sampler="Euler")
    for name in ("my_anime", "watercolor"):  # px_v2 has no centroid: its columns stay empty, no crash
        save_centroid(root / name, compute_centroid(scorer, m.generate(r.with_(loras={name: 1.0})).images))
    return m


@pytest.fixture
def small(tmp_path):
    p = tmp_path / "small.toml"
    p.write_text(SMALL)
    return ProtocolConfig.load(p)


def test_default_config_is_the_seed_report(mixer):
    cfg = ProtocolConfig.load()
    ids = [c.id for c in cfg.configurations()]
    assert ids[:5] == ["base", "anime", "watercolor", "cartoon", "pixelart"]
    assert "watercolor_pixelart_0.6_0.4" in ids and "watercolor_anime_0.5_0.5" in ids and len(ids) == 11
    assert len(ids) * len(cfg.prompts) * len(cfg.seeds) == 110
    assert cfg.settings(tiny=False)["width"] == 512 and cfg.settings(tiny=True)["width"] == 128
    with pytest.raises(StyleMixError, match="'cartoon' has no LoRA"):
        resolve_styles(cfg, mixer.library, {"pixelart": "px_v2"})


def test_protocol_runs_resumes_and_writes_every_file(mixer, small, tmp_path):
    out = tmp_path / "run"
    assert resolve_styles(small, mixer.library) == {"anime": "my_anime", "watercolor": "watercolor",
                                                    "pixelart": "px_v2"}
    total = 5 * 2  # base, 2 singles, 2 mixes (one 3-way) x 2 prompts x 1 seed

    def stop_after(k):
        def progress(done, n, msg):
            assert n == total
            if done >= k:
                raise KeyboardInterrupt
        return progress

    Counting.calls = 0
    with pytest.raises(KeyboardInterrupt):
        run_protocol(mixer, small, out, progress=stop_after(4))
    assert Counting.calls == 4
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and [r["config"] for r in rows[:2]] == ["base", "base"]  # base images first
    # an image saved just before the interruption, its row not yet written: scored from disk, not redone
    assert len(sorted((out / "images").rglob("*.png"))) == 4
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    (out / "results.csv").write_text("".join(lines[:-1]))  # drop the 4th row: its PNG is there, its row is not
    seen = []
    Counting.calls = 0
    res = run_protocol(mixer, small, out, progress=lambda d, n, m: seen.append(d))
    assert res.generated == 6 and Counting.calls == 6 and res.total == total  # only the 6 missing images
    assert res.rescored == 1
    assert seen[0] == 3 and seen[-1] == total
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == total and len({(r["config"], r["prompt_index"]) for r in rows}) == total
    three = [r for r in rows if r["config"] == "anime_watercolor_pixelart_0.4_0.3_0.3"]
    assert len(three) == 2 and json.loads(three[0]["loras"]) == {"my_anime": 0.4, "watercolor": 0.3, "px_v2": 0.3}
    assert all(r["clip_score"] for r in rows)
    assert all(r["sim_anime"] and r["sim_watercolor"] and not r["sim_pixelart"] for r in rows)  # px_v2: no centroid
    mix = [r for r in rows if r["config"] == "watercolor_pixelart_0.6_0.4"][0]
    assert not mix["cal_pixelart"]
    assert not mix["share_watercolor"]  # a style of the mix is unmeasured: no shares rather than a false 0%
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert [s["config"] for s in summary] == ["base", "anime", "pixelart", "watercolor_pixelart_0.6_0.4",
                                              "anime_watercolor_pixelart_0.4_0.3_0.3"]
    assert all(s["n"] == "2" for s in summary) and summary[1]["clip_lo"] and summary[1]["clip_hi"]
    md = (out / "summary.md").read_text()
    assert "DEMO VALUES" in md and "anime -> my_anime" in md
    for f in ("plot.png", "contact_p0.png", "contact_p1.png", "run.json"):
        assert (out / f).is_file(), f
    # complete: a third run generates nothing
    Counting.calls = 0
    assert run_protocol(mixer, small, out).generated == 0 and Counting.calls == 0
    # a PNG deleted by hand is made again
    (out / rows[-1]["file"]).unlink()
    assert run_protocol(mixer, small, out).generated == 1
    assert len(list(csv.DictReader(open(out / "summary.csv")))) == 5
    # a different run into the same folder is refused, nothing touched
    other = ProtocolConfig.from_dict({**_toml(SMALL), "protocol": {"prompts": ["a dog"], "seeds": [5]}})
    with pytest.raises(StyleMixError, match="different run"):
        run_protocol(mixer, other, out)


def test_a_run_from_before_modes_resumes_with_aligned_rows(mixer, small, tmp_path):
    """results.csv without the mode and schedules columns (written before they existed): rewritten with them,
    so the rows appended on resume line up with the header."""
    out = tmp_path / "run"
    run_protocol(mixer, small, out)
    rows = list(csv.DictReader(open(out / "results.csv")))
    old_cols = [c for c in rows[0] if c not in ("mode", "schedules")]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows[:-1])
    (out / rows[-1]["file"]).unlink()
    assert run_protocol(mixer, small, out).generated == 1
    again = list(csv.DictReader(open(out / "results.csv")))
    assert [r["config"] for r in again] == [r["config"] for r in rows]
    assert all(r["mode"] == "merge" and r["schedules"] == "" and r["clip_score"] for r in again)
    assert again[-1]["loras"] == rows[-1]["loras"] and again[0]["file"] == rows[0]["file"]


def _toml(text):
    import tomllib

    return tomllib.loads(text)


def test_bad_configs_are_refused(tmp_path, mixer):
    base = _toml(SMALL)
    cases = [
        ({**base, "extra": {}}, "unknown section 'extra'"),
        ({**base, "mixes": [{"weights": {"anime": 0.5}}]}, "at least two styles"),
        ({**base, "mixes": [{"weights": {"anime": 0.5, "oil": 0.5}}]}, "'oil'"),
        ({**base, "mixes": [{"weights": {"anime": 3.0, "pixelart": 0.5}}]}, "anime"),
        ({**base, "protocol": {**base["protocol"], "seeds": [1, 1]}}, "seeds"),
        ({**base, "protocol": {**base["protocol"], "prompts": []}}, "prompts"),
        ({**base, "generation": {"stepz": 3}}, "stepz"),
        ({**base, "styles": {"../x": "auto"}}, "style name"),
    ]
    for data, match in cases:
        with pytest.raises((StyleMixError, ValueError), match=match):
            ProtocolConfig.from_dict(data)
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(StyleMixError, match="not valid TOML"):
        ProtocolConfig.load(bad)
    cfg = ProtocolConfig.from_dict(base)
    with pytest.raises(StyleMixError, match="'pixelart' maps to LoRA 'nope'"):
        resolve_styles(cfg, mixer.library, {"pixelart": "nope"})
    with pytest.raises(StyleMixError, match="'oil'"):
        resolve_styles(cfg, mixer.library, {"oil": "px_v2"})
    with pytest.raises(StyleMixError, match="all map to LoRA 'watercolor'"):
        resolve_styles(cfg, mixer.library, {"anime": "watercolor"})


def test_mean_ci():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.303 * 1.0 / 3**0.5)
    assert mean_ci([1.0]) == (1.0, None, None) and mean_ci([]) == (None, None, None)


@pytest.mark.slow
def test_full_default_protocol_on_the_tiny_model(tmp_path):
    """The seed report's 110 images end to end with the tiny model (a couple of minutes on CPU)."""
    from stylemix.models import load_model

    for i, name in enumerate(["anime", "watercolor", "cartoon", "pixelart"]):
        make_library_lora(tmp_path / "loras", name, seed=i)
    m = Mixer(load_model("tiny", "cpu", "fp32"), LoraLibrary(tmp_path / "loras"))
    res = run_protocol(m, ProtocolConfig.load(), tmp_path / "out")
    assert res.total == res.generated == 110
    assert len(list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))) == 11


def test_cli_evaluate(tmp_path, mixer):
    import subprocess
    import sys

    from stylemix.cli import main

    loras = mixer.library.root
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL.replace('seeds = [5]', 'seeds = [2]').replace(
        '[[mixes]]\nweights = { anime = 0.4, watercolor = 0.3, pixelart = 0.3 }\n', ''))
    g = ["--model", "tiny", "--device", "cpu", "--loras-dir", str(loras)]
    assert main(g + ["evaluate", "--config", str(cfg), "--out", str(tmp_path / "o"), "--json"]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "o" / "summary.csv")))) == 4
    r = subprocess.run([sys.executable, "-m", "stylemix.cli", *g, "evaluate", "--config", str(cfg),
                        "--out", str(tmp_path / "o2"), "--map", "pixelart=ghost"], capture_output=True, text=True)
    assert r.returncode == 1 and "'pixelart' maps to LoRA 'ghost'" in r.stderr
    assert not (tmp_path / "o2").exists()  # refused before anything was written


# --------------------------------------------------------------------------- the app's experiments (service)

ANN, BOB = "u" + "a" * 24, "u" + "b" * 24


@pytest.fixture
def service(mixer, tmp_path):
    return service_over(mixer, tmp_path / "ws")


def test_experiment_sampler_and_steps_reach_every_image(service):
    from stylemix.recipe import DEFAULT_SAMPLER, read_recipe

    res = service.run_experiment(ANN, "protocol", ["watercolor"], ["a cat"], [0], 1, 64)
    pngs = sorted(res["protocol"].out_dir.glob("images/**/*.png"))
    assert len(pngs) == 2  # base and the single style
    assert {(read_recipe(p).sampler, read_recipe(p).steps) for p in pngs} == {(DEFAULT_SAMPLER, 1)}  # as Compose
    res = service.run_experiment(ANN, "sweep", ["watercolor", "my_anime"], ["a cat"], [0], 2, 64, [0, 1],
                                 sampler="DDIM")
    assert res["map"].recipe.sampler == "DDIM" and res["map"].recipe.steps == 2
    assert res["record"]["settings"]["sampler"] == "DDIM"
    # a LoRA at weight 0 never gets a share in a sweep
    for cell in res["map"].cells:
        assert set(cell.shares) <= {n for n, w in cell.weights.items() if w}, cell.weights


def test_experiment_settings_refused_with_the_recipes_words_before_any_image(service):
    before = Counting.calls
    with pytest.raises(ValueError, match=r"^steps 100000 must be an integer from 1 to 150\.$"):
        service.run_experiment(ANN, "protocol", ["watercolor"], ["a cat"], [0], 100000, 64)
    with pytest.raises(ValueError, match="Unknown sampler 'Heun'"):
        service.run_experiment(ANN, "protocol", ["watercolor"], ["a cat"], [0], 1, 64, sampler="Heun")
    with pytest.raises(ValueError, match="width 60 must be a multiple of 8"):
        service.run_experiment(ANN, "protocol", ["watercolor"], ["a cat"], [0], 1, 60)
    assert Counting.calls == before


def test_runs_are_listed_and_reopened_by_their_owner_only(service):
    first = service.run_experiment(ANN, "protocol", ["watercolor"], ["a cat"], [0], 1, 64)
    second = service.run_experiment(ANN, "sweep", ["watercolor", "my_anime"], ["a cat"], [0], 1, 64, [0, 1])
    runs = service.list_experiments(ANN)
    assert [r["id"] for r in runs] == [second["record"]["id"], first["record"]["id"]]  # newest first
    assert runs[0]["kind"] == "sweep" and runs[0]["names"] == ["watercolor", "my_anime"]
    assert [r["id"] for r in service.list_experiments(ANN, limit=1)] == [second["record"]["id"]]
    again = service.open_experiment(ANN, second["record"]["id"])
    assert again["cells"] == json.loads(json.dumps(second["record"]["cells"]))  # the same results after a reload
    assert set(again["files"]) == {"grid", "map", "json", "clash"}
    assert all(Path(p).is_file() and Path(second["out_dir"]) in Path(p).parents for p in again["files"].values())
    # another user sees none of it, and cannot open it by id
    assert service.list_experiments(BOB) == []
    with pytest.raises(StyleMixError, match="No saved experiment run"):
        service.open_experiment(BOB, second["record"]["id"])
    with pytest.raises(StyleMixError, match="Invalid experiment run"):
        service.open_experiment(ANN, "../" + BOB)
    # a saved file naming paths outside its run is not trusted
    f = Path(first["out_dir"]) / "experiment.json"
    rec = json.loads(f.read_text())
    rec["files"] = {"plot": "../../../../etc/passwd", "contact_p0": rec["files"]["contact_p0"]}
    f.write_text(json.dumps(rec))
    assert list(service.open_experiment(ANN, first["record"]["id"])["files"]) == ["contact_p0"]


def test_results_view_one_table_with_rounded_numbers(service):
    from ui.experiments_tab import experiment_view

    res = service.run_experiment(ANN, "protocol", ["watercolor", "my_anime"], ["a cat"], [0], 1, 64)
    md, header, rows, images = experiment_view(res["record"])
    assert "DEMO VALUES" in md and "|" not in md  # the numbers are in the table only, not twice
    assert header[:6] == ["config", "kind", "weights", "mode", "schedules", "n"] and [r[0] for r in rows][0] == "base"
    numbers = [x for r in rows for x in r if isinstance(x, float)]
    assert numbers and all(len(f"{abs(x):.10g}".replace(".", "").lstrip("0")) <= 4 for x in numbers), numbers
    assert experiment_view(service.open_experiment(ANN, res["record"]["id"]))[2] == rows
    sweep = service.run_experiment(ANN, "sweep", ["watercolor", "my_anime"], ["a cat"], [0], 1, 64, [0, 1])
    md, header, rows, images = experiment_view(sweep["record"])
    assert header == ["watercolor", "my_anime", "CLIP score", "share watercolor", "share my_anime"]
    assert "demo values" in md and "Clash map" in md and len(images) == 3
    for wa, wb, _, sa, sb in rows:
        assert (sa is None or wa) and (sb is None or wb)  # weight 0: no share


# --------------------------------------------------------------------------- stylemix score's text


def test_cli_score_says_no_style_detected(tmp_path, capsys):
    """An image measured against its own base image shows no style above the noise floor: said in words,
    as `stylemix generate` says it (an image of the style itself gets its share)."""
    import numpy as np
    from PIL import Image

    from stylemix.cli import main

    rng = np.random.default_rng(0)
    refs = []
    for i in range(4):  # the style's reference images: red noise
        refs.append(tmp_path / f"r{i}.png")
        Image.fromarray((rng.random((64, 64, 3)) * [255, 40, 40]).astype("uint8")).save(refs[-1])
    gray = tmp_path / "gray.png"
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(gray)
    make_library_lora(tmp_path / "loras", "red", seed=0)
    g = ["--loras-dir", str(tmp_path / "loras"), "--model", "tiny", "score"]
    assert main(g + [*map(str, refs), "--save-centroid", "red"]) == 0
    capsys.readouterr()
    assert main(g + [str(gray), "--lora", "red", "--base-image", str(gray)]) == 0  # calibrated 0: nothing detected
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(str(gray)) and line.endswith("| no style detected"), line
    assert main(g + [str(refs[0]), "--lora", "red", "--base-image", str(gray)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert "no style detected" not in line and line.endswith("shares red 100%"), line
