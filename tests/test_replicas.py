"""Replicas sharing one library: two real app processes (`python app.py`) on one STYLEMIX_HOME.

Two users and a stranger call import, rename, delete, visibility and training through
`gradio_client`, on both apps at once, in rounds that race for the same names.  Afterwards every
LoRA folder is complete, every recorded hash is its file's, each contested name went to exactly
one caller, every loser got a readable refusal, nothing a caller was told had succeeded is
missing, and both apps list the same LoRAs for each user (no process keeps a stale view).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import make_lora_file
from stylemix.access import owner_key
from stylemix.service import new_owner_token

gradio_client = pytest.importorskip("gradio_client")

ROOT = Path(__file__).resolve().parent.parent
ANN, BOB, STRANGER = new_owner_token(), new_owner_token(), new_owner_token()
START_S = 150  # both apps starting at once on a busy 2-core machine: a ceiling, never a speed assertion
KOHYA_DEFAULTS = ("attention", 0, "adamw", False, 1, 0, 0, 0)  # /start_training's kohya options (tests/test_app.py)
# what a caller who lost a race may be told; anything else (a traceback, an OSError) is a failure
REFUSALS = ("is taken by another LoRA", "already have a LoRA named", "already exists", "being trained by job",
            "already training a LoRA", "No LoRA named", "not in the list of choices", "belongs to another user")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(home: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "STYLEMIX_HOME": str(home), "STYLEMIX_MODEL": "tiny", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "STYLEMIX_STYLE_JUDGE": "clip"}
    for var in ("STYLEMIX_LORAS", "STYLEMIX_DATA", "STYLEMIX_JOBS", "STYLEMIX_OUTPUTS", "STYLEMIX_DEVICES"):
        env.pop(var, None)  # everything under the one shared STYLEMIX_HOME
    return subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_up(proc: subprocess.Popen, url: str, log: Path, deadline: float) -> None:
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app at {url} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the app at {url} did not start in {START_S}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def two_apps(tmp_path_factory):
    home = tmp_path_factory.mktemp("shared-home")
    procs, urls = [], []
    for i in range(2):  # both start at once: they race to install the example LoRAs too
        port = _free_port()
        log = home.parent / f"app{i}-{home.name}.log"
        procs.append((_start_app(home, port, log), log))
        urls.append(f"http://127.0.0.1:{port}/")
    try:
        deadline = time.time() + START_S
        for (proc, log), url in zip(procs, urls):
            _wait_up(proc, url, log, deadline)
        yield urls, home
    finally:
        from stylemix.paths import Workspace
        from stylemix.training import jobs

        for job in jobs.list_jobs(Workspace.at(home)):  # never leave a training process behind
            if job.state in (jobs.RUNNING, jobs.QUEUED):
                jobs.cancel(Workspace.at(home), job.id, timeout=30)
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _png(path: Path, color) -> str:
    from PIL import Image

    img = Image.new("RGB", (64, 64), color)
    for x in range(0, 64, 4):  # lines, so the blur filter keeps it
        for y in range(64):
            img.putpixel((x, y), (0, 0, 0))
    img.save(path)
    return str(path)


class Calls:
    """Every call's outcome, in the order they finished: (who, what, name, ok, message)."""

    def __init__(self):
        self.log: list[tuple] = []
        self._lock = threading.Lock()

    def run_round(self, *calls) -> None:
        """Run the calls at once (one thread each, released together), record each outcome."""
        barrier = threading.Barrier(len(calls))

        def one(who, what, name, fn):
            barrier.wait(30)
            try:
                out = fn()
                entry = (who, what, name, True, out)
            except Exception as e:  # noqa: BLE001 -- gradio_client raises its own error class with the message
                entry = (who, what, name, False, str(e))
            with self._lock:
                self.log.append(entry)

        threads = [threading.Thread(target=one, args=c) for c in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

    def outcome(self, who, what, name) -> tuple[bool, object]:
        found = [(ok, msg) for w, a, n, ok, msg in self.log if (w, a, n) == (who, what, name)]
        assert len(found) == 1, (who, what, name, self.log)
        return found[0]

    def refusals_are_readable(self) -> None:
        for who, what, name, ok, msg in self.log:
            if not ok:
                assert any(r in msg for r in REFUSALS), f"{what} {name!r}: not a readable refusal: {msg}"


def test_two_app_processes_share_one_library_safely(two_apps, tmp_path):
    from gradio_client import handle_file

    (url1, url2), home = two_apps
    client = {(who, app): gradio_client.Client(url, verbose=False)
              for who in ("ann", "bob", "stranger") for app, url in (("1", url1), ("2", url2))}
    client[("ann", "1b")] = gradio_client.Client(url1, verbose=False)
    token = {"ann": ANN, "bob": BOB, "stranger": STRANGER}
    files = [handle_file(str(make_lora_file(tmp_path / f"{i}.safetensors", seed=30 + i))) for i in range(3)]
    fa, fb, fc = files

    def call(who, app, api, *args):
        return lambda: client[(who, app)].predict(*args, token[who], api_name=api)

    def refreshed(who, app, api, *args):
        """A Library action on the name the caller's page now lists (the page's dropdown: refreshed first)."""
        def run():
            client[(who, app)].predict(None, token[who], api_name="/refresh_library")
            return client[(who, app)].predict(*args, token[who], api_name=api)
        return run

    # bob's dataset, through his session on app 1 (the Train tab's dataset list is the session's)
    pngs = [handle_file(_png(tmp_path / f"{i}.png", c)) for i, c in enumerate([(200, 30, 30), (30, 200, 30)])]
    client[("bob", "1")].predict(pngs, "bobset", "zqxbob", 64, "off", 0, False, BOB, api_name="/prepare_dataset")

    calls = Calls()
    # round 1: ann and bob import the same name on different apps; everyone imports something of their own
    calls.run_round(("ann", "import", "clash", call("ann", "1", "/import_lora", fa, "clash", "")),
                    ("bob", "import", "clash", call("bob", "2", "/import_lora", fb, "clash", "")),
                    ("ann", "import", "annkeep", call("ann", "2", "/import_lora", fa, "annkeep", "")),
                    ("bob", "import", "bobkeep", call("bob", "1", "/import_lora", fb, "bobkeep", "")),
                    ("stranger", "import", "strangerown", call("stranger", "1", "/import_lora", fc, "strangerown", "")))
    # round 2: a rename races an import of the new name; training races an import of its name; ann shares
    # what she is renaming; the stranger tries bob's and the clash winner's LoRAs
    calls.run_round(("ann", "rename", "target", refreshed("ann", "1", "/rename_lora", "annkeep", "target")),
                    ("bob", "import", "target", call("bob", "2", "/import_lora", fb, "target", "")),
                    ("ann", "share", "annkeep", refreshed("ann", "1b", "/set_visibility", "annkeep", "shared")),
                    ("bob", "train", "trained", call("bob", "1", "/start_training", "bobset", "trained", 2, 1e-3, 0,
                                                     20, 2, 0, False, 0, *KOHYA_DEFAULTS)),
                    ("ann", "import", "trained", call("ann", "2", "/import_lora", fa, "trained", "")),
                    ("stranger", "delete", "bobkeep", refreshed("stranger", "2", "/delete_lora", "bobkeep")),
                    ("stranger", "rename", "clash", refreshed("stranger", "1", "/rename_lora", "clash", "stolen")))
    ann_won_clash = calls.outcome("ann", "import", "clash")[0]
    winner, loser = ("ann", "bob") if ann_won_clash else ("bob", "ann")
    ann_lora = "target" if calls.outcome("ann", "rename", "target")[0] else "annkeep"
    # round 3: the clash winner deletes it while the loser imports the name again; bob shares bobkeep while
    # the stranger tries to make it private
    calls.run_round(("winner", "delete", "clash", refreshed(winner, "2", "/delete_lora", "clash")),
                    ("loser", "import", "clash", call(loser, "1", "/import_lora", fc, "clash", "")),
                    ("bob", "share", "bobkeep", refreshed("bob", "2", "/set_visibility", "bobkeep", "shared")),
                    ("stranger", "rename", ann_lora, refreshed("stranger", "2", "/rename_lora", ann_lora, "stolen")),
                    ("stranger", "private", "bobkeep", refreshed("stranger", "1", "/set_visibility", "bobkeep",
                                                                 "private")))
    # a started training job is not run to its end here: cancelled by its owner (its start was the point)
    trained_ok, view = calls.outcome("bob", "train", "trained")
    if trained_ok:
        job = view[4]
        client[("bob", "1")].predict(job, BOB, api_name="/cancel_job")

    calls.refusals_are_readable()
    loras = home / "loras"
    # every LoRA folder is complete and its recorded hash is its file's; no half-written leftovers
    meta = {}
    for d in sorted(loras.iterdir()):
        if d.name.startswith("."):
            assert d.name == ".stylemix.lock", f"a leftover temporary entry: {d.name}"
            continue
        weights, info = d / "pytorch_lora_weights.safetensors", d / "stylemix.json"
        assert weights.is_file() and info.is_file(), f"{d.name} is incomplete: {sorted(os.listdir(d))}"
        m = json.loads(info.read_text())
        assert m["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest(), d.name
        assert m["name"] == d.name, (d.name, m["name"])
        meta[d.name] = m
    assert {"kenney_flat", "pixel_city"} <= set(meta)  # both apps installed the examples; one copy stayed

    def owner_of(name):
        return {owner_key(t): w for w, t in token.items()}.get(meta[name].get("owner")) if name in meta else None

    # round 1: exactly one of the two clash imports succeeded (and it was the winner's until round 3)
    assert calls.outcome("bob", "import", "clash")[0] != ann_won_clash
    assert owner_of("strangerown") == "stranger" and owner_of("bobkeep") == "bob"
    # round 2: the name 'target' went to exactly one of the rename and the import
    renamed = calls.outcome("ann", "rename", "target")[0]
    assert renamed != calls.outcome("bob", "import", "target")[0]
    assert owner_of("target") == ("ann" if renamed else "bob")
    assert owner_of(ann_lora) == "ann" and (renamed is ("annkeep" not in meta))
    if calls.outcome("ann", "share", "annkeep")[0]:
        assert meta[ann_lora]["visibility"] == "shared"  # shared before or after the rename: it stayed shared
    # 'trained': exactly one of bob's training start and ann's import
    assert trained_ok != calls.outcome("ann", "import", "trained")[0]
    if trained_ok:
        from stylemix.paths import Workspace
        from stylemix.training import jobs

        assert [j.lora_name for j in jobs.list_jobs(Workspace.at(home), BOB)] == ["trained"]
    else:
        assert owner_of("trained") == "ann"
    # the stranger changed nothing of anyone's
    for what, name in (("delete", "bobkeep"), ("rename", "clash"), ("private", "bobkeep"), ("rename", ann_lora)):
        assert not calls.outcome("stranger", what, name)[0]
    assert "stolen" not in meta
    # round 3: the delete and the re-import of 'clash' both hold, in whichever order they ran
    deleted, reimported = calls.outcome("winner", "delete", "clash")[0], calls.outcome("loser", "import", "clash")[0]
    assert deleted, calls.log
    assert owner_of("clash") == (loser if reimported else None)
    assert calls.outcome("bob", "share", "bobkeep")[0] and meta["bobkeep"]["visibility"] == "shared"

    # the library's lock is one for all processes: while this process holds it, an app's import waits
    from stylemix.lora.library import LoraLibrary

    done = threading.Event()
    with LoraLibrary(loras).lock():
        t = threading.Thread(target=lambda: (call("stranger", "2", "/import_lora", fa, "late", "")(), done.set()))
        t.start()
        assert not done.wait(2.0), "an app wrote to the library while another process held its lock"
    t.join(60)
    assert done.is_set() and (loras / "late" / "stylemix.json").is_file()
    meta["late"] = json.loads((loras / "late" / "stylemix.json").read_text())

    # each app sees the other's changes: both list the same LoRAs for each user, as the folder has them
    for who in ("ann", "bob", "stranger"):
        lists = [sorted(r[0] for r in client[(who, app)].predict(token[who], api_name="/list_loras")["data"])
                 for app in ("1", "2")]
        assert lists[0] == lists[1], (who, lists)
        visible = sorted(n for n, m in meta.items() if m.get("visibility") == "shared" or owner_of(n) == who
                         or not m.get("owner"))
        assert lists[0] == visible, (who, lists[0], visible)
