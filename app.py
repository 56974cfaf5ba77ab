"""StyleMix web app: Gradio Blocks laid out here, every action a call into `stylemix.service`.

Run `python app.py` (or `stylemix serve`).  No module-level mutable state: the service (one
shared pipeline, one GPU queue) is created in `main()` and passed to `build_demo`; each browser
gets its own owner token, kept in the browser, under which its files are filed.  Every named
API endpoint takes that token as its last input, exactly as the page sends it; with auth on, the
login name is the identity and the token is ignored.  Who may see and change which LoRA is
decided in `stylemix.service` / `stylemix.access`, never here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import time

import gradio as gr

from stylemix.errors import StyleMixError
from stylemix.paths import Workspace, check_name
from stylemix.recipe import DEFAULT_SAMPLER, SAMPLERS, Recipe, format_block_weights, parse_block_weights, read_recipe
from stylemix.service import StyleMixService, check_owner_token, new_owner_token, zero_gpu

logger = logging.getLogger("stylemix.app")

SIZES = ["512x512", "512x768", "768x512", "640x640", "256x256", "128x128", "64x64"]
DATASET_SIZES = [512, 768, 256, 128, 64]
GPU_QUEUE = "gpu"  # every event that runs the model shares this queue: one at a time
GPU = dict(concurrency_id=GPU_QUEUE, concurrency_limit=1)
# Previews: their own queue, a few at once (one per session at most, by always_last): the pipeline's
# lock and stylemix.preview decide who renders; newer requests interrupt older ones between steps.
PREVIEW = dict(concurrency_id="preview", concurrency_limit=4)
MAX_UPLOAD = "200mb"
LIBRARY_COLUMNS = ["name", "trigger word", "rank", "alpha", "centroid", "fits model", "training", "samples", "created",
                   "owner", "visibility", "kind", "covers", "made for"]
LIBRARY_POLL_S = 2.0  # how often each page checks whether the shared library changed (a few stat calls)
EXPERIMENTS = dict(concurrency_id="experiments", concurrency_limit=2)  # interleaved with compose per image

try:  # Hugging Face ZeroGPU: a GPU is lent per decorated call; elsewhere the decorator is not used
    import spaces  # type: ignore
except ImportError:
    spaces = None


def gpu(duration: int):
    """spaces.GPU(duration) on a ZeroGPU Space, a no-op everywhere else."""
    if spaces is not None and zero_gpu():
        return spaces.GPU(duration=duration)
    return lambda fn: fn


def readable_errors(fn):
    """Every failure reaches the page as one readable message, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (StyleMixError, ValueError) as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # noqa: BLE001  (logged in full for the operator, one line for the user)
            logger.exception("Unexpected error in %s", fn.__name__)
            raise gr.Error(f"Something went wrong ({type(e).__name__}: {str(e)[:300]}); the server log has "
                           "the details.") from None

    return wrapper


def _owner(token: str | None, request: gr.Request | None) -> str:
    """The user's owner id: the login name when auth is on (STYLEMIX_AUTH, or a Hugging Face login on a
    Space with `hf_oauth: true`), else the browser's token."""
    name = (getattr(request, "username", None) or _space_login(request)) if request is not None else None
    if name:
        safe = "".join(c for c in name if c.isalnum())[:40]
        if safe != name:  # 'a.b' and 'ab' must not share a folder: other characters add a hash of the name
            safe = f"{safe[:30]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        return check_name("user_" + safe, "user")
    if not token:
        raise gr.Error("Your session has no id yet; reload the page.")
    return check_owner_token(token)


def _space_login(request: gr.Request) -> str | None:
    """The Hugging Face user logged in with the page's Login button (OAuth session), if any."""
    try:
        info = request.session.get("oauth_info") or {}  # only present when the Space enables OAuth
    except (AssertionError, AttributeError, KeyError):  # no session middleware: OAuth is off
        return None
    name = (info.get("userinfo") or {}).get("preferred_username")
    return name if isinstance(name, str) and name else None


def _format_scores(scores: dict | None) -> tuple[str, dict | None]:
    if not scores:
        return "", None
    if scores.get("unavailable"):
        return f"Scores unavailable: {scores['unavailable']}", None
    s = scores["images"][0]
    if s.get("clip_score") is None:
        lines = [f"**CLIP score** n/a (the prompt is only trigger words) with `{s['clip_model']}`"]
    else:
        lines = [f"**CLIP score** {s['clip_score']:.4f} (×100 scale: {s['clip_score_100']:.1f}) "
                 f"with `{s['clip_model']}`"]
    for name, sim in (s.get("similarity") or {}).items():
        cal = (s.get("calibrated") or {}).get(name)
        lines.append(f"- **{name}** similarity {sim:.4f}" + (f", calibrated {cal:.2f}" if cal is not None else ""))
    if s.get("shares") and s.get("shares_basis") != "calibrated":
        lines.append("\n*Shares use raw similarities: not every style in the mix could be calibrated (it needs a "
                     "base-model anchor, and the style's own images must sit closer to its centroid than that).*")
    if scores.get("missing_centroids"):
        lines.append(f"\nNo style centroid yet for: {', '.join(scores['missing_centroids'])} "
                     "(train here or give reference images in the Library tab).")
    if s.get("is_demo"):
        lines.append("\n*Demo values: computed with a tiny random CLIP, not a real measurement.*")
    return "\n".join(lines), (s.get("shares") or None)


def _compose_recipe(prompt_, negative_, weights_json, seed_value: int, steps_, size_, sampler_, guidance_,
                    strength_, triggers_, blocks_) -> Recipe:
    """The Compose tab's inputs as a validated recipe (for the exact render and for previews)."""
    weights = json.loads(weights_json or "{}")
    if not isinstance(weights, dict):
        raise ValueError("weights must be a JSON object of LoRA name -> weight")
    w, h = (int(x) for x in str(size_).lower().split("x"))
    return Recipe(prompt=prompt_, negative_prompt=negative_ or "", loras=weights, seed=seed_value,
                  steps=int(steps_), width=w, height=h, sampler=sampler_, guidance=float(guidance_),
                  total_strength=float(strength_) if strength_ else None, add_trigger_words=bool(triggers_),
                  block_weights=parse_block_weights(blocks_ or "")).validate()


def _exact_shown():
    """After an exact render: the image is the recipe's own again, not a preview."""
    return gr.update(label="Image"), "**Exact render** of the recipe (the same pixels as `stylemix generate`)."


def _progress_html(view: dict | None) -> str:
    if not view:
        return '<div class="sm-progress">No training job yet.</div>'
    pct, step, total = view["percent"], view["step"], view["total_steps"] or "?"
    color = {"failed": "#d33", "cancelled": "#999", "completed": "#2a2"}.get(view["state"], "#36c")
    return (f'<div class="sm-progress"><div style="background:#eee;border-radius:4px;height:14px;width:100%">'
            f'<div style="background:{color};height:14px;border-radius:4px;width:{pct}%"></div></div>'
            f'<span>{view["lora_name"]}: {view["state"]} · {pct}% · step {step}/{total}</span></div>')


def _loss_frame(curve: list):
    import pandas as pd

    return pd.DataFrame({"step": [float(s) for s, _ in curve], "loss": [float(v) for _, v in curve]})


def build_demo(service: StyleMixService) -> gr.Blocks:
    tiny = service.mixer.loaded.is_tiny
    # delete_cache: Gradio's copies of uploads and results older than a day are removed every hour
    with gr.Blocks(title="StyleMix", delete_cache=(3600, 86400)) as demo:
        owner = gr.BrowserState(None, storage_key="stylemix_owner")
        # before the page's first poll a visitor sees the shared LoRAs; their own follow at once
        lora_names = gr.State([e["name"] for e in service.usable_loras(None)])
        library_version = gr.State(None)  # the library fingerprint this page last showed
        recipe_version = gr.State(0)  # bumped when a recipe is loaded: the sliders are redrawn from it
        gr.Markdown("# StyleMix\nTrain style LoRAs for Stable Diffusion 1.5 and mix them, one slider per style.")
        gr.Markdown(service.banner, elem_id="banner")
        if os.environ.get("OAUTH_CLIENT_ID"):  # a Space with `hf_oauth: true`: log in to own LoRAs on any device
            gr.LoginButton()

        # ============================================================ Dataset
        with gr.Tab("Dataset", id="dataset"):
            with gr.Row():
                with gr.Column(scale=1):
                    ds_upload = gr.File(label="Images or a zip archive", file_count="multiple",
                                        file_types=["image", ".zip", ".txt"], type="filepath", elem_id="ds-upload")
                    with gr.Row():
                        ds_example_set = gr.Dropdown(list(service.example_sets()), label="Example set",
                                                     value=next(iter(service.example_sets()), None),
                                                     elem_id="ds-example-set")
                        ds_example = gr.Button("Load example set", elem_id="ds-example")
                    ds_style = gr.Textbox(label="Style name (the dataset's folder)", elem_id="ds-style")
                    ds_trigger = gr.Textbox(label="Trigger word (a rare word, e.g. 'knyflt')", elem_id="ds-trigger")
                    with gr.Accordion("Options", open=False):
                        ds_size = gr.Dropdown(DATASET_SIZES, value=128 if tiny else 512, label="Image size (px)",
                                              elem_id="ds-size")
                        ds_pixel = gr.Radio(["auto", "on", "off"], value="auto", label="Pixel art (sharp resize)")
                        ds_blur = gr.Number(value=100.0, label="Blur threshold (0 keeps all)")
                        ds_overwrite = gr.Checkbox(value=False, label="Replace my dataset of the same name")
                    ds_run = gr.Button("Prepare dataset", variant="primary", elem_id="ds-run")
                with gr.Column(scale=2):
                    ds_summary = gr.Markdown(elem_id="ds-summary")
                    ds_kept = gr.Gallery(label="Kept", columns=6, height=260, elem_id="ds-kept")
                    ds_rejected = gr.Dataframe(headers=["input", "reason", "detail"], label="Rejected",
                                               interactive=False, elem_id="ds-rejected")
                    ds_select = gr.Dropdown([], label="My datasets", elem_id="ds-select")
                    ds_captions = gr.Dataframe(headers=["file", "caption"], label="Captions (edit, then save)",
                                               interactive=True, elem_id="ds-captions")
                    ds_save = gr.Button("Save captions", elem_id="ds-save")

        # ============================================================ Train
        with gr.Tab("Train", id="train"):
            loss_history = gr.State([])
            with gr.Row():
                with gr.Column(scale=1):
                    tr_dataset = gr.Dropdown([], label="Dataset", elem_id="tr-dataset")
                    tr_name = gr.Textbox(label="LoRA name", elem_id="tr-name")
                    tr_steps = gr.Number(value=0, precision=0, label="Max steps (0 = 20 epochs, the default)",
                                         elem_id="tr-steps")
                    with gr.Accordion("Advanced (defaults = the seed report's settings)", open=False):
                        tr_lr = gr.Number(value=1e-4, label="Learning rate")
                        tr_rank = gr.Number(value=0, precision=0, label="Rank (0 = default: 32, 4 on the tiny model)")
                        tr_epochs = gr.Number(value=20, precision=0, label="Epochs (when max steps is 0)")
                        tr_batch = gr.Number(value=2, precision=0, label="Batch size")
                        tr_res = gr.Number(value=0, precision=0, label="Resolution (0 = the dataset's size)")
                        tr_text = gr.Checkbox(value=True, label="Train the text encoder too")
                        tr_seed = gr.Number(value=42, precision=0, label="Seed")
                    with gr.Row():
                        tr_start = gr.Button("Start training", variant="primary", elem_id="tr-start")
                        tr_cancel = gr.Button("Cancel", elem_id="tr-cancel")
                        tr_resume = gr.Button("Resume", elem_id="tr-resume")
                with gr.Column(scale=2):
                    tr_progress = gr.HTML(_progress_html(None), elem_id="tr-progress")
                    tr_status = gr.Markdown(elem_id="tr-status")
                    job_id = gr.Textbox(label="Job", interactive=False, max_lines=1, elem_id="tr-job")
                    tr_loss = gr.LinePlot(x="step", y="loss", label="Loss", height=220, elem_id="tr-loss")
                    tr_samples = gr.Gallery(label="Samples", columns=4, height=220, elem_id="tr-samples")
            timer = gr.Timer(1.0)

        # ============================================================ Compose
        with gr.Tab("Compose", id="compose"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", value="a cat sitting by a window", lines=2, elem_id="cp-prompt")
                    negative = gr.Textbox(label="Negative prompt", value="", elem_id="cp-negative")
                    weights_box = gr.Textbox(label="Weights (JSON)", value="{}", visible=False)

                    # Re-drawn when the library changes or a recipe is loaded, from the weights last
                    # sent (so a library change keeps the mix, and a loaded recipe moves the sliders).
                    @gr.render(inputs=[lora_names, weights_box],
                               triggers=[demo.load, lora_names.change, recipe_version.change])
                    def render_sliders(names, weights_json):
                        if not names:
                            gr.Markdown("No LoRAs in the library yet: train one or import one.")
                            return
                        try:
                            current = json.loads(weights_json or "{}")
                        except ValueError:
                            current = {}
                        current = current if isinstance(current, dict) else {}
                        sliders = [gr.Slider(-2, 2, value=current.get(n, 0), step=0.05, label=n, key=f"w-{n}",
                                             elem_id=f"w-{n}", preserved_by_key=None) for n in names]

                        def collect(*values):
                            return json.dumps(dict(zip(names, values)))

                        for s in sliders:
                            wire_live_slider(s, collect, sliders)

                    with gr.Row():
                        seed = gr.Number(label="Seed", value=1, precision=0, elem_id="cp-seed")
                        lock = gr.Checkbox(label="Lock seed", value=True, elem_id="cp-lock")
                    with gr.Accordion("Settings", open=False):
                        steps = gr.Slider(1, 100, value=4 if tiny else 25, step=1, label="Steps", elem_id="cp-steps")
                        size = gr.Dropdown(SIZES, value="64x64" if tiny else "512x512", label="Size",
                                           allow_custom_value=True, elem_id="cp-size")
                        sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler", elem_id="cp-sampler")
                        guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="CFG scale")
                        strength = gr.Number(label="Keep total strength at (0 = off)", value=0)
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

        # ============================================================ Library
        with gr.Tab("Library", id="library"):
            gr.Markdown("Your LoRAs start **private** (only you see and use them); **share** one and everyone can "
                        "use it in their mixes, but only you can rename, replace, delete or edit it. Built-in "
                        "LoRAs are shared and read-only. Datasets, jobs and images are always private. "
                        + ("You are identified by your login." if service_auth_on() else
                           "Without a login, you are identified by a secret token kept in this browser: clear "
                           "its storage and you can no longer change your LoRAs (they stay usable if shared)."))
            lib_table = gr.Dataframe(headers=LIBRARY_COLUMNS, value=service.library_rows(None), interactive=False,
                                     elem_id="lib-table")
            with gr.Row():
                with gr.Column():
                    lib_select = gr.Dropdown([e["name"] for e in service.all_loras(None)], label="LoRA",
                                             elem_id="lib-select")
                    lib_samples = gr.Gallery(label="Samples", columns=4, height=180, elem_id="lib-samples")
                    with gr.Row():
                        lib_format = gr.Radio(["diffusers", "kohya"], value="diffusers", label="Export format")
                        lib_export_btn = gr.Button("Export", elem_id="lib-export-btn")
                    lib_export_file = gr.File(label="Exported file", elem_id="lib-export-file")
                    with gr.Row():
                        lib_new_name = gr.Textbox(label="New name", elem_id="lib-new-name")
                        lib_rename_btn = gr.Button("Rename", elem_id="lib-rename-btn")
                    with gr.Row():
                        lib_new_trigger = gr.Textbox(label="Trigger word", elem_id="lib-new-trigger")
                        lib_trigger_btn = gr.Button("Set trigger word", elem_id="lib-trigger-btn")
                    with gr.Row():
                        lib_visibility = gr.Radio(["private", "shared"], value="shared", label="Visibility",
                                                  elem_id="lib-visibility")
                        lib_visibility_btn = gr.Button("Set visibility", elem_id="lib-visibility-btn")
                    lib_delete_btn = gr.Button("Delete", variant="stop", elem_id="lib-delete-btn")
                with gr.Column():
                    lib_import = gr.File(label="Import a .safetensors LoRA (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, A1111, diffusers)",
                                         file_types=[".safetensors"], type="filepath", elem_id="lib-import")
                    lib_name = gr.Textbox(label="Name in the library", elem_id="lib-name")
                    lib_trigger = gr.Textbox(label="Trigger word (optional)", elem_id="lib-trigger")
                    with gr.Row():
                        lib_import_btn = gr.Button("Import", variant="primary", elem_id="lib-import-btn")
                        lib_replace_btn = gr.Button("Replace selected LoRA with this file", elem_id="lib-replace-btn")
                    lib_msg = gr.Markdown(elem_id="lib-msg")

        # ============================================================ Experiments
        with gr.Tab("Experiments", id="experiments"):
            with gr.Row():
                with gr.Column(scale=1):
                    ex_kind = gr.Radio([("Seed protocol (base, singles, 50/50 mixes)", "protocol"),
                                        ("Weight sweep of two LoRAs", "sweep"),
                                        ("Balance LoRAs toward target shares", "balance")], value="protocol",
                                       label="Experiment", elem_id="ex-kind")
                    ex_loras = gr.Dropdown([e["name"] for e in service.usable_loras(None)], multiselect=True,
                                           label="LoRAs", elem_id="ex-loras")
                    ex_prompts = gr.Textbox(value="a cat sitting by a window", lines=3, label="Prompts (one per line)",
                                            elem_id="ex-prompts")
                    ex_seeds = gr.Textbox(value="0, 1", label="Seeds", elem_id="ex-seeds")
                    ex_values = gr.Textbox(value="0, 0.5, 1", label="Sweep weights / target shares",
                                           info="sweep: the weights each LoRA takes; balance: one target share per "
                                                "chosen LoRA, in order, summing to 1 (e.g. 0.6, 0.4)",
                                           elem_id="ex-values")
                    with gr.Row():
                        ex_steps = gr.Number(value=4 if tiny else 25, precision=0, label="Steps")
                        ex_size = gr.Dropdown([64, 128, 256, 512], value=64 if tiny else 512, label="Size")
                    ex_run = gr.Button("Run", variant="primary", elem_id="ex-run")
                with gr.Column(scale=2):
                    ex_summary = gr.Markdown(elem_id="ex-summary")
                    ex_table = gr.Dataframe(label="Results", interactive=False, elem_id="ex-table")
                    ex_gallery = gr.Gallery(label="Grids and plots", columns=2, height=420, elem_id="ex-gallery")

        # ============================================================ Compose logic
        compose_inputs = [prompt, negative, weights_box, seed, lock, steps, size, sampler, guidance, strength,
                          triggers, blocks, owner]
        # the last four move the sliders when the prompt held <lora:name:w> tags (see compose_fn)
        compose_outputs = [image, scores_md, shares, seed, png_file, recipe_file, used,
                           prompt, weights_box, blocks, recipe_version]

        @gpu(duration=60)
        def compose_fn(prompt_, negative_, weights_json, seed_, lock_, steps_, size_, sampler_, guidance_,
                       strength_, triggers_, blocks_, owner_, request: gr.Request, progress=gr.Progress()):
            try:
                who = _owner(owner_, request)
                seed_value = int(seed_) if lock_ and seed_ is not None else random.randrange(2**32)
                recipe = _compose_recipe(prompt_, negative_, weights_json, seed_value, steps_, size_, sampler_,
                                         guidance_, strength_, triggers_, blocks_)
                out = service.compose(who, recipe, progress=lambda d, t: progress((d, t), desc="denoising"))
            except (StyleMixError, ValueError) as e:
                raise gr.Error(str(e)) from None
            md, share = _format_scores(out.scores)
            used_md = f"Prompt used: `{out.result.prompt_used}`  \nWeights used: " + (
                ", ".join(f"{n} {v:.3g}" for n, v in out.result.weights_used.items() if v) or "none (base model)")
            path = str(out.image_paths[0])
            if recipe.prompt != prompt_:
                # The prompt held <lora:...> tags (Recipe.validate took them): their weights and lbw= move to
                # the sliders and the per-block box, so the tag is not re-applied over a slider moved later.
                tagged = (recipe.prompt, json.dumps(recipe.loras), format_block_weights(recipe.block_weights),
                          time.time_ns())  # a new recipe_version redraws the sliders
            else:
                tagged = (gr.update(),) * 4
            return (path, md, share, seed_value, path, str(out.recipe_path), used_md) + tagged

        go.click(compose_fn, inputs=compose_inputs, outputs=compose_outputs, api_name="compose",
                 trigger_mode="always_last", **GPU).success(_exact_shown, outputs=[image, live], queue=False)

        # ------------------------------------------------------------ live previews while a slider moves
        preview_outputs = [image, live]

        @gpu(duration=20)
        @readable_errors
        def preview_fn(prompt_, negative_, weights_json, seed_, lock_, steps_, size_, sampler_, guidance_,
                       strength_, triggers_, blocks_, owner_, request: gr.Request):
            """A fast preview of the weights being dragged, with the seed box's seed (so only the mix
            changes); skipped (no update) when a newer request or the exact render made it pointless."""
            recipe = _compose_recipe(prompt_, negative_, weights_json, int(seed_ or 0), steps_, size_, sampler_,
                                     guidance_, strength_, triggers_, blocks_)
            out = service.preview(_owner(owner_, request), recipe)
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
            slider.input(collect, inputs=sliders, outputs=weights_box, queue=False,
                         trigger_mode="always_last").then(
                preview_fn, inputs=compose_inputs, outputs=preview_outputs, trigger_mode="always_last",
                show_progress="hidden", **PREVIEW)
            # the newest release wins: queued older requests are dropped (always_last)
            slider.release(collect, inputs=sliders, outputs=weights_box, queue=False).then(
                compose_fn, inputs=compose_inputs, outputs=compose_outputs,
                trigger_mode="always_last", **GPU).success(_exact_shown, outputs=[image, live], queue=False)

        api_preview = gr.Button(visible=False)  # API only: POST /preview with the compose inputs
        api_preview.click(preview_fn, inputs=compose_inputs, outputs=preview_outputs, api_name="preview", **PREVIEW)

        def load_recipe(path, names, version):
            try:
                if not path:
                    return [gr.update()] * 11
                if str(path).lower().endswith(".json"):
                    with open(path, encoding="utf-8") as f:
                        r = Recipe.from_dict(json.loads(f.read(200_000)))
                else:
                    r = read_recipe(path)
            except (StyleMixError, ValueError, OSError) as e:
                raise gr.Error(f"Could not read that recipe: {e}") from None
            # a LoRA this page cannot use, or whose file is not the one the recipe recorded, is left out
            weights, notes = service.check_recipe_loras(None, r.loras, r.lora_hashes, names=list(names or []))
            if notes:
                gr.Warning("Left out of the mix: " + "; ".join(notes) + ".")
            block_text = format_block_weights(r.block_weights, names)
            return (r.prompt, r.negative_prompt, json.dumps(weights), r.seed, True, r.steps,
                    f"{r.width}x{r.height}", r.sampler, r.guidance, block_text, (version or 0) + 1)

        recipe_in.upload(load_recipe, inputs=[recipe_in, lora_names, recipe_version],
                         outputs=[prompt, negative, weights_box, seed, lock, steps, size, sampler, guidance,
                                  blocks, recipe_version], api_name="load_recipe")

        # ============================================================ library refresh (sliders follow it)
        def library_updates(who, selected=None, names_now=None):
            """New values for everything that lists LoRAs (sliders, tables, dropdowns), as `who` sees them.
            The sliders are redrawn only when the usable names changed (`names_now`: what the page has)."""
            usable = [e["name"] for e in service.usable_loras(who)]
            everything = [e["name"] for e in service.all_loras(who)]
            sel = selected if selected in everything else (everything[0] if everything else None)
            names = gr.skip() if names_now is not None and list(names_now) == usable else usable
            return (names, service.library_rows(who), gr.update(choices=everything, value=sel),
                    gr.update(choices=usable))

        library_outputs = [lora_names, lib_table, lib_select, ex_loras]

        # ============================================================ Dataset logic
        def _dataset_outputs(who, style, message=None):
            v = service.dataset_view(who, style)
            summary = f"**{style}** (trigger `{v['trigger_word']}`, {v['size']} px): {v['summary']}"
            if v.get("captioner_is_fallback"):
                summary += "  \n*Captions are the neutral fallback: edit them below for better training.*"
            if message:
                summary = message + "  \n" + summary
            names = service.list_datasets(who)
            return (summary, v["kept"], v["rejected"] or None, v["captions"],
                    gr.update(choices=names, value=style), gr.update(choices=names, value=style))

        dataset_outputs = [ds_summary, ds_kept, ds_rejected, ds_captions, ds_select, tr_dataset]

        @readable_errors
        def prepare_fn(files, style, trigger, size_, pixel, blur, overwrite, owner_, request: gr.Request,
                       progress=gr.Progress()):
            from stylemix.dataset import EmptyDatasetError

            who = _owner(owner_, request)
            paths = [f if isinstance(f, str) else getattr(f, "name", f) for f in (files or [])]
            try:
                result = service.prepare_dataset(who, paths, (style or "").strip(), trigger, int(size_), pixel,
                                                 float(blur or 0), bool(overwrite),
                                                 progress=lambda d, t, m: progress((d, max(t, 1)), desc=m))
            except EmptyDatasetError as e:
                reasons = "; ".join(f"{i.input.split(':', 1)[-1].split('/')[-1]}: {i.reason} ({i.detail})"
                                    for i in e.items[:8])
                raise gr.Error(f"{e} {reasons}") from None
            notes = list(result.trigger_check.warnings)
            for note in notes:
                gr.Warning(note)
            return _dataset_outputs(who, style.strip(), "  \n".join(f"⚠️ {n}" for n in notes) or None)

        ds_run.click(prepare_fn, inputs=[ds_upload, ds_style, ds_trigger, ds_size, ds_pixel, ds_blur, ds_overwrite,
                                         owner], outputs=dataset_outputs, api_name="prepare_dataset",
                     concurrency_id="datasets", concurrency_limit=2)

        @readable_errors
        def example_fn(name, owner_, request: gr.Request):
            who = _owner(owner_, request)
            files = service.stage_example(who, name)
            return [str(f) for f in files], name, service.example_sets()[name]

        ds_example.click(example_fn, inputs=[ds_example_set, owner], outputs=[ds_upload, ds_style, ds_trigger],
                         api_name="load_example_set")

        @readable_errors
        def view_dataset_fn(style, owner_, request: gr.Request):
            if not style:
                return [gr.update()] * len(dataset_outputs)
            return _dataset_outputs(_owner(owner_, request), style)

        ds_select.input(view_dataset_fn, inputs=[ds_select, owner], outputs=dataset_outputs, api_name="dataset_view")

        @readable_errors
        def save_captions_fn(style, table, owner_, request: gr.Request):
            who = _owner(owner_, request)
            if not style:
                raise StyleMixError("Choose one of your datasets first.")
            rows = table.values.tolist() if hasattr(table, "values") else (table.get("data") if isinstance(table, dict) else table)
            saved = service.save_captions(who, style, rows)
            return _dataset_outputs(who, style, f"Saved {len(saved)} captions.")

        ds_save.click(save_captions_fn, inputs=[ds_select, ds_captions, owner], outputs=dataset_outputs,
                      api_name="save_captions")

        # ============================================================ Train logic
        def _train_outputs(view, history, names_now, who):
            """progress, status, loss plot, samples, job id, history, then the library outputs (sliders,
            table, dropdowns) only when the usable LoRAs changed (a job finished)."""
            keep_library = (gr.skip(),) * len(library_outputs)
            if view is None:
                return (_progress_html(None), "", gr.skip(), gr.skip(), None, []) + keep_library
            history = list(history or [])
            if view["loss_curve"]:
                history = [list(p) for p in view["loss_curve"]]
            elif isinstance(view["loss"], (int, float)) and view["step"] and (
                    not history or history[-1][0] < view["step"]):
                history.append([view["step"], view["loss"]])
            status = f"Job `{view['id']}` — {view['text']}"
            if view["error"]:
                status += f"  \n**Error:** {view['error']}"
            usable = [e["name"] for e in service.usable_loras(who)]
            library = library_updates(who) if names_now is not None and usable != list(names_now) else keep_library
            return (_progress_html(view), status, _loss_frame(history), view["samples"], view["id"], history) + library

        train_outputs = [tr_progress, tr_status, tr_loss, tr_samples, job_id, loss_history] + library_outputs

        @readable_errors
        def start_fn(dataset, name, max_steps, lr, rank, epochs, batch, res, text, seed_, owner_,
                     request: gr.Request):
            who = _owner(owner_, request)
            if not dataset:
                raise StyleMixError("Choose a dataset (prepare one in the Dataset tab first).")
            settings = {"learning_rate": float(lr), "epochs": int(epochs), "batch_size": int(batch),
                        "train_text_encoder": bool(text), "seed": int(seed_)}
            if rank:
                settings.update(rank=int(rank), alpha=float(rank) / 2)
            if res:
                settings["resolution"] = int(res)
            job = service.start_training(who, dataset, (name or "").strip(), int(max_steps or 0) or None, settings)
            return _train_outputs(service.job_view(who, job.id), [], None, who)

        tr_start.click(start_fn, inputs=[tr_dataset, tr_name, tr_steps, tr_lr, tr_rank, tr_epochs, tr_batch, tr_res,
                                         tr_text, tr_seed, owner], outputs=train_outputs, api_name="start_training")

        last_shown = gr.State(None)

        @readable_errors
        def status_fn(jid, history, names_now, shown, owner_, request: gr.Request):
            who = _owner(owner_, request)
            view = service.job_view(who, jid or None)
            key = json.dumps(view, sort_keys=True, default=str)
            if key == shown:  # nothing new: send nothing (no flicker, no traffic)
                return (gr.skip(),) * (len(train_outputs) + 1)
            return _train_outputs(view, history, names_now, who) + (key,)

        # the poll is cheap (reads status.json), so it never waits in the GPU queue
        timer.tick(status_fn, inputs=[job_id, loss_history, lora_names, last_shown, owner],
                   outputs=train_outputs + [last_shown], show_progress="hidden", concurrency_limit=None,
                   api_name=False)

        @readable_errors
        def job_status_api(jid, owner_, request: gr.Request):
            view = service.job_view(_owner(owner_, request), jid or None)
            return json.dumps(view or {"state": None})

        # API only (the page polls with the timer above): the job's status as JSON
        api_json = gr.Textbox(visible=False)
        api_btn = gr.Button(visible=False)
        api_btn.click(job_status_api, inputs=[job_id, owner], outputs=api_json, api_name="job_status",
                      concurrency_limit=None)

        def job_action(verb: str, act):
            """The Cancel and Resume buttons: the same checks, then `act(owner, job_id)`."""
            @readable_errors
            def fn(jid, owner_, request: gr.Request):
                who = _owner(owner_, request)
                if not jid:
                    raise StyleMixError(f"No job to {verb}.")
                act(who, jid)
                return _train_outputs(service.job_view(who, jid), [], None, who)

            fn.__name__ = f"{verb}_fn"
            return fn

        tr_cancel.click(job_action("cancel", service.cancel_job), inputs=[job_id, owner], outputs=train_outputs,
                        api_name="cancel_job")
        tr_resume.click(job_action("resume", service.resume_job), inputs=[job_id, owner], outputs=train_outputs,
                        api_name="resume_job")

        # ============================================================ Library logic
        # Every action names the caller; the service refuses what they may not do (one readable message).
        @readable_errors
        def list_loras_fn(owner_, request: gr.Request):
            return service.library_rows(_owner(owner_, request))

        lib_refresh = gr.Button("Refresh", visible=False)
        lib_refresh.click(list_loras_fn, inputs=owner, outputs=lib_table, api_name="list_loras", queue=False)

        @readable_errors
        def refresh_library_fn(selected, owner_, request: gr.Request):
            return library_updates(_owner(owner_, request), selected)

        lib_refresh.click(refresh_library_fn, inputs=[lib_select, owner], outputs=library_outputs,
                          api_name="refresh_library", queue=False)

        @readable_errors
        def select_lora_fn(name, owner_, request: gr.Request):
            return service.lora_samples(_owner(owner_, request), name) if name else []

        lib_select.change(select_lora_fn, inputs=[lib_select, owner], outputs=lib_samples, api_name="lora_samples")

        @readable_errors
        def import_fn(path, name, trigger, owner_, request: gr.Request):
            who = _owner(owner_, request)
            entry = service.import_lora(who, path, (name or "").strip(), (trigger or "").strip() or None)
            return (f"Imported **{entry['name']}** (private: share it to let others use it).",) + \
                library_updates(who, entry["name"])

        lib_import_btn.click(import_fn, inputs=[lib_import, lib_name, lib_trigger, owner],
                             outputs=[lib_msg] + library_outputs, api_name="import_lora")

        @readable_errors
        def replace_fn(path, name, trigger, owner_, request: gr.Request):
            who = _owner(owner_, request)
            if not name:
                raise StyleMixError("Choose one of your LoRAs to replace.")
            entry = service.replace_lora(who, path, name, (trigger or "").strip() or None)
            return (f"Replaced the weights of **{entry['name']}**.",) + library_updates(who, entry["name"])

        lib_replace_btn.click(replace_fn, inputs=[lib_import, lib_select, lib_trigger, owner],
                              outputs=[lib_msg] + library_outputs, api_name="replace_lora")

        @readable_errors
        def export_fn(name, fmt, owner_, request: gr.Request):
            who = _owner(owner_, request)
            if not name:
                raise StyleMixError("Choose a LoRA to export.")
            return str(service.export_lora(who, name, fmt))

        lib_export_btn.click(export_fn, inputs=[lib_select, lib_format, owner], outputs=lib_export_file,
                             api_name="export_lora")

        @readable_errors
        def rename_fn(name, new, owner_, request: gr.Request):
            who = _owner(owner_, request)
            if not name:
                raise StyleMixError("Choose a LoRA to rename.")
            entry = service.rename_lora(who, name, new)
            return (f"Renamed **{name}** to **{entry['name']}**.",) + library_updates(who, entry["name"])

        # rename and delete wait for an image being made (the mixer's lock), not in the GPU queue
        lib_rename_btn.click(rename_fn, inputs=[lib_select, lib_new_name, owner], outputs=[lib_msg] + library_outputs,
                             api_name="rename_lora")

        @readable_errors
        def delete_fn(name, owner_, request: gr.Request):
            who = _owner(owner_, request)
            if not name:
                raise StyleMixError("Choose a LoRA to delete.")
            service.delete_lora(who, name)
            return (f"Deleted **{name}**.",) + library_updates(who)

        lib_delete_btn.click(delete_fn, inputs=[lib_select, owner], outputs=[lib_msg] + library_outputs,
                             api_name="delete_lora")

        @readable_errors
        def trigger_fn(name, word, owner_, request: gr.Request):
            who = _owner(owner_, request)
            if not name:
                raise StyleMixError("Choose a LoRA first.")
            entry = service.set_trigger_word(who, name, word)
            return (f"Trigger word of **{name}**: `{entry['trigger_word'] or 'none'}`.",) + library_updates(who, name)

        lib_trigger_btn.click(trigger_fn, inputs=[lib_select, lib_new_trigger, owner],
                              outputs=[lib_msg] + library_outputs, api_name="set_trigger_word")

        @readable_errors
        def visibility_fn(name, visibility, owner_, request: gr.Request):
            who = _owner(owner_, request)
            if not name:
                raise StyleMixError("Choose a LoRA first.")
            entry = service.set_visibility(who, name, visibility)
            return (f"**{name}** is now {entry['visibility']}.",) + library_updates(who, name)

        lib_visibility_btn.click(visibility_fn, inputs=[lib_select, lib_visibility, owner],
                                 outputs=[lib_msg] + library_outputs, api_name="set_visibility")

        # A live library: each page polls a cheap fingerprint and redraws its lists and sliders only
        # when another user shared, changed or trained a LoRA.
        lib_timer = gr.Timer(LIBRARY_POLL_S)

        def library_poll_fn(seen, names_now, selected, owner_, request: gr.Request):
            version = service.library_version()
            if version == seen:
                return (gr.skip(),) * (len(library_outputs) + 1)
            try:
                who = _owner(owner_, request)
            except gr.Error:  # the page has no id yet: demo.load gives it one
                return (gr.skip(),) * (len(library_outputs) + 1)
            return library_updates(who, selected, names_now) + (version,)

        lib_timer.tick(library_poll_fn, inputs=[library_version, lora_names, lib_select, owner],
                       outputs=library_outputs + [library_version], show_progress="hidden",
                       concurrency_limit=None, api_name=False)

        # ============================================================ Experiments logic
        @gpu(duration=300)
        @readable_errors
        def experiment_fn(kind, loras, prompts_text, seeds_text, values_text, steps_, size_, owner_,
                          request: gr.Request, progress=gr.Progress()):
            who = _owner(owner_, request)
            try:
                seeds = [int(s) for s in str(seeds_text).replace(",", " ").split()]
                values = [float(v) for v in str(values_text).replace(",", " ").split()]
            except ValueError:
                raise StyleMixError(f"Seeds must be integers and sweep weights numbers: got {seeds_text!r}, "
                                    f"{values_text!r}.") from None
            res = service.run_experiment(who, kind, list(loras or []), str(prompts_text).splitlines(), seeds,
                                         int(steps_), int(size_), values,
                                         progress=lambda d, t, m: progress((d, max(t, 1)), desc=m))
            header, rows = res["table"]
            import pandas as pd

            return res["markdown"], pd.DataFrame(rows, columns=header), res["images"]

        ex_run.click(experiment_fn, inputs=[ex_kind, ex_loras, ex_prompts, ex_seeds, ex_values, ex_steps, ex_size,
                                            owner], outputs=[ex_summary, ex_table, ex_gallery],
                     api_name="run_experiment", **EXPERIMENTS)

        # ============================================================ page load
        def on_load(token, names_now, request: gr.Request):
            """Give a new browser its id; show the user's datasets and their latest job again."""
            try:
                token = check_owner_token(token) if token else new_owner_token()
            except StyleMixError:
                token = new_owner_token()
            try:
                who = _owner(token, request)
                datasets = service.list_datasets(who)
                train = _train_outputs(service.job_view(who), [], names_now, who)
            except StyleMixError:
                datasets, train = [], _train_outputs(None, [], names_now, None)
            ds = gr.update(choices=datasets, value=datasets[-1] if datasets else None)
            return (token, ds, ds) + train

        demo.load(on_load, inputs=[owner, lora_names], outputs=[owner, ds_select, tr_dataset] + train_outputs,
                  api_name=False)
    return demo


def service_auth_on() -> bool:
    """App auth is on (STYLEMIX_AUTH, or a Space that asks visitors to log in)."""
    return bool(os.environ.get("STYLEMIX_AUTH") or os.environ.get("OAUTH_CLIENT_ID"))


def launch_options(service: StyleMixService, host: str | None = None, port: int | None = None,
                   share: bool = False, auth: str | None = None) -> dict:
    """The keyword arguments of `launch()`: the deployment's security settings in one place."""
    auth = auth or os.environ.get("STYLEMIX_AUTH")
    auth_pair = tuple(auth.split(":", 1)) if auth and ":" in auth else None
    if auth and not (auth_pair and all(auth_pair)):
        raise StyleMixError("--auth / STYLEMIX_AUTH must be USER:PASSWORD.")
    ws = service.workspace
    return dict(
        server_name=host or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=port or int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        share=bool(share), auth=auth_pair, max_file_size=MAX_UPLOAD,
        # only the app's own folders can be served; per-user files sit under unguessable session ids
        allowed_paths=[str(ws.outputs), str(ws.data), str(ws.loras)])


def main(model: str | None = None, device: str | None = None, dtype: str | None = None,
         loras_dir: str | None = None, host: str | None = None, port: int | None = None,
         share: bool = False, auth: str | None = None, compile: bool | None = None,
         preview: dict | None = None) -> None:
    """preview: PreviewConfig fields from the command line (None values: the STYLEMIX_PREVIEW_* environment)."""
    from stylemix import jobs
    from stylemix.models import TINY
    from stylemix.preview import PreviewConfig

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("stylemix").setLevel(logging.INFO)  # ours at INFO; libraries' request logs stay quiet
    model = model or os.environ.get("STYLEMIX_MODEL")
    previews = PreviewConfig.from_env(model == TINY, **(preview or {})) if preview else None
    service = StyleMixService.start(model, Workspace.default(loras_dir), device=device, dtype=dtype,
                                    compile=compile, preview=previews)
    options = launch_options(service, host, port, share, auth)  # a bad --auth fails before the long start
    jobs.ensure_queue_running(service.workspace)  # a job queued before a restart starts now
    build_demo(service).queue(default_concurrency_limit=1).launch(**options)


if __name__ == "__main__":
    main()
