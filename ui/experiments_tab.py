"""The Experiments tab: the seed protocol, a weight sweep of two LoRAs, balancing toward target shares, the
epochs of one LoRA compared, or the mixing modes and schedule presets of one mix compared."""

from __future__ import annotations

import math
from dataclasses import dataclass

import gradio as gr

from stylemix.errors import StyleMixError
from stylemix.recipe import DEFAULT_SAMPLER, MAX_STEPS, SAMPLERS, whole_number
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
    sampler: gr.Dropdown
    run: gr.Button
    runs: gr.Dropdown  # the user's past runs (listed when opened, and after each run)
    summary: gr.Markdown
    table: gr.Dataframe
    gallery: gr.Gallery


# the protocol has no values
VALUES_FOR_KIND = {"sweep": "0, 0.5, 1", "balance": "0.5, 0.5", "epochs": "1", "modes": "0.5, 0.5"}
MODES_INTRO = ("Modes and schedule presets of one mix, on the same prompts and seeds: **merge** (the weighted sum at "
               "every step), **switch** (one LoRA at a time, in turn), **composite** (the U-Net once per LoRA, "
               "the predictions averaged), and each preset's schedules (in merge mode).\n")
JUDGES_INTRO = ("The same images scored by both style judges: columns marked **[clip]** are `{clip}`'s, **[csd]** "
                "`{csd}`'s (CSD is trained so that images of one style sit close whatever they show; CLIP mostly "
                "sees content). Compare the order of the configurations within each judge's columns, never the "
                "numbers across judges: each judge has its own scale (docs/scores.md).\n")
SIGNIFICANT = 4  # digits of a number in the results table (the CSV files keep full precision)


def rounded(x):
    """A table cell: floats to SIGNIFICANT significant digits, everything else as it is."""
    if isinstance(x, float) and math.isfinite(x):
        return float(f"{x:.{SIGNIFICANT}g}")
    return x


def summary_table(summary: list[dict]) -> tuple[list[str], list[list]]:
    """A protocol summary's rows (dicts, one key order) as the results table: (header, rounded rows)."""
    header = list(summary[0]) if summary else []
    return header, [[rounded(r.get(k)) for k in header] for r in summary]


def experiment_view(rec: dict) -> tuple[str, list[str], list[list], list[tuple[str, str]]]:
    """A saved run (StyleMixService.run_experiment's "record", or open_experiment's) as the page shows it:
    (Markdown summary, table header, table rows, [(image path, caption)]).  The numbers are in the table
    only; the summary says what ran and what to read in it."""
    names, files, kind = rec["names"], rec.get("files") or {}, rec["kind"]
    settings = rec.get("settings") or {}
    ran = (f"{settings.get('steps')} steps, {settings.get('sampler')}, {settings.get('width')}px"
           if settings else "")
    if kind == "judges":
        header, rows = summary_table(rec.get("summary") or [])
        named = rec.get("judge_names") or {}
        images = [(files[f"{j}_plot"], f"CLIP score vs style similarity, judged by {named.get(j) or j}")
                  for j in ("clip", "csd") if f"{j}_plot" in files]
        images += [(p, k.split("_", 1)[1]) for k, p in files.items() if k.startswith("clip_contact_")]
        md = ((rec.get("intro") or "") + "\n" + JUDGES_INTRO.format(
            clip=named.get("clip") or "CLIP", csd=named.get("csd") or "CSD"))
        return md, header, rows, images
    if kind in ("protocol", "modes"):
        header, rows = summary_table(rec.get("summary") or [])
        images = [(files["plot"], "CLIP score vs style similarity")] if "plot" in files else []
        images += [(p, k) for k, p in files.items() if k.startswith("contact_")]
        return (rec.get("intro") or "") + ("\n" + MODES_INTRO if kind == "modes" else ""), header, rows, images
    if kind == "sweep":
        header = [names[0], names[1], "CLIP score"] + [f"share {n}" for n in names]
        rows = []
        for c in rec.get("cells") or []:
            w, sh = c.get("weights") or {}, c.get("shares") or {}
            rows.append([w.get(names[0]), w.get(names[1]), rounded(c.get("clip_score"))]
                        + [rounded(sh.get(n)) for n in names])
        images = [(files[k], caption) for k, caption in
                  (("grid", "images"), ("map", "style shares"),
                   ("clash", "clash map: where the two LoRAs' updates oppose (cosine)")) if k in files]
        md = (f"Weight sweep of {names[0]} x {names[1]} at {rec.get('values')} ({ran})"
              + (" — **demo values (tiny random CLIP judge)**" if rec.get("is_demo") else "") + "  \n"
              + "A blank share: that LoRA is not in the mix (weight 0), or no style was detected.  \n"
              + clash_summary(rec.get("clash") or {}))
        return md, header, rows, images
    if kind == "epochs":
        return epochs_view(rec, ran)
    result = rec["balance"]  # balance
    header = ["step"] + [f"w {n}" for n in names] + [f"share {n}" for n in names] + ["CLIP score", "error"]
    rows = [[i] + [rounded(p["weights"].get(n, 0.0)) for n in names]
            + [rounded(p["shares"].get(n)) for n in names] + [rounded(p["clip_score"]), rounded(p["error"])]
            for i, p in enumerate(result["path"])]
    images = [(files["map"], "style shares with the search path")] if "map" in files else []
    best = ", ".join(f"{n} {result['best']['weights'].get(n, 0):.2f}" for n in names)
    naive = ", ".join(f"{n} {result['naive']['weights'].get(n, 0):.2f}" for n in names)
    md = (f"Best weights: **{best}** (largest share error {result['best']['error']:.3f}; naive {naive}: "
          f"{result['naive']['error']:.3f}). {'Reached' if result['reached'] else 'Did not reach'} the targets "
          f"in {result['evaluations']} search previews ({result['generations']} generations in all; {ran})."
          + (" **Demo values (tiny random CLIP judge).**" if rec.get("is_demo") else ""))
    return md, header, rows, images


def epochs_view(rec: dict, ran: str) -> tuple[str, list[str], list[list], list[tuple[str, str]]]:
    """An epochs run (service "epochs" record): one row per epoch, base first and final last."""
    ep, files = rec.get("epochs") or {}, rec.get("files") or {}
    header = ["epoch", "LoRA", "weight", "n", "CLIP score", "style similarity", "calibrated style"]
    rows = [[r.get("epoch"), r.get("lora"), rounded(r.get("weight")), r.get("n"), rounded(r.get("clip_mean")),
             rounded(r.get("style_sim_mean")), rounded(r.get("style_cal_mean"))] for r in ep.get("rows") or []]
    images = [(files[k], caption) for k, caption in
              (("plot", "CLIP score and style similarity per epoch"),
               ("contact", "base and each epoch (rows) x prompt and seed")) if k in files]
    lora = ep.get("lora", "")
    md = (f"Epochs of **{lora}** at weight {ep.get('weight', 1.0):g} on {len(rec.get('prompts') or [])} prompt(s) "
          f"x {len(rec.get('seeds') or [])} seed(s) ({ran}); means per epoch, the base model for reference"
          + (" — **demo values (tiny random CLIP judge)**" if rec.get("is_demo") else "") + ".  \n"
          + (ep.get("note") or f"Style similarity: cosine to {lora}'s style centroid (the style it was trained on); "
             "calibrated: 0 = the base model's image of the same prompt and seed, 1 = the style's own images "
             "(blank where that scale does not exist)."))
    return md, header, rows, images


def clash_summary(clash: dict) -> str:
    overall = clash.get("overall")
    blocks = [(b, c) for b, c in (clash.get("blocks") or {}).items() if isinstance(c, (int, float))]
    worst = ", ".join(f"{b} {c:+.2f}" for b, c in sorted(blocks, key=lambda x: x[1])[:3])
    return (f"Clash map: overall cosine {'n/a' if overall is None else f'{overall:+.2f}'} between the two LoRAs' "
            f"weight updates; most opposed blocks: {worst or 'none'} (negative = the styles fight there; turn one "
            "down with per-block weights).")


def run_choices(runs: list[dict]) -> list[tuple[str, str]]:
    """The past-runs menu: (label, run id), newest first."""
    return [(f"{r['created']} · {r['kind']} · {', '.join(r['names'])}", r["id"]) for r in runs]


def build_experiments_tab(service: StyleMixService, tiny: bool) -> ExperimentsTab:
    """Lay out the tab (inside `gr.Tab`); its events are wired by `wire_experiments_tab`."""
    with gr.Row():
        with gr.Column(scale=1):
            kind = gr.Radio([("Seed protocol (base, singles, 50/50 mixes)", "protocol"),
                             ("Weight sweep of two LoRAs", "sweep"),
                             ("Balance LoRAs toward target shares", "balance"),
                             ("Compare the epochs of one LoRA", "epochs"),
                             ("Compare mixing modes and schedule presets of one mix", "modes"),
                             ("Compare the style judges (CLIP and CSD) on the seed protocol", "judges")],
                            value="protocol",
                            label="Experiment", elem_id="ex-kind")
            loras = gr.Dropdown([e["name"] for e in service.usable_loras(None)], multiselect=True,
                                label="LoRAs", elem_id="ex-loras")
            prompts = gr.Textbox(value="a cat sitting by a window", lines=3, label="Prompts (one per line)",
                                 elem_id="ex-prompts")
            seeds = gr.Textbox(value="0, 1", label="Seeds", elem_id="ex-seeds")
            values = gr.Textbox(value="0, 0.5, 1", label="Sweep weights / target shares / epoch weight / mix weights",
                                info="sweep: the weights each LoRA takes; balance: one target share per "
                                     "chosen LoRA, in order, summing to 1 (e.g. 0.6, 0.4); epochs: the one "
                                     "weight every epoch is rendered at (e.g. 1); modes: one weight per "
                                     "chosen LoRA, in order (e.g. 0.6, 0.4)",
                                elem_id="ex-values")
            with gr.Row():  # as in Compose; no client-side bounds: Recipe.validate names a bad value
                steps = gr.Number(value=4 if tiny else 25, label=f"Steps (1-{MAX_STEPS})", elem_id="ex-steps")
                size = gr.Dropdown([64, 128, 256, 512], value=64 if tiny else 512, label="Size", elem_id="ex-size")
                sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler", elem_id="ex-sampler")
            run = gr.Button("Run", variant="primary", elem_id="ex-run")
            runs = gr.Dropdown([], label="Your past runs", info="open one to see its results again",
                               elem_id="ex-runs")
        with gr.Column(scale=2):
            summary = gr.Markdown(elem_id="ex-summary")
            table = gr.Dataframe(label="Results", interactive=False, elem_id="ex-table")
            gallery = gr.Gallery(label="Grids and plots", columns=2, height=420, elem_id="ex-gallery")
    return ExperimentsTab(kind, loras, prompts, seeds, values, steps, size, sampler, run, runs, summary, table,
                          gallery)


def wire_experiments_tab(tab: ExperimentsTab, service: StyleMixService, owner: gr.BrowserState) -> None:
    results = [tab.summary, tab.table, tab.gallery]

    def shown(rec: dict) -> tuple:
        import pandas as pd

        md, header, rows, images = experiment_view(rec)
        return md, pd.DataFrame(rows, columns=header), images

    @gpu(duration=300)
    @readable_errors
    def experiment_fn(kind, loras, prompts_text, seeds_text, values_text, steps_, size_, sampler_, owner_,
                      request: gr.Request, progress=gr.Progress()):
        who = owner_of(owner_, request)
        try:
            seeds = [int(s) for s in str(seeds_text).replace(",", " ").split()]
            values = [float(v) for v in str(values_text).replace(",", " ").split()]
        except ValueError:
            raise StyleMixError(f"Seeds must be integers and sweep weights numbers: got {seeds_text!r}, "
                                f"{values_text!r}.") from None
        res = service.run_experiment(who, kind, list(loras or []), str(prompts_text).splitlines(), seeds,
                                     whole_number(steps_), whole_number(size_), values,
                                     progress=lambda d, t, m: progress((d, max(t, 1)), desc=m), sampler=sampler_)
        return shown(res["record"])

    @readable_errors
    def list_runs(owner_, request: gr.Request):
        return gr.update(choices=run_choices(service.list_experiments(owner_of(owner_, request))))

    @readable_errors
    def list_runs_newest_shown(owner_, request: gr.Request):
        runs = service.list_experiments(owner_of(owner_, request))
        return gr.update(choices=run_choices(runs), value=runs[0]["id"] if runs else None)

    # each kind reads the values box differently: show a value that fits the kind just chosen
    tab.kind.input(lambda k: VALUES_FOR_KIND.get(k, gr.skip()), inputs=[tab.kind], outputs=[tab.values],
                   api_visibility="private", show_progress="hidden")
    tab.run.click(experiment_fn, inputs=[tab.kind, tab.loras, tab.prompts, tab.seeds, tab.values, tab.steps,
                                         tab.size, tab.sampler, owner], outputs=results,
                  api_name="run_experiment", show_progress_on=results, **EXPERIMENTS).success(
        list_runs_newest_shown, inputs=[owner], outputs=tab.runs,
        api_visibility="private", show_progress="hidden")

    @readable_errors
    def open_run(run_id, owner_, request: gr.Request):
        if not run_id:
            return gr.skip(), gr.skip(), gr.skip()
        return shown(service.open_experiment(owner_of(owner_, request), run_id))

    # listed when the menu is opened: after a reload the page lists the runs saved before it
    tab.runs.focus(list_runs, inputs=[owner], outputs=tab.runs, api_name="list_experiments",
                   show_progress="hidden")
    tab.runs.input(open_run, inputs=[tab.runs, owner], outputs=results, api_name="open_experiment",
                   show_progress_on=results)
