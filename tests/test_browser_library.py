"""The Library tab in a real browser: every action hits the LoRA the user sees selected, and no other.

The race this guards against: the page polls the library every 2 s, and a poll's answer used to
carry the selection the page had when the poll was sent.  On a busy machine the server answers
slowly, so that answer could arrive after an import or a rename had selected another LoRA and put
the old selection back (or the first LoRA in the list): the next rename, share or delete then hit
the wrong LoRA.  Here two spinning processes keep both cores busy, and the poll's answer is slowed
down on the server (it waits before reading the library), as a loaded server answers it.  Every
action is then checked on disk: the intended LoRA changed, and no other one did.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from browser_fixtures import *  # noqa: F401,F403  (fixtures: chromium_path, server, page)
from browser_fixtures import choose, errors_on_page, open_tab, screenshot, wait_until
from helpers import make_lora_file
from ui.library_tab import LIBRARY_POLL_S

pytestmark = pytest.mark.browser

SLOW_POLL_S = 1.5  # the poll reads the library this long after it was sent (a loaded server)


class BusyMachine:
    """Two processes spinning on the CPU beside the app (CI has 2 cores) while the race can happen."""

    def __init__(self):
        self.spinners = []

    def start(self):
        self.spinners = [subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 600\n"
                                           "while time.time() < end: pass"]) for _ in range(2)]

    def stop(self):
        for p in self.spinners:
            p.kill()
            p.wait(timeout=10)
        self.spinners = []


@pytest.fixture
def busy_machine():
    busy = BusyMachine()
    busy.start()
    try:
        yield busy
    finally:
        busy.stop()


@pytest.fixture
def slow_poll(server, monkeypatch):
    """The library poll answers late: it reads the library SLOW_POLL_S after the page sent it."""
    service = server[2]
    real = service.library_version
    calls = []

    def slow_version():
        calls.append(time.monotonic())
        time.sleep(SLOW_POLL_S)
        return real()

    monkeypatch.setattr(service, "library_version", slow_version)
    return calls


def meta(ws, name: str) -> dict:
    return json.loads((ws.loras / name / "stylemix.json").read_text())


def selected(pg) -> str:
    return pg.locator("#lib-select input").input_value()


def message(pg) -> str:
    return pg.locator("#lib-msg").inner_text()


def act(pg, button: str, expect: str, what: str) -> str:
    """Click a Library button and wait for its message (or fail naming the error toast)."""
    pg.locator(f"#{button}").click()
    return wait_until(pg, lambda: expect in (t := message(pg)) and t, what)


def import_lora(pg, path, name: str) -> None:
    box = pg.locator("#lib-import input[type=file]")
    if not box.count():  # the app empties the box after an import; clear it the user's way if it did not
        pg.locator("#lib-import").get_by_label("Clear").first.click()
    wait_until(pg, lambda: box.count(), "the import box")
    pg.locator("#lib-import input[type=file]").set_input_files(str(path))
    pg.locator("#lib-name input, #lib-name textarea").fill(name)
    act(pg, "lib-import-btn", f"Imported {name}", f"the import of {name}")


def fill(pg, elem_id: str, value: str) -> None:
    pg.locator(f"#{elem_id} input, #{elem_id} textarea").fill(value)


def test_library_actions_hit_the_selected_lora_while_the_poll_runs(page, server, tmp_path, busy_machine, slow_poll):
    url, ws, service = server
    page.reload()
    page.locator("#banner").wait_for()
    open_tab(page, "Library")
    files = [make_lora_file(tmp_path / f"f{i}.safetensors", seed=70 + i) for i in range(2)]

    # import two of the user's own LoRAs; each import selects what it imported, and the poll that
    # follows (slow, sent before the import finished) must not take that back
    import_lora(page, files[0], "race_one")
    assert selected(page) == "race_one"
    import_lora(page, files[1], "race_two")
    assert selected(page) == "race_two"
    page.wait_for_timeout(2.5 * LIBRARY_POLL_S * 1000)  # at least one slow poll answered meanwhile
    assert slow_poll, "the library poll never ran"
    assert selected(page) == "race_two", f"the poll changed the selection to {selected(page)!r}"
    owner_key = meta(ws, "race_one")["owner"]

    # rename, then at once share and set a trigger word: all three on the renamed LoRA only
    fill(page, "lib-new-name", "race_two_b")
    act(page, "lib-rename-btn", "Renamed race_two to race_two_b", "the rename")
    assert (ws.loras / "race_two_b").is_dir() and not (ws.loras / "race_two").exists()
    assert (ws.loras / "race_one").is_dir(), "the rename moved another LoRA"
    page.locator("#lib-visibility").get_by_label("shared", exact=True).check()
    act(page, "lib-visibility-btn", "race_two_b is now shared", "setting the visibility")
    fill(page, "lib-new-trigger", "zqxrace")
    act(page, "lib-trigger-btn", "Trigger word of race_two_b", "setting the trigger word")
    page.wait_for_timeout(2.5 * LIBRARY_POLL_S * 1000)
    assert selected(page) == "race_two_b", f"the poll changed the selection to {selected(page)!r}"
    assert meta(ws, "race_two_b")["visibility"] == "shared" and meta(ws, "race_two_b")["trigger_word"] == "zqxrace"
    one = meta(ws, "race_one")
    assert one.get("visibility", "private") == "private" and one["trigger_word"] != "zqxrace", one
    for builtin in ("watercolor", "pixelart"):  # the read-only LoRAs are untouched too
        assert meta(ws, builtin).get("trigger_word") == f"{builtin}style"
    busy_machine.stop()  # the race is over; what follows is the delete's confirmation, checked at full speed

    # delete asks first, naming the LoRA; a double click on Delete deletes nothing
    page.locator("#lib-delete-btn").dblclick()
    wait_until(page, lambda: page.locator("#lib-confirm-row").is_visible(), "the delete confirmation")
    assert "race_two_b" in page.locator("#lib-confirm-text").inner_text()
    page.wait_for_timeout(500)
    assert (ws.loras / "race_two_b").is_dir(), "Delete deleted without a confirmation"
    confirm = page.locator("#lib-confirm-delete")
    assert confirm.inner_text().strip() == "Delete race_two_b"
    confirm.click()
    wait_until(page, lambda: "Deleted race_two_b" in message(page), "the delete")
    assert not (ws.loras / "race_two_b").exists() and (ws.loras / "race_one").is_dir()
    assert selected(page) == "", "something was selected after the delete"
    page.wait_for_timeout(2.5 * LIBRARY_POLL_S * 1000)
    assert selected(page) == "" and (ws.loras / "race_one").is_dir()
    # with nothing selected, Delete deletes nothing and says why (a third click of a double-delete)
    page.locator("#lib-delete-btn").click()
    wait_until(page, lambda: any("Choose a LoRA to delete" in e for e in errors_on_page(page)), "the refusal")
    assert (ws.loras / "race_one").is_dir() and meta(ws, "race_one")["owner"] == owner_key
    screenshot(page, "library-actions")


def test_library_form_shows_the_selected_loras_state_and_errors_leave_it_editable(page, server, tmp_path):
    url, ws, service = server
    page.reload()
    page.locator("#banner").wait_for()
    open_tab(page, "Library")
    assert selected(page) == "", "a LoRA was selected before the user chose one"
    # the table leads with what a user scans for, visible without scrolling
    headers = [h.strip() for h in page.locator("#lib-table thead th").all_inner_texts() if h.strip()]
    assert headers[:4] == ["name", "kind", "owner", "visibility"], headers
    import_lora(page, make_lora_file(tmp_path / "f.safetensors", seed=80), "form_lora")
    page.locator("#lib-visibility").get_by_label("shared", exact=True).check()
    act(page, "lib-visibility-btn", "form_lora is now shared", "sharing form_lora")
    choose(page, "lib-select", "watercolor")
    wait_until(page, lambda: "watercolor" in page.locator("#lib-selected").inner_text(), "the watercolor form")
    assert page.locator("#lib-new-name input, #lib-new-name textarea").input_value() == "watercolor"
    assert page.locator("#lib-new-trigger input, #lib-new-trigger textarea").input_value() == "watercolorstyle"
    assert "read-only" in page.locator("#lib-selected").inner_text()
    choose(page, "lib-select", "form_lora")
    wait_until(page, lambda: page.locator("#lib-new-name input, #lib-new-name textarea").input_value() == "form_lora",
               "the form to follow the selection")
    assert page.locator("#lib-visibility").get_by_label("shared", exact=True).is_checked()

    # a refusal: one readable toast, the fields stay visible and editable, no stale success message
    fill(page, "lib-new-name", "watercolor")  # taken by a built-in LoRA
    page.locator("#lib-rename-btn").click()
    errors = wait_until(page, lambda: errors_on_page(page), "the rename refusal")
    assert any("'watercolor' is taken" in e for e in errors), errors
    assert "form_lora is now shared" not in message(page), "an earlier success still shows beside the error"
    form = page.locator("#lib-select, #lib-new-name, #lib-new-trigger, #lib-visibility, #lib-msg, #lib-table")
    badges = [b.evaluate("e => e.closest('[id]').id + ': ' + e.outerHTML.slice(0, 200)") for b in form.locator(".error").all()
              if b.is_visible()]
    assert not badges, f"an Error badge covers the form: {badges}"
    box = page.locator("#lib-new-name input, #lib-new-name textarea")
    box.fill("form_lora_2")
    assert box.is_editable() and box.input_value() == "form_lora_2"
    assert (ws.loras / "form_lora").is_dir() and not (ws.loras / "form_lora_2").exists()
