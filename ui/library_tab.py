"""The Library tab: every LoRA the user can see; import, replace, export, rename, share, delete."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from stylemix import access
from stylemix.errors import StyleMixError
from stylemix.scores.scoring import CENTROID_FILE
from stylemix.service import StyleMixService
from ui.common import owner_of, readable_errors

LIBRARY_COLUMNS = ["name", "trigger word", "rank", "alpha", "centroid", "fits model", "training", "samples", "created",
                   "kind", "covers", "made for", "owner", "visibility"]
LIBRARY_POLL_S = 2.0  # how often each page checks whether the shared library changed (a few stat calls)


@dataclass
class LibraryTab:
    table: gr.Dataframe
    select: gr.Dropdown
    samples: gr.Gallery
    format: gr.Radio
    export_btn: gr.Button
    export_file: gr.File
    new_name: gr.Textbox
    rename_btn: gr.Button
    new_trigger: gr.Textbox
    trigger_btn: gr.Button
    visibility: gr.Radio
    visibility_btn: gr.Button
    delete_btn: gr.Button
    import_file: gr.File
    name: gr.Textbox
    trigger: gr.Textbox
    import_btn: gr.Button
    replace_btn: gr.Button
    msg: gr.Markdown


def library_rows(service: StyleMixService, viewer: str | None = None) -> list[list]:
    """One row per LoRA `viewer` may see, in LIBRARY_COLUMNS order (the owner is shown as you/another user)."""
    rows = []
    for e in service.visible_loras(viewer):
        m = e.meta
        train = m.get("training") or {}
        s = e.summary()
        rows.append([e.name, e.trigger_word or "", ", ".join(map(str, s["ranks"])), m.get("alpha"),
                     "yes" if (e.folder / CENTROID_FILE).is_file() else (m.get("style") or {}).get("status", "no"),
                     "ok" if e.compatible else f"incompatible: {e.problem}",
                     ", ".join(f"{k}={train[k]}" for k in ("max_steps", "learning_rate", "resolution", "model")
                               if k in train),
                     len(m.get("samples") or []), (m.get("created") or "")[:19],
                     s["kind"], " + ".join(s["covers"]), s["made_for"] or "",
                     access.owner_label(m, viewer), e.visibility])
    return rows


def build_library_tab(service: StyleMixService, auth_on: bool) -> LibraryTab:
    """Lay out the tab (inside `gr.Tab`); its events are wired by `wire_library_tab`."""
    gr.Markdown("Your LoRAs start **private** (only you see and use them); **share** one and everyone can "
                "use it in their mixes, but only you can rename, replace, delete or edit it. Built-in "
                "LoRAs are shared and read-only. Datasets, jobs and images are always private. "
                + ("You are identified by your login." if auth_on else
                   "Without a login, you are identified by a secret token kept in this browser: clear "
                   "its storage and you can no longer change your LoRAs (they stay usable if shared)."))
    table = gr.Dataframe(headers=LIBRARY_COLUMNS, value=library_rows(service, None), interactive=False,
                         elem_id="lib-table")
    with gr.Row():
        with gr.Column():
            select = gr.Dropdown([e["name"] for e in service.all_loras(None)], label="LoRA", elem_id="lib-select")
            samples = gr.Gallery(label="Samples", columns=4, height=180, elem_id="lib-samples")
            with gr.Row():
                format_ = gr.Radio(["diffusers", "kohya"], value="diffusers", label="Export format")
                export_btn = gr.Button("Export", elem_id="lib-export-btn")
            export_file = gr.File(label="Exported file", elem_id="lib-export-file")
            with gr.Row():
                new_name = gr.Textbox(label="New name", elem_id="lib-new-name")
                rename_btn = gr.Button("Rename", elem_id="lib-rename-btn")
            with gr.Row():
                new_trigger = gr.Textbox(label="Trigger word", elem_id="lib-new-trigger")
                trigger_btn = gr.Button("Set trigger word", elem_id="lib-trigger-btn")
            with gr.Row():
                visibility = gr.Radio(["private", "shared"], value="shared", label="Visibility",
                                      elem_id="lib-visibility")
                visibility_btn = gr.Button("Set visibility", elem_id="lib-visibility-btn")
            delete_btn = gr.Button("Delete", variant="stop", elem_id="lib-delete-btn")
        with gr.Column():
            import_file = gr.File(label="Import a .safetensors LoRA (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, A1111, diffusers)",
                                  file_types=[".safetensors"], type="filepath", elem_id="lib-import")
            name = gr.Textbox(label="Name in the library", elem_id="lib-name")
            trigger = gr.Textbox(label="Trigger word (optional)", elem_id="lib-trigger")
            with gr.Row():
                import_btn = gr.Button("Import", variant="primary", elem_id="lib-import-btn")
                replace_btn = gr.Button("Replace selected LoRA with this file", elem_id="lib-replace-btn")
            msg = gr.Markdown(elem_id="lib-msg")
    return LibraryTab(table, select, samples, format_, export_btn, export_file, new_name, rename_btn, new_trigger,
                      trigger_btn, visibility, visibility_btn, delete_btn, import_file, name, trigger, import_btn,
                      replace_btn, msg)


def library_updates(service: StyleMixService, who, selected=None, names_now=None) -> tuple:
    """New values for everything that lists LoRAs (sliders, tables, dropdowns), as `who` sees them, in the
    order of app.build_demo's `library_outputs`: LoRA names (sliders), table, LoRA dropdown, Experiments'
    LoRA choices.  The sliders are redrawn only when the usable names changed (`names_now`: what the page has)."""
    usable = [e["name"] for e in service.usable_loras(who)]
    everything = [e["name"] for e in service.all_loras(who)]
    sel = selected if selected in everything else (everything[0] if everything else None)
    names = gr.skip() if names_now is not None and list(names_now) == usable else usable
    return (names, library_rows(service, who), gr.update(choices=everything, value=sel), gr.update(choices=usable))


def wire_library_tab(tab: LibraryTab, service: StyleMixService, owner: gr.BrowserState, lora_names: gr.State,
                     library_version: gr.State, library_outputs: list) -> None:
    """The tab's events.  Every change refreshes `library_outputs` (this tab's and the other tabs' lists)."""

    def updates(who, selected=None, names_now=None):
        return library_updates(service, who, selected, names_now)

    # Every action names the caller; the service refuses what they may not do (one readable message).
    @readable_errors
    def list_loras_fn(owner_, request: gr.Request):
        return library_rows(service, owner_of(owner_, request))

    lib_refresh = gr.Button("Refresh", visible=False)
    lib_refresh.click(list_loras_fn, inputs=owner, outputs=tab.table, api_name="list_loras", queue=False)

    @readable_errors
    def refresh_library_fn(selected, owner_, request: gr.Request):
        return updates(owner_of(owner_, request), selected)

    lib_refresh.click(refresh_library_fn, inputs=[tab.select, owner], outputs=library_outputs,
                      api_name="refresh_library", queue=False)

    @readable_errors
    def select_lora_fn(name, owner_, request: gr.Request):
        return service.lora_samples(owner_of(owner_, request), name) if name else []

    tab.select.change(select_lora_fn, inputs=[tab.select, owner], outputs=tab.samples, api_name="lora_samples")

    @readable_errors
    def import_fn(path, name, trigger, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        entry = service.import_lora(who, path, (name or "").strip(), (trigger or "").strip() or None)
        return (f"Imported **{entry['name']}** (private: share it to let others use it).",) + \
            updates(who, entry["name"])

    with_msg = [tab.msg] + library_outputs
    tab.import_btn.click(import_fn, inputs=[tab.import_file, tab.name, tab.trigger, owner], outputs=with_msg,
                         api_name="import_lora")

    @readable_errors
    def replace_fn(path, name, trigger, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        if not name:
            raise StyleMixError("Choose one of your LoRAs to replace.")
        entry = service.replace_lora(who, path, name, (trigger or "").strip() or None)
        return (f"Replaced the weights of **{entry['name']}**.",) + updates(who, entry["name"])

    tab.replace_btn.click(replace_fn, inputs=[tab.import_file, tab.select, tab.trigger, owner], outputs=with_msg,
                          api_name="replace_lora")

    @readable_errors
    def export_fn(name, fmt, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        if not name:
            raise StyleMixError("Choose a LoRA to export.")
        return str(service.export_lora(who, name, fmt))

    tab.export_btn.click(export_fn, inputs=[tab.select, tab.format, owner], outputs=tab.export_file,
                         api_name="export_lora")

    def on_selected(missing: str, act):
        """A button that changes the selected LoRA with one value: the same checks, then
        `act(who, name, value)` -> (message, the LoRA to select afterwards)."""
        @readable_errors
        def fn(name, value, owner_, request: gr.Request):
            who = owner_of(owner_, request)
            if not name:
                raise StyleMixError(missing)
            message, select = act(who, name, value)
            return (message,) + updates(who, select)

        return fn

    def rename(who, name, new):
        entry = service.rename_lora(who, name, new)
        return f"Renamed **{name}** to **{entry['name']}**.", entry["name"]

    # rename and delete wait for an image being made (the mixer's lock), not in the GPU queue
    tab.rename_btn.click(on_selected("Choose a LoRA to rename.", rename), inputs=[tab.select, tab.new_name, owner],
                         outputs=with_msg, api_name="rename_lora")

    @readable_errors
    def delete_fn(name, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        if not name:
            raise StyleMixError("Choose a LoRA to delete.")
        service.delete_lora(who, name)
        return (f"Deleted **{name}**.",) + updates(who)

    tab.delete_btn.click(delete_fn, inputs=[tab.select, owner], outputs=with_msg, api_name="delete_lora")

    def set_trigger(who, name, word):
        entry = service.set_trigger_word(who, name, word)
        return f"Trigger word of **{name}**: `{entry['trigger_word'] or 'none'}`.", name

    tab.trigger_btn.click(on_selected("Choose a LoRA first.", set_trigger), inputs=[tab.select, tab.new_trigger, owner],
                          outputs=with_msg, api_name="set_trigger_word")

    def set_visibility(who, name, visibility):
        entry = service.set_visibility(who, name, visibility)
        return f"**{name}** is now {entry['visibility']}.", name

    tab.visibility_btn.click(on_selected("Choose a LoRA first.", set_visibility),
                             inputs=[tab.select, tab.visibility, owner], outputs=with_msg, api_name="set_visibility")

    # A live library: each page polls a cheap fingerprint and redraws its lists and sliders only
    # when another user shared, changed or trained a LoRA.
    lib_timer = gr.Timer(LIBRARY_POLL_S)

    def library_poll_fn(seen, names_now, selected, owner_, request: gr.Request):
        version = service.library_version()
        if version == seen:
            return (gr.skip(),) * (len(library_outputs) + 1)
        try:
            who = owner_of(owner_, request)
        except gr.Error:  # the page has no id yet: demo.load gives it one
            return (gr.skip(),) * (len(library_outputs) + 1)
        return updates(who, selected, names_now) + (version,)

    lib_timer.tick(library_poll_fn, inputs=[library_version, lora_names, tab.select, owner],
                   outputs=library_outputs + [library_version], show_progress="hidden",
                   concurrency_limit=None, api_visibility="private")
