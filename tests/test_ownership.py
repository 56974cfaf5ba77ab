"""Who may see and change which LoRA: two users (ann, bob) and a stranger, on the tiny model.

Service-level first (no gradio), then the same through the running app with `gradio_client`
over every endpoint that changes something owned or shared.  Every refusal is one readable
message, and afterwards the other user's things are exactly as they were.
"""

import json
import threading
import time

import pytest

from helpers import make_library_lora, make_lora_file
from stylemix import access, gpu_queue
from stylemix.training import jobs
from stylemix.errors import StyleMixError
from stylemix.recipe import Recipe
from stylemix.service import StyleMixService, new_owner_token
from ui.library_tab import library_rows

ANN, BOB, STRANGER = new_owner_token(), new_owner_token(), new_owner_token()


@pytest.fixture
def service(workspace):
    make_library_lora(workspace.loras, "builtin", seed=1)  # an admin's LoRA, present at start
    return StyleMixService.start("tiny", workspace, examples=False)


def snapshot(service, name):
    """Everything a change could touch: the folder's files, the weights' hash, the metadata."""
    folder = service.workspace.loras / name
    return (sorted(p.name for p in folder.iterdir()), service.library.get(name).sha256,
            (folder / "stylemix.json").read_text())


def names(rows):
    return [r[0] for r in rows]


def test_private_lora_is_invisible_and_untouchable_for_others(service, tmp_path):
    src = make_lora_file(tmp_path / "a.safetensors", seed=2)
    entry = service.import_lora(ANN, str(src), "annstyle", "annword")
    assert entry["visibility"] == "private"
    meta = json.loads((service.workspace.loras / "annstyle" / "stylemix.json").read_text())
    assert meta["owner"] == access.owner_key(ANN) and ANN not in json.dumps(meta)  # a hash, never the token
    assert "annstyle" in names(library_rows(service, ANN))
    assert "annstyle" not in names(library_rows(service, BOB)) and "annstyle" not in names(library_rows(service, None))
    assert "annstyle" not in [e["name"] for e in service.usable_loras(BOB)]
    before = snapshot(service, "annstyle")
    # for bob it reads exactly like a missing LoRA, whatever he tries
    attempts = [lambda: service.rename_lora(BOB, "annstyle", "mine"), lambda: service.delete_lora(BOB, "annstyle"),
                lambda: service.set_trigger_word(BOB, "annstyle", "x"),
                lambda: service.set_visibility(BOB, "annstyle", "shared"),
                lambda: service.replace_lora(BOB, str(src), "annstyle"),
                lambda: service.export_lora(BOB, "annstyle"), lambda: service.lora_samples(BOB, "annstyle"),
                lambda: service.compose(BOB, Recipe("a cat", loras={"annstyle": 1.0}, steps=1, width=64, height=64)),
                lambda: service.run_experiment(BOB, "protocol", ["annstyle"], ["a cat"], [0], 1, 64)]
    for attempt in attempts:
        with pytest.raises(StyleMixError, match="No LoRA named 'annstyle' in your library"):
            attempt()
    # the name itself is taken (names are first come, first served), and says so
    with pytest.raises(access.AccessError, match="'annstyle' is taken by another LoRA"):
        service.import_lora(BOB, str(src), "annstyle")
    assert snapshot(service, "annstyle") == before
    assert not (service.workspace.loras / "mine").exists()


def test_shared_lora_is_usable_by_all_and_changed_by_its_owner_only(service, tmp_path):
    src = make_lora_file(tmp_path / "a.safetensors", seed=2)
    other = make_lora_file(tmp_path / "b.safetensors", seed=3)
    service.import_lora(ANN, str(src), "annstyle", "annword")
    assert service.set_visibility(ANN, "annstyle", "shared")["visibility"] == "shared"
    assert "annstyle" in [e["name"] for e in service.usable_loras(BOB)]
    row = {r[0]: r for r in library_rows(service, BOB)}["annstyle"]
    assert row[2:4] == ["another user", "shared"]  # owner, visibility (LIBRARY_COLUMNS)
    assert {r[0]: r for r in library_rows(service, ANN)}["annstyle"][2:4] == ["you", "shared"]
    out = service.compose(BOB, Recipe("a cat", loras={"annstyle": 1.0}, steps=1, width=64, height=64), score=False)
    assert out.result.weights_used == {"annstyle": 1.0}
    before = snapshot(service, "annstyle")
    for action, attempt in [("rename", lambda: service.rename_lora(BOB, "annstyle", "mine")),
                            ("delete", lambda: service.delete_lora(BOB, "annstyle")),
                            ("change the trigger word of", lambda: service.set_trigger_word(BOB, "annstyle", "x")),
                            ("change the visibility of", lambda: service.set_visibility(BOB, "annstyle", "private")),
                            ("replace", lambda: service.replace_lora(BOB, str(other), "annstyle"))]:
        with pytest.raises(access.AccessError) as e:
            attempt()
        assert str(e.value) == (f"Cannot {action} LoRA 'annstyle': it belongs to another user; only its owner "
                                f"can {action} it.")
    with pytest.raises(access.AccessError, match="taken by another LoRA"):
        service.import_lora(BOB, str(other), "annstyle")
    assert snapshot(service, "annstyle") == before
    # the owner can do all of it; replacing keeps the visibility
    assert service.set_trigger_word(ANN, "annstyle", "newword")["trigger_word"] == "newword"
    replaced = service.replace_lora(ANN, str(other), "annstyle")
    assert replaced["sha256"] != before[1] and replaced["visibility"] == "shared"
    assert service.rename_lora(ANN, "annstyle", "annstyle2")["name"] == "annstyle2"
    service.delete_lora(ANN, "annstyle2")
    assert "annstyle2" not in names(library_rows(service, ANN))


def test_builtin_loras_are_shared_and_read_only(service):
    assert "builtin" in names(library_rows(service, STRANGER))
    assert {r[0]: r for r in library_rows(service, STRANGER)}["builtin"][2:4] == ["built-in", "shared"]
    before = snapshot(service, "builtin")
    for attempt in (lambda: service.delete_lora(ANN, "builtin"), lambda: service.rename_lora(ANN, "builtin", "x"),
                    lambda: service.set_visibility(ANN, "builtin", "private"),
                    lambda: service.set_trigger_word(ANN, "builtin", "x")):
        with pytest.raises(access.AccessError, match="built-in shared LoRA, read-only in the app"):
            attempt()
    assert snapshot(service, "builtin") == before


def test_a_replaced_or_reused_name_is_reported_not_loaded_by_old_recipes(service, tmp_path):
    service.import_lora(ANN, str(make_lora_file(tmp_path / "a.safetensors", seed=2)), "annstyle")
    service.set_visibility(ANN, "annstyle", "shared")
    saved = service.compose(BOB, Recipe("a cat", loras={"annstyle": 0.7, "builtin": 0.3}, steps=1, width=64,
                                        height=64), score=False).result.recipe
    keep, notes = service.check_recipe_loras(BOB, saved.loras, saved.lora_hashes)
    assert keep == {"annstyle": 0.7, "builtin": 0.3} and not notes
    service.replace_lora(ANN, str(make_lora_file(tmp_path / "b.safetensors", seed=9)), "annstyle")
    keep, notes = service.check_recipe_loras(BOB, saved.loras, saved.lora_hashes)
    assert keep == {"builtin": 0.3}
    assert len(notes) == 1 and "annstyle: the library's file" in notes[0] and saved.lora_hashes["annstyle"] in notes[0]
    service.set_visibility(ANN, "annstyle", "private")
    assert service.check_recipe_loras(BOB, saved.loras, saved.lora_hashes)[1] == ["annstyle: not in your library"]


def test_training_over_another_users_lora_is_refused(service, tmp_path):
    service.import_lora(ANN, str(make_lora_file(tmp_path / "a.safetensors", seed=2)), "annstyle")
    service.set_visibility(ANN, "annstyle", "shared")
    data = service.user_dir(BOB, "data") / "set"
    data.mkdir()
    (data / "metadata.jsonl").write_text("")
    before = snapshot(service, "annstyle")
    with pytest.raises(access.AccessError, match="'annstyle' is taken by another LoRA"):
        service.start_training(BOB, "set", "annstyle", 2)
    with pytest.raises(access.AccessError, match="Cannot retrain LoRA 'annstyle': it belongs to another user"):
        service.start_training(BOB, "set", "annstyle", 2, overwrite=True)
    with pytest.raises(access.AccessError, match="Cannot retrain LoRA 'builtin': it is a built-in"):
        service.start_training(BOB, "set", "builtin", 2, overwrite=True)
    assert snapshot(service, "annstyle") == before and not jobs.list_jobs(service.workspace)


def _queued_job(service, owner, name):
    """A queued (never started) training job of `owner`, as start_training files it."""
    from trainers.lora import TrainConfig

    data = service.user_dir(owner, "data") / "set"
    data.mkdir(parents=True, exist_ok=True)
    (data / "metadata.jsonl").write_text("")
    config = TrainConfig(data_dir=str(data), name=name, loras_dir=str(service.workspace.loras), model="tiny",
                         owner=access.owner_key(owner))
    job_dir = service.workspace.jobs / f"test-{name}"
    job_dir.mkdir(parents=True)
    from dataclasses import asdict

    (job_dir / "config.json").write_text(json.dumps({"train": asdict(config), "owner": owner}))
    (job_dir / "status.json").write_text(json.dumps({"state": "queued", "step": 0, "queued": "2024"}))
    return job_dir.name


def test_job_cancel_and_resume_by_others_are_refused(service):
    job = _queued_job(service, ANN, "annjob")
    for attempt in (lambda: service.cancel_job(BOB, job), lambda: service.resume_job(BOB, job)):
        with pytest.raises(StyleMixError, match=f"No training job '{job}'"):
            attempt()
    assert jobs.get_job(service.workspace, job).state == jobs.QUEUED
    assert service.cancel_job(ANN, job).state == jobs.CANCELLED
    with pytest.raises(StyleMixError, match=f"No training job '{job}'"):
        service.resume_job(BOB, job)
    assert jobs.get_job(service.workspace, job).state == jobs.CANCELLED
    # bob imports under the stopped job's name: ann's resume would replace his LoRA, so it is refused
    from helpers import make_lora_file as mk

    service.import_lora(BOB, str(mk(service.workspace.outputs / "b.safetensors", seed=4)), "annjob")
    with pytest.raises(access.AccessError, match="'annjob' now belongs to another LoRA"):
        service.resume_job(ANN, job)
    assert jobs.get_job(service.workspace, job).state == jobs.CANCELLED


def test_interactive_request_runs_before_the_experiments_next_image(service):
    """The fair queue: a compose queued during an experiment gets the GPU before the experiment's next image."""
    lock = service.mixer.lock
    lock.grants.clear()
    lock.acquire()  # an image in progress: everything below queues behind it
    results = {}

    def experiment():
        results["exp"] = service.run_experiment(ANN, "protocol", ["builtin"], ["a cat"], [0], 1, 64)

    def compose():
        results["compose"] = service.compose(BOB, Recipe("a dog", steps=1, width=64, height=64), score=False)

    t_exp = threading.Thread(target=experiment, name="experiment")
    t_exp.start()
    deadline = time.time() + 60
    while lock.waiting() != [gpu_queue.BACKGROUND] and time.time() < deadline:  # the experiment waits for the GPU
        time.sleep(0.01)
    t_cmp = threading.Thread(target=compose, name="compose")
    t_cmp.start()
    while sorted(lock.waiting()) != [gpu_queue.INTERACTIVE, gpu_queue.BACKGROUND] and time.time() < deadline:
        time.sleep(0.01)
    assert lock.waiting() == [gpu_queue.INTERACTIVE, gpu_queue.BACKGROUND]  # served in this order
    lock.release()
    t_exp.join(120)
    t_cmp.join(120)
    order = [name for _, name in lock.grants if name in ("experiment", "compose")]
    assert order[0] == "compose", order  # arrived second, served first
    assert order.count("experiment") >= 2  # the experiment took the GPU per image, not once for the run
    assert results["compose"].image_paths and results["exp"]["kind"] == "protocol"


def test_priority_lock_is_reentrant_and_fifo_within_a_priority():
    lock = gpu_queue.PriorityRLock()
    order = []
    lock.acquire()
    with lock:  # re-entrant
        pass

    def take(name, prio):
        with lock if prio == gpu_queue.INTERACTIVE else _bg(lock):
            order.append(name)

    threads = []
    for name, prio in [("bg1", 1), ("bg2", 1), ("ui1", 0), ("ui2", 0)]:
        t = threading.Thread(target=take, args=(name, prio))
        t.start()
        threads.append(t)
        while len(lock.waiting()) < len(threads):
            time.sleep(0.005)
    lock.release()
    for t in threads:
        t.join(10)
    assert order == ["ui1", "ui2", "bg1", "bg2"]
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()


class _bg:
    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        with gpu_queue.background():
            self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()


# --------------------------------------------------------------------------- through the running app

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    import app
    from stylemix.paths import Workspace

    ws = Workspace.at(tmp_path_factory.mktemp("ws"))
    make_library_lora(ws.loras, "builtin", seed=1)
    service = StyleMixService.start("tiny", ws, examples=False)
    demo = app.build_demo(service)
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
                        allowed_paths=[str(ws.outputs)])
    yield demo.local_url, ws, service
    demo.close()


def _png(path, color):
    from PIL import Image

    img = Image.new("RGB", (64, 64), color)
    for x in range(0, 64, 4):
        for y in range(64):
            img.putpixel((x, y), (0, 0, 0))
    img.save(path)
    return str(path)


def test_two_users_and_a_stranger_through_every_mutating_endpoint(app_url, tmp_path):
    from gradio_client import handle_file

    url, ws, service = app_url
    ann, bob, stranger = (gradio_client.Client(url, verbose=False) for _ in range(3))
    made_up = "u" + "0" * 24  # what a stranger types as a session value
    f1 = handle_file(str(make_lora_file(tmp_path / "a.safetensors", seed=2)))
    f2 = handle_file(str(make_lora_file(tmp_path / "b.safetensors", seed=3)))
    msg, table, select, _ = ann.predict(f1, "annshared", "annword", ANN, api_name="/import_lora")
    assert "Imported" in msg and "private" in msg and select["value"] == "annshared"
    ann.predict(f2, "annprivate", "", ANN, api_name="/import_lora")
    msg, *_ = ann.predict("annshared", "shared", ANN, api_name="/set_visibility")
    assert msg == "**annshared** is now shared."
    # what each one sees
    assert {"annshared", "annprivate", "builtin"} <= set(names(ann.predict(ANN, api_name="/list_loras")["data"]))
    assert set(names(bob.predict(BOB, api_name="/list_loras")["data"])) == {"annshared", "builtin"}
    table, select, _ = bob.predict(None, BOB, api_name="/refresh_library")
    assert "annprivate" not in select["choices"].__repr__()
    stranger.predict(None, made_up, api_name="/refresh_library")
    before = {n: snapshot(service, n) for n in ("annshared", "annprivate", "builtin")}
    # a session value is a server-made token: none can pose as a logged-in user's id or a path
    for forged in ("user_ann", "../" + ANN, ANN.upper()):
        with pytest.raises(Exception, match="Invalid session id"):
            stranger.predict(forged, api_name="/list_loras")

    def refused(client, who, pattern, *args, api):
        with pytest.raises(Exception, match=pattern):
            client.predict(*args, who, api_name=api)

    for client, who in ((bob, BOB), (stranger, made_up)):
        other = "belongs to another user; only its owner can"
        refused(client, who, f"Cannot delete LoRA 'annshared': it {other} delete it", "annshared", api="/delete_lora")
        refused(client, who, f"Cannot rename LoRA 'annshared': it {other} rename it", "annshared", "mine",
                api="/rename_lora")
        refused(client, who, "Cannot change the trigger word of LoRA 'annshared'", "annshared", "x",
                api="/set_trigger_word")
        refused(client, who, "Cannot change the visibility of LoRA 'annshared'", "annshared", "private",
                api="/set_visibility")
        refused(client, who, "Cannot replace LoRA 'annshared'", f2, "annshared", "", api="/replace_lora")
        refused(client, who, "'annshared' is taken by another LoRA", f2, "annshared", "", api="/import_lora")
        refused(client, who, "'annprivate' is taken by another LoRA", f2, "annprivate", "", api="/import_lora")
        refused(client, who, "read-only in the app", "builtin", api="/delete_lora")
        # ann's private LoRA is not even offered: the page's own list refuses the name
        refused(client, who, "annprivate", "annprivate", api="/delete_lora")
        refused(client, who, "No LoRA named 'annprivate'", "a cat", "", json.dumps({"annprivate": 1}), 1, True, 1,
                "64x64", "Euler", 7.5, 0, True, "", api="/compose")
    assert {n: snapshot(service, n) for n in before} == before

    # datasets and captions: each user's own; bob cannot read or edit ann's
    pngs = [handle_file(_png(tmp_path / f"{i}.png", c)) for i, c in enumerate([(200, 30, 30), (30, 200, 30)])]
    ann.predict(pngs, "annset", "zqxann", 64, "off", 0, False, ANN, api_name="/prepare_dataset")
    captions = (ws.data / ANN / "annset" / "metadata.jsonl").read_text()
    for who, client in ((BOB, bob), (made_up, stranger)):
        # any name reaches the service, which only ever looks in the caller's own folder
        refused(client, who, "You have no dataset named 'annset'", "annset",
                {"headers": ["file", "caption"], "data": [["0.png", "mine now"]]}, api="/save_captions")
    with pytest.raises(StyleMixError, match="You have no dataset named 'annset'"):
        service.save_captions(BOB, "annset", [["0.png", "mine now"]])
    assert (ws.data / ANN / "annset" / "metadata.jsonl").read_text() == captions

    # jobs: bob cannot cancel or resume ann's
    job = _queued_job(service, ANN, "annjob")
    refused(bob, BOB, f"No training job '{job}'", job, api="/cancel_job")
    refused(bob, BOB, f"No training job '{job}'", job, api="/resume_job")
    assert jobs.get_job(ws, job).state == jobs.QUEUED
    ann.predict(job, ANN, api_name="/cancel_job")  # her own: cancelled (it was only queued)
    refused(stranger, made_up, f"No training job '{job}'", job, api="/resume_job")
    assert jobs.get_job(ws, job).state == jobs.CANCELLED

    # experiments: only with LoRAs one may see, outputs in one's own folder
    refused(bob, BOB, "annprivate", "protocol", ["annprivate"], "a cat", "0", "", 1, 64, "Euler", api="/run_experiment")
    md, table, _ = bob.predict("protocol", ["annshared"], "a cat", "0", "", 1, 64, "Euler", BOB, api_name="/run_experiment")
    assert [r[0] for r in table["data"]] == ["base", "annshared"]
    assert list((ws.outputs / BOB / "experiments").iterdir()) and not (ws.outputs / ANN / "experiments").exists()

    # the owner can change everything; the others see it without reloading (the library fingerprint moved)
    version = service.library_version()
    ann.predict("annshared", "annword2", ANN, api_name="/set_trigger_word")
    msg, table, select, _ = ann.predict("annshared", "annrenamed", ANN, api_name="/rename_lora")
    assert msg == "Renamed **annshared** to **annrenamed**." and select["value"] == "annrenamed"
    assert service.library_version() != version
    assert "annrenamed" in names(bob.predict(BOB, api_name="/list_loras")["data"])
    ann.predict("annprivate", ANN, api_name="/delete_lora")
    assert not (ws.loras / "annprivate").exists()
