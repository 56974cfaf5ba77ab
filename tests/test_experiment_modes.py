"""Modes and schedules compared by the protocol (issue 20): config, CLI, bad values, the app's "modes" kind.

Tiny model, 64 px, 2-3 steps, one prompt, one or two seeds."""

import csv
import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import counting_mixer_class, make_library_lora, service_over
from stylemix.errors import StyleMixError
from stylemix.experiments.protocol import ProtocolConfig
from stylemix.lora.library import LoraLibrary
from stylemix.models import LoadedModel, tiny_pipeline
from stylemix.recipe import Recipe, read_recipe

EXAMPLE = Path(__file__).parents[1] / "stylemix" / "configs" / "modes_comparison.toml"
TINY = ["--model", "tiny", "--device", "cpu"]


Counting = counting_mixer_class()  # counts generate calls


@pytest.fixture(scope="module")
def mixer(tmp_path_factory):
    """watercolor (found by name) and px_v2 (by its trigger word), each with a style centroid: shares exist."""
    from stylemix.scores.clip_models import load_scorer
    from stylemix.scores.scoring import compute_centroid, save_centroid

    root = tmp_path_factory.mktemp("loras")
    make_library_lora(root, "watercolor", seed=2, trigger="wcstyle")
    make_library_lora(root, "px_v2", seed=3, trigger="pixstyle")
    loaded = LoadedModel(pipe=tiny_pipeline(), model_id="tiny", device=torch.device("cpu"), dtype=torch.float32)
    m = Counting(loaded, LoraLibrary(root))
    scorer = load_scorer(tiny=True)
    r = Recipe(prompt="a house", steps=2, width=64, height=64, batch_size=2, sampler="Euler")
    for name in ("watercolor", "px_v2"):
        save_centroid(root / name, compute_centroid(scorer, m.generate(r.with_(loras={name: 1.0})).images))
    return m


def example(**protocol) -> dict:
    """The shipped example with a smaller [protocol] (one prompt, one seed unless given)."""
    data = tomllib.loads(EXAMPLE.read_text())
    data["protocol"] = {**data["protocol"], "prompts": ["a cat by a window"], "seeds": [0], **protocol}
    return data


def write_toml(path: Path, data: dict) -> Path:
    """A protocol dict as TOML (only the shapes the protocol files use)."""
    def value(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    lines = [f"name = {json.dumps(data['name'])}"]
    for section in ("styles", "triggers", "protocol", "scoring"):
        lines += [f"[{section}]"] + [f"{json.dumps(k)} = {value(v)}" for k, v in data.get(section, {}).items()]
    gen = dict(data.get("generation", {}))
    tiny = gen.pop("tiny", {})
    lines += ["[generation]"] + [f"{k} = {value(v)}" for k, v in gen.items()]
    lines += ["[generation.tiny]"] + [f"{k} = {value(v)}" for k, v in tiny.items()]
    for mix in data.get("mixes", []):
        lines += ["[[mixes]]"] + [f"{k} = {value(v)}" for k, v in mix.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_the_example_compares_modes_and_a_preset_from_the_cli(mixer, tmp_path):
    from stylemix.cli import main

    cfg = write_toml(tmp_path / "modes.toml", example())
    out = tmp_path / "out"
    assert main(TINY + ["--loras-dir", str(mixer.library.root), "evaluate", "--config", str(cfg),
                        "--out", str(out), "--json"]) == 0
    ids = ["base"] + [f"watercolor_pixelart_0.6_0.4@{v}" for v in ("merge", "switch", "composite", "style-late")]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["config"] for r in rows] == ids  # one row per (configuration, prompt, seed), base first
    by_id = {r["config"]: r for r in rows}
    assert [by_id[i]["mode"] for i in ids] == ["merge", "merge", "switch", "composite", "merge"]
    assert by_id[ids[4]]["schedules"] == "preset: style late" and not by_id[ids[1]]["schedules"]
    assert all(r["clip_score"] and r["sim_watercolor"] and r["sim_pixelart"] for r in rows)
    # the same prompt and seed, another way of running the mix: another image
    merge, switch = (pixels(out / by_id[i]["file"]) for i in ids[1:3])
    assert np.abs(merge - switch).mean() > 1
    # each PNG carries the configuration's mode and schedules
    recipes = {i: read_recipe(out / by_id[i]["file"]) for i in ids}
    assert {i: r.mode for i, r in recipes.items()} == dict(zip(ids, ["merge", "merge", "switch", "composite",
                                                                     "merge"]))
    assert recipes[ids[4]].schedules == {"watercolor": "unet=0@0.3,0.6@0.6:te=0.6",
                                         "px_v2": "unet=0@0.3,0.4@0.6:te=0.4"}
    assert recipes[ids[1]].schedules == {} and recipes[ids[1]].loras == {"watercolor": 0.6, "px_v2": 0.4}
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert [s["config"] for s in summary] == ids and all(s["n"] == "1" for s in summary)
    assert summary[2]["mode"] == "switch every 5" and summary[4]["schedules"] == "preset: style late"
    md = (out / "summary.md").read_text()
    assert "| watercolor_pixelart_0.6_0.4@composite | composite | - | 1 |" in md
    assert (out / "plot.png").is_file() and Image.open(out / "contact_p0.png").height == 20 + 5 * 96


def test_modes_flag_expands_each_plain_mix(mixer, tmp_path, capsys):
    from stylemix.cli import main

    data = example()
    data["mixes"] = [{"weights": {"watercolor": 0.5, "pixelart": 0.5}},
                     {"weights": {"watercolor": 0.7, "pixelart": 0.3}, "mode": "switch", "switch_every": 2}]
    cfg = write_toml(tmp_path / "plain.toml", data)
    g = TINY + ["--loras-dir", str(mixer.library.root), "evaluate", "--config", str(cfg), "--dry-run"]
    assert main(g + ["--modes", "merge,composite", "--preset", "content early, style late"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["configurations"] == ["base", "watercolor_pixelart_0.5_0.5@merge",
                                       "watercolor_pixelart_0.5_0.5@composite",
                                       "watercolor_pixelart_0.5_0.5@content-early-style-late",
                                       "watercolor_pixelart_0.7_0.3@switch-2"]  # a mix with its own mode: as is
    assert shown["images"] == 5
    assert main(g) == 0  # without the flags: the plain mix once
    assert json.loads(capsys.readouterr().out)["configurations"][1] == "watercolor_pixelart_0.5_0.5"
    assert main(g + ["--modes", "merge,swap"]) == 1
    assert "--modes 'merge,swap': unknown mode 'swap'" in capsys.readouterr().err
    assert main(g + ["--preset", "style early"]) == 1
    assert "--preset 'style early' is not known" in capsys.readouterr().err
    # the same comparison written in the file
    cfg = ProtocolConfig.from_dict({**data, "protocol": {**data["protocol"], "modes": ["switch"],
                                                         "presets": ["style late"]}})
    assert [c.id for c in cfg.configurations()][1:3] == ["watercolor_pixelart_0.5_0.5@switch",
                                                         "watercolor_pixelart_0.5_0.5@style-late"]


MIX = {"watercolor": 0.6, "pixelart": 0.4}


@pytest.mark.parametrize("mix, message", [
    ({"mode": "blend"}, "configuration 'watercolor_pixelart_0.6_0.4@blend': unknown mode 'blend'; choose one of: "
                        "merge, switch, composite."),
    ({"preset": "style early"}, "configuration 'watercolor_pixelart_0.6_0.4@style-early': unknown preset "
                                "'style early'; choose one of: 'style late', 'content early, style late',"),
    ({"schedules": {"pixelart": "0@0,0.4@zero"}}, "configuration 'watercolor_pixelart_0.6_0.4@schedule': "
                                                  "schedule of 'pixelart': keyframe '0.4@zero' is not WEIGHT@POSITION"),
    ({"schedules": {"pixelart": "unet=0@0,1@0.5"}}, "configuration 'watercolor_pixelart_0.6_0.4@schedule': schedule "
                                                    "of 'pixelart' peaks at 1 but the mix gives 'pixelart' weight 0.4"),
    ({"schedules": {"anime": "0@0,0.4@1"}}, "configuration 'watercolor_pixelart_0.6_0.4@schedule': schedule of "
                                            "'anime': that style is not in the mix"),
    ({"schedules": {"pixelart": "0@0,0.4@3"}}, "configuration 'watercolor_pixelart_0.6_0.4@schedule' (with "
                                               "[generation.tiny]'s settings): schedule of LoRA 'pixelart': "
                                               "keyframe at step 3 is beyond the render's 3 steps"),
    ({"preset": "style late", "schedules": {"pixelart": "0@0,0.4@1"}},
     "configuration 'watercolor_pixelart_0.6_0.4@style-late+schedule': give a preset or schedules, not both"),
    ({"switch_every": 2}, "configuration 'watercolor_pixelart_0.6_0.4@merge': switch_every applies to "
                          "mode = \"switch\" only"),
    ({"mode": "switch", "switch_every": 0}, "configuration 'watercolor_pixelart_0.6_0.4@switch-0': switch_every 0"),
    ({"label": "../x"}, "configuration 'watercolor_pixelart_0.6_0.4@../x': Invalid configuration label"),
    ({"mood": "switch"}, "[[mixes]] entry {'watercolor': 0.6, 'pixelart': 0.4}: unknown key 'mood' (known: weights, "
                         "mode, switch_every, preset, schedules, label)"),
])
def test_bad_modes_and_schedules_are_refused_naming_the_configuration(mixer, tmp_path, capsys, mix, message):
    data = example()
    data["mixes"] = [{"weights": dict(MIX), **mix}]
    with pytest.raises(StyleMixError, match="^" + re.escape("config: " + message)):
        ProtocolConfig.from_dict(data)
    # from the command line: the message (naming the file), and nothing made
    from stylemix.cli import main

    cfg = write_toml(tmp_path / "bad.toml", data)
    assert main(TINY + ["--loras-dir", str(mixer.library.root), "evaluate", "--config", str(cfg),
                        "--out", str(tmp_path / "o")]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_bad_comparison_lists_and_twin_ids_are_refused():
    data = example(modes=["merge", "mix"])
    with pytest.raises(StyleMixError, match="protocol.modes: unknown mode 'mix'"):
        ProtocolConfig.from_dict(data)
    with pytest.raises(StyleMixError, match="protocol.presets: unknown preset 'late'"):
        ProtocolConfig.from_dict(example(presets=["late"]))
    twins = example()
    twins["mixes"] = [{"weights": dict(MIX), "schedules": {"pixelart": "0@0,0.4@1"}},
                      {"weights": dict(MIX), "schedules": {"pixelart": "0@0.5,0.4@1"}}]
    with pytest.raises(StyleMixError, match="'watercolor_pixelart_0.6_0.4@schedule' appears twice.*label"):
        ProtocolConfig.from_dict(twins)
    twins["mixes"][1]["label"] = "px-late"
    ids = [c.id for c in ProtocolConfig.from_dict(twins).configurations()]
    assert ids[-2:] == ["watercolor_pixelart_0.6_0.4@schedule", "watercolor_pixelart_0.6_0.4@px-late"]


def test_a_plain_protocol_keeps_its_ids_and_fingerprint():
    """A run made before modes existed resumes: plain mixes keep their names and run.json's entries."""
    cfg = ProtocolConfig.load()
    configs = cfg.configurations()
    assert all(c.is_plain for c in configs) and "watercolor_pixelart_0.6_0.4" in [c.id for c in configs]
    assert all(set(c.info()) == {"id", "kind", "styles", "loras"} for c in configs)


# --------------------------------------------------------------------------- the app's "modes" kind (service)

ANN = "u" + "a" * 24


@pytest.fixture
def service(mixer, tmp_path):
    return service_over(mixer, tmp_path / "ws")


def test_service_modes_kind_table_plot_and_contact_sheet(service):
    from stylemix.schedules import MODES, PRESETS
    from stylemix.service import experiment_images
    from ui.experiments_tab import experiment_view

    res = service.run_experiment(ANN, "modes", ["watercolor", "px_v2"], ["a cat"], [0], 2, 64, [0.6, 0.4],
                                 sampler="Euler")
    rec = res["record"]
    assert rec["kind"] == "modes" and experiment_images("modes", 2, 1, 1) == 1 + len(MODES) + len(PRESETS) == 7
    md, header, rows, images = experiment_view(rec)
    assert "**switch**" in md and "DEMO VALUES" in md
    assert header[:6] == ["config", "kind", "weights", "mode", "schedules", "n"]
    assert "clip_mean" in header and "style_sim_mean" in header and "share_px_v2_mean" in header
    assert [r[0] for r in rows] == ["base"] + [f"watercolor_px_v2_0.6_0.4@{v}" for v in (
        "merge", "switch-1", "composite", "style-late", "content-early-style-late", "style-on-the-decoder")]
    assert rows[2][3] == "switch every 1"  # 2 steps: each LoRA gets one turn
    assert [c for _, c in images] == ["CLIP score vs style similarity", "contact_p0"]
    # every image: the mode or preset its row names
    pngs = {p.parent.name: read_recipe(p) for p in Path(res["out_dir"]).glob("images/*/*.png")}
    assert pngs["watercolor_px_v2_0.6_0.4@composite"].mode == "composite"
    assert pngs["watercolor_px_v2_0.6_0.4@style-on-the-decoder"].block_weights["px_v2"]["OUT03"] == 1
    assert pngs["watercolor_px_v2_0.6_0.4@style-on-the-decoder"].block_weights["px_v2"]["IN04"] == 0
    # reopened after a reload: the same table
    assert service.list_experiments(ANN)[0]["kind"] == "modes"
    assert experiment_view(service.open_experiment(ANN, rec["id"]))[2] == rows


def test_service_modes_kind_refuses_a_bad_mix_before_any_image(service):
    Counting.calls = 0
    with pytest.raises(StyleMixError, match="one mix of two to four LoRAs; 1 chosen"):
        service.run_experiment(ANN, "modes", ["watercolor"], ["a cat"], [0], 2, 64)
    with pytest.raises(StyleMixError, match=r"one weight per LoRA \(2\), e\.g\. 0\.5, 0\.5; got \[0\.6\]"):
        service.run_experiment(ANN, "modes", ["watercolor", "px_v2"], ["a cat"], [0], 2, 64, [0.6])
    with pytest.raises(StyleMixError, match="weight of 'px_v2' .* must be a number in"):
        service.run_experiment(ANN, "modes", ["watercolor", "px_v2"], ["a cat"], [0], 2, 64, [0.6, 3])
    assert Counting.calls == 0 and service.list_experiments(ANN) == []


def test_summaries_refuse_rows_of_two_style_judges():
    """A summary never averages similarities measured by two judges (CLIP and CSD live in different spaces)."""
    from stylemix.errors import StyleMixError
    from stylemix.experiments.protocol import summarise

    rows = [{"config": "base", "clip_score": "0.3", "style_judge": "ViT-B-32/openai"},
            {"config": "base", "clip_score": "0.31", "style_judge": "CSD-ViT-L/0123456789ab"}]
    with pytest.raises(StyleMixError, match="different style judges"):
        summarise(rows, [], [])


def test_service_judges_kind_scores_one_set_of_images_with_clip_and_csd_side_by_side(service, mixer):
    """Issue 19: the Experiments tab shows both judges side by side.  The protocol's images are made once and
    scored by each judge into its own folder and its own columns; the numbers differ (two judges), the
    configuration and CLIP score columns appear once."""
    import csv

    from stylemix.scores.csd_install import load_csd_scorer
    from stylemix.scores.scoring import compute_centroid, save_centroid
    from ui.experiments_tab import experiment_view

    csd = load_csd_scorer("cpu", tiny=True)
    r = Recipe(prompt="a house", steps=2, width=64, height=64, batch_size=2, sampler="Euler")
    for name in ("watercolor", "px_v2"):  # CSD's own centroids, as training makes them (trainers/output.py)
        save_centroid(mixer.library.root / name, compute_centroid(csd, mixer.generate(r.with_(loras={name: 1.0})).images))
    Counting.calls = 0
    res = service.run_experiment(ANN, "judges", ["watercolor", "px_v2"], ["a cat"], [0], 2, 64, sampler="Euler")
    assert Counting.calls == 4  # base, two singles, one mix: made once for both judges
    out = Path(res["out_dir"])
    for png in (out / "clip").glob("images/*/*.png"):
        assert png.read_bytes() == (out / "csd" / png.relative_to(out / "clip")).read_bytes()
    judged = {j: {row["style_judge"] for row in csv.DictReader(open(out / j / "results.csv"))} for j in ("clip", "csd")}
    assert judged == {"clip": {"tiny-random-clip (demo values)"}, "csd": {csd.name}}, judged
    md, header, rows, images = experiment_view(res["record"])
    assert "[clip]" in md and "[csd]" in md and "never the numbers across judges" in md
    assert header[:6] == ["config", "kind", "weights", "mode", "schedules", "n"] and header.count("clip_mean") == 1
    assert "style_sim_mean [clip]" in header and "style_sim_mean [csd]" in header and len(rows) == 4
    singles = [row for row in res["record"]["summary"] if row["kind"] == "single"]  # full precision
    assert len(singles) == 2 and all(row["style_sim_mean [clip]"] != row["style_sim_mean [csd]"] for row in singles)
    assert [c for _, c in images][:2] == ["CLIP score vs style similarity, judged by tiny-random-clip (demo values)",
                                          f"CLIP score vs style similarity, judged by {csd.name}"]
    assert experiment_view(service.open_experiment(ANN, res["record"]["id"]))[2] == rows  # reopened: the same
