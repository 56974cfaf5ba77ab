"""The Compose tab: one slider per style, live previews while dragging, the exact render on release."""

from __future__ import annotations

import json
import random
import time

import gradio as gr

from stylemix.errors import StyleMixError
from stylemix.compose import read_recipe_file
from stylemix.recipe import (DEFAULT_SAMPLER, MAX_STEPS, SAMPLERS, WEIGHT_LIMIT, Recipe, format_block_weights,
                             parse_block_weights, parse_size, whole_number)
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


def collect_weights_js(names: list[str]) -> str:
    """The sliders' values as the weights JSON, collected in the browser: no server round trip, so a typed
    out-of-range value reaches the render as it is and Recipe.validate names it (a server step would
    have Gradio refuse the value before any code of ours runs, as an HTTP 500)."""
    return ("(...values) => [JSON.stringify(Object.fromEntries(%s.map((n, i) => "
            "[n, values[i] === undefined || values[i] === '' ? null : values[i]])))]" % json.dumps(names))


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
    for name, sim in (s.get("similarity") or {}).items():
        cal = (s.get("calibrated") or {}).get(name)
        lines.append(f"- **{name}** similarity {sim:.4f}" + (f", calibrated {cal:.2f}" if cal is not None else ""))
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
        lines.append("\n*Demo values: the judge is a tiny random CLIP (the built-in tiny model's), so these "
                     "numbers are not a real measurement.*")
    return "\n".join(lines), shares


def compose_recipe(prompt_, negative_, weights_json, seed_value, steps_, size_, sampler_, guidance_,
                   strength_, triggers_, blocks_) -> Recipe:
    """The Compose tab's inputs as a validated recipe (for the exact render and for previews).

    Values go to Recipe as typed (whole numbers as ints), so Recipe.validate, the CLI's own check, names
    any bad one with the CLI's words: nothing is clamped or rounded here."""
    try:
        weights = json.loads(weights_json or "{}")
    except ValueError:
        weights = None
    if not isinstance(weights, dict):
        raise ValueError(f"weights {str(weights_json)[:80]!r} must be a JSON object of LoRA name -> weight.")
    width, height = parse_size(size_)
    strength = None if strength_ in (None, 0) else strength_  # 0 or a cleared box: off
    return Recipe(prompt=prompt_, negative_prompt=negative_ or "", loras=weights, seed=whole_number(seed_value),
                  steps=whole_number(steps_), width=width, height=height, sampler=sampler_, guidance=guidance_,
                  total_strength=strength, add_trigger_words=bool(triggers_),
                  block_weights=parse_block_weights(blocks_ or "")).validate()


def weights_used_text(weights: dict[str, float], block_weights: dict[str, dict[str, float]]) -> str:
    """"watercolor 0.6 (up=0.5), pixelart 0.4": each LoRA in the render with its per-block weights."""
    parts = []
    for name, w in weights.items():
        if not w:
            continue
        blocks = format_block_weights({name: block_weights[name]}) if block_weights.get(name) else ""
        parts.append(f"{name} {w:.3g}" + (f" ({blocks.split(':', 1)[1]})" if blocks else ""))
    return ", ".join(parts) or "none (base model)"


def _exact_shown():
    """After an exact render: the image is the recipe's own again, not a preview."""
    return gr.update(label="Image"), "**Exact render** of the recipe (the same pixels as `stylemix generate`)."


def build_compose_tab(service: StyleMixService, tiny: bool, demo: gr.Blocks, owner: gr.BrowserState,
                      lora_names: gr.State, recipe_version: gr.State) -> None:
    """Lay out the tab (inside `gr.Tab`) and wire it: it only reads the shared LoRA names and owner,
    and bumps `recipe_version` when a recipe (or a prompt's <lora:...> tags) moves the sliders."""
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", value="a cat sitting by a window", lines=2, elem_id="cp-prompt")
            negative = gr.Textbox(label="Negative prompt", value="", elem_id="cp-negative")
            weights_box = gr.Textbox(label="Weights (JSON)", value="{}", visible=False)

            # Re-drawn when the library changes or a recipe is loaded, from the weights last
            # sent (so a library change keeps the mix, and a loaded recipe moves the sliders).
            @gr.render(inputs=[lora_names, weights_box], triggers=[demo.load, lora_names.change, recipe_version.change])
            def render_sliders(names, weights_json):
                if not names:
                    gr.Markdown("No LoRAs in the library yet: train one or import one.")
                    return
                try:
                    current = json.loads(weights_json or "{}")
                except ValueError:
                    current = {}
                current = current if isinstance(current, dict) else {}
                gr.Markdown(f"Weights from {-WEIGHT_LIMIT:g} to {WEIGHT_LIMIT:g}; the mark in the middle of "
                            "each track is 0 = off.", elem_classes=["sm-weight-help"])
                sliders = [gr.Slider(-WEIGHT_LIMIT, WEIGHT_LIMIT, value=_slider_value(current.get(n, 0)),
                                     step=0.05, label=n, key=f"w-{n}", elem_id=f"w-{n}",
                                     elem_classes=["sm-weight"], preserved_by_key=None) for n in names]
                collect = collect_weights_js(names)
                for s in sliders:
                    wire_live_slider(s, collect, sliders)

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

    compose_inputs = [prompt, negative, weights_box, seed, lock, steps, size, sampler, guidance, strength,
                      triggers, blocks, owner]
    # the last four move the sliders when the prompt held <lora:name:w> tags (see compose_fn)
    compose_outputs = [image, scores_md, shares, seed, png_file, recipe_file, used,
                       prompt, weights_box, blocks, recipe_version]

    @gpu(duration=60)
    @readable_errors
    def compose_fn(prompt_, negative_, weights_json, seed_, lock_, steps_, size_, sampler_, guidance_,
                   strength_, triggers_, blocks_, owner_, request: gr.Request, progress=gr.Progress()):
        who = owner_of(owner_, request)
        seed_value = seed_ if lock_ else random.randrange(2**32)  # locked: as typed (a cleared box is refused)
        recipe = compose_recipe(prompt_, negative_, weights_json, seed_value, steps_, size_, sampler_,
                                guidance_, strength_, triggers_, blocks_)
        out = service.compose(who, recipe, progress=lambda d, t: progress((d, t), desc="denoising"))
        md, share = format_scores(out.scores)
        used_md = (f"Prompt used: `{out.result.prompt_used}`  \nWeights used: "
                   + escape_md(weights_used_text(out.result.weights_used, out.result.recipe.block_weights)))
        path = str(out.image_paths[0])
        if recipe.prompt != prompt_:
            # The prompt held <lora:...> tags (Recipe.validate took them): their weights and lbw= move to
            # the sliders and the per-block box, so the tag is not re-applied over a slider moved later.
            tagged = (recipe.prompt, json.dumps(recipe.loras), format_block_weights(recipe.block_weights),
                      time.time_ns())  # a new recipe_version redraws the sliders
        else:
            tagged = (gr.update(),) * 4
        return (path, md, share, recipe.seed, path, str(out.recipe_path), used_md) + tagged

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
                   strength_, triggers_, blocks_, owner_, request: gr.Request):
        """A fast preview of the weights being dragged, with the seed box's seed (so only the mix
        changes); skipped (no update) when a newer request or the exact render made it pointless."""
        try:
            recipe = compose_recipe(prompt_, negative_, weights_json, seed_, steps_, size_, sampler_,
                                    guidance_, strength_, triggers_, blocks_)
        except ValueError:
            # a bad value is named once, by the exact render on release (or Generate), not by every move
            return gr.skip(), gr.skip()
        out = service.preview(owner_of(owner_, request), recipe)
        if out is None:
            return gr.skip(), gr.skip()
        note = (f"**{out.label}** — the exact image renders when you release the slider "
                "(scores come with it).")
        return gr.update(value=out.image, label=out.label), note

    def wire_live_slider(slider, collect, sliders):
        """`.input` (every move) -> a preview; `.release` -> the exact render, which replaces it.

        Previews have their own queue: they never wait behind a full render in Gradio's queue,
        and a full render never waits for them (it stops them, stylemix/preview.py).  always_last:
        while one preview of this slider runs, only the newest value waits to be sent.
        """
        slider.input(None, inputs=sliders, outputs=weights_box, js=collect, queue=False,
                     trigger_mode="always_last", api_visibility="private").then(
            preview_fn, inputs=compose_inputs, outputs=preview_outputs, trigger_mode="always_last",
            show_progress="hidden", **PREVIEW)
        # the newest release wins: queued older requests are dropped (always_last)
        slider.release(None, inputs=sliders, outputs=weights_box, js=collect, queue=False,
                       api_visibility="private").then(
            compose_fn, inputs=compose_inputs, outputs=compose_outputs, trigger_mode="always_last",
            show_progress_on=[image], **GPU).success(_exact_shown, outputs=[image, live], queue=False,
                                                      api_visibility="private")
        # Gradio's slider sets a typed value back into its range when the box loses focus: the weights
        # follow what the slider then shows, so Generate renders what the page shows
        slider.change(None, inputs=sliders, outputs=weights_box, js=collect, queue=False,
                      api_visibility="private")

    api_preview = gr.Button(visible=False)  # API only: POST /preview with the compose inputs
    api_preview.click(preview_fn, inputs=compose_inputs, outputs=preview_outputs, api_name="preview", **PREVIEW)

    recipe_outputs = [prompt, negative, weights_box, seed, lock, steps, size, sampler, guidance, blocks,
                      recipe_version]

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
                f"{r.width}x{r.height}", r.sampler, r.guidance, block_text, (version or 0) + 1)

    recipe_in.upload(load_recipe, inputs=[recipe_in, lora_names, recipe_version], outputs=recipe_outputs,
                     api_name="load_recipe", show_progress_on=[recipe_in])

    demo.load(None, js=COMPOSE_JS, api_visibility="private")  # the tab's CSS and Ctrl+Enter


def _slider_value(w) -> float:
    """A weight the slider can show: one outside its range (a recipe's weights are checked before they
    get here) or not a number starts at 0 rather than breaking the redraw."""
    try:
        w = float(w)
    except (TypeError, ValueError):
        return 0.0
    return w if abs(w) <= WEIGHT_LIMIT else 0.0
