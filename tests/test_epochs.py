"""Comparing the epochs of one LoRA (stylemix/experiments/epochs.py) on the tiny model: 64 px, 1 step.

Versions are library LoRAs named `<name>@eNN`.  The experiment itself takes its versions as
(epoch, library name), so most tests pass ordinary names; the service tests use real `@eNN`
names and need the library to list them (see `versions_listed`).
"""

import dataclasses
import json
from pathlib import Path

import pytest

from helpers import make_library_lora, service_over, tiny_mixer
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


# --------------------------------------------------------------------------- the app's epochs runs (service)

ANN, BOB = "u" + "a" * 24, "u" + "b" * 24


def _versions_supported(library) -> bool:
    """Whether the library holds epoch versions (NAME@eNN) yet: the trainer/library side of issue 17."""
    try:
        library.folder(version_name("x", 2))
        return True
    except StyleMixError:
        return False


def _add_version(library, name, epoch, seed):
    """Epoch `epoch` of LoRA `name`, written wherever the library keeps versions."""
    folder = library.folder(version_name(name, epoch))
    return make_library_lora(folder.parent, folder.name, seed=seed, trigger="mystyle")


@pytest.fixture
def service(mixer, tmp_path):
    return service_over(mixer, tmp_path / "ws")


@pytest.fixture(scope="module")
def versioned(mixer):
    """mystyle@e02 and mystyle@e10 (other files than mystyle's), and ann's private annpriv with annpriv@e01."""
    from stylemix import access

    lib = mixer.library
    if not _versions_supported(lib):
        pytest.skip("the library does not hold epoch versions (NAME@eNN) yet: re-enabled by itself once it does")
    _add_version(lib, "mystyle", 2, seed=2)
    _add_version(lib, "mystyle", 10, seed=3)
    d = make_library_lora(lib.root, "annpriv", seed=5, trigger="mystyle")
    meta = json.loads((d / "stylemix.json").read_text())
    (d / "stylemix.json").write_text(json.dumps({**meta, "owner": access.owner_key(ANN), "visibility": "private"}))
    _add_version(lib, "annpriv", 1, seed=6)
    return lib


def test_service_compares_a_loras_epochs_and_reopens_the_run(service, versioned):
    from ui.experiments_tab import experiment_view

    assert service.lora_versions(ANN, "mystyle") == [(2, "mystyle@e02"), (10, "mystyle@e10")]
    res = service.run_experiment(ANN, "epochs", ["mystyle"], ["a cat"], [0], 1, 64, sampler="Euler")
    rows = res["epochs"].rows
    assert [(r["epoch"], r["lora"]) for r in rows] == [("base", ""), ("e02", "mystyle@e02"), ("e10", "mystyle@e10"),
                                                       ("final", "mystyle")]
    assert len({r["clip_mean"] for r in rows}) == 4  # each version really rendered
    # the run is listed and reopens with the same table
    runs = service.list_experiments(ANN)
    assert runs[0] == {"id": res["record"]["id"], "kind": "epochs", "names": ["mystyle"],
                       "created": res["record"]["created"]}
    again = service.open_experiment(ANN, res["record"]["id"])
    assert again["epochs"]["rows"] == json.loads(json.dumps(rows))
    assert set(again["files"]) == {"plot", "contact", "json"} and all(Path(p).is_file() for p in again["files"].values())
    md, header, table, images = experiment_view(again)
    assert header[:5] == ["epoch", "LoRA", "weight", "n", "CLIP score"] and [r[0] for r in table] == \
        ["base", "e02", "e10", "final"]
    numbers = [x for r in table for x in r[4:] if isinstance(x, float)]
    assert numbers and all(len(f"{abs(x):.10g}".replace(".", "").lstrip("0")) <= 4 for x in numbers), numbers
    assert "Epochs of **mystyle** at weight 1" in md and "demo values" in md and len(images) == 2
    # a version chosen by name stands for its LoRA; one weight for every epoch
    res = service.run_experiment(ANN, "epochs", ["mystyle@e10"], ["a cat"], [0], 1, 64, [0.5], sampler="Euler")
    assert res["names"] == ["mystyle"] and [r["weight"] for r in res["epochs"].rows] == [0.0, 0.5, 0.5, 0.5]


def test_service_refuses_other_users_private_epochs_and_counts_the_quota(service, versioned):
    from stylemix.quotas import QuotaError

    assert service.lora_versions(ANN, "annpriv") == [(1, "annpriv@e01")]
    for name in ("annpriv", "annpriv@e01"):  # bob sees neither the LoRA nor its versions
        with pytest.raises(StyleMixError, match=f"No LoRA named {name!r}"):
            service.run_experiment(BOB, "epochs", [name], ["a cat"], [0], 1, 64)
    with pytest.raises(StyleMixError, match="No LoRA named 'annpriv'"):
        service.lora_versions(BOB, "annpriv")
    # base + 2 versions + final, x 2 prompts x 2 seeds = 16 images, counted before any is made
    service.quotas = dataclasses.replace(service.quotas, max_experiment_images=15)
    with pytest.raises(QuotaError, match="16 images"):
        service.run_experiment(ANN, "epochs", ["mystyle"], ["a cat", "a dog"], [0, 1], 1, 64)
    assert service.list_experiments(ANN) == []


def test_service_refuses_bad_epoch_requests_before_any_image(service):
    cases = [([], [], "exactly one LoRA; 0 chosen"),
             (["mystyle", "mystyle_e02"], [], r"exactly one LoRA; 2 chosen \(mystyle, mystyle_e02\)"),
             (["mystyle_e02"], [], "'mystyle_e02' has no saved epochs .*train with --save-every-epochs N"),
             (["ghost"], [], "No LoRA named 'ghost'")]
    for loras, values, match in cases:
        with pytest.raises(StyleMixError, match=match):
            service.run_experiment(ANN, "epochs", loras, ["a cat"], [0], 1, 64, values)
    assert service.list_experiments(ANN) == []


def test_experiments_tab_compares_epochs_through_the_app(mixer, tmp_path):
    """The tab's radio offers the kind, its one-LoRA rule reads as a message, and the table and gallery show
    the run (through the app's named endpoint, as the page calls it)."""
    gradio_client = pytest.importorskip("gradio_client")
    import app
    from stylemix.paths import Workspace
    from stylemix.service import StyleMixService

    ws = Workspace.at(tmp_path / "ws")
    for p in (ws.loras, ws.data, ws.jobs, ws.outputs):
        p.mkdir(parents=True)
    service = StyleMixService(mixer=tiny_mixer(ws.loras), workspace=ws, banner="")
    make_library_lora(ws.loras, "mystyle", seed=1, trigger="mystyle")
    make_library_lora(ws.loras, "other", seed=2, trigger="other")
    versions = _versions_supported(service.library)
    if versions:
        _add_version(service.library, "mystyle", 3, seed=3)
    demo = app.build_demo(service)
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
                        allowed_paths=[str(ws.outputs)])
    try:
        c = gradio_client.Client(demo.local_url, verbose=False)
        run = ("a cat", "0", "1", 1, 64, "Euler", ANN)
        with pytest.raises(Exception, match=r"exactly one LoRA; 2 chosen \(mystyle, other\)"):
            c.predict("epochs", ["mystyle", "other"], *run, api_name="/run_experiment")
        with pytest.raises(Exception, match="train with --save-every-epochs N to compare epochs"):
            c.predict("epochs", ["other"], *run, api_name="/run_experiment")
        if not versions:
            pytest.skip("the library does not hold epoch versions (NAME@eNN) yet: the run itself is not tried")
        md, table, gallery = c.predict("epochs", ["mystyle"], *run, api_name="/run_experiment")
        assert [r[0] for r in table["data"]] == ["base", "e03", "final"]
        assert table["headers"][4:] == ["CLIP score", "style similarity", "calibrated style"]
        assert "Epochs of **mystyle**" in md and "no style centroid" in md and len(gallery) == 2
    finally:
        demo.close()


EPOCHS_TOML = """
name = "epochs"
[styles]
mystyle = "mystyle"
[protocol]
prompts = ["a cat"]
seeds = [4]
[generation]
steps = 1
width = 64
height = 64
sampler = "Euler"
"""


def test_cli_evaluate_epochs(tmp_path, capsys):
    from stylemix.cli import main
    from stylemix.lora.library import LoraLibrary

    loras = tmp_path / "loras"
    make_library_lora(loras, "mystyle", seed=1, trigger="mystyle")
    cfg = tmp_path / "e.toml"
    cfg.write_text(EPOCHS_TOML)
    g = ["--model", "tiny", "--device", "cpu", "--loras-dir", str(loras), "evaluate", "--config", str(cfg)]
    assert main(g + ["--epochs", "mystyle", "--out", str(tmp_path / "none")]) == 1
    assert "train with --save-every-epochs N" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # refused before anything was written
    assert main(g + ["--epochs", "ghost"]) == 1 and "No LoRA named 'ghost'" in capsys.readouterr().err
    library = LoraLibrary(loras)
    if not _versions_supported(library):
        pytest.skip("the library does not hold epoch versions (NAME@eNN) yet: the run itself is not tried")
    _add_version(library, "mystyle", 2, seed=2)
    assert main(g + ["--epochs", "mystyle@e02", "--dry-run"]) == 0  # a version stands for its LoRA
    plan = json.loads(capsys.readouterr().out)
    assert plan["versions"] == ["mystyle@e02"] and plan["images"] == 3 and plan["settings"]["steps"] == 1
    out = tmp_path / "run"
    assert main(g + ["--epochs", "mystyle", "--weight", "0.5", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [(r["epoch"], r["weight"]) for r in res["rows"]] == [("base", 0.0), ("e02", 0.5), ("final", 0.5)]
    assert not res["has_centroid"] and "no style centroid" in res["note"]
    assert sorted(p.name for p in out.iterdir()) == ["contact.png", "epochs.json", "images", "plot.png"]
    assert main(g + ["--epochs", "mystyle", "--out", str(out)]) == 1  # never mixed with an earlier run
    assert "not empty" in capsys.readouterr().err
