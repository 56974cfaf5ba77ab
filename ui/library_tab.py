"""The Library tab: every LoRA the user can see; import, replace, export, rename, share, delete."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gradio as gr

from stylemix import access
from stylemix.errors import StyleMixError
from stylemix.scores.scoring import CENTROID_FILE
from stylemix.service import StyleMixService
from ui.common import badge_sink, escape_md, owner_of, readable_errors

# name, kind, owner and visibility lead: they are what a user scans for, and they stay on screen
LIBRARY_COLUMNS = ["name", "kind", "owner", "visibility", "trigger word", "covers", "rank", "alpha", "centroid",
                   "fits model", "made for", "training", "samples", "created"]
LIBRARY_POLL_S = 2.0  # how often each page checks whether the shared library changed (a few stat calls)
KEEP = object()  # library_updates(selected=KEEP): leave the page's selection as the user left it


@dataclass
class LibraryTab:
    table: gr.Dataframe
    select: gr.Dropdown
    selected_md: gr.Markdown
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
    confirm_row: gr.Row
    confirm_md: gr.Markdown
    confirm_btn: gr.Button
    keep_btn: gr.Button
    pending_delete: gr.State
    import_file: gr.File
    name: gr.Textbox
    trigger: gr.Textbox
    import_btn: gr.Button
    replace_btn: gr.Button
    msg: gr.Markdown
    sink: gr.HTML  # show_progress_on target: no progress or "Error" badge over the form


def library_rows(service: StyleMixService, viewer: str | None = None) -> list[list]:
    """One row per LoRA `viewer` may see, in LIBRARY_COLUMNS order (the owner is shown as you/another user)."""
    rows = []
    for e in service.visible_loras(viewer):
        m = e.meta
        train = m.get("training") or {}
        s = e.summary()
        rows.append([e.name, s["kind"], access.owner_label(m, viewer), e.visibility, e.trigger_word or "",
                     " + ".join(s["covers"]), ", ".join(map(str, s["ranks"])), m.get("alpha"),
                     "yes" if (e.folder / CENTROID_FILE).is_file() else (m.get("style") or {}).get("status", "no"),
                     "ok" if e.compatible else f"incompatible: {e.problem}", s["made_for"] or "",
                     ", ".join(f"{k}={train[k]}" for k in ("max_steps", "learning_rate", "resolution", "model")
                               if k in train),
                     len(m.get("samples") or []), (m.get("created") or "")[:19]])
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
            # Nothing is selected until the user picks a LoRA; only the user's pick or their own action
            # (import, rename, delete) ever changes it.  allow_custom_value: an API caller may name any LoRA
            # it can see now (one made after this page was built, or by another app process); the service
            # decides whether that name is visible to the caller.
            select = gr.Dropdown([e["name"] for e in service.all_loras(None)], value=None, label="LoRA",
                                 allow_custom_value=True, elem_id="lib-select")
            selected_md = gr.Markdown("Choose a LoRA above to export, rename, share or delete it.",
                                      elem_id="lib-selected")
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
                visibility = gr.Radio(list(access.VISIBILITIES), value=None, label="Visibility",
                                      elem_id="lib-visibility")
                visibility_btn = gr.Button("Set visibility", elem_id="lib-visibility-btn")
            delete_btn = gr.Button("Delete…", variant="stop", elem_id="lib-delete-btn")
            # Delete asks once more, naming the LoRA; the confirmation deletes exactly the LoRA it names
            with gr.Row(visible=False, elem_id="lib-confirm-row") as confirm_row:
                confirm_md = gr.Markdown(elem_id="lib-confirm-text")
                confirm_btn = gr.Button("Delete", variant="stop", elem_id="lib-confirm-delete")
                keep_btn = gr.Button("Keep it", elem_id="lib-keep")
            pending_delete = gr.State(None)
            sink = badge_sink()
        with gr.Column():
            import_file = gr.File(label="Import a .safetensors LoRA (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, A1111, diffusers)",
                                  file_types=[".safetensors"], type="filepath", elem_id="lib-import")
            name = gr.Textbox(label="Name in the library", elem_id="lib-name")
            trigger = gr.Textbox(label="Trigger word (optional)", elem_id="lib-trigger")
            with gr.Row():
                import_btn = gr.Button("Import", variant="primary", elem_id="lib-import-btn")
                replace_btn = gr.Button("Replace selected LoRA with this file", elem_id="lib-replace-btn")
            msg = gr.Markdown(elem_id="lib-msg")
    return LibraryTab(table, select, selected_md, samples, format_, export_btn, export_file, new_name, rename_btn,
                      new_trigger, trigger_btn, visibility, visibility_btn, delete_btn, confirm_row, confirm_md,
                      confirm_btn, keep_btn, pending_delete, import_file, name, trigger, import_btn, replace_btn, msg,
                      sink)


def library_updates(service: StyleMixService, who, selected=KEEP, names_now=None) -> tuple:
    """New values for everything that lists LoRAs (sliders, tables, dropdowns), as `who` sees them, in the
    order of app.build_demo's `library_outputs`: LoRA names (sliders), table, LoRA dropdown, Experiments'
    LoRA choices.  The sliders are redrawn only when the usable names changed (`names_now`: what the page has).

    selected: the LoRA to select afterwards (a name, or None for nothing), or KEEP to leave the page's
    selection alone: a poll never changes what the user selected (its answer can arrive after the user
    or their own action picked another LoRA)."""
    usable = [e["name"] for e in service.usable_loras(who)]
    everything = [e["name"] for e in service.all_loras(who)]
    names = gr.skip() if names_now is not None and list(names_now) == usable else usable
    dropdown = gr.update(choices=everything) if selected is KEEP else gr.update(choices=everything, value=selected)
    return (names, library_rows(service, who), dropdown, gr.update(choices=usable))


def selection_view(service: StyleMixService, who: str | None, name: str | None) -> tuple:
    """The selected LoRA's current state for the form: (selected line, samples, new-name box, trigger box,
    visibility radio).  The boxes start from what the LoRA has now, so an unedited field changes nothing."""
    if not name:
        return ("Choose a LoRA above to export, rename, share or delete it.", [], "", "", None)
    entry = service.visible_entry(who, name)
    samples = service.lora_samples(who, name)
    whose = access.owner_label(entry.meta, who)
    note = "" if whose == "you" else " — read-only for you"
    line = f"Selected: **{escape_md(entry.name)}** ({entry.summary()['kind']}, {whose}, {entry.visibility}){note}"
    return (line, samples, entry.name, entry.trigger_word or "", entry.visibility)


def wire_library_tab(tab: LibraryTab, service: StyleMixService, owner: gr.BrowserState, lora_names: gr.State,
                     library_version: gr.State, library_outputs: list) -> None:
    """The tab's events.  Every change refreshes `library_outputs` (this tab's and the other tabs' lists).

    Every action acts on the name its request carries (the dropdown's value when the user clicked, or the
    name an API caller passed) and on nothing else; the service checks that the caller may."""

    def updates(who, selected=KEEP, names_now=None):
        return library_updates(service, who, selected, names_now)

    quiet = [tab.sink]  # every event: badges out of sight, errors as one toast
    form = [tab.selected_md, tab.samples, tab.new_name, tab.new_trigger, tab.visibility]
    hide_confirm = (None, gr.update(visible=False))  # pending_delete, confirm_row

    @readable_errors
    def list_loras_fn(owner_, request: gr.Request):
        return library_rows(service, owner_of(owner_, request))

    lib_refresh = gr.Button("Refresh", visible=False)
    lib_refresh.click(list_loras_fn, inputs=owner, outputs=tab.table, api_name="list_loras", queue=False)

    @readable_errors
    def refresh_library_fn(selected, owner_, request: gr.Request):
        return updates(owner_of(owner_, request))

    lib_refresh.click(refresh_library_fn, inputs=[tab.select, owner], outputs=library_outputs,
                      api_name="refresh_library", queue=False)

    @readable_errors
    def select_lora_fn(name, owner_, request: gr.Request):
        return service.lora_samples(owner_of(owner_, request), name) if name else []

    api_samples = gr.Button(visible=False)  # API only: the samples of a LoRA the caller may see
    api_samples.click(select_lora_fn, inputs=[tab.select, owner], outputs=tab.samples, api_name="lora_samples")

    def form_view(who, name) -> tuple:
        """The form for `name` (None: nothing selected), and any pending delete disarmed."""
        try:
            return selection_view(service, who, name) + hide_confirm
        except StyleMixError:  # gone meanwhile (deleted by its owner elsewhere): nothing selected
            return selection_view(service, None, None) + hide_confirm

    form_outputs = form + [tab.pending_delete, tab.confirm_row]

    @readable_errors
    def show_selection_fn(name, owner_, request: gr.Request):
        return form_view(owner_of(owner_, request), name)

    # only the user's own pick fills the form (`.input`): an action's answer carries its form itself, in
    # the same response as the selection it makes, so no later event can overwrite what the user types
    tab.select.input(show_selection_fn, inputs=[tab.select, owner], outputs=form_outputs,
                     show_progress_on=quiet, api_visibility="private")

    def clear_msg():
        return ""

    def with_form(fn, resets: tuple = ()):
        """The page's version of an action: its answer (message, lists, the selection it makes) and, in the
        same response, the form of the LoRA it selects and the `resets` values (so no later event can
        overwrite what the user types next)."""
        @functools.wraps(fn)
        def page_fn(*args):
            out = fn(*args)
            selection = out[with_msg.index(tab.select)]  # the dropdown's update: the LoRA it selects
            name = selection.get("value", KEEP) if isinstance(selection, dict) else KEEP
            form_values = ((gr.skip(),) * len(form_outputs) if name is KEEP
                           else form_view(owner_of(args[-2], args[-1]), name))
            return out + form_values + resets

        return page_fn

    def action(button: gr.Button, fn, inputs: list, api_name: str, resets: dict | None = None):
        """A Library button.  The page: the old message goes at once (so a refusal, shown as a toast, never
        sits beside an earlier success), then `fn` runs with its form (with_form) and `resets` ({component:
        value} set on success), its progress and badges on the invisible sink.  API callers: `fn` alone,
        at `api_name`, answering the message and lists."""
        resets = resets or {}
        api_button = gr.Button(visible=False)
        api_button.click(fn, inputs=inputs, outputs=with_msg, api_name=api_name, show_progress_on=quiet)
        button.click(clear_msg, outputs=tab.msg, queue=False, show_progress_on=quiet,
                     api_visibility="private").then(with_form(fn, tuple(resets.values())), inputs=inputs,
                                                    outputs=with_msg + form_outputs + list(resets),
                                                    show_progress_on=quiet, api_visibility="private")

    with_msg = [tab.msg] + library_outputs

    @readable_errors
    def import_fn(path, name, trigger, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        entry = service.import_lora(who, path, (name or "").strip(), (trigger or "").strip() or None)
        return (f"Imported **{escape_md(entry['name'])}** (private: share it to let others use it).",) + \
            updates(who, entry["name"])

    # imported: the import form is emptied for the next file, in the same response
    action(tab.import_btn, import_fn, [tab.import_file, tab.name, tab.trigger, owner], "import_lora",
           resets={tab.import_file: None, tab.name: "", tab.trigger: ""})

    @readable_errors
    def replace_fn(path, name, trigger, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        if not name:
            raise StyleMixError("Choose one of your LoRAs to replace.")
        entry = service.replace_lora(who, path, name, (trigger or "").strip() or None)
        return (f"Replaced the weights of **{escape_md(entry['name'])}**.",) + updates(who, entry["name"])

    action(tab.replace_btn, replace_fn, [tab.import_file, tab.select, tab.trigger, owner], "replace_lora")

    @readable_errors
    def export_fn(name, fmt, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        if not name:
            raise StyleMixError("Choose a LoRA to export.")
        return str(service.export_lora(who, name, fmt))

    tab.export_btn.click(export_fn, inputs=[tab.select, tab.format, owner], outputs=tab.export_file,
                         api_name="export_lora", show_progress_on=[tab.export_file])

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
        return f"Renamed **{escape_md(name)}** to **{escape_md(entry['name'])}**.", entry["name"]

    # rename and delete wait for an image being made (the mixer's lock), not in the GPU queue
    action(tab.rename_btn, on_selected("Choose a LoRA to rename.", rename), [tab.select, tab.new_name, owner],
           "rename_lora")

    def set_trigger(who, name, word):
        entry = service.set_trigger_word(who, name, word)
        return f"Trigger word of **{escape_md(name)}**: `{escape_md(entry['trigger_word'] or 'none')}`.", name

    action(tab.trigger_btn, on_selected("Choose a LoRA first.", set_trigger), [tab.select, tab.new_trigger, owner],
           "set_trigger_word")

    def set_visibility(who, name, visibility):
        if not visibility:
            raise StyleMixError("Choose private or shared.")
        entry = service.set_visibility(who, name, visibility)
        return f"**{escape_md(name)}** is now {entry['visibility']}.", name

    action(tab.visibility_btn, on_selected("Choose a LoRA first.", set_visibility),
           [tab.select, tab.visibility, owner], "set_visibility")

    # ---- delete: the first click names the LoRA and asks; only the confirmation deletes, and only that LoRA
    @readable_errors
    def arm_delete_fn(name, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        if not name:
            raise StyleMixError("Choose a LoRA to delete.")
        service.owned_entry(who, name, "delete")  # refused now, not after the confirmation
        label = escape_md(name)
        return (name, gr.update(visible=True),
                f"Delete **{label}** and its files? This cannot be undone.", gr.update(value=f"Delete {name}"))

    tab.delete_btn.click(clear_msg, outputs=tab.msg, queue=False, show_progress_on=quiet,
                         api_visibility="private").then(
        arm_delete_fn, inputs=[tab.select, owner],
        outputs=[tab.pending_delete, tab.confirm_row, tab.confirm_md, tab.confirm_btn],
        show_progress_on=quiet, api_visibility="private")

    def delete_named(who, name) -> tuple:
        service.delete_lora(who, name)
        return (f"Deleted **{escape_md(name)}**.",) + updates(who, None)  # nothing is selected afterwards

    @readable_errors
    def confirm_delete_fn(pending, name, owner_, request: gr.Request):
        who = owner_of(owner_, request)
        if not pending:
            raise StyleMixError("Nothing to delete: click Delete… first.")
        if pending != name:  # the selection moved since Delete… was clicked: ask again for what is shown now
            raise StyleMixError(f"The selection changed since you asked to delete {pending!r}; nothing was "
                                "deleted. Click Delete… again.")
        return delete_named(who, pending) + form_view(who, None)  # nothing selected: an empty form

    tab.confirm_btn.click(confirm_delete_fn, inputs=[tab.pending_delete, tab.select, owner],
                          outputs=with_msg + form_outputs, show_progress_on=quiet, api_visibility="private")
    tab.keep_btn.click(lambda: hide_confirm, outputs=[tab.pending_delete, tab.confirm_row], queue=False,
                       show_progress_on=quiet, api_visibility="private")

    @readable_errors
    def delete_fn(name, owner_, request: gr.Request):
        """API: delete the LoRA the caller names (a client names its target explicitly; no second step)."""
        who = owner_of(owner_, request)
        if not name:
            raise StyleMixError("Choose a LoRA to delete.")
        return delete_named(who, name)

    api_delete = gr.Button(visible=False)
    api_delete.click(delete_fn, inputs=[tab.select, owner], outputs=with_msg, api_name="delete_lora")

    # A live library: each page polls a cheap fingerprint and redraws its lists and sliders only
    # when another user shared, changed or trained a LoRA.  It never sends or changes the selection.
    lib_timer = gr.Timer(LIBRARY_POLL_S)

    def library_poll_fn(seen, names_now, owner_, request: gr.Request):
        version = service.library_version()
        if version == seen:
            return (gr.skip(),) * (len(library_outputs) + 1)
        try:
            who = owner_of(owner_, request)
        except gr.Error:  # the page has no id yet: demo.load gives it one
            return (gr.skip(),) * (len(library_outputs) + 1)
        return updates(who, KEEP, names_now) + (version,)

    lib_timer.tick(library_poll_fn, inputs=[library_version, lora_names, owner],
                   outputs=library_outputs + [library_version], show_progress_on=quiet,
                   concurrency_limit=None, api_visibility="private")
