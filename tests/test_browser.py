"""The app in a real browser: Debian's headless Chromium driven by Playwright, app on the tiny model.

The set-up (tests/browser_setup.py) finds or installs the system Chromium; these tests skip only
where it truly cannot be had, and say why.  The app runs in this process on a temporary
workspace (fixtures in tests/browser_fixtures.py).  Everything is done the way a user does it
(clicks, typing, real file uploads, mouse drags on the sliders), and every assertion is on what
the page shows or serves.  Each tab is screenshotted into tests/artifacts/<tab>.png (ignored by
git) for a human to look at.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from browser_fixtures import *  # noqa: F401,F403  (fixtures: chromium_path, server, page)
from browser_fixtures import (EXAMPLES, MIX_STYLES, add_to_mix, choose, compose_small, drag_two_and_check, errors_on_page,
                              fetch_pixels, image_src, open_tab, progress_step, screenshot, set_number,
                              slider_thumb, wait_until)

pytestmark = pytest.mark.browser

# A handful of the example set: enough for a kept gallery and a few training batches, few enough to be quick.
EXAMPLE_FILES = ["skyline_far_left.png", "street_bar.png", "street_tower.png", "towers_mid.png",
                 "synth_buildings.png", "synth_palms.png"]
TRAIN_STEPS = 3  # each step also renders 3 sample images (the app samples ~4 times a run): keep it short
TRAINED = "mycity"  # the LoRA the browser trains (the library ships a `pixel_city` example already)


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
    assert f"completed: step {TRAIN_STEPS}/{TRAIN_STEPS}" in last and "100%" in last, \
        f"training ended as: {last} ({page.locator('#tr-status').inner_text()})"
    # The bar moved: the page showed the job at work short of its last step (training it, or making that
    # step's samples), then complete; steps and widths never went back, and every text before the end
    # named what the job was doing.  (Timing decides which steps a 1 s poll catches: printed, not required.)
    texts = [t for t, _ in seen]
    assert len(set(texts)) >= 3, f"the progress text changed fewer than twice: {texts}"
    at_work = [int(m.group(1) or m.group(2)) for t in texts[:-1]
               if (m := re.search(r"Training: step (\d+)/|Making samples \(step (\d+)\b", t))]
    assert any(s < TRAIN_STEPS for s in at_work), f"the page never showed the job at work before it completed: {texts}"
    steps = at_work + [progress_step(last)[0]]
    assert steps == sorted(steps) and steps[-1] == TRAIN_STEPS, texts
    named = ("Starting the training process", "Loading the model", "Caching latents", "Training: step",
             "Making samples (step", "Saving", "Scoring the style")
    job_texts = [t for t in texts[:-1] if t.startswith(f"{TRAINED}: ")]  # not "No training job yet."
    assert job_texts and all(any(n in t for n in named) for t in job_texts), f"a progress text without its phase: {texts}"
    assert not any("0/?" in t or re.search(r"\b0 ?s left", t) for t in texts), texts
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

    # ---- Compose: the new style has a card; add it and another style to the mix and drag their sliders
    open_tab(page, "Compose")
    wait_until(page, lambda: page.locator(f"#add-{TRAINED}").count(), f"a card for {TRAINED}")
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
    add_to_mix(page, name)
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
