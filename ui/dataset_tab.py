"""The Dataset tab: upload images (or load an example set), prepare a training set, edit its captions."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from stylemix.errors import StyleMixError
from stylemix.service import StyleMixService
from ui.common import badge_sink, owner_of, readable_errors, user_error

DATASET_SIZES = [512, 768, 256, 128, 64]


@dataclass
class DatasetTab:
    upload: gr.File
    example_set: gr.Dropdown
    example: gr.Button
    style: gr.Textbox
    trigger: gr.Textbox
    size: gr.Dropdown
    pixel: gr.Radio
    blur: gr.Number
    buckets: gr.Checkbox
    overwrite: gr.Checkbox
    run: gr.Button
    summary: gr.Markdown
    kept: gr.Gallery
    rejected: gr.Dataframe
    select: gr.Dropdown
    captions: gr.Dataframe
    save: gr.Button
    sink: gr.HTML  # show_progress_on target for events whose outputs are form fields


def build_dataset_tab(service: StyleMixService, tiny: bool) -> DatasetTab:
    """Lay out the tab (inside `gr.Tab`); its events are wired by `wire_dataset_tab`."""
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="Images or a zip archive", file_count="multiple",
                             file_types=["image", ".zip", ".txt"], type="filepath", elem_id="ds-upload")
            with gr.Row():
                example_set = gr.Dropdown(list(service.example_sets()), label="Example set",
                                          value=next(iter(service.example_sets()), None), elem_id="ds-example-set")
                example = gr.Button("Load example set", elem_id="ds-example")
            style = gr.Textbox(label="Style name (the dataset's folder)", elem_id="ds-style")
            trigger = gr.Textbox(label="Trigger word (a rare word, e.g. 'knyflt')", elem_id="ds-trigger")
            with gr.Accordion("Options", open=False):
                # any multiple of 64 may be typed; DatasetConfig checks it (the CLI's check)
                size = gr.Dropdown(DATASET_SIZES, value=128 if tiny else 512, label="Image size (px)",
                                   allow_custom_value=True, elem_id="ds-size")
                pixel = gr.Radio(["auto", "on", "off"], value="auto", label="Pixel art (sharp resize)")
                blur = gr.Number(value=100.0, label="Blur threshold (0 keeps all)")
                buckets = gr.Checkbox(value=True, label="Aspect-ratio buckets",
                                      info="Keep each image's shape (kohya's buckets, at most size x size pixels); "
                                           "off: crop every image to a square", elem_id="ds-buckets")
                overwrite = gr.Checkbox(value=False, label="Replace my dataset of the same name")
            run = gr.Button("Prepare dataset", variant="primary", elem_id="ds-run")
        with gr.Column(scale=2):
            summary = gr.Markdown(elem_id="ds-summary")
            kept = gr.Gallery(label="Kept", columns=6, height=260, elem_id="ds-kept")
            rejected = gr.Dataframe(headers=["input", "reason", "detail"], label="Rejected",
                                    interactive=False, elem_id="ds-rejected")
            # allow_custom_value: an API caller may name a dataset made after this page was built (or by
            # another app process); the service checks that it is the caller's
            select = gr.Dropdown([], value=None, label="My datasets", allow_custom_value=True, elem_id="ds-select")
            captions = gr.Dataframe(headers=["file", "caption"], label="Captions (edit, then save)",
                                    interactive=True, elem_id="ds-captions")
            save = gr.Button("Save captions", elem_id="ds-save")
            sink = badge_sink()
    return DatasetTab(upload, example_set, example, style, trigger, size, pixel, blur, buckets, overwrite, run,
                      summary, kept, rejected, select, captions, save, sink)


def bucket_line(buckets: dict[str, int]) -> str:
    """'Images per bucket: 320x768: 3, 512x512: 2' (width x height in pixels), as the summary's second line."""
    if not buckets:
        return ""
    return "Images per bucket: " + ", ".join(f"{name}: {n}" for name, n in buckets.items()) + "."


def wire_dataset_tab(tab: DatasetTab, service: StyleMixService, owner: gr.BrowserState,
                     train_dataset: gr.Dropdown) -> None:
    """The tab's events; every change to the user's datasets also updates the Train tab's dataset list."""

    def dataset_outputs(who, style, message=None):
        v = service.dataset_view(who, style)
        summary = f"**{style}** (trigger `{v['trigger_word']}`, {v['size']} px): {v['summary']}"
        summary += "  \n" + bucket_line(v["buckets"])
        if v.get("captioner_is_demo"):
            summary += ("  \n⚠️ *Demo captions: the built-in tiny captioner has random weights, so these captions "
                        "are **random words**. Describe each image below (or start the app with a real BLIP "
                        "captioner) before training a real LoRA.*")
        elif v.get("captioner_is_fallback"):
            summary += "  \n*Captions are the neutral fallback: edit them below for better training.*"
        if message:
            summary = message + "  \n" + summary
        names = service.list_datasets(who)
        return (summary, v["kept"], v["rejected"] or None, v["captions"],
                gr.update(choices=names, value=style), gr.update(choices=names, value=style))

    outputs = [tab.summary, tab.kept, tab.rejected, tab.captions, tab.select, train_dataset]

    @readable_errors
    def prepare_fn(files, style, trigger, size_, pixel, blur, overwrite, owner_, buckets=True,
                   request: gr.Request = None, progress=gr.Progress()):
        from stylemix.datasets.prepare import EmptyDatasetError

        who = owner_of(owner_, request)
        paths = [f if isinstance(f, str) else getattr(f, "name", f) for f in (files or [])]
        try:
            result = service.prepare_dataset(who, paths, (style or "").strip(), trigger, size_, pixel,
                                             blur, bool(overwrite),
                                             progress=lambda d, t, m: progress((d, max(t, 1)), desc=m),
                                             enable_bucket=buckets)
        except EmptyDatasetError as e:
            reasons = "; ".join(f"{i.input.split(':', 1)[-1].split('/')[-1]}: {i.reason} ({i.detail})"
                                for i in e.items[:8])
            raise user_error(f"{e} {reasons}") from None
        notes = list(result.trigger_check.warnings)
        for note in notes:
            gr.Warning(note)
        return dataset_outputs(who, style.strip(), "  \n".join(f"⚠️ {n}" for n in notes) or None)

    # buckets comes last: API callers that send the older eight values get its default (on)
    tab.run.click(prepare_fn, inputs=[tab.upload, tab.style, tab.trigger, tab.size, tab.pixel, tab.blur,
                                      tab.overwrite, owner, tab.buckets], outputs=outputs, api_name="prepare_dataset",
                  concurrency_id="datasets", concurrency_limit=2,
                  show_progress_on=[tab.kept])  # progress (and a failure's badge) on the gallery, not the form

    @readable_errors
    def example_fn(name, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        files = service.stage_example(who, name)
        return [str(f) for f in files], name, service.example_sets()[name]

    tab.example.click(example_fn, inputs=[tab.example_set, owner], outputs=[tab.upload, tab.style, tab.trigger],
                      api_name="load_example_set", show_progress_on=[tab.sink])

    @readable_errors
    def view_dataset_fn(style, owner_, request: gr.Request):
        if not style:
            return [gr.update()] * len(outputs)
        return dataset_outputs(owner_of(owner_, request), style)

    tab.select.input(view_dataset_fn, inputs=[tab.select, owner], outputs=outputs, api_name="dataset_view",
                     show_progress_on=[tab.sink])

    @readable_errors
    def save_captions_fn(style, table, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        if not style:
            raise StyleMixError("Choose one of your datasets first.")
        rows = table.values.tolist() if hasattr(table, "values") else (table.get("data") if isinstance(table, dict) else table)
        saved = service.save_captions(who, style, rows)
        return dataset_outputs(who, style, f"Saved {len(saved)} captions.")

    tab.save.click(save_captions_fn, inputs=[tab.select, tab.captions, owner], outputs=outputs,
                   api_name="save_captions", show_progress_on=[tab.sink])
