"""The Train tab: start, follow, cancel and resume a training job (one job on the GPU at a time)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import gradio as gr

from stylemix.errors import StyleMixError
from stylemix.service import StyleMixService
from ui.common import owner_of, readable_errors


@dataclass
class TrainTab:
    loss_history: gr.State
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
    samples: gr.Gallery
    timer: gr.Timer


def progress_html(view: dict | None) -> str:
    if not view:
        return '<div class="sm-progress">No training job yet.</div>'
    pct, step, total = view["percent"], view["step"], view["total_steps"] or "?"
    color = {"failed": "#d33", "cancelled": "#999", "completed": "#2a2"}.get(view["state"], "#36c")
    return (f'<div class="sm-progress"><div style="background:#eee;border-radius:4px;height:14px;width:100%">'
            f'<div style="background:{color};height:14px;border-radius:4px;width:{pct}%"></div></div>'
            f'<span>{view["lora_name"]}: {view["state"]} · {pct}% · step {step}/{total}</span></div>')


def job_text(view: dict) -> str:
    """One line about a job: state, step, loss and (while running) the time left."""
    eta = view.get("eta_s")
    return (f"{view['state']}: step {view['step']}/{view['total_steps'] or '?'} ({view['percent']}%)"
            + (f", loss {view['loss']:.4f}" if isinstance(view.get("loss"), (int, float)) else "")
            + (f", about {eta:.0f}s left" if isinstance(eta, (int, float)) and view["state"] == "running" else ""))


def _loss_frame(curve: list):
    import pandas as pd

    return pd.DataFrame({"step": [float(s) for s, _ in curve], "loss": [float(v) for _, v in curve]})


def build_train_tab() -> TrainTab:
    """Lay out the tab (inside `gr.Tab`); its events are wired by `wire_train_tab`."""
    loss_history = gr.State([])
    with gr.Row():
        with gr.Column(scale=1):
            dataset = gr.Dropdown([], label="Dataset", elem_id="tr-dataset")
            name = gr.Textbox(label="LoRA name", elem_id="tr-name")
            steps = gr.Number(value=0, precision=0, label="Max steps (0 = 20 epochs, the default)", elem_id="tr-steps")
            with gr.Accordion("Advanced (defaults = the seed report's settings)", open=False):
                lr = gr.Number(value=1e-4, label="Learning rate")
                rank = gr.Number(value=0, precision=0, label="Rank (0 = default: 32, 4 on the tiny model)")
                epochs = gr.Number(value=20, precision=0, label="Epochs (when max steps is 0)")
                batch = gr.Number(value=2, precision=0, label="Batch size")
                res = gr.Number(value=0, precision=0, label="Resolution (0 = the dataset's size)")
                text = gr.Checkbox(value=True, label="Train the text encoder too")
                seed = gr.Number(value=42, precision=0, label="Seed")
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="tr-start")
                cancel = gr.Button("Cancel", elem_id="tr-cancel")
                resume = gr.Button("Resume", elem_id="tr-resume")
        with gr.Column(scale=2):
            progress = gr.HTML(progress_html(None), elem_id="tr-progress")
            status = gr.Markdown(elem_id="tr-status")
            job_id = gr.Textbox(label="Job", interactive=False, max_lines=1, elem_id="tr-job")
            loss = gr.LinePlot(x="step", y="loss", label="Loss", height=220, elem_id="tr-loss")
            samples = gr.Gallery(label="Samples", columns=4, height=220, elem_id="tr-samples")
    timer = gr.Timer(1.0)
    return TrainTab(loss_history, dataset, name, steps, lr, rank, epochs, batch, res, text, seed, start, cancel,
                    resume, progress, status, job_id, loss, samples, timer)


def wire_train_tab(tab: TrainTab, service: StyleMixService, owner: gr.BrowserState, lora_names: gr.State,
                   library_outputs: list, library_updates: Callable[[str], tuple]) -> tuple[list, Callable]:
    """The tab's events.  A job that finishes adds a LoRA: its poll then also refreshes `library_outputs`
    (with `library_updates(who)`).  Returns the outputs and the function that fills them (for page load)."""

    def train_outputs_for(view, history, names_now, who):
        """progress, status, loss plot, samples, job id, history, then the library outputs (sliders,
        table, dropdowns) only when the usable LoRAs changed (a job finished)."""
        keep_library = (gr.skip(),) * len(library_outputs)
        if view is None:
            return (progress_html(None), "", gr.skip(), gr.skip(), None, []) + keep_library
        history = list(history or [])
        if view["loss_curve"]:
            history = [list(p) for p in view["loss_curve"]]
        elif isinstance(view["loss"], (int, float)) and view["step"] and (
                not history or history[-1][0] < view["step"]):
            history.append([view["step"], view["loss"]])
        status = f"Job `{view['id']}` — {job_text(view)}"
        if view["error"]:
            status += f"  \n**Error:** {view['error']}"
        usable = [e["name"] for e in service.usable_loras(who)]
        library = library_updates(who) if names_now is not None and usable != list(names_now) else keep_library
        return (progress_html(view), status, _loss_frame(history), view["samples"], view["id"], history) + library

    outputs = [tab.progress, tab.status, tab.loss, tab.samples, tab.job_id, tab.loss_history] + library_outputs

    @readable_errors
    def start_fn(dataset, name, max_steps, lr, rank, epochs, batch, res, text, seed_, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        if not dataset:
            raise StyleMixError("Choose a dataset (prepare one in the Dataset tab first).")
        settings = {"learning_rate": float(lr), "epochs": int(epochs), "batch_size": int(batch),
                    "train_text_encoder": bool(text), "seed": int(seed_)}
        if rank:
            settings.update(rank=int(rank), alpha=float(rank) / 2)
        if res:
            settings["resolution"] = int(res)
        job = service.start_training(who, dataset, (name or "").strip(), int(max_steps or 0) or None, settings)
        return train_outputs_for(service.job_view(who, job.id), [], None, who)

    tab.start.click(start_fn, inputs=[tab.dataset, tab.name, tab.steps, tab.lr, tab.rank, tab.epochs, tab.batch,
                                      tab.res, tab.text, tab.seed, owner], outputs=outputs, api_name="start_training")

    last_shown = gr.State(None)

    @readable_errors
    def status_fn(jid, history, names_now, shown, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        view = service.job_view(who, jid or None)
        key = json.dumps(view, sort_keys=True, default=str)
        if key == shown:  # nothing new: send nothing (no flicker, no traffic)
            return (gr.skip(),) * (len(outputs) + 1)
        return train_outputs_for(view, history, names_now, who) + (key,)

    # the poll is cheap (reads status.json), so it never waits in the GPU queue
    tab.timer.tick(status_fn, inputs=[tab.job_id, tab.loss_history, lora_names, last_shown, owner],
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

    def job_action(verb: str, act):
        """The Cancel and Resume buttons: the same checks, then `act(owner, job_id)`."""
        @readable_errors
        def fn(jid, owner_, request: gr.Request):
            who = owner_of(owner_, request)
            if not jid:
                raise StyleMixError(f"No job to {verb}.")
            act(who, jid)
            return train_outputs_for(service.job_view(who, jid), [], None, who)

        fn.__name__ = f"{verb}_fn"
        return fn

    tab.cancel.click(job_action("cancel", service.cancel_job), inputs=[tab.job_id, owner], outputs=outputs,
                     api_name="cancel_job")
    tab.resume.click(job_action("resume", service.resume_job), inputs=[tab.job_id, owner], outputs=outputs,
                     api_name="resume_job")
    return outputs, train_outputs_for
