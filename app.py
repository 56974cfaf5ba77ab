"""StyleMix web app: the page (one builder per tab, in ui/), every action a call into `stylemix.service`.

Run `python app.py` (or `stylemix serve`).  No module-level mutable state: the service (one
shared pipeline, one GPU queue) is created in `main()` and passed to `build_demo`; each browser
gets its own owner token, kept in the browser, under which its files are filed.  Every named
API endpoint takes that token as its last input, exactly as the page sends it; with auth on, the
login name is the identity and the token is ignored.  Who may see and change which LoRA is
decided in `stylemix.service` / `stylemix.access`, never here.
"""

from __future__ import annotations

import functools
import logging
import os

import gradio as gr

from stylemix.errors import StyleMixError
from stylemix.paths import Workspace
from stylemix.service import StyleMixService, check_owner_token, new_owner_token
from ui.common import auth_on, gpu, owner_of  # noqa: F401  (gpu: app.gpu is the decorator's public name)
from ui.compose_tab import build_compose_tab
from ui.dataset_tab import build_dataset_tab, wire_dataset_tab
from ui.experiments_tab import build_experiments_tab, wire_experiments_tab
from ui.home import build_home
from ui.library_tab import build_library_tab, library_updates, wire_library_tab
from ui.train_tab import build_train_tab, wire_train_tab

logger = logging.getLogger("stylemix.app")

MAX_UPLOAD = "200mb"


def build_demo(service: StyleMixService) -> gr.Blocks:
    """The page: shared state, one builder per tab (in page order), then the wiring that crosses tabs."""
    tiny = service.mixer.loaded.is_tiny
    # delete_cache: Gradio's copies of uploads and results older than a day are removed every hour
    with gr.Blocks(title="StyleMix", delete_cache=(3600, 86400)) as demo:
        owner = gr.BrowserState(None, storage_key="stylemix_owner")
        # before the page's first poll a visitor sees the shared LoRAs; their own follow at once
        lora_names = gr.State([e["name"] for e in service.usable_loras(None)])
        library_version = gr.State(None)  # the library fingerprint this page last showed
        recipe_version = gr.State(0)  # bumped when a recipe is loaded: the sliders are redrawn from it
        build_home(service)
        if os.environ.get("OAUTH_CLIENT_ID"):  # a Space with `hf_oauth: true`: log in to own LoRAs on any device
            gr.LoginButton()

        with gr.Tab("Dataset", id="dataset"):
            dataset = build_dataset_tab(service, tiny)
        with gr.Tab("Train", id="train"):
            train = build_train_tab()
        with gr.Tab("Compose", id="compose"):
            build_compose_tab(service, tiny, demo, owner, lora_names, recipe_version)
        with gr.Tab("Library", id="library"):
            library = build_library_tab(service, auth_on())
        with gr.Tab("Experiments", id="experiments"):
            experiments = build_experiments_tab(service, tiny)

        # ------------------------------------------------ wiring across tabs
        # Everything that lists LoRAs, refreshed together: the Compose sliders (through lora_names), the
        # Library table and dropdown, and the Experiments LoRA choices (order: ui.library_tab.library_updates).
        library_outputs = [lora_names, library.table, library.select, experiments.loras]
        refresh_library = functools.partial(library_updates, service)
        # a prepared dataset appears in the Train tab's dataset list
        wire_dataset_tab(dataset, service, owner, train_dataset=train.dataset)
        # a finished job adds a LoRA: the Train poll refreshes the library outputs
        train_outputs, train_view = wire_train_tab(train, service, owner, lora_names, library_outputs,
                                                   refresh_library)
        wire_library_tab(library, service, owner, lora_names, library_version, library_outputs)
        wire_experiments_tab(experiments, service, owner)

        def on_load(token, names_now, request: gr.Request):
            """Give a new browser its id; show the user's datasets and their latest job again."""
            try:
                token = check_owner_token(token) if token else new_owner_token()
            except StyleMixError:
                token = new_owner_token()
            try:
                who = owner_of(token, request)
                datasets = service.list_datasets(who)
                shown = train_view(service.job_view(who), [], names_now, who)
            except StyleMixError:
                datasets, shown = [], train_view(None, [], names_now, None)
            ds = gr.update(choices=datasets, value=datasets[-1] if datasets else None)
            return (token, ds, ds) + shown

        demo.load(on_load, inputs=[owner, lora_names], outputs=[owner, dataset.select, train.dataset] + train_outputs,
                  api_visibility="private")
    return demo


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
    from stylemix.training import jobs
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
