"""The app in a real browser: Debian's headless Chromium driven by Playwright, app on the tiny model.

The set-up (tests/browser_setup.py) finds or installs the system Chromium; these tests skip only
where it truly cannot be had, and say why.  The app runs in this process on a temporary
workspace.  Everything is done the way a user does it (clicks, typing, real file uploads, mouse
drags on the sliders), and every assertion is on what the page shows or serves.  Each tab is
screenshotted into tests/artifacts/<tab>.png (ignored by git) for a human to look at.
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser_setup import ARTIFACTS, ensure_chromium, launch_browser
from helpers import add_own_centroids, make_library_lora
from stylemix.paths import Workspace

pytestmark = pytest.mark.browser

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples" / "pixel_city"
# A handful of the example set: enough for a kept gallery and a few training batches, few enough to be quick.
EXAMPLE_FILES = ["skyline_far_left.png", "street_bar.png", "street_tower.png", "towers_mid.png",
                 "synth_buildings.png", "synth_palms.png"]
MIX_STYLES = ("watercolor", "pixelart")  # library LoRAs present from the start, each with a style centroid
TRAIN_STEPS = 3  # each step also renders 3 sample images (the app samples ~4 times a run): keep it short
TRAINED = "mycity"  # the LoRA the browser trains (the library ships a `pixel_city` example already)
WAIT_S = 120  # generous per-step ceiling for a 2-core CI machine; never a speed assertion


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path, why = ensure_chromium()
    if path is None:
        pytest.skip(f"no Chromium for the browser tests: {why}")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on the tiny model over a fresh workspace with two ready-made style LoRAs."""
    import app
    from stylemix.service import StyleMixService

    ws = Workspace.at(tmp_path_factory.mktemp("browser-ws"))
    for p in (ws.loras, ws.data, ws.jobs, ws.outputs):
        p.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(MIX_STYLES):
        make_library_lora(ws.loras, name, seed=40 + i)
    service = StyleMixService.start("tiny", ws)
    add_own_centroids(service, MIX_STYLES, images_per_style=2)  # so the page shows style shares
    demo = app.build_demo(service)
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
                        allowed_paths=[str(ws.outputs)])
    try:
        yield demo.local_url, ws, service
    finally:
        demo.close()
        from stylemix.training import jobs

        for job in jobs.list_jobs(ws):  # a failed test must not leave a training process behind
            if job.state in (jobs.RUNNING, jobs.QUEUED):
                jobs.cancel(ws, job.id, timeout=30)


@pytest.fixture(scope="module")
def page(chromium_path, server, tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # a test dependency, not a machine limitation: fail, never skip
        pytest.fail("playwright is not installed: pip install -r requirements-test.txt (no browser download needed)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("failed-*.png"):  # only this run's failure screenshots stay
        old.unlink()
    with sync_playwright() as pw:
        context = launch_browser(pw, chromium_path, tmp_path_factory.mktemp("chromium-profile"))
        context.set_default_timeout(30_000)
        pg = context.new_page()
        pg.goto(server[0])
        pg.locator("#banner").wait_for()
        try:
            yield pg
        finally:
            context.close()


# ----------------------------------------------------------------------------- helpers


def errors_on_page(pg) -> list[str]:
    """Text of Gradio's error toasts (gr.Error), to say *why* a wait failed."""
    return [t.strip() for t in pg.locator(".toast-body.error, .toast-wrap .error").all_inner_texts() if t.strip()]


def wait_until(pg, condition, what: str, timeout: float = WAIT_S, interval: float = 0.1):
    """Poll `condition()` until truthy; on timeout fail naming `what`, the page's errors and a screenshot."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            shot = ARTIFACTS / f"failed-{re.sub(r'[^a-z0-9]+', '-', what.lower())[:60]}.png"
            pg.screenshot(path=str(shot), full_page=True)
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; errors on the page: "
                        f"{errors_on_page(pg) or 'none'}; screenshot: {shot}")
        pg.wait_for_timeout(interval * 1000)


def open_tab(pg, label: str) -> None:
    pg.get_by_role("tab", name=re.compile(rf"^\s*{label}\s*$", re.I)).click()


def screenshot(pg, tab: str) -> Path:
    path = ARTIFACTS / f"{tab}.png"
    pg.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    return path


def set_number(pg, elem_id: str, value) -> None:
    """Type into a Slider/Number's number box and leave it (blur fires the slider's change/release)."""
    box = pg.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def slider_thumb(pg, label: str) -> tuple[dict, float, float]:
    """A slider's track box and where its thumb is (x, y), scrolled into view."""
    rng = pg.get_by_label(f"range slider for {label}", exact=True)
    rng.scroll_into_view_if_needed()
    box = rng.bounding_box()
    lo, hi, val = (float(rng.get_attribute(a) or 0) for a in ("min", "max", "value"))
    return box, box["x"] + box["width"] * (val - lo) / (hi - lo), box["y"] + box["height"] / 2


def drag_slider(pg, label: str, to_fraction: float) -> float:
    """Drag a slider's thumb with the mouse (press, move, release) to a fraction of its track.

    Returns the value the slider shows afterwards.  The thumb starts where the value is; Gradio
    fires `.release` on the pointerup of the range input, which is what the app listens to.
    """
    box, x0, y = slider_thumb(pg, label)
    x1 = box["x"] + box["width"] * to_fraction
    pg.mouse.move(x0, y)
    pg.mouse.down()
    pg.mouse.move((x0 + x1) / 2, y, steps=4)
    pg.mouse.move(x1, y, steps=4)
    pg.mouse.up()
    return float(pg.get_by_label(f"number input for {label}").input_value())


def image_src(pg) -> str:
    img = pg.locator("#cp-image img")
    return (img.first.get_attribute("src") or "") if img.count() else ""


def fetch_pixels(pg, src: str) -> np.ndarray:
    resp = pg.request.get(src)
    assert resp.ok, f"the image {src} was not served: HTTP {resp.status}"
    return np.asarray(Image.open(io.BytesIO(resp.body())).convert("RGB"), dtype=np.int16)


def compose_small(pg) -> None:
    """Tiny settings for speed: 2 steps at 64x64 (the defaults are 25 steps at 512)."""
    settings = pg.get_by_role("button", name=re.compile(r"^\s*Settings\s*[▼▲]?\s*$"))
    settings.click()
    set_number(pg, "cp-steps", 2)
    size = pg.locator("#cp-size input")
    size.fill("64x64")
    size.press("Enter")
    settings.click()  # closed again: the screenshot shows the sliders


def drag_two_and_check(pg, first: str, second: str) -> None:
    """Drag two sliders; after each release a new image and new scores must appear."""
    before_src, before_scores = image_src(pg), pg.locator("#cp-scores").inner_text()
    v1 = drag_slider(pg, first, 0.75)
    assert v1 > 0.5, f"dragging the {first} slider did not move it (value {v1})"
    src1 = wait_until(pg, lambda: (s := image_src(pg)) and s != before_src and s, f"an image after moving {first}")
    # the finished scores (not Gradio's progress text over the box while the render runs)
    scores1 = wait_until(pg, lambda: (t := pg.locator("#cp-scores").inner_text()) != before_scores
                         and "CLIP score" in t and first in t and t, f"scores after moving {first}")
    assert "CLIP score" in scores1 and first in scores1 and "Demo values" in scores1
    pixels1 = fetch_pixels(pg, src1)

    v2 = drag_slider(pg, second, 0.65)
    assert v2 > 0.3, f"dragging the {second} slider did not move it (value {v2})"
    src2 = wait_until(pg, lambda: (s := image_src(pg)) != src1 and s, f"an image after moving {second}")
    scores2 = wait_until(pg, lambda: (t := pg.locator("#cp-scores").inner_text()) != scores1
                         and "CLIP score" in t and second in t and t, f"scores after moving {second}")
    assert second in scores2 and first in scores2, scores2
    pixels2 = fetch_pixels(pg, src2)
    assert pixels1.shape == pixels2.shape == (64, 64, 3)
    assert np.abs(pixels1 - pixels2).max() > 0, "the second slider changed the image file but not its pixels"
    # both weights reached the server: the page reports what was used
    used = pg.locator("#cp-used").inner_text()
    assert f"{first} {v1:.3g}" in used and f"{second} {v2:.3g}" in used, used


def choose(pg, elem_id: str, option: str) -> None:
    """Pick an option of a Gradio dropdown the way a user does: open it, click the entry."""
    pg.locator(f"#{elem_id} input").click()
    pg.get_by_role("option", name=option, exact=True).click()


def progress_step(text: str) -> tuple[int, int] | None:
    m = re.search(r"step (\d+)/(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


# ----------------------------------------------------------------------------- tests


def test_compose_two_sliders_change_image_and_scores(page, server):
    """The Compose tab alone, with the two LoRAs the library starts with."""
    page.reload()
    page.locator("#banner").wait_for()
    assert "tiny" in page.locator("#banner").inner_text().lower()  # the demo model is announced, never silent
    open_tab(page, "Compose")
    compose_small(page)
    drag_two_and_check(page, *MIX_STYLES)
    screenshot(page, "compose")
    # a mistake gets a readable message on the page, not a traceback: training with no dataset yet
    open_tab(page, "Train")
    page.locator("#tr-start").click()
    errors = wait_until(page, lambda: errors_on_page(page), "an error message for training without a dataset")
    assert any("Choose a dataset" in e for e in errors), errors
    assert not any("Traceback" in e for e in errors), errors


def test_upload_preprocess_train_then_mix(page, server):
    """The whole path a user takes: upload images, prepare them, train, then mix the new style."""
    url, ws, service = server
    t0 = time.monotonic()
    phases = {}  # seconds per phase, printed for whoever tunes the test's runtime (pytest -s)
    page.reload()
    page.locator("#banner").wait_for()

    # ---- Dataset: a real multi-file upload through the file input, then preprocess at 64 px
    open_tab(page, "Dataset")
    page.locator("#ds-upload input[type=file]").set_input_files([str(EXAMPLES / f) for f in EXAMPLE_FILES])
    wait_until(page, lambda: all(page.locator("#ds-upload").get_by_text(f[:8]).count() for f in EXAMPLE_FILES),
               "the uploaded files to be listed")
    page.locator("#ds-style input, #ds-style textarea").fill(TRAINED)
    page.locator("#ds-trigger input, #ds-trigger textarea").fill("mycty")
    page.get_by_role("button", name=re.compile(r"^\s*Options\s*[▼▲]?\s*$")).click()
    choose(page, "ds-size", "64")
    page.locator("#ds-run").click()
    summary = wait_until(page, lambda: TRAINED in (t := page.locator("#ds-summary").inner_text()) and t,
                         "the dataset summary")
    counts = re.search(r"Kept (\d+) of (\d+)", summary)
    assert counts and int(counts.group(2)) == len(EXAMPLE_FILES), summary  # every upload got an outcome
    kept = wait_until(page, lambda: page.locator("#ds-kept img").count(), "kept images in the gallery")
    assert kept == int(counts.group(1)) >= 3, f"gallery shows {kept}; summary: {summary}"
    owner = next(d.name for d in ws.data.iterdir() if (d / TRAINED).is_dir())
    lines = (ws.data / owner / TRAINED / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == kept, (len(lines), kept)
    assert all("mycty" in line for line in lines)  # every caption carries the trigger word
    screenshot(page, "dataset")
    phases["dataset"] = round(time.monotonic() - t0)

    # ---- Train: a few steps at the dataset's 64 px; the progress bar must be seen moving
    open_tab(page, "Train")
    choose(page, "tr-dataset", TRAINED)
    page.locator("#tr-name input, #tr-name textarea").fill(TRAINED)
    set_number(page, "tr-steps", TRAIN_STEPS)
    seen: list[tuple[str, str]] = []  # (progress text, bar width) each time the page shows something new

    def finished() -> bool:
        # .sm-progress is the app's own bar inside #tr-progress (without Gradio's "processing | 0.1s"
        # overlay that every timer poll puts over the component)
        bar = page.locator("#tr-progress .sm-progress")
        text = bar.inner_text().strip() if bar.count() else ""
        fill = bar.locator("div div")
        width = fill.first.evaluate("e => e.style.width") if fill.count() else ""
        if text and (not seen or seen[-1] != (text, width)):
            seen.append((text, width))
        return any(w in text for w in ("completed", "failed", "cancelled"))

    assert not finished(), f"a job was already shown before training started: {seen}"
    page.locator("#tr-start").click()
    wait_until(page, finished, "training to finish", timeout=300, interval=0.2)
    last = seen[-1][0]
    assert "completed" in last and "100%" in last, f"training ended as: {last} ({page.locator('#tr-status').inner_text()})"
    # The bar moved: the page showed the job running short of its last step, then complete; steps and
    # widths never went back.  (Timing decides which intermediate steps a 1 s poll catches, so the
    # intermediate values are printed, not required.)
    texts = [t for t, _ in seen]
    assert len(set(texts)) >= 3, f"the progress text changed fewer than twice: {texts}"
    steps = [s for t in texts if (s := progress_step(t))]
    assert steps == sorted(steps) and steps[-1] == (TRAIN_STEPS, TRAIN_STEPS), texts
    assert any("running" in t and (st := progress_step(t)) and st[0] < TRAIN_STEPS for t in texts), \
        f"the page never showed the job running before it completed: {texts}"
    widths = [float(w.rstrip("%")) for _, w in seen if w.endswith("%")]
    assert widths == sorted(widths) and widths[-1] == 100 and widths[0] < 100, seen
    print("progress seen:", texts)
    wait_until(page, lambda: page.locator("#tr-samples img").count(), "training sample images")
    assert (ws.loras / TRAINED / "pytorch_lora_weights.safetensors").is_file()
    screenshot(page, "train")
    phases["train"] = round(time.monotonic() - t0)

    # ---- Library: the new LoRA is listed (checked at the end, so one stale table still lets the rest run)
    open_tab(page, "Library")
    problems = []
    try:
        page.locator("#lib-table").get_by_text(TRAINED, exact=True).wait_for(timeout=10_000)
    except Exception:  # noqa: BLE001  (playwright's TimeoutError)
        problems.append(f"the Library tab's table does not list the newly trained LoRA {TRAINED!r} "
                        f"(it shows: {page.locator('#lib-table').inner_text()[:300]!r})")
    screenshot(page, "library")
    phases["library"] = round(time.monotonic() - t0)

    # ---- Compose: the new style has a slider; drag it and another style's slider
    open_tab(page, "Compose")
    wait_until(page, lambda: page.get_by_label(f"range slider for {TRAINED}", exact=True).count(),
               f"a slider for {TRAINED}")
    compose_small(page)
    drag_two_and_check(page, TRAINED, MIX_STYLES[0])
    screenshot(page, "compose")
    phases["compose"] = round(time.monotonic() - t0)

    # ---- Experiments: a one-seed protocol of the two ready-made styles (base, singles, the 50/50 mix)
    open_tab(page, "Experiments")
    page.locator("#ex-loras input").click()
    if not page.get_by_role("option", name=TRAINED, exact=True).count():
        problems.append(f"the Experiments tab's LoRA list does not offer the newly trained {TRAINED!r}")
    for name in MIX_STYLES:
        page.get_by_role("option", name=name, exact=True).click()
    page.keyboard.press("Escape")
    page.locator("#ex-seeds input, #ex-seeds textarea").fill("0")
    page.locator("#ex-run").click()
    wait_until(page, lambda: page.locator("#ex-table tbody tr").count() and page.locator("#ex-gallery img").count(),
               "experiment results")
    table = page.locator("#ex-table").inner_text()
    assert all(name in table for name in MIX_STYLES), table
    screenshot(page, "experiments")
    phases["experiments"] = round(time.monotonic() - t0)
    print("browser flow, seconds since start:", phases)
    assert not problems, "; ".join(problems)


def test_live_previews_while_dragging_then_exact_image_on_release(page, server):
    """Hold the mouse on a slider: previews appear while it moves; on release the exact recipe image."""
    import json

    from stylemix.recipe import Recipe

    url, ws, service = server
    page.reload()
    page.locator("#banner").wait_for()
    open_tab(page, "Compose")
    compose_small(page)
    name = MIX_STYLES[0]
    box, x, y = slider_thumb(page, name)
    live = page.locator("#cp-live")
    previews: list[np.ndarray] = []
    srcs: list[str] = []
    page.mouse.move(x, y)
    page.mouse.down()
    for frac in (0.62, 0.72, 0.85):  # the mouse stays down: every move is an `.input`, never a release
        x1 = box["x"] + box["width"] * frac
        page.mouse.move(x1, y, steps=3)
        src = wait_until(page, lambda: (s := image_src(page)) and s not in srcs and "Preview" in live.inner_text()
                         and s, f"a preview while dragging to {frac:.0%}")
        srcs.append(src)
        previews.append(fetch_pixels(page, src))
    assert "Preview — " in live.inner_text() and "steps" in live.inner_text()
    assert len({p.tobytes() for p in previews}) >= 2, "the previews did not change while the slider moved"
    page.mouse.up()
    exact_src = wait_until(page, lambda: "Exact render" in live.inner_text() and (s := image_src(page)) not in srcs
                           and s, "the exact image after the release")
    shown = fetch_pixels(page, exact_src)
    screenshot(page, "compose-live")
    # the recipe the server saved for this image, rendered again by the library: the same pixels
    recipe_path = max(ws.outputs.glob("*/*-recipe.json"), key=lambda p: p.stat().st_mtime)
    recipe = Recipe.from_dict(json.loads(recipe_path.read_text()))
    assert recipe.loras[name] > 0.5, recipe.loras
    again = np.asarray(service.mixer.generate(recipe).images[0].convert("RGB"), dtype=np.int16)
    assert np.array_equal(shown, again), "the image shown after release is not the recipe's exact render"
    assert all(not np.array_equal(p, shown) for p in previews)  # a preview is never the exact image
