"""The Compose tab: LoRAs added to the mix from a card browser, one slider and one schedule per LoRA of the
mix, a mode for mixing over time with a plot of each LoRA's weight per step, live previews while dragging,
the exact render on release."""

from __future__ import annotations

import hashlib
import html
import json
import math
import random
import time

import gradio as gr
import pandas as pd

from stylemix.errors import StyleMixError
from stylemix.compose import read_recipe_file
from stylemix.recipe import (DEFAULT_SAMPLER, MAX_STEPS, SAMPLERS, WEIGHT_LIMIT, Recipe, format_block_weights,
                             parse_block_weights, parse_size, whole_number)
from stylemix.schedules import (DEFAULT_SWITCH_EVERY, MODES, PRESETS, Schedule, apply_preset, compile_plan,
                                parse_schedule)
from stylemix.scores.scoring import NOISE_FLOOR
from stylemix.service import StyleMixService
from ui.common import GPU, PREVIEW, escape_md, gpu, owner_of, readable_errors, user_error

SIZES = ["512x512", "512x768", "768x512", "640x640", "256x256", "128x128", "64x64"]

# The tab's styling, put into the page by COMPOSE_JS (run on load: no gr.Blocks(css=...) needed).
COMPOSE_CSS = """
/* small images (the tiny model's 64x64) shown large, pixels kept sharp rather than smoothed */
body #cp-image img { image-rendering: pixelated; min-width: min(100%, 384px); min-height: 256px; object-fit: contain; }
/* weight sliders: the track is filled from the centre (0 = off) to the value, with a mark at 0 */
body .sm-weight input[type=range]::-webkit-slider-runnable-track {
  background:
    linear-gradient(to right, transparent calc(50% - 1px), var(--body-text-color-subdued) calc(50% - 1px),
                    var(--body-text-color-subdued) calc(50% + 1px), transparent calc(50% + 1px)),
    linear-gradient(to right, var(--neutral-200) min(50%, var(--range_progress)),
                    var(--slider-color) min(50%, var(--range_progress)),
                    var(--slider-color) max(50%, var(--range_progress)),
                    var(--neutral-200) max(50%, var(--range_progress)));
}
body .sm-weight input[type=range]::-moz-range-track {
  background: linear-gradient(to right, transparent calc(50% - 1px), var(--body-text-color-subdued) calc(50% - 1px),
                              var(--body-text-color-subdued) calc(50% + 1px), transparent calc(50% + 1px)),
              var(--neutral-200);
}
/* the LoRA browser: small cards in a wrapping row, as A1111's LoRA cards */
body #cp-cards { flex-wrap: wrap; gap: 8px; }
body .sm-card { flex: 0 0 150px !important; min-width: 150px !important; max-width: 150px; }
body .sm-card img { height: 96px; object-fit: cover; }
body .sm-card-blank { height: 96px; border-radius: 6px; display: flex; align-items: center; justify-content: center;
                      font-size: 40px; font-weight: 600; color: white; }
body .sm-card .prose { font-size: 0.85em; overflow-wrap: anywhere; }
/* the schedules' problems, right under the mix */
body .sm-sched-msg { color: var(--error-text-color, #b91c1c); }
"""

# Run once when the page loads (demo.load(js=...)): adds COMPOSE_CSS, and Ctrl+Enter / Cmd+Enter in the
# prompt or negative prompt clicks Generate (Enter alone stays a new line in the two-line prompt).
COMPOSE_JS = """
() => {
  if (!document.getElementById("sm-compose-style")) {
    const style = document.createElement("style");
    style.id = "sm-compose-style";
    style.textContent = %s;
    document.head.appendChild(style);
  }
  if (!window.__smComposeKeys) {
    window.__smComposeKeys = true;
    document.addEventListener("keydown", (e) => {
      if (e.key !== "Enter" || !(e.ctrlKey || e.metaKey) || e.isComposing) return;
      if (!(e.target instanceof Element) || !e.target.closest("#cp-prompt, #cp-negative")) return;
      e.preventDefault();
      document.querySelector("#cp-generate")?.click();
    }, true);
  }
}
""" % json.dumps(COMPOSE_CSS)


def collect_weights_js(names: list[str], stamp: bool = False) -> str:
    """The sliders' values as the weights JSON, collected in the browser: no server round trip, so a typed
    out-of-range value reaches the render as it is and Recipe.validate names it (a server step would
    have Gradio refuse the value before any code of ours runs, as an HTTP 500).  The JSON is written
    key by key: its key order is the mix's order (a JS object would put a LoRA named "7" first).
    stamp: also a value never sent before, for a hidden box whose change starts a server step."""
    return ("(...values) => ['{' + %s.map((n, i) => JSON.stringify(n) + ':' + "
            "JSON.stringify(values[i] === undefined || values[i] === '' ? null : values[i])).join(',') + '}'%s]"
            % (json.dumps(names), ", %s" % STAMP_JS if stamp else ""))


# A value never sent before (a hidden box set to it fires its change event every time)
STAMP_JS = "String(Date.now()) + ':' + Math.random()"


def mix_action_js(op: str, name: str) -> str:
    """A card's "Add to mix" or a row's remove button, in the browser: the action for the hidden mix_action
    box, whose change (wired outside the redrawn parts of the page) changes the mix on the server."""
    return "() => [JSON.stringify({op: %s, name: %s, at: %s})]" % (json.dumps(op), json.dumps(name), STAMP_JS)


def collect_schedules_js(names: list[str]) -> str:
    """The schedule boxes of the mix (start, end, keyframes of each LoRA, in that order) as the schedules
    JSON, collected in the browser as the weights are; rows left empty are left out."""
    return """(...values) => {
  const parts = [], blank = (v) => v === undefined || v === null || String(v).trim() === '';
  %s.forEach((n, i) => {
    const [s, e, k] = values.slice(3 * i, 3 * i + 3);
    const f = {start: blank(s) ? null : s, end: blank(e) ? null : e, keyframes: blank(k) ? '' : k};
    if (f.start !== null || f.end !== null || f.keyframes) parts.push(JSON.stringify(n) + ':' + JSON.stringify(f));
  });
  return ['{' + parts.join(',') + '}'];
}""" % json.dumps(names)


# --------------------------------------------------------------------------- the mix and its schedules
#
# The page keeps the mix in two hidden JSON boxes, so that recipes, previews and the API see what the
# page shows: the weights ({lora: weight}, key order = mix order = the order Switch rotates in) and the
# schedule form ({lora: {"start", "end", "keyframes"}}: what the user typed in each LoRA's schedule boxes).

def _form_number(name: str, key: str, value, whole_render: float) -> float | None:
    """A start/end box as a fraction of the render, None when empty or at the edge of the whole render."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"schedule of LoRA {name!r}: {key} {value!r} is not a number (a fraction of the render "
                         "from 0 to 1).") from None
    if not math.isfinite(v) or not 0 <= v <= 1:
        shown = value.strip() if isinstance(value, str) else f"{v:g}"  # as typed
        raise ValueError(f"schedule of LoRA {name!r}: {key} {shown} must be a fraction of the render from 0 to 1 "
                         f"(empty: {'from the first step' if key == 'start' else 'to the last step'}).")
    return None if v == whole_render else v


def form_schedule(name: str, fields) -> str:
    """One LoRA's schedule boxes -> its schedule text as a recipe stores it ('' = the plain weight).

    fields: {"start", "end", "keyframes"} from the page, or the recipe's own schedule text (an API caller's).
    start and end are fractions of the render (A1111 LoRA Block Weight's start=/stop=); the keyframe box
    takes loractl keyframes (0@0,1@0.5) and any other schedule item (te=, interp=, start=/stop= in steps).
    ValueError naming the LoRA and the problem, in Recipe.validate's words."""
    if isinstance(fields, str):
        fields = {"keyframes": fields}
    if not isinstance(fields, dict):
        raise ValueError(f"schedule of LoRA {name!r}: give a schedule text or {{start, end, keyframes}}.")
    text = fields.get("keyframes") or ""
    if not isinstance(text, str):
        raise ValueError(f"schedule of LoRA {name!r}: keyframes must be text, as in 0@0,1@0.5.")
    start = _form_number(name, "start", fields.get("start"), 0.0)
    end = _form_number(name, "end", fields.get("end"), 1.0)
    try:
        sched = parse_schedule(text) if text.strip() else Schedule()
    except ValueError as e:
        raise ValueError(f"schedule of LoRA {name!r}: {e}") from None
    for key, box, written in (("start", start, sched.start), ("end", end, sched.stop)):
        if box is not None and written is not None:
            raise ValueError(f"schedule of LoRA {name!r}: {key} is given twice, in its box and in the keyframes "
                             f"({'start' if key == 'start' else 'stop'}=); keep one.")
    if start == 1:
        raise ValueError(f"schedule of LoRA {name!r}: start 1 is the end of the render: the LoRA would never be on.")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"schedule of LoRA {name!r}: end {end:g} is not after start {start:g}: the LoRA would "
                         "never be on.")
    sched = Schedule(unet=sched.unet, te=sched.te, interp=sched.interp,
                     start=start if start is not None else sched.start,
                     stop=end if end is not None else sched.stop)
    return sched.text()


def schedule_form(text: str) -> dict:
    """A recipe's schedule text -> the schedule boxes: start/stop that are fractions of the render go to the
    start and end boxes, everything else stays in the keyframe box (bare keyframes without `unet=`)."""
    sched = parse_schedule(text)
    start = sched.start if sched.start is not None and sched.start < 1 else None
    end = sched.stop if sched.stop is not None and sched.stop < 1 else None
    rest = Schedule(unet=sched.unet, te=sched.te, interp=sched.interp,
                    start=None if start is not None else sched.start,
                    stop=None if end is not None else sched.stop).text()
    return {"start": start, "end": end, "keyframes": rest.removeprefix("unet=")}


def schedules_form_json(schedules: dict[str, str], names=None) -> str:
    """The schedules JSON of the page for a recipe's schedules (those of LoRAs in `names` only)."""
    return json.dumps({n: schedule_form(t) for n, t in schedules.items() if names is None or n in names})


def read_schedules(schedules_json) -> dict[str, str]:
    """The page's (or an API caller's) schedules JSON -> the recipe's {lora: schedule text}.  Each value is
    the boxes {"start", "end", "keyframes"} or a schedule text as a recipe stores it."""
    form = _mapping(schedules_json, "schedules", "schedule")
    out = {}
    for name, fields in form.items():
        text = form_schedule(name, fields)
        if text:
            out[name] = text
    return out


def read_weights(weights_json) -> dict:
    return _mapping(weights_json, "weights", "weight")


def _mapping(text, what: str, value: str) -> dict:
    """A JSON object of LoRA name -> `value` from the page or an API caller ('' = {}); ValueError naming `what`."""
    try:
        found = json.loads(text or "{}")
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise ValueError(f"{what} {str(text)[:80]!r} must be a JSON object of LoRA name -> {value}.")
    return found


def change_mix(action_json, weights_json, schedules_json) -> tuple[str, str] | None:
    """A mix action from the page ({"op": "add" | "remove", "name"}) applied to the weights and schedules
    JSON; None when it changes nothing (a LoRA added twice, a bad action)."""
    action = _json_object(action_json)
    name = action.get("name")
    if not isinstance(name, str) or not name:
        return None
    if action.get("op") == "add":
        weights = add_to_mix(weights_json, name)
        return None if weights is None else (weights, schedules_json or "{}")
    if action.get("op") == "remove":
        return remove_from_mix(weights_json, schedules_json, name)
    return None


def add_to_mix(weights_json, name: str, weight: float = 1.0) -> str | None:
    """The weights JSON with `name` added at the end of the mix (at A1111's default weight, 1); None when it
    is in the mix already."""
    weights = read_weights(weights_json)
    if name in weights:
        return None
    return json.dumps({**weights, name: weight})


def remove_from_mix(weights_json, schedules_json, name: str) -> tuple[str, str]:
    """The weights and schedules JSON without `name`."""
    weights = {n: w for n, w in read_weights(weights_json).items() if n != name}
    form = {n: f for n, f in _json_object(schedules_json).items() if n != name}
    return json.dumps(weights), json.dumps(form)


def preset_for_mix(preset: str, weights_json, blocks_text: str) -> tuple[str, str]:
    """A preset (stylemix.schedules.PRESETS) applied to the mix: (schedules JSON, per-block text).  Every LoRA
    of the mix gets the preset's schedule (or none); the preset's lbw= replaces the per-block weights of the
    LoRAs it names, the others' stay."""
    weights = read_weights(weights_json)
    schedules, lbw = apply_preset(preset, {n: w for n, w in weights.items() if isinstance(w, (int, float))})
    kept = {n: b for n, b in parse_block_weights(blocks_text or "").items() if n not in lbw}
    blocks = ", ".join(x for x in [format_block_weights(kept)] + [f"{n}:lbw={v}" for n, v in lbw.items()] if x)
    return schedules_form_json(schedules), blocks


def plot_frame(recipe: Recipe) -> pd.DataFrame:
    """Each LoRA's U-Net weight at each step (step numbers from 0, as keyframes count them), for the plot: a
    LoRA of the mix that is off throughout is drawn at 0."""
    plan = compile_plan(recipe)
    rows = [{"step": i, "weight": round(row.get(n, 0.0), 4), "lora": n}
            for i, row in enumerate(plan.table()) for n in recipe.loras]
    # typed columns even when empty: the plot reads an untyped (object) column as categories, not numbers
    return pd.DataFrame(rows, columns=["step", "weight", "lora"]).astype({"step": "int64", "weight": "float64",
                                                                           "lora": "object"})


def mode_note(recipe: Recipe, speed: dict | None = None) -> str:
    """What the mode does, and for composite what it costs, said before the render starts.

    speed: this page's last render ({"seconds", "steps", "pixels", "unet_passes"}, `render_speed`): with it the
    cost is also said in seconds, scaled to these settings (per U-Net pass and pixel)."""
    if recipe.mode == "switch":
        return (f"**Switch**: one LoRA at a time, at its own weight, in the mix's order, each for "
                f"{recipe.switch_every} step{'s' if recipe.switch_every != 1 else ''}.")
    if recipe.mode == "composite":
        n = len(compile_plan(recipe, steps=1).names)
        note = (f"**Composite** runs the U-Net once per LoRA at every step and averages them: with {n} "
                f"LoRA{'s' if n != 1 else ''} in the mix, expect about **{n}× the time of a merge render**")
        seconds = expected_seconds(recipe, n, speed)
        shown = f"{seconds:.1f}" if seconds and seconds < 10 else f"{seconds or 0:.0f}"
        return note + (f" (about **{shown} s** at these settings, from your last render)." if seconds else ".")
    return ""


def expected_seconds(recipe: Recipe, unet_passes: int, speed: dict | None) -> float | None:
    """A render's expected denoising time from the last one's, scaled by U-Net passes and pixels (None: no
    render yet, or one that says nothing)."""
    try:
        per = float(speed["seconds"]) / (int(speed["steps"]) * int(speed["unet_passes"]) * int(speed["pixels"]))
    except (TypeError, KeyError, ValueError, ZeroDivisionError):
        return None
    return per * recipe.steps * max(unet_passes, 1) * recipe.width * recipe.height if per > 0 else None


def render_speed(result) -> dict | None:
    """What `expected_seconds` needs of a finished render (MixResult)."""
    seconds = (result.timings or {}).get("denoise_decode_s")
    if not seconds:
        return None
    r = result.recipe
    return {"seconds": round(float(seconds), 3), "steps": r.steps, "pixels": r.width * r.height,
            "unet_passes": max(int(result.unet_passes or 1), 1)}


def format_scores(scores: dict | None) -> tuple[str, dict | str | None]:
    """The scores as the page's Markdown, and what the style-shares label shows: the shares, a short
    reason when there are none to show, or None (no scores)."""
    if not scores:
        return "", None
    if scores.get("unavailable"):
        return f"Scores unavailable: {escape_md(scores['unavailable'])}", None
    s = scores["images"][0]
    if s.get("clip_score") is None:
        lines = [f"**CLIP score** n/a (the prompt is only trigger words) with `{s['clip_model']}`"]
    else:
        lines = [f"**CLIP score** {s['clip_score']:.4f} (×100 scale: {s['clip_score_100']:.1f}) "
                 f"with `{s['clip_model']}`"]
    judge = s.get("style_judge") or scores.get("style_judge") or s.get("clip_model")
    if s.get("similarity"):  # which judge made the style numbers (CLIP's embedding or CSD's, docs/scores.md)
        lines.append(f"Style similarity judged by `{escape_md(judge)}`:")
    for name, sim in (s.get("similarity") or {}).items():
        cal = (s.get("calibrated") or {}).get(name)
        lines.append(f"- **{escape_md(name)}** similarity {sim:.4f}"
                     + (f", calibrated {cal:.2f}" if cal is not None else ""))
    shares: dict | str | None = s.get("shares") or None
    if s.get("style_detected") is False:
        shares = "no style detected"
        lines.append(f"\n*No style detected: no style in the mix is more than {NOISE_FLOOR:g} of the way from "
                     "the base model's image to the style's own images (calibrated similarity), so no shares.*")
    elif s.get("shares_basis") == "raw":
        if shares:
            lines.append("\n*Shares use raw similarities: not every style in the mix could be calibrated (it "
                         "needs a base-model anchor, and the style's own images must sit closer to its centroid "
                         "than that).*")
        else:
            shares = "no shares (uncalibrated)"
            lines.append("\n*No shares: the style could not be calibrated (its own images must sit closer to its "
                         "centroid than base-model images do), and one style's raw share would be 100% whatever "
                         "the image shows.*")
    if scores.get("missing_centroids"):
        lines.append(f"\nNo style centroid yet for: {', '.join(scores['missing_centroids'])} "
                     "(train here or give reference images in the Library tab).")
    if s.get("is_demo"):
        lines.append("\n*Demo values: the judges are tiny random CLIP/CSD models (the built-in tiny model's), so "
                     "these numbers are not a real measurement.*")
    return "\n".join(lines), shares


def compose_recipe(prompt_, negative_, weights_json, seed_value, steps_, size_, sampler_, guidance_,
                   strength_, triggers_, blocks_, schedules_json="{}", mode_="merge",
                   switch_every_=DEFAULT_SWITCH_EVERY) -> Recipe:
    """The Compose tab's inputs as a validated recipe (for the exact render, previews and the plot).

    Values go to Recipe as typed (whole numbers as ints), so Recipe.validate, the CLI's own check, names
    any bad one with the CLI's words: nothing is clamped or rounded here.  `switch_every_` counts only in
    switch mode (its box is hidden otherwise, so a cleared one must not block a merge)."""
    weights = read_weights(weights_json)
    width, height = parse_size(size_)
    strength = None if strength_ in (None, 0) else strength_  # 0 or a cleared box: off
    mode = mode_ or "merge"
    return Recipe(prompt=prompt_, negative_prompt=negative_ or "", loras=weights, seed=whole_number(seed_value),
                  steps=whole_number(steps_), width=width, height=height, sampler=sampler_, guidance=guidance_,
                  total_strength=strength, add_trigger_words=bool(triggers_),
                  block_weights=parse_block_weights(blocks_ or ""), schedules=read_schedules(schedules_json),
                  mode=mode, switch_every=whole_number(switch_every_) if mode == "switch" else DEFAULT_SWITCH_EVERY
                  ).validate()


def weights_used_text(weights: dict[str, float], block_weights: dict[str, dict[str, float]],
                      schedules: dict[str, str] | None = None) -> str:
    """"watercolor 0.6 (up=0.5), pixelart 0.4 [0@0,1@0.5:start=0.3]": each LoRA in the render with its
    per-block weights and its schedule."""
    parts = []
    for name, w in weights.items():
        if not w:
            continue
        blocks = format_block_weights({name: block_weights[name]}) if block_weights.get(name) else ""
        sched = (schedules or {}).get(name)
        parts.append(f"{name} {w:.3g}" + (f" ({blocks.split(':', 1)[1]})" if blocks else "")
                     + (f" [{sched.removeprefix('unet=')}]" if sched else ""))
    return ", ".join(parts) or "none (base model)"


def mode_used_text(recipe: Recipe, unet_passes: int) -> str:
    """The mode line under "Weights used" (nothing for a merge, every other tool's only mode)."""
    if recipe.mode == "switch":
        return f"Mode: switch every {recipe.switch_every} step{'s' if recipe.switch_every != 1 else ''}"
    if recipe.mode == "composite":
        return f"Mode: composite ({unet_passes} U-Net passes per step)"
    return ""


def _exact_shown():
    """After an exact render: the image is the recipe's own again, not a preview."""
    return gr.update(label="Image"), "**Exact render** of the recipe (the same pixels as `stylemix generate`)."


def build_compose_tab(service: StyleMixService, tiny: bool, demo: gr.Blocks, owner: gr.BrowserState,
                      lora_names: gr.State, recipe_version: gr.State) -> None:
    """Lay out the tab (inside `gr.Tab`) and wire it: it only reads the shared LoRA names and owner,
    and bumps `recipe_version` when the mix changes shape (a LoRA added or removed, a preset, a recipe or a
    prompt's <lora:...> tags): the mix's rows are redrawn from the hidden weights and schedules."""
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", value="a cat sitting by a window", lines=2, elem_id="cp-prompt")
            negative = gr.Textbox(label="Negative prompt", value="", elem_id="cp-negative")
            weights_box = gr.Textbox(label="Weights (JSON)", value="{}", visible=False)
            schedules_box = gr.Textbox(label="Schedules (JSON)", value="{}", visible=False)
            # set in the browser by the redrawn parts of the page (the mix, the cards), whose own events stay
            # there: a slider moved (a preview), a slider released (the exact render), a LoRA added or removed
            preview_go = gr.Textbox(visible=False)
            render_go = gr.Textbox(visible=False)
            mix_action = gr.Textbox(visible=False)

            # The mix: a slider and the schedule boxes for each LoRA in it.  Re-drawn when the library changes
            # or the mix changes shape, from the weights and schedules last sent (so a library change keeps
            # the mix, and a loaded recipe moves the sliders); the boxes send every change to the hidden
            # JSON in the browser, and the server only reads those.
            @gr.render(inputs=[lora_names, weights_box, schedules_box],
                       triggers=[demo.load, lora_names.change, recipe_version.change])
            def render_mix(names, weights_json, schedules_json):
                current, form = _json_object(weights_json), _json_object(schedules_json)
                usable = set(names or [])
                mix = [n for n in current if n in usable]  # a LoRA gone from the library drops out
                if not mix:
                    gr.Markdown("Nothing in the mix yet: add LoRAs from the cards below (with none, the base "
                                "model renders alone).", elem_id="cp-mix-empty")
                    return
                gr.Markdown(f"Weights from {-WEIGHT_LIMIT:g} to {WEIGHT_LIMIT:g}; the mark in the middle of "
                            "each track is 0 = off. **Start** and **End**: the part of the render the LoRA is on, "
                            "as fractions 0-1 (empty: the whole render). **Keyframes**: its weight over the render "
                            "in A1111's loractl syntax, `0@0,1@0.5` = from 0 at the start to 1 halfway (they "
                            "replace the slider's weight; `te=1`, `interp=cosine` work too).",
                            elem_classes=["sm-weight-help"])
                sliders, boxes = [], []
                for n in mix:
                    fields = form.get(n) if isinstance(form.get(n), dict) else {}
                    with gr.Group(elem_classes=["sm-mix-row"], key=f"row-{n}"):
                        with gr.Row(equal_height=True):
                            # interactive: only JS steps read the slider, and Gradio would draw it disabled
                            # when it is redrawn by an event (a LoRA added) rather than on load
                            slider = gr.Slider(-WEIGHT_LIMIT, WEIGHT_LIMIT, value=_slider_value(current.get(n, 0)),
                                               step=0.05, label=n, key=f"w-{n}", elem_id=f"w-{n}",
                                               elem_classes=["sm-weight"], preserved_by_key=None, scale=8,
                                               interactive=True)
                            remove = gr.Button("✕", size="sm", scale=0, min_width=44, key=f"rm-{n}",
                                               elem_id=f"rm-{n}", elem_classes=["sm-remove"])
                        # Start and end are text boxes: a number box drawn empty by a redraw shows (and sends) 0,
                        # and any typed value reaches form_schedule, which names what is allowed.
                        # No `key`: each redraw makes new boxes (a box kept and given the new value would fire
                        # its `.change` of the last drawing, collecting boxes that are gone).
                        with gr.Row():
                            start = gr.Textbox(_box_text(fields.get("start")), label="Start (0-1)", placeholder="0",
                                               max_lines=1, elem_id=f"st-{n}", min_width=90, scale=1)
                            end = gr.Textbox(_box_text(fields.get("end")), label="End (0-1)", placeholder="1",
                                             max_lines=1, elem_id=f"en-{n}", min_width=90, scale=1)
                            keys = gr.Textbox(str(fields.get("keyframes") or ""), label="Keyframes",
                                              placeholder="0@0,1@0.5", max_lines=1, elem_id=f"kf-{n}", scale=3)
                    sliders.append(slider)
                    boxes.append((start, end, keys, remove, n))
                # Only steps in the browser here, writing hidden boxes whose own events (wired once, below)
                # run on the server: a redraw forgets the functions of the parts it replaces, and a server
                # step of theirs still under way (a render after a release, a preview) would fail when
                # it is reached (the page would call a function the server no longer has).
                for s in sliders:
                    wire_live_slider(s, sliders, mix)
                collect_sched = collect_schedules_js(mix)
                sched_inputs = [c for start, end, keys, *_ in boxes for c in (start, end, keys)]
                for start, end, keys, remove, n in boxes:
                    gr.on([start.change, end.change, keys.change], None, inputs=sched_inputs, outputs=schedules_box,
                          js=collect_sched, queue=False, api_visibility="private")
                    remove.click(None, outputs=mix_action, js=mix_action_js("remove", n), queue=False,
                                 api_visibility="private")

            # Each schedule checked as typed: its problem, naming the LoRA, right under the mix (a render
            # still names it, once).
            schedule_md = gr.Markdown(elem_id="cp-schedule-problems", elem_classes=["sm-sched-msg"])

            # The LoRA browser: one card per LoRA (its newest sample as thumbnail, kind, trigger word, base
            # model), filtered by the search box; a card's button adds its LoRA at the end of the mix.
            with gr.Accordion("Add LoRAs to the mix", open=True, elem_id="cp-browser"):
                search = gr.Textbox(label="Search", placeholder="name, trigger word, kind or base model",
                                    max_lines=1, elem_id="cp-search")

                @gr.render(inputs=[lora_names, search], triggers=[demo.load, lora_names.change, search.change])
                def render_cards(names, query):
                    cards = service.lora_cards(list(names or []))
                    if not cards:
                        gr.Markdown("No LoRAs in the library yet: train one or import one.")
                        return
                    shown = [c for c in cards if card_matches(c, query)]
                    if not shown:
                        gr.Markdown(f"No LoRA matches “{escape_md(query)}”.")
                        return
                    with gr.Row(elem_id="cp-cards"):
                        for c in shown[:MAX_CARDS]:
                            n = c["name"]
                            with gr.Column(scale=0, min_width=150, elem_classes=["sm-card"], elem_id=f"card-{n}",
                                           key=f"card-{n}"):
                                if c.get("thumbnail"):
                                    gr.Image(c["thumbnail"], show_label=False, interactive=False, container=False,
                                             buttons=[], height=96, key=f"thumb-{n}")
                                else:
                                    gr.HTML(_blank_card(n), key=f"blank-{n}")
                                gr.Markdown(card_text(c), key=f"text-{n}")
                                add = gr.Button("Add to mix", size="sm", key=f"add-{n}", elem_id=f"add-{n}")
                            add.click(None, outputs=mix_action, js=mix_action_js("add", n), queue=False,
                                      api_visibility="private")
                    if len(shown) > MAX_CARDS:
                        gr.Markdown(f"{len(shown) - MAX_CARDS} more: search to narrow the list.")

            # Mixing over time: the mode, the presets and what the schedules make of each LoRA's weight.
            with gr.Row():
                mode = gr.Radio(list(MODES), value="merge", label="Mode", elem_id="cp-mode",
                                info="merge: one weighted sum; switch: one LoRA at a time; composite: each LoRA "
                                     "alone, predictions averaged")
                switch_every = gr.Number(DEFAULT_SWITCH_EVERY, label="Switch every (steps)", visible=False,
                                         elem_id="cp-switch-every", min_width=120)
                preset = gr.Dropdown(list(PRESETS), value=None, label="Preset", elem_id="cp-preset",
                                     info="fills the schedules (and per-block weights) of the mix")
            mode_md = gr.Markdown(elem_id="cp-mode-note")
            speed_state = gr.State(None)  # this page's last render's speed (render_speed): composite's expected time
            preset_md = gr.Markdown(elem_id="cp-preset-note")
            # the title inside the chart: Gradio sizes the chart to `height` and a label above it pushes the
            # legend out of sight
            plot = gr.LinePlot(plot_frame(Recipe("")), x="step", y="weight", color="lora", height=300,
                               title="Each LoRA's U-Net weight at each step", x_title="step (from 0)",
                               label="Weights over the steps", show_label=False, elem_id="cp-plot")

            # Number boxes without minimum/maximum: Gradio would clamp a typed value in the browser or refuse
            # it with its own words; Recipe.validate checks every value and says what is allowed.
            with gr.Row():
                seed = gr.Number(label="Seed", value=1, elem_id="cp-seed")
                lock = gr.Checkbox(label="Lock seed", value=True, elem_id="cp-lock")
            with gr.Accordion("Settings", open=False):
                steps = gr.Number(value=4 if tiny else 25, step=1, label=f"Steps (1-{MAX_STEPS})", elem_id="cp-steps")
                size = gr.Dropdown(SIZES, value="64x64" if tiny else "512x512", label="Size",
                                   allow_custom_value=True, elem_id="cp-size")
                sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler", elem_id="cp-sampler")
                guidance = gr.Number(value=7.5, step=0.5, label="CFG scale", elem_id="cp-cfg")
                strength = gr.Number(label="Keep total strength at (0 = off)", value=0, elem_id="cp-strength")
                triggers = gr.Checkbox(label="Put trigger words in front of the prompt", value=True)
                blocks = gr.Textbox(label="Per-block weights (advanced)", value="",
                                    placeholder="anime:up=0.5, pixelart:down.1=0",
                                    info="LORA:BLOCK=MULTIPLIER; blocks: down, down.0-3, mid, up, up.0-3, "
                                         "text_encoder, A1111's IN01-OUT11/M00/BASE or LORA:lbw=OUTD "
                                         "(the most specific wins). The Experiments tab's "
                                         "clash map shows where two styles fight.",
                                    elem_id="cp-blocks")
            go = gr.Button("Generate", variant="primary", elem_id="cp-generate")
        with gr.Column(scale=1):
            live = gr.Markdown(elem_id="cp-live")  # says whether the image is a preview or the exact render
            image = gr.Image(label="Image", type="filepath", format="png", interactive=False, elem_id="cp-image")
            shares = gr.Label(label="Style shares", elem_id="cp-shares")
            scores_md = gr.Markdown(elem_id="cp-scores")
            used = gr.Markdown(elem_id="cp-used")
            with gr.Row():
                png_file = gr.File(label="Download: PNG with its recipe", elem_id="cp-png")
                recipe_file = gr.File(label="Recipe JSON", elem_id="cp-recipe")
            recipe_in = gr.File(label="Load a recipe: drop a StyleMix PNG or recipe JSON",
                                file_types=[".png", ".json"], type="filepath", elem_id="cp-recipe-in")

    # The schedules, mode and switch period come after the owner: API callers written before them (the
    # owner last) keep working, the three taking their defaults (no schedules, merge, 5).
    compose_inputs = [prompt, negative, weights_box, seed, lock, steps, size, sampler, guidance, strength,
                      triggers, blocks, owner, schedules_box, mode, switch_every]
    # prompt .. recipe_version and schedules_box move the mix when the prompt held <lora:...> tags (compose_fn)
    compose_outputs = [image, scores_md, shares, seed, png_file, recipe_file, used,
                       prompt, weights_box, blocks, recipe_version, schedules_box, speed_state]
    plot_inputs = [weights_box, schedules_box, steps, strength, mode, switch_every, speed_state, size]
    plot_outputs = [plot, mode_md]

    def update_plot(weights_json, schedules_json, steps_, strength_, mode_, switch_every_, speed=None, size_=None):
        """The plot of each LoRA's weight per step, and the mode's note; unchanged while a value is bad (a
        schedule's problem shows under the mix, any other one here)."""
        try:
            recipe = compose_recipe("", "", weights_json, 0, steps_, "64x64", DEFAULT_SAMPLER, 7.5, strength_, False,
                                    "", schedules_json, mode_, switch_every_)
            try:  # the render's size, for composite's expected time (the plot does not depend on it)
                width, height = parse_size(size_)
                recipe = recipe.with_(width=width, height=height)
            except (TypeError, ValueError):
                pass
        except ValueError as e:
            note = gr.skip() if str(e).startswith("schedule of LoRA") else f"*The plot waits: {escape_md(e)}*"
            return gr.skip(), note
        frame = plot_frame(recipe)
        # the weight axis always shows 0 (off) and 1 (a plain LoRA's full weight), and every value drawn, with
        # a margin so that a line at 0 or at the top is not hidden in the frame
        low, high = min([0.0, *frame.weight]), max([1.0, *frame.weight])
        return gr.update(value=frame, y_lim=[low - 0.05, high + 0.05]), mode_note(recipe, speed)

    def plot_colours(weights_json):
        """A colour per LoRA of the mix, sent after the data: Gradio's plot fixes its colours (and legend)
        to the LoRAs in its data when its color_map changes, and a change that arrives with new data is
        drawn with the old LoRAs (a LoRA just added would be invisible)."""
        return gr.update(color_map={n: PLOT_COLOURS[i % len(PLOT_COLOURS)]
                                    for i, n in enumerate(_json_object(weights_json))})

    @readable_errors
    def on_mix_action(action_json, weights_json, schedules_json, version):
        changed = change_mix(action_json, weights_json, schedules_json)
        if changed is None:
            if _json_object(action_json).get("op") == "add":
                gr.Info(f"{_json_object(action_json).get('name')} is in the mix already.")
            return gr.skip(), gr.skip(), gr.skip()
        return (*changed, (version or 0) + 1)  # a new recipe_version redraws the mix

    # queued: Gradio tells the page that recipe_version changed (which redraws the mix) only in a queued
    # event's answer
    mix_action.change(on_mix_action, inputs=[mix_action, weights_box, schedules_box, recipe_version],
                      outputs=[weights_box, schedules_box, recipe_version], show_progress="hidden",
                      api_visibility="private")

    mode.change(lambda m: gr.update(visible=m == "switch"), inputs=mode, outputs=switch_every, queue=False,
                api_visibility="private")
    gr.on([schedules_box.change, steps.change], schedule_problems, inputs=[schedules_box, steps],
          outputs=schedule_md, queue=False, show_progress="hidden", trigger_mode="always_last",
          api_visibility="private")
    # The plot follows the hidden weights and schedules (whatever set them: a slider, a schedule box, a LoRA
    # added or removed, a preset, a recipe, prompt tags) and the settings it depends on; wired here, outside
    # the mix's redraws, so that no step of it is lost when the mix is redrawn.  Its data first, then its
    # colours (plot_colours).
    gr.on([weights_box.change, schedules_box.change, mode.change, switch_every.change, steps.change,
           strength.change, size.change, speed_state.change], update_plot, inputs=plot_inputs, outputs=plot_outputs,
          queue=False,
          show_progress="hidden", trigger_mode="always_last", api_visibility="private").then(
        plot_colours, inputs=weights_box, outputs=plot, queue=False, show_progress="hidden", api_visibility="private")

    @readable_errors
    def choose_preset(preset_, weights_json, blocks_, version):
        if not preset_:
            return (gr.skip(),) * 5
        form, block_text = preset_for_mix(preset_, weights_json, blocks_)
        note = f"Preset **{escape_md(preset_)}** applied: {escape_md(PRESETS[preset_].description)}"
        # the dropdown empties again, so the same preset can be applied to a mix that changed since
        return form, block_text, (version or 0) + 1, None, note

    preset.input(choose_preset, inputs=[preset, weights_box, blocks, recipe_version],
                 outputs=[schedules_box, blocks, recipe_version, preset, preset_md],
                 show_progress_on=[preset_md], api_visibility="private")

    @gpu(duration=60)
    @readable_errors
    def compose_fn(prompt_, negative_, weights_json, seed_, lock_, steps_, size_, sampler_, guidance_,
                   strength_, triggers_, blocks_, owner_, schedules_json, mode_, switch_every_,
                   request: gr.Request, progress=gr.Progress()):
        who = owner_of(owner_, request)
        seed_value = seed_ if lock_ else random.randrange(2**32)  # locked: as typed (a cleared box is refused)
        recipe = compose_recipe(prompt_, negative_, weights_json, seed_value, steps_, size_, sampler_,
                                guidance_, strength_, triggers_, blocks_, schedules_json, mode_, switch_every_)
        out = service.compose(who, recipe, progress=lambda d, t: progress((d, t), desc="denoising"))
        md, share = format_scores(out.scores)
        done = out.result.recipe
        mode_line = mode_used_text(done, out.result.unet_passes)
        used_md = (f"Prompt used: `{out.result.prompt_used}`  \nWeights used: "
                   + escape_md(weights_used_text(out.result.weights_used, done.block_weights, done.schedules))
                   + (f"  \n{mode_line}" if mode_line else ""))
        path = str(out.image_paths[0])
        if recipe.prompt != prompt_:
            # The prompt held <lora:...> tags (Recipe.validate took them): their weights, lbw= and schedules
            # move to the mix, so the tag is not re-applied over a slider moved later.
            tagged = (recipe.prompt, json.dumps(recipe.loras), format_block_weights(recipe.block_weights),
                      time.time_ns(),  # a new recipe_version redraws the mix
                      schedules_form_json(recipe.schedules))
        else:
            tagged = (gr.update(),) * 5
        speed = render_speed(out.result) or gr.skip()  # this page's last render: composite's expected time
        return (path, md, share, recipe.seed, path, str(out.recipe_path), used_md) + tagged + (speed,)

    # show_progress_on: the progress and any error badge sit on the image, never over the prompt and
    # the other fields this event also updates (they stay visible and editable after a refusal)
    go.click(compose_fn, inputs=compose_inputs, outputs=compose_outputs, api_name="compose",
             trigger_mode="always_last", show_progress_on=[image], **GPU).success(
        _exact_shown, outputs=[image, live], queue=False, api_visibility="private")

    # ------------------------------------------------------------ live previews while a slider moves
    preview_outputs = [image, live]

    @gpu(duration=20)
    @readable_errors
    def preview_fn(prompt_, negative_, weights_json, seed_, lock_, steps_, size_, sampler_, guidance_,
                   strength_, triggers_, blocks_, owner_, schedules_json, mode_, switch_every_,
                   request: gr.Request):
        """A fast preview of the weights being dragged, with the seed box's seed (so only the mix
        changes); skipped (no update) when a newer request or the exact render made it pointless."""
        try:
            recipe = compose_recipe(prompt_, negative_, weights_json, seed_, steps_, size_, sampler_,
                                    guidance_, strength_, triggers_, blocks_, schedules_json, mode_, switch_every_)
        except ValueError:
            # a bad value is named once, by the exact render on release (or Generate), not by every move
            return gr.skip(), gr.skip()
        out = service.preview(owner_of(owner_, request), recipe)
        if out is None:
            return gr.skip(), gr.skip()
        note = (f"**{out.label}** — the exact image renders when you release the slider "
                "(scores come with it).")
        return gr.update(value=out.image, label=out.label), note

    def wire_live_slider(slider, sliders, names):
        """`.input` (every move) -> a preview; `.release` -> the exact render, which replaces it (both through
        the hidden preview_go and render_go boxes, see render_mix).

        Previews have their own queue: they never wait behind a full render in Gradio's queue,
        and a full render never waits for them (it stops them, stylemix/preview.py).  always_last:
        while one preview runs, only the newest value waits to be sent.
        """
        slider.input(None, inputs=sliders, outputs=[weights_box, preview_go], js=collect_weights_js(names, True),
                     queue=False, trigger_mode="always_last", api_visibility="private")
        slider.release(None, inputs=sliders, outputs=[weights_box, render_go], js=collect_weights_js(names, True),
                       queue=False, api_visibility="private")
        # Gradio's slider sets a typed value back into its range when the box loses focus: the weights
        # follow what the slider then shows, so Generate renders what the page shows
        slider.change(None, inputs=sliders, outputs=weights_box, js=collect_weights_js(names), queue=False,
                      api_visibility="private")

    preview_go.change(preview_fn, inputs=compose_inputs, outputs=preview_outputs, trigger_mode="always_last",
                      show_progress="hidden", api_visibility="private", **PREVIEW)
    # the newest release wins: queued older requests are dropped (always_last)
    render_go.change(compose_fn, inputs=compose_inputs, outputs=compose_outputs, trigger_mode="always_last",
                     show_progress_on=[image], api_visibility="private", **GPU).success(
        _exact_shown, outputs=[image, live], queue=False, api_visibility="private")

    api_preview = gr.Button(visible=False)  # API only: POST /preview with the compose inputs
    api_preview.click(preview_fn, inputs=compose_inputs, outputs=preview_outputs, api_name="preview", **PREVIEW)

    recipe_outputs = [prompt, negative, weights_box, seed, lock, steps, size, sampler, guidance, blocks,
                      recipe_version, schedules_box, mode, switch_every]

    @readable_errors
    def load_recipe(path, names, version):
        try:
            if not path:
                return [gr.update()] * len(recipe_outputs)
            r = read_recipe_file(path)
        except (StyleMixError, ValueError, OSError) as e:
            raise user_error(f"Could not read that recipe: {e}") from None
        # a LoRA this page cannot use, or whose file is not the one the recipe recorded, is left out
        weights, notes = service.check_recipe_loras(None, r.loras, r.lora_hashes, names=list(names or []))
        if notes:
            gr.Warning("Left out of the mix: " + "; ".join(notes) + ".")
        block_text = format_block_weights(r.block_weights, names)
        return (r.prompt, r.negative_prompt, json.dumps(weights), r.seed, True, r.steps,
                f"{r.width}x{r.height}", r.sampler, r.guidance, block_text, (version or 0) + 1,
                schedules_form_json(r.schedules, weights), r.mode, r.switch_every)

    recipe_in.upload(load_recipe, inputs=[recipe_in, lora_names, recipe_version], outputs=recipe_outputs,
                     api_name="load_recipe", show_progress_on=[recipe_in])

    demo.load(None, js=COMPOSE_JS, api_visibility="private")  # the tab's CSS and Ctrl+Enter


MAX_CARDS = 48  # cards drawn at once; a bigger library is narrowed with the search box
PLOT_COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
                "#bab0ac")  # Tableau 10: the plot's LoRAs, in the mix's order


def card_matches(card: dict, query: str | None) -> bool:
    """Every word of the search is in the card's name, trigger word, kind or base model (any case)."""
    text = " ".join(str(card.get(k) or "") for k in ("name", "trigger_word", "kind", "made_for")).lower()
    return all(word in text for word in (query or "").lower().split())


def card_text(card: dict) -> str:
    """A card's caption: the name, then kind, trigger word and base model when known."""
    lines = [f"**{escape_md(card['name'])}**", escape_md(card.get("kind") or "LoRA")]
    if card.get("trigger_word"):
        lines.append(f"trigger: {escape_md(card['trigger_word'])}")
    if card.get("made_for"):
        lines.append(f"base: {escape_md(card['made_for'])}")
    return "  \n".join(lines)


def _blank_card(name: str) -> str:
    """The thumbnail of a LoRA with no sample image: its initial on a colour of its own (from its name)."""
    hue = int(hashlib.sha1(name.encode()).hexdigest()[:4], 16) % 360
    return (f'<div class="sm-card-blank" style="background: hsl({hue}, 45%, 45%)">'
            f"{html.escape(name[:1].upper())}</div>")


def _json_object(text) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _box_text(value) -> str:
    """A start/end value as its box shows it: empty for none, a number as short as it reads."""
    if value is None:
        return ""
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def schedule_problems(schedules_json, steps=None) -> str:
    """What is wrong with the mix's schedule boxes, one line per LoRA ('' when nothing): the message under
    the mix, updated as the user types."""
    form = _json_object(schedules_json)
    return "  \n".join(p for name, fields in form.items() if (p := _schedule_problem(name, fields, steps)))


def _schedule_problem(name: str, fields, steps=None) -> str:
    """What is wrong with one LoRA's schedule boxes ('' when nothing)."""
    try:
        text = form_schedule(name, fields)
        steps = whole_number(steps)
        if text and isinstance(steps, int) and 1 <= steps <= MAX_STEPS:
            try:
                parse_schedule(text).check(steps)
            except ValueError as e:
                raise ValueError(f"schedule of LoRA {name!r}: {e}") from None
    except ValueError as e:
        return escape_md(str(e))
    return ""


def _slider_value(w) -> float:
    """A weight the slider can show: one outside its range (a recipe's weights are checked before they
    get here) or not a number starts at 0 rather than breaking the redraw."""
    try:
        w = float(w)
    except (TypeError, ValueError):
        return 0.0
    return w if abs(w) <= WEIGHT_LIMIT else 0.0
