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


def experiment_view(res: dict) -> tuple[str, list[str], list[list], list[tuple[str, str]]]:
    """An experiment's result (StyleMixService.run_experiment) as the page shows it:
    (Markdown summary, table header, table rows, [(image path, caption)])."""
    names = res["names"]
    if res["kind"] == "protocol":
        result = res["protocol"]
        header, rows = result.summary_table()
        images = [(result.files["plot"], "CLIP score vs style similarity")]
        images += [(p, k) for k, p in result.files.items() if k.startswith("contact_")]
        return result.markdown, header, rows, images
    if res["kind"] == "sweep":
        header = [names[0], names[1], "CLIP score"] + [f"share {n}" for n in names]
        rows = []
        for c in res["map"].to_dict()["cells"]:
            w = c.get("weights", {})
            sh = c.get("shares") or {}
            rows.append([w.get(names[0]), w.get(names[1]), c.get("clip_score")] + [sh.get(n) for n in names])
        files = res["files"]
        images = [(files["grid"], "images"), (files["map"], "style shares"),
                  (files["clash"], "clash map: where the two LoRAs' updates oppose (cosine)")]
        md = (f"Weight sweep of {names[0]} x {names[1]} at {res['values']}"
              + (" — **demo values (tiny CLIP)**" if res["is_demo"] else "") + "  \n" + clash_summary(res["clash"]))
        return md, header, rows, images
    result = res["balance"]  # balance
    header = ["step"] + [f"w {n}" for n in names] + [f"share {n}" for n in names] + ["CLIP score", "error"]
    rows = [[i] + [round(p.weights.get(n, 0.0), 3) for n in names] + [round(p.shares.get(n, 0.0), 3) for n in names]
            + [None if p.clip_score is None else round(p.clip_score, 4), round(p.error, 3)]
            for i, p in enumerate(result.path)]
    images = [(res["files"]["map"], "style shares with the search path")] if res["files"] else []
    best = ", ".join(f"{n} {result.best.weights.get(n, 0):.2f}" for n in names)
    naive = ", ".join(f"{n} {result.naive.weights.get(n, 0):.2f}" for n in names)
    md = (f"Best weights: **{best}** (largest share error {result.best.error:.3f}; naive {naive}: "
          f"{result.naive.error:.3f}). {'Reached' if result.reached else 'Did not reach'} the targets "
          f"in {result.evaluations} search previews ({result.generations} generations in all).")
    return md, header, rows, images


def clash_summary(clash) -> str:
    overall = "n/a" if clash.overall is None else f"{clash.overall:+.2f}"
    worst = ", ".join(f"{b} {c:+.2f}" for b, c in clash.worst_blocks(3))
    return (f"Clash map: overall cosine {overall} between the two LoRAs' weight updates; most opposed blocks: "
            f"{worst or 'none'} (negative = the styles fight there; turn one down with per-block weights).")


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
        md, header, rows, images = experiment_view(res)
        import pandas as pd

        return md, pd.DataFrame(rows, columns=header), images

    tab.run.click(experiment_fn, inputs=[tab.kind, tab.loras, tab.prompts, tab.seeds, tab.values, tab.steps,
                                         tab.size, owner], outputs=[tab.summary, tab.table, tab.gallery],
                  api_name="run_experiment", **EXPERIMENTS)
