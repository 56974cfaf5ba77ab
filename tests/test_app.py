"""The app through a real client: launched on the tiny model, driven by its named API endpoints."""

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from helpers import add_own_centroids, make_library_lora
from stylemix.errors import StyleMixError
from stylemix.paths import Workspace
from stylemix.recipe import read_recipe

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    import app
    from stylemix.service import StyleMixService

    ws = Workspace.at(tmp_path_factory.mktemp("ws"))
    for i, name in enumerate(["anime", "watercolor", "cartoon", "pixelart"]):
        make_library_lora(ws.loras, name, seed=20 + i)
    service = StyleMixService.start("tiny", ws)
    add_own_centroids(service, ("watercolor", "pixelart"), images_per_style=4)
    demo = app.build_demo(service)
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
                        allowed_paths=[str(ws.outputs)])
    yield demo.local_url, ws, service
    demo.close()


def compose(client, weights, seed=3, owner="u" + "1" * 24, blocks=""):
    return client.predict("a cat", "", json.dumps(weights), seed, True, 2, "64x64", "Euler", 7.5, 0, True, blocks,
                          owner, api_name="/compose")


def test_compose_endpoint_weights_change_the_image(app_url):
    url, ws, service = app_url
    client = gradio_client.Client(url, verbose=False)
    assert "tiny" in service.banner.lower() and "random weights" in service.banner
    a = compose(client, {"watercolor": 0.6, "pixelart": 0.4})
    b = compose(client, {"watercolor": 0.5, "pixelart": 0.5})
    zero = compose(client, {"watercolor": 0.0, "pixelart": 0.0})
    base = compose(client, {})
    img = lambda r: np.asarray(Image.open(r[0]), dtype=np.int16)  # noqa: E731
    assert np.abs(img(a) - img(b)).max() > 0
    assert np.array_equal(img(zero), img(base))
    recipe = read_recipe(a[4])  # the downloadable PNG carries its recipe
    assert recipe.loras == {"watercolor": 0.6, "pixelart": 0.4} and recipe.seed == 3
    assert "watercolorstyle" in a[6]
    # scores: demo values from the tiny CLIP, calibrated against the base image, shares summing to 1
    assert "CLIP score" in a[1] and "Demo values" in a[1] and "calibrated" in a[1]
    shares = {c["label"]: c["confidence"] for c in a[2]["confidences"]}
    assert set(shares) == {"watercolor", "pixelart"} and abs(sum(shares.values()) - 1) < 1e-6
    assert a[1] != b[1]  # other weights, other scores
    # the user's files are filed under their own folder
    assert list((ws.outputs / ("u" + "1" * 24)).glob("*.png"))


def test_compose_errors_are_readable(app_url):
    url, _, _ = app_url
    client = gradio_client.Client(url, verbose=False)
    with pytest.raises(Exception, match=r"\[-2, 2\]"):
        compose(client, {"watercolor": 5})
    with pytest.raises(Exception, match="No LoRA named"):
        compose(client, {"nope": 1})
    with pytest.raises(Exception, match="Invalid session id"):
        compose(client, {}, owner="../../etc")


# --------------------------------------------------------------------------- the other tabs

OWNER = "u" + "4" * 24
# /start_training's kohya options: network, conv rank, optimizer, shuffle, keep tokens, caption and tag dropout,
# save every N epochs
KOHYA_DEFAULTS = ("attention", 0, "adamw", False, 1, 0, 0, 0)
OTHER = "u" + "5" * 24


def _client(url):
    return gradio_client.Client(url, verbose=False)


def _png(path, color, size=40):
    Image.new("RGB", (size, size), color).save(path)
    # a few lines so the image is not blurry (the blur filter would reject a flat square)
    img = Image.open(path)
    for x in range(0, size, 4):
        for y in range(size):
            img.putpixel((x, y), (0, 0, 0))
    img.save(path)
    return path


def test_example_loras_are_installed_on_the_tiny_model(app_url):
    url, ws, service = app_url
    rows = _client(url).predict(OWNER, api_name="/list_loras")["data"]
    names = {r[0]: r for r in rows}
    assert {"kenney_flat", "pixel_city"} <= set(names)
    from ui.library_tab import LIBRARY_COLUMNS

    col = {c: i for i, c in enumerate(LIBRARY_COLUMNS)}
    assert LIBRARY_COLUMNS[:4] == ["name", "kind", "owner", "visibility"]  # what a user scans for, on screen
    row = names["kenney_flat"]
    assert row[col["trigger word"]] == "knyflt" and row[col["centroid"]] == "yes"
    assert "example LoRAs" in service.banner
    assert service.install_example_loras() == []  # never twice, never over an existing LoRA


def test_dataset_tab_example_set_prepare_and_captions(app_url):
    url, ws, _ = app_url
    c = _client(url)
    files, style, trigger = c.predict("pixel_city", OWNER, api_name="/load_example_set")
    assert style == "pixel_city" and trigger == "pxcty" and len(files) >= 10
    summary, kept, rejected, captions, *_ = c.predict(
        [gradio_client.handle_file(f) for f in files[:6]], "city", trigger, 64, "auto", 0, False, OWNER,
        api_name="/prepare_dataset")
    assert "Kept 6 of 6" in summary and len(kept) == 6 and not rejected["data"]
    folder = ws.data / OWNER / "city"
    assert (folder / "metadata.jsonl").is_file() and len(list(folder.glob("*.png"))) == 6
    rows = captions["data"]
    assert all(r[1].startswith("pxcty") for r in rows)
    rows[0][1] = "a neon street at night"
    out = c.predict("city", {"headers": ["file", "caption"], "data": rows}, OWNER, api_name="/save_captions")
    assert "Saved 6 captions" in out[0]
    saved = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert saved[0]["text"] == "pxcty, a neon street at night"  # the trigger word is kept in front
    # another session sees none of it: not in its list, and not by name
    with pytest.raises(Exception, match="no dataset named 'city'"):
        c.predict("city", OTHER, api_name="/dataset_view")
    # no name can lead outside the user's folder: the dropdown passes any name on, and the service
    # refuses any unsafe one
    with pytest.raises(Exception, match="Invalid dataset name"):
        c.predict("../" + OWNER + "/city", OTHER, api_name="/dataset_view")
    with pytest.raises(Exception, match="Invalid dataset name"):
        _, _, service = app_url
        service.dataset_view(OTHER, "../" + OWNER + "/city")


def test_hostile_upload_is_refused_with_reasons(app_url, tmp_path):
    import zipfile

    url, ws, _ = app_url
    c = _client(url)
    good = _png(tmp_path / "good.png", (200, 40, 40))
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.write(good, "../../escaped.png")
        z.write(good, "fine.png")
    summary, kept, rejected, *_ = c.predict([gradio_client.handle_file(str(evil))], "mixed", "zqxstyle", 64,
                                            "auto", 0, False, OWNER, api_name="/prepare_dataset")
    assert len(kept) == 1 and "rejected 1 unsafe path" in summary
    assert rejected["data"][0][1] == "unsafe_path" and ".." in rejected["data"][0][2]
    only_evil = tmp_path / "only.zip"
    with zipfile.ZipFile(only_evil, "w") as z:
        z.write(good, "../escaped.png")
    with pytest.raises(Exception, match="No usable images.*unsafe_path"):
        c.predict([gradio_client.handle_file(str(only_evil))], "evil", "zqxstyle", 64, "auto", 0, False, OWNER,
                  api_name="/prepare_dataset")
    assert not list(ws.data.parent.rglob("escaped.png"))  # nothing written anywhere
    assert not (ws.data / OWNER / "evil").exists()
    with pytest.raises(Exception, match="Invalid style name"):
        c.predict([gradio_client.handle_file(str(good))], "../../x", "zqxstyle", 64, "auto", 0, False, OWNER,
                  api_name="/prepare_dataset")


def test_train_tab_job_progress_isolation_and_library_refresh(app_url, tmp_path):
    url, ws, service = app_url
    c = _client(url)
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        _png(tmp_path / f"img{i}.png", color, 64)
    c.predict([gradio_client.handle_file(str(tmp_path / f"img{i}.png")) for i in range(4)], "squares",
              "zqxsq", 64, "off", 0, False, OWNER, api_name="/prepare_dataset")
    with pytest.raises(Exception, match="no dataset named 'squares'"):  # not another session's dataset
        c.predict("squares", "newlora", 2, 1e-3, 0, 20, 2, 0, False, 0, *KOHYA_DEFAULTS, OTHER,
                  api_name="/start_training")
    progress, status, _, _, job, *_ = c.predict("squares", "sqlora", 2, 1e-3, 0, 20, 2, 0, False, 0, *KOHYA_DEFAULTS,
                                                OWNER, api_name="/start_training")
    assert job and job in status and "sqlora: Starting the training process" in progress  # a named phase at once
    # another session can neither see nor cancel the job
    with pytest.raises(Exception, match="No training job"):
        c.predict(job, OTHER, api_name="/job_status")
    with pytest.raises(Exception, match="No training job"):
        c.predict(job, OTHER, api_name="/cancel_job")
    with pytest.raises(Exception, match="Invalid job id"):
        c.predict("../" + job, OWNER, api_name="/job_status")
    seen = []
    deadline = time.time() + 240
    while time.time() < deadline:
        view = json.loads(c.predict(job, OWNER, api_name="/job_status"))
        seen.append((view["state"], view["step"]))
        if view["done"]:
            break
        time.sleep(1)
    assert view["state"] == "completed", view
    assert view["percent"] == 100 and view["loss_curve"] and view["samples"]
    # the user's latest job is what a reload shows (job id empty = latest)
    assert json.loads(c.predict("", OWNER, api_name="/job_status"))["id"] == job
    assert json.loads(c.predict("", OTHER, api_name="/job_status")) == {"state": None}
    assert "sqlora" in [e["name"] for e in service.usable_loras(OWNER)]
    assert "sqlora" in [r[0] for r in c.predict(OWNER, api_name="/list_loras")["data"]]
    # the trained LoRA is its trainer's, and private until shared
    from stylemix.access import owner_key

    meta = json.loads((ws.loras / "sqlora" / "stylemix.json").read_text())
    assert meta["owner"] == owner_key(OWNER) and meta["visibility"] == "private"
    assert "sqlora" not in [r[0] for r in c.predict(OTHER, api_name="/list_loras")["data"]]


def test_library_import_export_rename_delete(app_url, tmp_path):
    from helpers import make_lora_file

    url, ws, _ = app_url
    c = _client(url)
    src = make_lora_file(tmp_path / "style.safetensors", seed=7)
    msg, table, select, ex = c.predict(gradio_client.handle_file(str(src)), "imported", "zqximp", OWNER,
                                       api_name="/import_lora")
    assert "Imported" in msg and "imported" in [r[0] for r in table["data"]] and select["value"] == "imported"
    exported = c.predict("imported", "kohya", OWNER, api_name="/export_lora")
    from safetensors.torch import load_file

    keys = list(load_file(exported))
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert (ws.outputs / OWNER / "exports" / "imported-kohya.safetensors").is_file()
    msg, table, select, _ = c.predict("imported", "renamed", OWNER, api_name="/rename_lora")
    names = [r[0] for r in table["data"]]
    assert "renamed" in names and "imported" not in names and select["value"] == "renamed"
    with pytest.raises(Exception, match="Invalid LoRA name"):
        c.predict("renamed", "../../outside", OWNER, api_name="/rename_lora")
    with pytest.raises(Exception, match="Invalid LoRA name"):  # any name reaches the service, which checks it
        c.predict("../watercolor", "kohya", OWNER, api_name="/export_lora")
    with pytest.raises(Exception, match="Invalid LoRA name"):
        app_url[2].export_lora(OWNER, "../watercolor")
    pickle = tmp_path / "evil.ckpt"
    pickle.write_bytes(b"not a pickle you want")
    with pytest.raises(Exception, match="safetensors"):  # the upload itself is refused
        c.predict(gradio_client.handle_file(str(pickle)), "evil", "", OWNER, api_name="/import_lora")
    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(b"garbage-not-safetensors")
    with pytest.raises(Exception, match="not a valid safetensors file"):
        c.predict(gradio_client.handle_file(str(bad)), "evil", "", OWNER, api_name="/import_lora")
    assert not (ws.loras / "evil").exists()
    msg, table, *_ = c.predict("renamed", OWNER, api_name="/delete_lora")
    assert "renamed" not in [r[0] for r in table["data"]] and not (ws.loras / "renamed").exists()


def test_experiments_protocol_and_sweep(app_url):
    url, _, _ = app_url
    c = _client(url)
    md, table, gallery = c.predict("protocol", ["watercolor", "pixelart"], "a cat", "0", "", 2, 64, "Euler", OWNER,
                                   api_name="/run_experiment")
    configs = [r[0] for r in table["data"]]
    assert configs == ["base", "watercolor", "pixelart", "watercolor_pixelart_0.5_0.5"]
    assert "DEMO VALUES" in md and len(gallery) == 2  # scatter plot + contact sheet
    md, table, gallery = c.predict("sweep", ["watercolor", "pixelart"], "a cat", "0", "0, 1", 2, 64, "Euler", OWNER,
                                   api_name="/run_experiment")
    assert len(table["data"]) == 4 and len(gallery) == 3 and "demo values" in md  # grid, share map, clash map
    assert "Clash map: overall cosine" in md
    with pytest.raises(Exception, match="exactly two LoRAs"):
        c.predict("sweep", ["watercolor"], "a cat", "0", "0, 1", 2, 64, "Euler", OWNER, api_name="/run_experiment")
    md, table, gallery = c.predict("balance", ["watercolor", "pixelart"], "a cat", "0", "0.6, 0.4", 2, 64, "Euler", OWNER,
                                   api_name="/run_experiment")
    assert "Best weights" in md and "search previews" in md and len(gallery) == 1  # the path on the share map
    assert table["headers"][:3] == ["step", "w watercolor", "w pixelart"] and len(table["data"]) >= 1
    with pytest.raises(Exception, match="one target share per LoRA"):
        c.predict("balance", ["watercolor", "pixelart"], "a cat", "0", "1", 2, 64, "Euler", OWNER, api_name="/run_experiment")


def test_recipe_png_restores_settings(app_url):
    url, _, _ = app_url
    c = _client(url)
    png = compose(c, {"watercolor": 0.3, "pixelart": -0.2}, seed=11, blocks="pixelart:up=0.5")[4]
    out = c.predict(gradio_client.handle_file(png), api_name="/load_recipe")
    prompt, _, weights, seed, lock, steps, size, sampler, _, blocks, *_ = out
    assert prompt == "a cat" and json.loads(weights) == {"watercolor": 0.3, "pixelart": -0.2}
    assert seed == 11 and lock is True and steps == 2 and size == "64x64" and sampler == "Euler"
    assert blocks == "pixelart:up=0.5"


def test_per_block_weights_change_the_image_and_bad_blocks_are_refused(app_url):
    url, _, _ = app_url
    c = _client(url)
    full = compose(c, {"watercolor": 1.0}, blocks="")
    no_up = compose(c, {"watercolor": 1.0}, blocks="watercolor:up=0")
    img = lambda r: np.asarray(Image.open(r[0]), dtype=np.int16)  # noqa: E731
    assert np.abs(img(full) - img(no_up)).max() > 0
    with pytest.raises(Exception, match="unknown block 'sideways'"):
        compose(c, {"watercolor": 1.0}, blocks="watercolor:sideways=0")


def test_prompt_tags_move_the_sliders_and_never_reach_the_model(app_url):
    url, _, _ = app_url
    c = _client(url)

    def run(prompt, weights, blocks=""):
        return c.predict(prompt, "", json.dumps(weights), 3, True, 2, "64x64", "Euler", 7.5, 0, True, blocks, OWNER,
                         api_name="/compose")

    tagged = run("a cat, <lora:watercolor:0.6:lbw=OUTD>", {"pixelart": 0.4, "watercolor": 0.1})
    plain = run("a cat", {"pixelart": 0.4, "watercolor": 0.6}, blocks="watercolor:lbw=OUTD")
    img = lambda r: np.asarray(Image.open(r[0]), dtype=np.int16)  # noqa: E731
    assert np.array_equal(img(tagged), img(plain))  # the tag's weight and lbw took effect
    assert "<lora" not in tagged[6] and "watercolor 0.6" in tagged[6]  # "Prompt used" shows no tag
    # the prompt box loses the tag, the sliders (weights box) and per-block box take it over
    prompt, weights, blocks = tagged[7:10]
    assert prompt == "a cat" and json.loads(weights) == {"pixelart": 0.4, "watercolor": 0.6}
    assert blocks == "watercolor:lbw=1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"
    recipe = read_recipe(tagged[4])
    assert recipe.prompt == "a cat" and recipe.loras == {"pixelart": 0.4, "watercolor": 0.6}
    with pytest.raises(Exception, match=r"No LoRA named 'nope'.*known: .*watercolor"):
        run("a cat <lora:nope:0.5>", {})
    with pytest.raises(Exception, match=r"weight 5 is outside \[-2, 2\]"):
        run("a cat <lora:watercolor:5>", {})


def test_launch_security_settings_and_zero_gpu(app_url, monkeypatch):
    import app

    _, ws, service = app_url
    monkeypatch.delenv("STYLEMIX_AUTH", raising=False)
    opts = app.launch_options(service)
    assert opts["share"] is False and opts["auth"] is None and opts["max_file_size"] == "200mb"
    assert opts["server_name"] == "127.0.0.1" or os.environ.get("GRADIO_SERVER_NAME")
    assert set(opts["allowed_paths"]) == {str(ws.outputs), str(ws.data), str(ws.loras)}
    monkeypatch.setenv("STYLEMIX_AUTH", "ann:s3cret")
    assert app.launch_options(service)["auth"] == ("ann", "s3cret")
    with pytest.raises(StyleMixError, match="USER:PASSWORD"):
        app.launch_options(service, auth="nopassword")
    # ZeroGPU: the decorator is used only there; training is refused with a reason, not attempted
    fn = lambda: 1  # noqa: E731
    assert app.gpu(60)(fn) is fn
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    with pytest.raises(StyleMixError, match="ZeroGPU"):
        service.start_training("u" + "6" * 24, "anything", "x", 2)


def test_api_callers_may_name_loras_and_datasets_made_after_the_page_was_built(app_url, tmp_path):
    """Another app process sharing the library adds a LoRA after this app started: its owner can act on
    it through the API by name (the service checks who may), and a stranger gets the service's refusal."""
    from helpers import make_lora_file
    from stylemix.access import owner_key

    url, ws, service = app_url
    c = _client(url)
    other_process = StyleMixService_for(ws)
    other_process.import_lora(OWNER, str(make_lora_file(tmp_path / "late.safetensors", seed=9)), "latecomer")
    msg, *_ = c.predict("latecomer", "shared", OWNER, api_name="/set_visibility")
    assert "**latecomer** is now shared" in msg
    assert json.loads((ws.loras / "latecomer" / "stylemix.json").read_text())["owner"] == owner_key(OWNER)
    with pytest.raises(Exception, match="belongs to another user"):
        c.predict("latecomer", "stolen", OTHER, api_name="/rename_lora")
    msg, table, select, _ = c.predict("latecomer", "latecomer2", OWNER, api_name="/rename_lora")
    assert select["value"] == "latecomer2" and (ws.loras / "latecomer2").is_dir()
    with pytest.raises(Exception, match="No LoRA named 'nothere'"):
        c.predict("nothere", OWNER, api_name="/delete_lora")
    msg, table, *_ = c.predict("latecomer2", OWNER, api_name="/delete_lora")
    assert "Deleted **latecomer2**" in msg and not (ws.loras / "latecomer2").exists()
    # a dataset prepared by the other process is viewable by its owner by name
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):  # noise: sharp enough for the blur filter
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    other_process.prepare_dataset(OWNER, [str(tmp_path / f"img{i}.png") for i in range(3)], "lateset", "zqxlate",
                                  64, "off", 0.0)
    summary, *_ = c.predict("lateset", OWNER, api_name="/dataset_view")
    assert "lateset" in summary
    with pytest.raises(Exception, match="no dataset named 'lateset'"):
        c.predict("lateset", OTHER, api_name="/dataset_view")


def StyleMixService_for(ws):
    """A second service over the same workspace (as a second app process would have), sharing the tiny model."""
    from stylemix.service import StyleMixService

    return StyleMixService.start("tiny", ws, examples=False)


def test_a_user_error_is_one_log_line_and_readable_on_the_page(app_url, caplog, capfd):
    """A refusal reaches the caller whole (tags and quotes as typed) and the log as one line, no traceback;
    a bad form value never becomes int()'s message."""
    import logging

    url, ws, _ = app_url
    c = _client(url)
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="stylemix.app"):
        with pytest.raises(Exception, match="Invalid size 'abc'"):
            c.predict([], "ds", "zqx", "abc", "off", 0, False, OWNER, api_name="/prepare_dataset")
        with pytest.raises(Exception, match=r"No LoRA named 'ghost' in your library"):
            c.predict("ghost", "kohya", OWNER, api_name="/export_lora")
    err = capfd.readouterr()
    assert "Traceback" not in err.out + err.err, (err.out + err.err)[-2000:]
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("export_fn refused: No LoRA named 'ghost'" in m for m in refusals), refusals
    assert all("\n" not in m for m in refusals)


def test_train_tab_offers_kohyas_options_checked_like_the_cli():
    """The Train tab's kohya options reach TrainConfig under their names; a bad one is refused with the
    CLI's words before any job starts."""
    from stylemix.errors import StyleMixError
    from stylemix.training.config import TrainConfig
    from ui.train_tab import kohya_settings

    s = kohya_settings("locon", 8, "prodigy", True, 2, 0.1, 0.2, 3)
    assert s == {"network": "locon", "optimizer": "prodigy", "shuffle_caption": True, "keep_tokens": 2,
                 "caption_dropout_rate": 0.1, "caption_tag_dropout_rate": 0.2, "conv_rank": 8, "conv_alpha": 4.0,
                 "save_every_epochs": 3}
    TrainConfig(data_dir="d", name="n", **s).validate()  # every key is a TrainConfig field, every value valid
    assert "conv_rank" not in kohya_settings(*KOHYA_DEFAULTS) and "save_every_epochs" not in kohya_settings(*KOHYA_DEFAULTS)
    for args, message in ((("lycoris",) + KOHYA_DEFAULTS[1:], "Invalid network 'lycoris': use attention, kohya or locon"),
                          (KOHYA_DEFAULTS[:5] + (1.5,) + KOHYA_DEFAULTS[6:], "Invalid caption dropout rate 1.5"),
                          (KOHYA_DEFAULTS[:2] + ("sgd",) + KOHYA_DEFAULTS[3:], "Invalid optimizer 'sgd'")):
        with pytest.raises(StyleMixError, match=message):
            kohya_settings(*args)
