"""Fixtures and helpers shared by the real-browser tests (tests/test_browser*.py).

`server` runs the app on the tiny model over a fresh workspace with two ready-made style LoRAs;
`page` is a headless Chromium page on it (module scope: one app and one browser per test file).
Import the fixtures into a test module with `from browser_fixtures import *`.
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

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples" / "pixel_city"
MIX_STYLES = ("watercolor", "pixelart")  # library LoRAs present from the start, each with a style centroid
WAIT_S = 120  # generous per-step ceiling for a 2-core CI machine; never a speed assertion

__all__ = ["ARTIFACTS", "EXAMPLES", "MIX_STYLES", "WAIT_S", "chromium_path", "server", "page", "errors_on_page",
           "wait_until", "open_tab", "screenshot", "set_number", "slider_thumb", "drag_slider", "image_src",
           "fetch_pixels", "compose_small", "drag_two_and_check", "choose", "progress_step"]


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


def add_to_mix(pg, *names: str) -> None:
    """Add LoRAs to the Compose tab's mix the way a user does: the "Add to mix" button of each one's card
    (a LoRA in the mix already keeps its slider).  A LoRA joins at weight 1, as in A1111."""
    for name in names:
        if pg.locator(f"#w-{name}").count():
            continue
        pg.locator(f"#add-{name}").click()
        pg.locator(f"#w-{name}").wait_for()


def drag_two_and_check(pg, first: str, second: str) -> None:
    """Add two LoRAs to the mix and drag their sliders; after each release a new image and new scores
    must appear."""
    add_to_mix(pg, first, second)
    before_src, before_scores = image_src(pg), pg.locator("#cp-scores").inner_text()
    v1 = drag_slider(pg, first, 0.8)  # from 1 (a LoRA added to the mix) to about 1.2
    assert v1 > 0.5, f"dragging the {first} slider did not move it (value {v1})"
    src1 = wait_until(pg, lambda: (s := image_src(pg)) and s != before_src and s, f"an image after moving {first}")
    # the finished scores (not Gradio's progress text over the box while the render runs)
    scores1 = wait_until(pg, lambda: (t := pg.locator("#cp-scores").inner_text()) != before_scores
                         and "CLIP score" in t and first in t and t, f"scores after moving {first}")
    assert "CLIP score" in scores1 and first in scores1 and "Demo values" in scores1
    pixels1 = fetch_pixels(pg, src1)

    v2 = drag_slider(pg, second, 0.7)  # from 1 to about 0.8
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
