"""The Experiments tab: the seed protocol, a weight sweep of two LoRAs, or balancing toward target shares."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from stylemix.errors import StyleMixError
from stylemix.service import StyleMixService
from ui.common import EXPERIMENTS, gpu, owner_of, readable_errors


@dataclass
class ExperimentsTab:
    kind: gr.Radio
    loras: gr.Dropdown  # refreshed with the library (one of app.build_demo's library outputs)
    prompts: gr.Textbox
    seeds: gr.Textbox
    values: gr.Textbox
    steps: gr.Number
    size: gr.Dropdown
    run: gr.Button
    summary: gr.Markdown
    table: gr.Dataframe
    gallery: gr.Gallery


def build_experiments_tab(service: StyleMixService, tiny: bool) -> ExperimentsTab:
    """Lay out the tab (inside `gr.Tab`); its events are wired by `wire_experiments_tab`."""
    with gr.Row():
        with gr.Column(scale=1):
            kind = gr.Radio([("Seed protocol (base, singles, 50/50 mixes)", "protocol"),
                             ("Weight sweep of two LoRAs", "sweep"),
                             ("Balance LoRAs toward target shares", "balance")], value="protocol",
                            label="Experiment", elem_id="ex-kind")
            loras = gr.Dropdown([e["name"] for e in service.usable_loras(None)], multiselect=True,
                                label="LoRAs", elem_id="ex-loras")
            prompts = gr.Textbox(value="a cat sitting by a window", lines=3, label="Prompts (one per line)",
                                 elem_id="ex-prompts")
            seeds = gr.Textbox(value="0, 1", label="Seeds", elem_id="ex-seeds")
            values = gr.Textbox(value="0, 0.5, 1", label="Sweep weights / target shares",
                                info="sweep: the weights each LoRA takes; balance: one target share per "
                                     "chosen LoRA, in order, summing to 1 (e.g. 0.6, 0.4)",
                                elem_id="ex-values")
            with gr.Row():
                steps = gr.Number(value=4 if tiny else 25, precision=0, label="Steps")
                size = gr.Dropdown([64, 128, 256, 512], value=64 if tiny else 512, label="Size")
            run = gr.Button("Run", variant="primary", elem_id="ex-run")
        with gr.Column(scale=2):
            summary = gr.Markdown(elem_id="ex-summary")
            table = gr.Dataframe(label="Results", interactive=False, elem_id="ex-table")
            gallery = gr.Gallery(label="Grids and plots", columns=2, height=420, elem_id="ex-gallery")
    return ExperimentsTab(kind, loras, prompts, seeds, values, steps, size, run, summary, table, gallery)


def wire_experiments_tab(tab: ExperimentsTab, service: StyleMixService, owner: gr.BrowserState) -> None:
    @gpu(duration=300)
    @readable_errors
    def experiment_fn(kind, loras, prompts_text, seeds_text, values_text, steps_, size_, owner_,
                      request: gr.Request, progress=gr.Progress()):
        who = owner_of(owner_, request)
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

    tab.run.click(experiment_fn, inputs=[tab.kind, tab.loras, tab.prompts, tab.seeds, tab.values, tab.steps,
                                         tab.size, owner], outputs=[tab.summary, tab.table, tab.gallery],
                  api_name="run_experiment", **EXPERIMENTS)
