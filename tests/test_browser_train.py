"""The Train tab in a real browser: bad values are refused with one readable message and change
nothing; a run shows its named phases, every sample labelled with its step and prompt, a pointer to
Compose when done, and the user's past jobs, each of which can be shown again.

The app runs on the tiny model (fixtures in tests/browser_fixtures.py); every assertion is on what
the page shows, or on the workspace the page's actions wrote to.
"""

from __future__ import annotations

import re

import pytest

from browser_fixtures import *  # noqa: F401,F403  (fixtures: chromium_path, server, page)
from browser_fixtures import EXAMPLES, choose, errors_on_page, open_tab, screenshot, set_number, wait_until

pytestmark = pytest.mark.browser

DATASET = "trainset"
PROMPTS = ("trnstyle, a portrait of a woman", "trnstyle, a mountain landscape", "trnstyle, a bowl of fruit")

# (box, what is typed, what the one message must say): empty, negative, fractional, huge and off-grid values.
# (Text that is not a number cannot be typed into a number box; the server's answer to it is tested in
# tests/test_jobs.py, with the same limits.)
BAD_VALUES = [
    ("tr-steps", "", "No max steps given"),
    ("tr-steps", "-5", "Invalid max steps -5: use a whole number from 1 to 100000, or 0 to train by epochs"),
    ("tr-steps", "1e9", "Invalid max steps 1000000000"),
    ("tr-lr", "0", "Invalid learning rate 0: use a number greater than 0 and at most 1"),
    ("tr-lr", "", "No learning rate given"),
    ("tr-rank", "2.5", "Invalid rank 2.5"),
    ("tr-epochs", "0", "Invalid epochs 0: use a whole number from 1 to 10000"),
    ("tr-batch", "100000", "Invalid batch size 100000"),
    ("tr-res", "100", "Invalid resolution 100: use a multiple of 8 from 64 to 2048"),
    ("tr-seed", "-1", "Invalid seed -1"),
    ("tr-seed", "99999999999999999999", "Invalid seed 1e+20"),
]
GOOD = {"tr-steps": "2", "tr-lr": "0.0001", "tr-rank": "0", "tr-epochs": "20", "tr-batch": "2", "tr-res": "0",
        "tr-seed": "42"}


def number_box(pg, elem_id: str):
    return pg.locator(f"#{elem_id} input[type=number]")


def close_toasts(pg) -> None:
    for button in pg.locator(".toast-close").all():
        if button.is_visible():
            button.click()
    wait_until(pg, lambda: not errors_on_page(pg), "the error messages to close")


def progress_text(pg) -> str:
    bar = pg.locator("#tr-progress .sm-progress")
    return bar.inner_text().strip() if bar.count() else ""


def job_cell(table, job_id: str):
    """The visible cell of the jobs table that holds this job id (the table also keeps hidden copies)."""
    return table.get_by_test_id(re.compile(r"^cell-\d+-0$")).filter(has_text=job_id).first


def jobs_on_disk(ws) -> list[str]:
    return sorted(d.name for d in ws.jobs.iterdir() if d.is_dir())


@pytest.fixture(scope="module")
def owner_dataset(page, server):
    """A small dataset of this browser's user: the example set loaded by the page, prepared at 64 px."""
    url, ws, service = server
    page.reload()
    page.locator("#banner").wait_for()
    open_tab(page, "Dataset")
    page.locator("#ds-example").click()  # copies the example set into this user's upload folder
    uploads = ws.data / ".uploads"
    wait_until(page, lambda: uploads.is_dir() and any(uploads.iterdir()), "the example set to be staged")
    owner = next(uploads.iterdir()).name
    files = sorted((uploads / owner).rglob("*.png"))[:4]
    service.prepare_dataset(owner, files, DATASET, "trnstyle", size=64)
    page.reload()  # the Train tab's dataset list is filled on load
    page.locator("#banner").wait_for()
    return owner


def other_users_job(ws, owner: str) -> str:
    """A cancelled job of another user, on this user's dataset folder (only its listing matters)."""
    from stylemix.training import jobs
    from stylemix.training.config import TrainConfig

    config = TrainConfig(data_dir=str(ws.data / owner / DATASET), name="someoneelse", model="tiny", device="cpu",
                         resolution=64, rank=4, alpha=4, max_steps=2, sample_prompts=[])
    job = jobs.submit(config, ws, owner="u" + "f" * 24, start=False)
    return jobs.cancel(ws, job.id, timeout=60).id


def test_bad_values_get_one_message_and_change_nothing(page, server, owner_dataset):
    url, ws, service = server
    for tab, picker in (("Library", "#lib-select"), ("Experiments", "#ex-loras")):  # tabs render when first opened
        open_tab(page, tab)
        page.locator(picker).wait_for()
    open_tab(page, "Train")
    choose(page, "tr-dataset", DATASET)
    page.locator("#tr-name input, #tr-name textarea").fill("badvalues")
    page.get_by_role("button", name=re.compile(r"^\s*Advanced")).click()
    for elem_id, good in GOOD.items():
        set_number(page, elem_id, good)
    before = jobs_on_disk(ws)
    for elem_id, typed, message in BAD_VALUES:
        box = number_box(page, elem_id)
        box.fill(typed)
        box.press("Tab")
        page.locator("#tr-start").click()
        wait_until(page, lambda: errors_on_page(page), f"a message for {typed!r} in {elem_id}")
        toasts = page.locator(".toast-body").all_inner_texts()
        assert len(toasts) == 1 and message in toasts[0], (elem_id, typed, toasts)  # one message, the right one
        assert "Traceback" not in toasts[0] and "500" not in toasts[0]
        # the form stays as typed and usable: no Error badge over it, nothing clamped or reset
        assert box.is_visible() and box.is_editable() and box.input_value() == typed, (elem_id, box.input_value())
        # (the event's outputs include the Library and Experiments tabs' LoRA pickers: no badge there either)
        for part in ("#tr-name", f"#{elem_id}", "#tr-samples", "#tr-jobs", "#tr-loss", "#lib-select", "#ex-loras"):
            assert "Error" not in (page.locator(part).text_content() or ""), (part, elem_id, typed)
        assert jobs_on_disk(ws) == before  # nothing queued, nothing written
        close_toasts(page)
        set_number(page, elem_id, GOOD[elem_id])
    screenshot(page, "train-bad-values")


def test_training_shows_phases_labelled_samples_compose_pointer_and_past_jobs(page, server, owner_dataset):
    url, ws, service = server
    others = other_users_job(ws, owner_dataset)
    open_tab(page, "Train")
    choose(page, "tr-dataset", DATASET)
    page.locator("#tr-name input, #tr-name textarea").fill("trained")
    set_number(page, "tr-steps", 2)  # the app samples every steps // 4 = 1 step: 2 rounds of 3 prompts
    seen: list[str] = []

    def ended() -> bool:
        text = progress_text(page)
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        return any(w in text for w in ("completed", "failed", "cancelled"))

    page.locator("#tr-start").click()
    wait_until(page, ended, "the training to end", timeout=300, interval=0.2)
    assert "trained: completed: step 2/2 · 100%" in seen[-1], (seen, page.locator("#tr-status").inner_text())
    print("progress seen:", seen)
    seen = [t for t in seen if t.startswith("trained: ")]  # not the previous job's or "No training job yet."
    running = seen[:-1]
    # each poll showed what the job was doing: a named phase, never a bare "step 0/?"
    phase_names = ("Starting the training process", "Loading the model", "Caching latents", "Training: step",
                   "Making samples (step", "Saving", "Scoring the style")
    assert running and all(any(p in t for p in phase_names) for t in running), running
    assert not any("0/?" in t for t in seen), seen
    assert any(p in t for t in running for p in phase_names if p != "Training: step"), running  # not only steps
    assert not any(re.search(r"\b0 ?s left", t) for t in seen), seen  # never "0 s left" while work remains
    widths = [int(re.search(r"· (\d+)%", t).group(1)) for t in seen]
    assert widths == sorted(widths) and widths[-1] == 100, seen

    # every sample, labelled with its step and prompt
    gallery = page.locator("#tr-samples")
    wait_until(page, lambda: gallery.locator(".caption-label").count() == 6, "6 labelled samples")
    captions = gallery.locator(".caption-label").all_inner_texts()
    assert captions == [f"step {s} · {p}" for s in (1, 2) for p in PROMPTS], captions
    # where to go next
    status = page.locator("#tr-status").inner_text()
    assert "trained is ready: open the Compose tab and move its slider" in status, status
    job_id = page.locator("#tr-job input, #tr-job textarea").input_value()
    table = page.locator("#tr-jobs")
    wait_until(page, lambda: job_id in table.inner_text(), "the job in the list of past jobs")
    assert re.search(rf"{job_id}\s+trained\s+completed\s+2/2\s+20\d\d-", table.inner_text()), table.inner_text()
    screenshot(page, "train")

    # a second job, cancelled: the list has both, and a click on a row shows that job again
    page.locator("#tr-name input, #tr-name textarea").fill("stopped")
    set_number(page, "tr-steps", 400)
    page.locator("#tr-start").click()
    wait_until(page, lambda: "Training: step" in progress_text(page) and "stopped" in progress_text(page),
               "the second job to train", timeout=240, interval=0.2)
    page.locator("#tr-cancel").click()
    wait_until(page, lambda: "cancelled at step" in progress_text(page), "the job to be cancelled", timeout=120)
    second = page.locator("#tr-job input, #tr-job textarea").input_value()
    assert second != job_id
    wait_until(page, lambda: second in table.inner_text() and "cancelled" in table.inner_text(), "both jobs listed")
    job_cell(table, job_id).click()
    wait_until(page, lambda: "trained: completed" in progress_text(page)
               and page.locator("#tr-job input, #tr-job textarea").input_value() == job_id, "the first job shown again")
    assert gallery.locator(".caption-label").count() == 6
    job_cell(table, second).click()
    wait_until(page, lambda: "stopped: cancelled at step" in progress_text(page), "the cancelled job shown again")
    # only this user's jobs are listed: another user's job in the same workspace is not
    assert others not in table.inner_text()
    assert set(re.findall(r"\d{8}-\d{6}-[0-9a-f]{6}", table.inner_text())) == {job_id, second}, table.inner_text()
    screenshot(page, "train-past-jobs")
