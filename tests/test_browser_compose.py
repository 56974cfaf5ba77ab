"""The Compose tab's refusals and habits in a real browser (Chromium, app on the tiny model).

Every bad value typed into the page gets one readable message with the CLI's words, renders nothing,
never costs an HTTP 500 and leaves the inputs editable; Ctrl+Enter generates; "Weights used" names the
block weights; a 64x64 image is shown large and sharp; LoRAs join the mix from the card browser and
leave it with one click, each with a schedule the plot draws and the render follows.
Fixtures: tests/browser_fixtures.py.
"""

from __future__ import annotations

import json
import re

import pytest

from browser_fixtures import *  # noqa: F401,F403  (fixtures: chromium_path, server, page)
from browser_fixtures import (MIX_STYLES, add_to_mix, choose, compose_small, errors_on_page, image_src,
                              open_tab, screenshot, set_number, wait_until)

pytestmark = pytest.mark.browser

NAME = MIX_STYLES[0]


@pytest.fixture(scope="module")
def compose(page, server):
    """The Compose tab at 2 steps and 64x64, one image made, and every HTTP response >= 500 recorded."""
    failures: list[str] = []
    page.on("response", lambda r: r.status >= 500 and failures.append(f"HTTP {r.status} {r.url}"))
    page.reload()
    page.locator("#banner").wait_for()
    open_tab(page, "Compose")
    compose_small(page)
    add_to_mix(page, *MIX_STYLES)
    set_number(page, f"w-{MIX_STYLES[1]}", 0)  # a typed weight renders on leaving the box: the first image
    wait_until(page, lambda: image_src(page) and weights_used(page) == f"{NAME} 1", "the first image")
    return page, failures


def weights_used(pg) -> str:
    """The "Weights used" line under the image ('' before the first render)."""
    m = re.search(r"Weights used: (.*)", pg.locator("#cp-used").inner_text())
    return m.group(1).strip() if m else ""


def cli_error(capsys, *args: str) -> str:
    """What `stylemix generate` says about the same value (its checks run before any model loads)."""
    from stylemix.cli import main

    assert main(["generate", "a cat", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("stylemix: error: "), err
    return err.removeprefix("stylemix: error: ")


def toasts(pg) -> list[str]:
    """The text of each toast on the page, one entry per toast."""
    return [t.strip() for t in pg.locator(".toast-body").all_inner_texts()]


def close_toasts(pg) -> None:
    for button in pg.locator(".toast-close").all():
        try:
            button.click(timeout=2000)
        except Exception:  # noqa: BLE001  (a toast that timed out on its own meanwhile)
            pass
    wait_until(pg, lambda: not toasts(pg), "the toasts to close")


def refused(pg, failures, expected: str, what: str) -> None:
    """One toast says `expected` in full; no image was made; no HTTP 500; the prompt wears no error badge."""
    wait_until(pg, lambda: errors_on_page(pg), f"a message about {what}")
    pg.wait_for_timeout(1500)  # a second refusal of the same value would show by now
    shown = toasts(pg)
    assert len(shown) == 1 and expected in shown[0], (what, shown)
    assert "Traceback" not in shown[0] and "Value " not in shown[0]  # not Gradio's own bounds message
    assert not failures, failures
    assert "Error" not in pg.locator("#cp-prompt").inner_text()  # the badge sits on the image only
    assert pg.locator("#cp-prompt textarea").is_editable()
    close_toasts(pg)


def settings(pg, open_: bool) -> None:
    button = pg.get_by_role("button", name=re.compile(r"^\s*Settings\s*[▼▲]?\s*$"))
    if pg.locator("#cp-steps").is_visible() != open_:
        button.click()


def test_typed_weight_out_of_range_is_named_and_never_rendered(compose):
    pg, failures = compose
    before_src, before_used = image_src(pg), pg.locator("#cp-used").inner_text()
    box = pg.get_by_label(f"number input for {NAME}")
    box.fill("5")
    box.press("Tab")
    refused(pg, failures, f"weight of LoRA '{NAME}' is 5; it must be a number in [-2, 2].", "a weight of 5")
    assert image_src(pg) == before_src and pg.locator("#cp-used").inner_text() == before_used
    # Generate renders exactly what the slider now shows (Gradio put the box back into its range)
    shown = float(box.input_value())
    assert -2 <= shown <= 2
    pg.locator("#cp-generate").click()
    used = wait_until(pg, lambda: (t := pg.locator("#cp-used").inner_text()) != before_used and t,
                      "an image after Generate")
    assert (f"{NAME} {shown:.3g}" in used) if shown else ("none (base model)" in used), (shown, used)
    assert not failures and not toasts(pg)


def test_settings_are_refused_with_the_clis_words(compose, capsys):
    pg, failures = compose
    settings(pg, True)
    before_src = image_src(pg)
    cases = [("#cp-steps", "100000", ("--steps", "100000"), "2"),
             ("#cp-seed", "-1", ("--seed", "-1"), "1"),
             ("#cp-cfg", "50", ("--guidance", "50"), "7.5")]
    for elem, typed, cli_args, good in cases:
        field = pg.locator(f"{elem} input[type=number]")
        field.fill(typed)
        field.press("Tab")
        pg.locator("#cp-generate").click()
        refused(pg, failures, cli_error(capsys, *cli_args), f"{elem} {typed}")
        assert field.input_value() == typed, "the typed value was changed instead of refused"
        assert image_src(pg) == before_src
        field.fill(good)
        field.press("Tab")
    size = pg.locator("#cp-size input")
    size.fill("abc")
    size.press("Enter")
    pg.locator("#cp-generate").click()
    expected = cli_error(capsys, "--size", "abc").removeprefix("--")
    assert expected == "size 'abc': write it as WIDTHxHEIGHT, e.g. 512x512."
    refused(pg, failures, expected, "size abc")
    size.fill("64x64")
    size.press("Enter")
    settings(pg, False)
    assert image_src(pg) == before_src


def test_malformed_lora_tag_message_shows_whole(compose):
    pg, failures = compose
    prompt = pg.locator("#cp-prompt textarea")
    for tag, message in [("<lora:watercolor:5>", "LoRA tag '<lora:watercolor:5>': weight 5 is outside [-2, 2]."),
                         ("<lora:watercolor:abc>",
                          "LoRA tag '<lora:watercolor:abc>': the weight 'abc' is not a number.")]:
        prompt.fill(f"a cat {tag}")
        pg.locator("#cp-generate").click()
        refused(pg, failures, message, tag)
        assert prompt.input_value() == f"a cat {tag}"  # kept as typed, to fix it
    prompt.fill("a cat")


def test_ctrl_enter_generates_and_weights_used_lists_block_weights(compose):
    pg, failures = compose
    blocks = pg.locator("#cp-blocks textarea, #cp-blocks input").first
    settings(pg, True)
    blocks.fill(f"{NAME}:up=0.5")
    settings(pg, False)
    box = pg.get_by_label(f"number input for {NAME}")
    box.fill("0.6")
    box.press("Tab")  # a typed weight renders on leaving the box, as a released slider does
    wait_until(pg, lambda: f"{NAME} 0.6 (up=0.5)" in pg.locator("#cp-used").inner_text(), "the block weights")
    prompt = pg.locator("#cp-prompt textarea")
    for keys, text in [("Control+Enter", "a dog"), ("Meta+Enter", "a bird")]:
        before = image_src(pg)
        prompt.fill(text)
        prompt.press(keys)
        wait_until(pg, lambda: image_src(pg) != before and re.search(rf"Prompt used: .*\b{text}\s*\n",
                                                                     pg.locator("#cp-used").inner_text()),
                   f"an image of {text!r} after {keys}")
        assert prompt.input_value() == text  # no new line typed into the prompt
    used = pg.locator("#cp-used").inner_text()
    assert f"Weights used: {NAME} 0.6 (up=0.5)" in used, used
    assert not failures and not toasts(pg)
    settings(pg, True)
    blocks.fill("")
    settings(pg, False)


def test_small_images_shown_large_and_sharp_and_zero_reads_as_off(compose):
    pg, _ = compose
    img = pg.locator("#cp-image img").first
    box = img.bounding_box()
    assert box["width"] >= 256 and box["height"] >= 256, box  # the 64x64 image at 4x or more
    assert img.evaluate("e => getComputedStyle(e).imageRendering") == "pixelated"
    assert img.evaluate("e => e.naturalWidth") == 64
    slider = pg.locator(f"#w-{NAME}")
    assert "sm-weight" in (slider.get_attribute("class") or "")
    assert "0 = off" in pg.locator(".sm-weight-help").first.inner_text()
    # the track is filled from the centre (0 = off) to the value: at 0 nothing is filled
    off = track_pixels(pg, MIX_STYLES[1], 0.0)
    assert colour_distance(off[0.2], off[0.9]) < 30 and colour_distance(off[0.8], off[0.9]) < 30, off
    pg.get_by_label(f"number input for {NAME}").fill("1")
    on = track_pixels(pg, NAME, 1.0)  # filled from the centre (50%) to 75%, not from the left end
    assert colour_distance(on[0.2], on[0.9]) < 30 and colour_distance(on[0.62], on[0.9]) > 60, on
    screenshot(pg, "compose-small-image")


def track_pixels(pg, label: str, value: float) -> dict[float, tuple[int, int, int]]:
    """The colour of a weight slider's track at a few fractions of its width (read from a screenshot)."""
    import io

    from PIL import Image

    rng = pg.get_by_label(f"range slider for {label}", exact=True)
    wait_until(pg, lambda: float(rng.input_value() or "nan") == value, f"{label} at {value}")
    rng.scroll_into_view_if_needed()
    shot = Image.open(io.BytesIO(rng.screenshot())).convert("RGB")
    w, h = shot.size
    return {f: shot.getpixel((int(w * f), h // 2)) for f in (0.2, 0.62, 0.8, 0.9)}


def colour_distance(a, b) -> int:
    return sum(abs(x - y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- the mix and its schedules


def plot_points(pg) -> dict[str, list[float]]:
    """The plot's data as drawn: each LoRA's weights by step, read from the chart's point labels."""
    labels = pg.locator("#cp-plot [aria-roledescription='point']").evaluate_all(
        "els => els.map(e => e.getAttribute('aria-label'))")
    points: dict[str, dict[int, float]] = {}
    for label in labels:
        m = re.search(r"step[^:]*: ([\d.]+); weight: (-?[\d.]+); lora: (\S+)", label or "")
        if m:
            points.setdefault(m.group(3), {})[int(float(m.group(1)))] = float(m.group(2))
    return {name: [w for _, w in sorted(steps.items())] for name, steps in points.items()}


def mix_order(pg) -> list[str]:
    return [i.removeprefix("w-") for i in pg.locator(".sm-weight").evaluate_all("els => els.map(e => e.id)")]


def test_cards_schedules_plot_and_render(compose, server):
    """Remove a LoRA with one click, find it again by its trigger word and add it back from its card; give
    the two LoRAs a start and keyframes: the plot follows as typed, a bad keyframe is named next to its box
    and refused by Generate, and the render (its "Weights used" and its recipe) carries the schedules; a
    preset fills them; a loaded recipe brings its LoRA back into the mix with its schedule."""
    pg, failures = compose
    _, ws, _ = server
    other = MIX_STYLES[1]
    kf, start = (lambda n: pg.locator(f"#kf-{n} input, #kf-{n} textarea").first), \
        (lambda n: pg.locator(f"#st-{n} input, #st-{n} textarea").first)
    settings(pg, True)
    set_number(pg, "cp-steps", 5)  # enough steps for the plot to show a ramp
    settings(pg, False)
    wait_until(pg, lambda: len(plot_points(pg).get(NAME, [])) == 5, "the plot at 5 steps")

    # the card browser: out of the mix with one click, found by its trigger word, back in at the end
    pg.locator(f"#rm-{other}").click()
    wait_until(pg, lambda: mix_order(pg) == [NAME] and other not in plot_points(pg), f"{other} out of the mix")
    search = pg.locator("#cp-search input, #cp-search textarea").first
    search.fill(f"{other}style")  # its trigger word
    wait_until(pg, lambda: pg.locator(f"#card-{other}").count() and not pg.locator(f"#card-{NAME}").count(),
               "the search to narrow the cards")
    add_to_mix(pg, other)
    assert mix_order(pg) == [NAME, other]  # the order of addition: the order Switch rotates in
    wait_until(pg, lambda: plot_points(pg).get(other) == [1.0] * 5, f"{other} in the plot at its weight, 1")
    search.fill("")
    screenshot(pg, "compose-mix")

    # schedules, checked as typed: the message sits under the mix and names the LoRA
    kf(other).fill("1@0.5,0@0")
    msg = pg.locator("#cp-schedule-problems")
    wait_until(pg, lambda: "keyframes out of order" in msg.inner_text(), "the keyframes' problem under the mix")
    assert msg.inner_text().startswith(f"schedule of LoRA '{other}': keyframes out of order")
    before = image_src(pg)
    pg.locator("#cp-generate").click()
    refused(pg, failures, f"schedule of LoRA '{other}': keyframes out of order", "keyframes out of order")
    assert image_src(pg) == before
    kf(other).fill("0@0,1@0.5")
    start(NAME).fill("0.5")
    wait_until(pg, lambda: plot_points(pg) == {NAME: [0, 0, 1, 1, 1], other: [0, 0.5, 1, 1, 1]},
               "the plot to follow the schedules")
    assert msg.inner_text().strip() == ""

    # the modes: composite says what it costs before it starts; switch shows its period and rotates
    pg.locator("#cp-mode").get_by_label("composite", exact=True).check()
    wait_until(pg, lambda: "about 2× the time of a merge render" in pg.locator("#cp-mode-note").inner_text(),
               "composite's cost")
    pg.locator("#cp-mode").get_by_label("switch", exact=True).check()
    pg.locator("#cp-switch-every").wait_for()
    set_number(pg, "cp-switch-every", 2)
    wait_until(pg, lambda: plot_points(pg) == {NAME: [0, 0, 0, 0, 1], other: [0, 0, 1, 1, 0]}, "the switch plot")
    pg.locator("#cp-mode").get_by_label("merge", exact=True).check()
    wait_until(pg, lambda: not pg.locator("#cp-switch-every").is_visible() and plot_points(pg)[NAME] == [0, 0, 1, 1, 1],
               "merge again")

    # the render follows the schedules: "Weights used" and the recipe carry them
    pg.locator("#cp-generate").click()
    used = wait_until(pg, lambda: image_src(pg) != before and "[" in (t := weights_used(pg)) and t, "the render")
    assert used == f"{NAME} 1 [start=0.5], {other} 1 [0@0,1@0.5]", used
    recipe_path = max(ws.outputs.glob("*/*-recipe.json"), key=lambda p: p.stat().st_mtime)
    recipe = json.loads(recipe_path.read_text())
    assert recipe["schedules"] == {NAME: "start=0.5", other: "unet=0@0,1@0.5"} and recipe["mode"] == "merge"
    assert not failures
    # after a render, composite's cost is also said in seconds (from that render, scaled)
    pg.locator("#cp-mode").get_by_label("composite", exact=True).check()
    wait_until(pg, lambda: re.search(r"about [\d.]+ s at these settings", pg.locator("#cp-mode-note").inner_text()),
               "composite's expected seconds")
    pg.locator("#cp-mode").get_by_label("merge", exact=True).check()

    # a preset fills the schedules of the whole mix (and empties the start box it replaces)
    choose(pg, "cp-preset", "style late")
    wait_until(pg, lambda: kf(NAME).input_value() == "0@0.3,1@0.6:te=1" and kf(other).input_value()
               == "0@0.3,1@0.6:te=1", "the preset's schedules")
    assert start(NAME).input_value() == ""
    wait_until(pg, lambda: plot_points(pg) == {NAME: [0, 0, 0.6667, 1, 1], other: [0, 0, 0.6667, 1, 1]},
               "the preset's plot")

    # a recipe brings its LoRAs into the mix with their schedules
    pg.locator(f"#rm-{other}").click()
    wait_until(pg, lambda: mix_order(pg) == [NAME], f"{other} out of the mix")
    pg.locator("#cp-recipe-in input[type=file]").set_input_files(str(recipe_path))
    wait_until(pg, lambda: mix_order(pg) == [NAME, other] and kf(other).input_value() == "0@0,1@0.5"
               and start(NAME).input_value() == "0.5" and kf(NAME).input_value() == "", "the recipe's mix")
    wait_until(pg, lambda: plot_points(pg) == {NAME: [0, 0, 1, 1, 1], other: [0, 0.5, 1, 1, 1]}, "the recipe's plot")
    assert not failures and not errors_on_page(pg)
