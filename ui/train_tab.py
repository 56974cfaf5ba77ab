"""The Train tab: start, follow, cancel and resume a training job (one job on the GPU at a time), and
look back at the user's past jobs.

What a job is doing comes from its status.json (written by the trainer, read by
`StyleMixService.job_view`): the phase, the step, a smoothed time left, the share of the work done,
the whole loss curve and every sample image.  This module only words and draws it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import gradio as gr

from stylemix.errors import StyleMixError
from stylemix.service import StyleMixService
from stylemix.training.config import HELP, LIMITS, NETWORKS, OPTIMIZERS, check_choice, check_setting, parse_number
from ui.common import escape_md, owner_of, readable_errors

JOB_COLUMNS = ["job", "LoRA", "state", "steps", "started"]


@dataclass
class TrainTab:
    dataset: gr.Dropdown
    name: gr.Textbox
    steps: gr.Number
    lr: gr.Number
    rank: gr.Number
    epochs: gr.Number
    batch: gr.Number
    res: gr.Number
    text: gr.Checkbox
    seed: gr.Number
    start: gr.Button
    cancel: gr.Button
    resume: gr.Button
    progress: gr.HTML
    status: gr.Markdown
    job_id: gr.Textbox
    loss: gr.LinePlot
    lr_plot: gr.LinePlot
    samples: gr.Gallery
    jobs: gr.Dataframe
    timer: gr.Timer
    kohya: list  # network, conv rank, optimizer, shuffle, keep tokens, caption and tag dropout, save every epochs


# --------------------------------------------------------------------------- wording


def time_left(eta: float | None) -> str:
    """A smoothed estimate in words, rounded so that it does not flicker (never "0 s" while work remains)."""
    if not isinstance(eta, (int, float)):
        return "estimating the time left"
    if eta < 10:
        return "a few seconds left"
    if eta < 90:
        return f"about {5 * round(eta / 5):.0f} s left"
    if eta < 90 * 60:
        return f"about {round(eta / 60):.0f} min left"
    return f"about {eta / 3600:.1f} h left"


def phase_text(view: dict) -> str:
    """What the job is doing: "Caching latents (3/12 images)", "Training: step 40/200", "completed: step 200/200"."""
    step, total = view["step"], view["total_steps"] or "?"
    state, phase = view["state"], view.get("phase")
    done, of = view.get("phase_done"), view.get("phase_total")
    part = f" ({done}/{of})" if isinstance(done, int) and isinstance(of, int) else ""
    if state == "running":
        return {"starting": "Starting the training process",
                "loading": "Loading the model",
                "caching": f"Caching latents ({done}/{of} images)" if part else "Caching latents",
                "sampling": f"Making samples (step {step}, {done}/{of})" if part else f"Making samples (step {step})",
                "saving": "Saving",
                "scoring": "Scoring the style"}.get(phase, f"Training: step {step}/{total}")
    if state == "queued":
        return "queued: waits for the job training now" + (f" (stopped at step {step}/{total})" if step else "")
    if state == "completed":
        return f"completed: step {step}/{total}"
    return f"{state} at step {step}/{total}"  # failed, cancelled


def job_text(view: dict) -> str:
    """One line about a job: what it does, its share done, loss and (while running) the time left."""
    return (f"{phase_text(view)} ({view['percent']}%)"
            + (f", loss {view['loss']:.4f}" if isinstance(view.get("loss"), (int, float)) else "")
            + (f" (smoothed {view['loss_ema']:.4f})" if isinstance(view.get("loss_ema"), (int, float)) else "")
            + (f", {view['steps_per_sec']:.2f} steps/s" if isinstance(view.get("steps_per_sec"), (int, float)) else "")
            + (f", {time_left(view.get('eta_s'))}" if view["state"] == "running" else ""))


def progress_html(view: dict | None) -> str:
    if not view:
        return '<div class="sm-progress">No training job yet.</div>'
    pct = view["percent"]
    color = {"failed": "#d33", "cancelled": "#999", "completed": "#2a2"}.get(view["state"], "#36c")
    line = f"{escape_md(view['lora_name'])}: {escape_md(phase_text(view))} · {pct}%"
    if view["state"] == "running":
        line += f" · {time_left(view.get('eta_s'))}"
    return (f'<div class="sm-progress"><div style="background:#eee;border-radius:4px;height:14px;width:100%">'
            f'<div style="background:{color};height:14px;border-radius:4px;width:{pct}%"></div></div>'
            f'<span>{line}</span></div>')


def status_markdown(view: dict) -> str:
    text = f"Job `{view['id']}` — {escape_md(job_text(view))}"
    if view["error"]:
        text += f"  \n**Error:** {escape_md(view['error'])}"
    if view["state"] == "completed":
        text += (f"  \n**{escape_md(view['lora_name'])}** is ready: open the Compose tab and move its slider.")
    if view["samples_total"] > len(view["samples"]):
        text += f"  \nShowing the newest {len(view['samples'])} of {view['samples_total']} samples."
    return text


def gallery(view: dict) -> list[tuple[str, str]]:
    """Every sample shown, oldest first, captioned with its step and prompt."""
    return [(s["path"], f"step {s['step']} · {s['prompt']}" if s["prompt"] else f"step {s['step']}")
            for s in view["samples"]]


def job_rows(views: list[dict]) -> list[list[str]]:
    return [[v["id"], v["lora_name"], v["state"], f"{v['step']}/{v['total_steps'] or '?'}",
             (v["started"] or "")[:19].replace("T", " ")] for v in views]


def _loss_frame(view: dict):
    """The loss and, beside it, its smoothed curve (an exponential moving average), one series each."""
    import pandas as pd

    rows = [(float(s), float(v), series) for series, key in (("loss", "loss_curve"), ("smoothed", "loss_ema_curve"))
            for s, v in view.get(key) or []]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def _lr_frame(view: dict):
    import pandas as pd

    return pd.DataFrame({"step": [float(s) for s, _ in view.get("lr_curve") or []],
                         "lr": [float(v) for _, v in view.get("lr_curve") or []]})


# --------------------------------------------------------------------------- the form's numbers


_ZERO_MEANS = {"max_steps": "train by epochs", "rank": "use the default", "resolution": "use the dataset's size",
               "conv_rank": "use the rank", "save_every_epochs": "keep the final LoRA only"}


def form_setting(name: str, raw):
    """A number typed in the form, checked against TrainConfig's limits (the CLI's too).

    For the boxes where 0 means a default (`_ZERO_MEANS`), 0 gives None.  Empty boxes, text and
    values out of range are refused with one message naming the box's value; nothing is clamped."""
    if name not in _ZERO_MEANS:
        return check_setting(name, raw)
    try:
        value = parse_number(name, raw)
        return None if value == 0 else check_setting(name, value)
    except StyleMixError as e:
        raise StyleMixError(f"{str(e).rstrip('.')}, or 0 to {_ZERO_MEANS[name]}.") from None


def form_settings(max_steps, lr, rank, epochs, batch, res, text, seed) -> tuple[int | None, dict]:
    """(max steps, TrainConfig settings) from the form's boxes, every value checked before anything starts."""
    steps = form_setting("max_steps", max_steps)
    settings = {"learning_rate": form_setting("learning_rate", lr), "epochs": form_setting("epochs", epochs),
                "batch_size": form_setting("batch_size", batch), "train_text_encoder": bool(text),
                "seed": form_setting("seed", seed)}
    rank_ = form_setting("rank", rank)
    if rank_ is not None:
        settings.update(rank=rank_, alpha=rank_ / 2)
    res_ = form_setting("resolution", res)
    if res_ is not None:
        settings["resolution"] = res_
    return steps, settings


def kohya_settings(network, conv_rank, optimizer, shuffle, keep_tokens, caption_dropout, tag_dropout,
                   save_every) -> dict:
    """The kohya-named options of the form as TrainConfig settings, each checked like the CLI's flag
    (check_choice / LIMITS), before anything starts."""
    settings = {"network": check_choice("network", network), "optimizer": check_choice("optimizer", optimizer),
                "shuffle_caption": bool(shuffle), "keep_tokens": form_setting("keep_tokens", keep_tokens),
                "caption_dropout_rate": form_setting("caption_dropout_rate", caption_dropout),
                "caption_tag_dropout_rate": form_setting("caption_tag_dropout_rate", tag_dropout)}
    conv = form_setting("conv_rank", conv_rank)
    if conv is not None:
        settings.update(conv_rank=conv, conv_alpha=conv / 2)
    every = form_setting("save_every_epochs", save_every)
    if every is not None:
        settings["save_every_epochs"] = every
    return settings


def _box(label: str, value, name: str, elem_id: str) -> gr.Number:
    """A number box without Gradio's own min/max/precision: those would refuse or round a value before
    the server could say why (a typed 2.5 would silently become 2); `form_setting` checks it instead."""
    hint = LIMITS[name].describe() + (", or 0" if name in _ZERO_MEANS else "")
    return gr.Number(value=value, label=label, elem_id=elem_id, info=hint)


# --------------------------------------------------------------------------- layout and events


def build_train_tab() -> TrainTab:
    """Lay out the tab (inside `gr.Tab`); its events are wired by `wire_train_tab`."""
    with gr.Row():
        with gr.Column(scale=1):
            dataset = gr.Dropdown([], label="Dataset", elem_id="tr-dataset")
            name = gr.Textbox(label="LoRA name", elem_id="tr-name")
            steps = _box("Max steps (0 = 20 epochs, the default)", 0, "max_steps", "tr-steps")
            with gr.Accordion("Advanced (defaults = the seed report's settings)", open=False):
                lr = _box("Learning rate", 1e-4, "learning_rate", "tr-lr")
                rank = _box("Rank (0 = default: 32, 4 on the tiny model)", 0, "rank", "tr-rank")
                epochs = _box("Epochs (when max steps is 0)", 20, "epochs", "tr-epochs")
                batch = _box("Batch size", 2, "batch_size", "tr-batch")
                res = _box("Resolution (0 = the dataset's size)", 0, "resolution", "tr-res")
                text = gr.Checkbox(value=True, label="Train the text encoder too")
                seed = _box("Seed", 42, "seed", "tr-seed")
            with gr.Accordion("Network, optimizer, captions, epochs (kohya's options)", open=False):
                # dropdowns accept any value: the server names a bad one with the CLI's words
                network = gr.Dropdown(list(NETWORKS), value="attention", label="Network (--network)",
                                      allow_custom_value=True, elem_id="tr-network",
                                      info=HELP["network"])
                conv_rank = _box("Conv rank for LoCon (0 = the rank)", 0, "conv_rank", "tr-conv-rank")
                optimizer = gr.Dropdown(list(OPTIMIZERS), value="adamw", label="Optimizer (--optimizer)",
                                        allow_custom_value=True, elem_id="tr-optimizer", info=HELP["optimizer"])
                shuffle = gr.Checkbox(value=False, label="Shuffle caption tags (--shuffle-caption)",
                                      elem_id="tr-shuffle")
                keep_tokens = _box("Keep tokens (the first N tags never move or drop; 1 = the trigger word)", 1,
                                   "keep_tokens", "tr-keep-tokens")
                caption_dropout = _box("Caption dropout rate", 0, "caption_dropout_rate", "tr-caption-dropout")
                tag_dropout = _box("Caption tag dropout rate", 0, "caption_tag_dropout_rate", "tr-tag-dropout")
                save_every = _box("Save every N epochs as NAME@eNN (0 = only the final LoRA)", 0,
                                  "save_every_epochs", "tr-save-every")
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="tr-start")
                cancel = gr.Button("Cancel", elem_id="tr-cancel")
                resume = gr.Button("Resume", elem_id="tr-resume")
        with gr.Column(scale=2):
            progress = gr.HTML(progress_html(None), elem_id="tr-progress")
            status = gr.Markdown(elem_id="tr-status")
            job_id = gr.Textbox(label="Job", interactive=False, max_lines=1, elem_id="tr-job")
            loss = gr.LinePlot(x="step", y="loss", color="series", label="Loss (and smoothed)", height=220,
                               elem_id="tr-loss")
            lr_plot = gr.LinePlot(x="step", y="lr", label="Learning rate", height=160, elem_id="tr-lr-curve")
            samples = gr.Gallery(label="Samples (step · prompt)", columns=6, height=260, elem_id="tr-samples")
            jobs = gr.Dataframe(headers=JOB_COLUMNS, value=[], interactive=False, label="Your jobs (click one to show it)",
                                max_height=260, elem_id="tr-jobs")
    timer = gr.Timer(1.0)
    return TrainTab(dataset, name, steps, lr, rank, epochs, batch, res, text, seed, start, cancel, resume, progress,
                    status, job_id, loss, lr_plot, samples, jobs, timer,
                    [network, conv_rank, optimizer, shuffle, keep_tokens, caption_dropout, tag_dropout, save_every])


def wire_train_tab(tab: TrainTab, service: StyleMixService, owner: gr.BrowserState, lora_names: gr.State,
                   library_outputs: list, library_updates: Callable[[str], tuple]) -> tuple[list, Callable]:
    """The tab's events.  A job that finishes adds a LoRA: its poll then also refreshes `library_outputs`
    (with `library_updates(who)`).  Returns the outputs and the function that fills them (for page load):
    `fill(view, history, names_now, who)` (history is unused: the loss curve is the job's own)."""

    def train_outputs_for(view, history, names_now, who):
        """progress, status, loss plot, samples, job id, the user's jobs, learning-rate plot, then the library outputs (sliders,
        table, dropdowns) only when the usable LoRAs changed (a job finished)."""
        keep_library = (gr.skip(),) * len(library_outputs)
        rows = job_rows(service.list_job_views(who)) if who else []
        if view is None:
            return (progress_html(None), "", gr.skip(), gr.skip(), None, rows, gr.skip()) + keep_library
        usable = [e["name"] for e in service.usable_loras(who)]
        library = library_updates(who) if names_now is not None and usable != list(names_now) else keep_library
        return (progress_html(view), status_markdown(view), _loss_frame(view), gallery(view), view["id"], rows,
                _lr_frame(view)) + library

    # the learning-rate chart after the original six, so API callers' positions stay as they were
    outputs = [tab.progress, tab.status, tab.loss, tab.samples, tab.job_id, tab.jobs, tab.lr_plot] + library_outputs
    # Errors and the spinner sit on the progress bar: the form and the library's inputs stay usable.
    on_progress = dict(show_progress_on=[tab.progress])

    @readable_errors
    def start_fn(dataset, name, max_steps, lr, rank, epochs, batch, res, text, seed_, network, conv_rank, optimizer,
                 shuffle, keep_tokens, caption_dropout, tag_dropout, save_every, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        if not dataset:
            raise StyleMixError("Choose a dataset (prepare one in the Dataset tab first).")
        steps, settings = form_settings(max_steps, lr, rank, epochs, batch, res, text, seed_)
        settings.update(kohya_settings(network, conv_rank, optimizer, shuffle, keep_tokens, caption_dropout,
                                       tag_dropout, save_every))
        if settings["optimizer"] == "prodigy" and settings["learning_rate"] < 0.1:
            gr.Warning(f"Prodigy finds its own step size and multiplies it by the learning rate: the convention is "
                       f"1.0, and {settings['learning_rate']:g} will train very slowly.")
        job = service.start_training(who, dataset, (name or "").strip(), steps, settings)
        return train_outputs_for(service.job_view(who, job.id), None, None, who)

    tab.start.click(start_fn, inputs=[tab.dataset, tab.name, tab.steps, tab.lr, tab.rank, tab.epochs, tab.batch,
                                      tab.res, tab.text, tab.seed] + tab.kohya + [owner], outputs=outputs,
                    api_name="start_training", **on_progress)

    last_shown = gr.State(None)

    @readable_errors
    def status_fn(jid, names_now, shown, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        view = service.job_view(who, jid or None)
        key = json.dumps(view, sort_keys=True, default=str)
        if key == shown:  # nothing new: send nothing (no flicker, no traffic)
            return (gr.skip(),) * (len(outputs) + 1)
        return train_outputs_for(view, None, names_now, who) + (key,)

    # the poll is cheap (reads status.json), so it never waits in the GPU queue
    tab.timer.tick(status_fn, inputs=[tab.job_id, lora_names, last_shown, owner],
                   outputs=outputs + [last_shown], show_progress="hidden", concurrency_limit=None, api_visibility="private")

    @readable_errors
    def job_status_api(jid, owner_, request: gr.Request):
        view = service.job_view(owner_of(owner_, request), jid or None)
        return json.dumps({**view, "text": job_text(view)} if view else {"state": None})

    # API only (the page polls with the timer above): the job's status as JSON
    api_json = gr.Textbox(visible=False)
    api_btn = gr.Button(visible=False)
    api_btn.click(job_status_api, inputs=[tab.job_id, owner], outputs=api_json, api_name="job_status",
                  concurrency_limit=None)

    @readable_errors
    def show_job(owner_, evt: gr.SelectData, request: gr.Request):
        """A click on a row of the jobs table shows that job (the service checks it is the user's)."""
        who = owner_of(owner_, request)
        row = evt.row_value or []
        if not row or not row[0]:
            raise StyleMixError("Click a job's row to show it.")
        return train_outputs_for(service.job_view(who, str(row[0])), None, None, who)

    tab.jobs.select(show_job, inputs=[owner], outputs=outputs, api_visibility="private", **on_progress)

    def job_action(verb: str, act):
        """The Cancel and Resume buttons: the same checks, then `act(owner, job_id)`."""
        @readable_errors
        def fn(jid, owner_, request: gr.Request):
            who = owner_of(owner_, request)
            if not jid:
                raise StyleMixError(f"No job to {verb}.")
            act(who, jid)
            return train_outputs_for(service.job_view(who, jid), None, None, who)

        fn.__name__ = f"{verb}_fn"
        return fn

    tab.cancel.click(job_action("cancel", service.cancel_job), inputs=[tab.job_id, owner], outputs=outputs,
                     api_name="cancel_job", **on_progress)
    tab.resume.click(job_action("resume", service.resume_job), inputs=[tab.job_id, owner], outputs=outputs,
                     api_name="resume_job", **on_progress)
    return outputs, train_outputs_for
