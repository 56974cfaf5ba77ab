"""What the web app does, as plain Python: one shared model and mixer, per-user files.

`app.py` and `ui/` lay out the page, format what it shows, and call these methods; everything
here is testable without gradio.  This module dispatches and enforces ownership and quotas.
One `StyleMixService` exists per running app (created in `app.main`, never at import time); all
users share its pipeline and its lock, and each user's files live under a folder named by their owner
token, which only the server chooses.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from stylemix import access, gpu_queue
from stylemix.errors import StyleMixError
from stylemix.datasets.images import is_image_name
from stylemix.lora.library import LoraEntry, LoraLibrary
from stylemix.lora.names import pipeline_targets
from stylemix.mixer import Mixer, MixResult
from stylemix.preview import PreviewConfig, Previewer, PreviewResult
from stylemix.models import ModelLoadError, load_model
from stylemix.paths import Workspace, atomic_write_text, check_lora_name, check_name, folder_lock, inside
from stylemix.quotas import Quotas, folder_bytes
from stylemix.compose import BaseImageCache, ComposeOutput, compose, score_mix
from stylemix.recipe import DEFAULT_SAMPLER, Recipe, whole_number

logger = logging.getLogger("stylemix")


def library_locked(method):
    """Run a service method under the LoRA library's write lock (`LoraLibrary.lock`): its checks (a free
    name, an owner, a quota) and the change they allow happen with no other thread or app process
    sharing the library changing it in between."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.library.lock():
            return method(self, *args, **kwargs)
    return locked


def data_locked(method):
    """Run a method that writes the owner's datasets (its first argument is the owner) under the lock of
    their data folder: two app processes sharing the folder never build or edit one dataset at once."""
    @functools.wraps(method)
    def locked(self, owner, *args, **kwargs):
        with folder_lock(self.user_dir(owner, "data")):
            return method(self, owner, *args, **kwargs)
    return locked


def new_owner_token() -> str:
    """An unguessable per-browser id; a user's uploads, datasets and jobs are filed under it."""
    return "u" + secrets.token_hex(12)


_TOKEN = re.compile(r"u[0-9a-f]{24}")


def check_owner_token(token: str) -> str:
    """A browser token must look like one `new_owner_token` makes, so that no session value can pose
    as a logged-in user's id (`user_<name>`) or any other name."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise StyleMixError(f"Invalid session id {str(token)[:40]!r}: reload the page to get a new one.")
    return token


@dataclass
class StyleMixService:
    mixer: Mixer
    workspace: Workspace
    banner: str  # what model runs and what that means, in full (model_line + banner_details)
    fallback_reason: str | None = None  # set when the requested model failed and tiny runs instead
    scorer_cache: dict = field(default_factory=dict)
    base_images: BaseImageCache = field(default_factory=BaseImageCache)  # the calibration anchors, reused
    previewer: Previewer | None = None  # live previews while sliders move; None: exact renders only
    quotas: Quotas = field(default_factory=Quotas.from_env)  # per-user limits (STYLEMIX_MAX_* variables)
    model_line: str = ""  # the model's state in one line (the first page shows it; details are folded)
    banner_details: list[str] = field(default_factory=list)  # why, what it means, what to do: one item each

    @classmethod
    def start(cls, model: str | None, workspace: Workspace, device: str | None = None,
              dtype: str | None = None, examples: bool = True, compile: bool | None = None,
              preview: PreviewConfig | None = None) -> "StyleMixService":
        """Load the model; if it cannot be loaded, run on `tiny` and say so in the banner (never silently).

        compile: torch.compile the UNet and VAE decoder (None: on for CUDA, see stylemix/accel.py).
        preview: how live previews are made (None: from the STYLEMIX_PREVIEW_* environment).
        """
        from stylemix import pipelines

        reason = None
        devices = pipelines.devices_wanted(device)  # --device, else $STYLEMIX_DEVICES: one pipeline per device
        try:
            loaded = load_model(model, devices[0], dtype)
        except ModelLoadError as e:
            reason = str(e)
            logger.error("%s -- starting on the built-in tiny model instead.", reason)
            loaded = load_model("tiny", devices[0], dtype)
        library = LoraLibrary(workspace.loras, targets=pipeline_targets(loaded.pipe), base_model=loaded.model_id)
        mixer = pipelines.make_mixer(loaded, library, devices, dtype)  # a Mixer, or a MixerPool over the devices
        if len(devices) > 1:
            logger.info("Rendering on %s.", mixer.describe())
        previewer = Previewer(mixer, preview or PreviewConfig.from_env(loaded.is_tiny)).setup()
        service = cls(mixer=mixer, workspace=workspace, banner="", fallback_reason=reason, previewer=previewer)
        if examples:
            service.install_example_loras()
        service.model_line, service.banner_details = model_banner(loaded, reason, bool(service.example_loras()),
                                                                  zero_gpu())
        service.banner = "  \n".join([service.model_line] + service.banner_details)
        from stylemix.accel import compile_wanted

        if compile_wanted(loaded.device, compile):
            service.compile_and_warm_up()
        return service

    def compile_and_warm_up(self) -> None:
        """Compile, then load the library's LoRAs and render the default shapes once: later weight
        changes and drags then never wait for a compile (a LoRA loaded later wraps new layers and
        compiles once)."""
        from stylemix.accel import compile_pipeline, fuse_qkv, fuse_qkv_wanted, warm_up

        from stylemix.pipelines import MixerPool, members

        names = [e["name"] for e in self.usable_loras()][:16]
        side = 64 if self.mixer.loaded.is_tiny else 512
        for m in members(self.mixer):  # each pipeline of a pool compiles and warms up its own graphs
            m.ensure_loaded(names)  # peft wraps their layers now, before the graphs are captured
            if fuse_qkv_wanted():
                fuse_qkv(m)
            compile_pipeline(m.pipe)
            pinned = self.mixer.checkout(m) if isinstance(self.mixer, MixerPool) else contextlib.nullcontext()
            with pinned:  # a pool's renders and previews below all go to this pipeline
                warm_up(self.mixer, [Recipe("warm-up", loras={n: 0.5 for n in names[:2]}, steps=2, width=side,
                                            height=side)], self.previewer)

    # ---------------------------------------------------------------- library

    @property
    def library(self) -> LoraLibrary:
        return self.mixer.library

    def usable_loras(self, viewer: str | None = None) -> list[dict]:
        """LoRAs `viewer` may use that fit the loaded model, for the sliders (viewer None: shared ones only);
        incompatible ones are listed, not offered."""
        return [e.summary() for e in self.library.visible_to(viewer) if e.compatible]

    def all_loras(self, viewer: str | None = None) -> list[dict]:
        return [e.summary() for e in self.library.visible_to(viewer)]

    def library_version(self) -> str:
        """A short fingerprint of the library that changes with any LoRA change (polled by every page)."""
        import hashlib

        return hashlib.sha1(repr(self.library.version()).encode()).hexdigest()[:16]

    def visible_entry(self, owner: str | None, name: str) -> LoraEntry:
        """The LoRA if `owner` may see it; another user's private LoRA reads exactly like a missing one."""
        check_lora_name(name or "", "LoRA name")  # a LoRA or one of its epoch versions (NAME@eNN)
        try:
            entry = self.library.get(name)
        except StyleMixError:
            entry = None
        if entry is None or not access.can_see(entry.meta, owner):
            known = ", ".join(e.name for e in self.library.visible_to(owner)) or "none"
            raise StyleMixError(f"No LoRA named {name!r} in your library (known: {known}).")
        return entry

    def owned_entry(self, owner: str, name: str, action: str) -> LoraEntry:
        """The LoRA if `owner` may change it, else one readable refusal (access.check_can_change)."""
        entry = self.visible_entry(owner, name)
        access.check_can_change(name, entry.meta, owner, action)
        return entry

    def _check_name_free(self, owner: str, name: str) -> None:
        """Names are first come, first served across all users (see stylemix/access.py)."""
        self._check_not_training(name)
        try:
            entry = self.library.get(name)
        except StyleMixError:
            return
        if access.is_owner(entry.meta, owner):
            raise StyleMixError(f"You already have a LoRA named {name!r}: choose another name, or replace it "
                                "with 'Replace selected' in the Library tab.")
        raise access.AccessError(f"The name {name!r} is taken by another LoRA in the shared library; choose "
                                 "another name.")

    def owned_usage(self, owner: str) -> tuple[int, int]:
        """(LoRAs, bytes) `owner` owns, for the quotas."""
        mine = [e for e in self.library.list() if access.is_owner(e.meta, owner)]
        return len(mine), sum(folder_bytes(e.folder) for e in mine)

    def check_recipe_loras(self, owner: str | None, loras: dict[str, float], hashes: dict[str, str],
                           names: list[str] | None = None) -> tuple[dict[str, float], list[str]]:
        """The recipe's LoRAs this user can load as recorded, and why the others are left out.

        A name the user cannot see, or whose file is not the one the recipe recorded (its owner
        replaced it, or the name now belongs to another LoRA), is reported and left out.
        """
        if names is not None:  # the page's own list (server-side session state, already filtered for its user)
            visible = {e.name: e for e in self.library.list() if e.name in names and e.compatible}
        else:
            visible = {e.name: e for e in self.library.visible_to(owner) if e.compatible}
        keep, notes = {}, []
        for n, w in loras.items():
            if n not in visible:
                notes.append(f"{n}: not in your library")
            elif n in hashes and w and not visible[n].sha256.startswith(str(hashes[n]).lower()):
                notes.append(f"{n}: the library's file ({visible[n].short_hash}) is not the one this recipe used "
                             f"({hashes[n]}); it was replaced or the name reused")
            else:
                keep[n] = w
        return keep, notes

    # ---------------------------------------------------------------- compose

    def user_dir(self, owner: str, kind: str) -> Path:
        """outputs/<owner>/, data/<owner>/ ...: the only places a user's files go."""
        check_name(owner, "session id")
        # upload staging lives beside the users' dataset folders; a leading '.' can never be an owner id
        base = {"outputs": self.workspace.outputs, "data": self.workspace.data,
                "uploads": self.workspace.data / ".uploads"}[kind]
        path = inside(base, owner)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def compose(self, owner: str, recipe: Recipe, progress=None, score: bool = True) -> ComposeOutput:
        for name in recipe.loras:
            self.visible_entry(owner, name)  # another user's private LoRA cannot be used, even by name
        generate = None
        if self.previewer is not None:  # the exact image: this owner's running previews stop for it
            generate = functools.partial(self.previewer.render_exact, channel=owner)
        out_dir = self.user_dir(owner, "outputs")
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{secrets.token_hex(3)}"
        out = compose(self.mixer, recipe, lambda result: [out_dir / f"{stamp}-{s}.png" for s in result.seeds],
                      generate=generate, progress=progress, score=score, base_cache=self.base_images,
                      cache=self.scorer_cache, recipe_path=out_dir / f"{stamp}-recipe.json")
        self.trim_outputs(owner)
        return out

    def preview(self, owner: str, recipe: Recipe) -> PreviewResult | None:
        """A fast preview of `recipe` for a moving slider; None when a newer request made it pointless.

        Not scored: CLIP scoring would slow the preview past its budget, and the exact render on
        release is scored.  Nothing is saved (a preview is not the recipe's image).
        """
        check_name(owner, "session id")
        if self.previewer is None:
            raise StyleMixError("Previews are not set up on this server.")
        for name in recipe.loras:
            self.visible_entry(owner, name)  # another user's private LoRA cannot be previewed either
        return self.previewer.preview(recipe, channel=owner)

    def trim_outputs(self, owner: str) -> list[str]:
        """Keep the owner's newest `max_outputs` results (a composed image with its recipe, or one
        experiment run); the oldest go first.  Returns what was removed."""
        root = self.user_dir(owner, "outputs")
        groups: dict[str, list[Path]] = {}
        for f in root.iterdir():
            if f.is_file() and not f.is_symlink() and f.suffix in (".png", ".json"):
                groups.setdefault(f.name.rsplit("-", 1)[0], []).append(f)  # <stamp>-<seed>.png, <stamp>-recipe.json
        runs = root / "experiments"
        if runs.is_dir():
            for d in runs.iterdir():
                if d.is_dir() and not d.is_symlink():
                    groups["experiments/" + d.name] = [d]
        extra = len(groups) - self.quotas.max_outputs
        if extra <= 0:
            return []
        oldest = sorted(groups, key=lambda k: max(p.stat().st_mtime for p in groups[k]))[:extra]
        for k in oldest:
            for p in groups[k]:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return oldest

    def score(self, result: MixResult) -> dict:
        return score_mix(self.mixer, result, base_cache=self.base_images, cache=self.scorer_cache)

    # ================================================================ the other tabs
    # Everything below takes the caller's `owner` (the server-chosen session id) and only ever
    # touches that owner's folders, or the shared LoRA library.

    # ---------------------------------------------------------------- example LoRAs

    def example_loras(self) -> list[str]:
        """The example LoRAs in the library that fit the running model (the tiny model only)."""
        if not self.mixer.loaded.is_tiny or not EXAMPLE_LORAS.is_dir():
            return []
        return [d.name for d in sorted(EXAMPLE_LORAS.iterdir()) if (self.workspace.loras / d.name).is_dir()]

    def install_example_loras(self) -> list[str]:
        """Copy assets/example_loras/* into the library, tiny model only, never over an existing LoRA.

        They were trained on the tiny model (assets/make_example_loras.py) and cannot fit a real
        SD1.5, so on a real model nothing is copied.
        """
        if not self.mixer.loaded.is_tiny or not EXAMPLE_LORAS.is_dir():
            return []
        added = []
        for src in sorted(EXAMPLE_LORAS.iterdir()):
            if not (src / "pytorch_lora_weights.safetensors").is_file() or (self.workspace.loras / src.name).exists():
                continue
            check_name(src.name, "LoRA name")
            self.workspace.loras.mkdir(parents=True, exist_ok=True)
            tmp = self.workspace.loras / f".tmp-example-{src.name}-{secrets.token_hex(3)}"
            shutil.copytree(src, tmp)
            with self.library.lock():  # replicas starting together: the first one's copy stays
                if (self.workspace.loras / src.name).exists():
                    shutil.rmtree(tmp, ignore_errors=True)
                    continue
                os.replace(tmp, self.workspace.loras / src.name)  # atomic: never a half-copied LoRA in the library
            added.append(src.name)
        if added:
            logger.info("Example LoRAs for the tiny model added to the library: %s", ", ".join(added))
        return added

    # ---------------------------------------------------------------- datasets

    @staticmethod
    def example_sets() -> dict[str, str]:
        """Example set name -> suggested trigger word (assets/examples/)."""
        return {n: t for n, t in EXAMPLE_SETS.items() if (EXAMPLES / n).is_dir()}

    def stage_example(self, owner: str, name: str) -> list[Path]:
        """Copy an example set's images into the owner's upload folder (as if uploaded); returns the files."""
        if name not in self.example_sets():
            raise StyleMixError(f"No example set {name!r} (choose one of: {', '.join(self.example_sets())}).")
        dest = inside(self.user_dir(owner, "uploads"), "examples", name)
        dest.mkdir(parents=True, exist_ok=True)
        files = []
        for f in sorted((EXAMPLES / name).iterdir()):
            if is_image_name(f) and f.is_file() and not f.is_symlink():
                shutil.copyfile(f, dest / f.name)
                files.append(dest / f.name)
        return files

    def captioner(self):
        """The captioner for datasets: the tiny BLIP with the tiny model, BLIP (or a loud fallback) otherwise."""
        if "captioner" not in self.scorer_cache:
            from stylemix.datasets.captioning import load_captioner

            self.scorer_cache["captioner"] = load_captioner("tiny" if self.mixer.loaded.is_tiny else None)
        return self.scorer_cache["captioner"]

    @data_locked
    def prepare_dataset(self, owner: str, files: list, style: str, trigger_word: str, size: int = 512,
                        pixel_art: str = "auto", blur_threshold: float = 100.0, overwrite: bool = False,
                        progress=None, enable_bucket: bool = True):
        """Build data/<owner>/<style>/ from uploaded files (images, zips).  Returns a DatasetResult.

        enable_bucket: kohya's aspect-ratio buckets (DatasetConfig's limits); False: square size x size crops."""
        from stylemix.datasets.prepare import DatasetConfig, prepare_dataset

        check_name(style or "", "style name")
        config = DatasetConfig(size=_whole(size), pixel_art=pixel_art, blur_threshold=blur_threshold,
                               enable_bucket=enable_bucket)
        files = [Path(f) for f in (files or [])]
        if not files:
            raise StyleMixError("Nothing uploaded: add images or a zip archive (or load an example set).")
        root = self.user_dir(owner, "data")
        used = folder_bytes(root) - (folder_bytes(inside(root, style)) if overwrite else 0)
        self.quotas.check_dataset(used, sum(f.stat().st_size for f in files if f.is_file()))
        return prepare_dataset(files, style, (trigger_word or "").strip(), self.user_dir(owner, "data"), config,
                               captioner=self.captioner(), progress=progress, overwrite=overwrite)

    def list_datasets(self, owner: str) -> list[str]:
        root = self.user_dir(owner, "data")
        return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                      and (d / "metadata.jsonl").is_file())

    def dataset_dir(self, owner: str, style: str) -> Path:
        path = inside(self.user_dir(owner, "data"), check_name(style or "", "dataset name"))
        if not (path / "metadata.jsonl").is_file():
            raise StyleMixError(f"You have no dataset named {style!r}.")
        return path

    def dataset_view(self, owner: str, style: str) -> dict:
        """What the Dataset tab shows: kept images with captions, rejected inputs with reasons, summary, and
        images per bucket ({"320x768": n}, the fullest first; a set made before buckets counts its square)."""
        from stylemix.datasets.prepare import bucket_counts, load_captions

        path = self.dataset_dir(owner, style)
        captions = load_captions(path)
        report = _read_json(path / "report.json")
        info = _read_json(path / "dataset.json")
        rejected = [[Path(str(i.get("input", ""))).name if ":" not in str(i.get("input", ""))
                     else str(i["input"]).split(":", 1)[1], i.get("reason", ""), i.get("detail", "")]
                    for i in report.get("items", []) if i.get("status") == "rejected"]
        return {"path": path, "style": style, "trigger_word": info.get("trigger_word"),
                "kept": [(str(path / f), c) for f, c in captions.items()], "captions": [[f, c] for f, c in captions.items()],
                "rejected": rejected, "summary": report.get("summary", ""), "size": info.get("size"),
                "buckets": bucket_counts(path),
                "captioner": info.get("captioner"), "captioner_is_fallback": info.get("captioner_is_fallback"),
                "captioner_is_demo": info.get("captioner") == "tiny"}  # captioning.TINY_CAPTIONER: random words

    @data_locked
    def save_captions(self, owner: str, style: str, rows: list[list[str]]) -> dict[str, str]:
        from stylemix.datasets.prepare import save_captions

        captions = {}
        for row in rows or []:
            if len(row) < 2 or not str(row[0]).strip():
                continue
            captions[str(row[0])] = str(row[1])
        return save_captions(self.dataset_dir(owner, style), captions)

    # ---------------------------------------------------------------- training

    @library_locked
    def start_training(self, owner: str, dataset: str, name: str, max_steps: int | None = None,
                       settings: dict | None = None, overwrite: bool = False):
        """Queue a training job for one of the owner's datasets (runs in its own process, one at a time).

        overwrite=True retrains one of the owner's own LoRAs under its name; nobody else's.
        """
        from stylemix.training import jobs
        from stylemix.training.config import TrainConfig, check_setting

        if zero_gpu():
            raise StyleMixError("Training is switched off on ZeroGPU Spaces: a training run needs a GPU for "
                                "longer than ZeroGPU lends one. Train locally or on a Space with a dedicated "
                                "GPU, then import the LoRA in the Library tab.")
        data_dir = self.dataset_dir(owner, dataset)
        check_name(name or "", "LoRA name")
        if overwrite and (self.workspace.loras / name).exists():
            self.owned_entry(owner, name, "retrain")
        else:
            overwrite = False
            self._check_name_free(owner, name)
        count, used = self.owned_usage(owner)
        active = self._active_jobs(owner)
        self.quotas.check_jobs(len(active))
        self.quotas.check_loras(count + sum(1 for j in active if not j.config["train"].get("overwrite")), used,
                                adding=0 if overwrite else 1)
        settings = dict(settings or {})
        size = _read_json(data_dir / "dataset.json").get("size") or 512
        if self.mixer.loaded.is_tiny:
            # The tiny model learns nothing visible at 512 px and would take minutes on a CPU: train at the
            # dataset's size capped at 128, with short samples.  Loudly, like every tiny-model choice.
            logger.warning("TINY model: training at <= 128 px with 4-step samples (a demo LoRA).")
            settings.setdefault("resolution", min(int(size), 128))
            settings.setdefault("sample_steps", 4)
            settings.setdefault("rank", 4)
            settings.setdefault("alpha", 4.0)
        else:
            settings.setdefault("resolution", min(int(size), 512))
        known = {f for f in TrainConfig.__dataclass_fields__}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise StyleMixError(f"Unknown training setting(s): {', '.join(unknown)}.")
        steps = check_setting("max_steps", max_steps)  # TrainConfig's limits, as everywhere
        if steps is not None:
            settings.setdefault("sample_every", max(1, steps // 4))
            settings.setdefault("checkpoint_every", max(1, steps // 2))
        config = TrainConfig(data_dir=str(data_dir), name=name, loras_dir=str(self.workspace.loras),
                             model=self.mixer.loaded.model_id, device=str(self.mixer.loaded.device),
                             max_steps=steps, overwrite=overwrite, owner=access.owner_key(owner), **settings)
        return jobs.submit(config.validate(), self.workspace, owner=owner)

    def _active_jobs(self, owner: str) -> list:
        from stylemix.training import jobs

        return [j for j in jobs.list_jobs(self.workspace, owner) if j.state in (jobs.QUEUED, jobs.RUNNING)]

    def latest_job(self, owner: str):
        """The owner's running job, else queued, else their newest one (None if they have none)."""
        from stylemix.training import jobs

        mine = jobs.list_jobs(self.workspace, owner)
        for state in (jobs.RUNNING, jobs.QUEUED):
            for j in mine:
                if j.state == state:
                    return j
        return mine[0] if mine else None

    def job_view(self, owner: str, job_id: str | None = None) -> dict | None:
        """The Train tab's view of a job: phase, progress, time left, loss curve, samples, error.

        None: the owner has no job.  Only the owner's jobs: another's is "No training job", like a
        missing one.  `samples` are all the job's sample images (the newest MAX_SAMPLES_SHOWN), oldest
        first, each {"path", "step", "prompt"}; `loss_curve` is the whole run's, across cancel and resume.
        """
        from stylemix.training import jobs

        jobs.ensure_queue_running(self.workspace)
        job = jobs.get_job(self.workspace, job_id, owner) if job_id else self.latest_job(owner)
        if job is None:
            return None
        s = job.status
        step, total = int(s.get("step") or 0), s.get("total_steps")
        if job.state == jobs.COMPLETED:
            pct = 100
        elif isinstance(s.get("percent"), (int, float)):
            pct = min(99, int(s["percent"]))
        else:  # a status written before phases and percentages existed
            pct = min(99, int(100 * step / total)) if total else 0
        samples = _job_samples(job.dir, s.get("sample_prompts") or job.config["train"].get("sample_prompts") or [])
        curve = s.get("loss_curve") or []
        if job.state == jobs.COMPLETED and not (curve and samples):  # an older job: its LoRA has them
            try:
                entry = self.library.get(job.lora_name)
                curve = curve or entry.meta.get("loss_curve") or []
                samples = samples or _job_samples(entry.folder, s.get("sample_prompts") or [])
            except StyleMixError:
                pass
        running = job.state == jobs.RUNNING
        return {"id": job.id, "state": job.state, "lora_name": job.lora_name,
                "phase": s.get("phase") if running else None, "phase_done": s.get("phase_done"),
                "phase_total": s.get("phase_total"), "step": step, "total_steps": total, "percent": pct,
                "loss": s.get("loss"), "lr": s.get("lr"), "eta_s": s.get("eta_s") if running else None,
                "error": s.get("error"), "samples": samples[-MAX_SAMPLES_SHOWN:], "samples_total": len(samples),
                "loss_curve": curve, "done": job.state in jobs.TERMINAL,
                # the smoothed loss and the learning rate the trainer reports (trainers/trackers.py), steps/s
                "loss_ema": s.get("loss_ema"), "loss_ema_curve": s.get("loss_ema_curve") or [],
                "lr_curve": s.get("lr_curve") or [], "steps_per_sec": s.get("steps_per_sec") if running else None,
                "started": _started(job)}

    def list_job_views(self, owner: str, limit: int = 50) -> list[dict]:
        """The owner's jobs, newest first (at most `limit`): id, LoRA name, state, step, total, started."""
        from stylemix.training import jobs

        return [{"id": j.id, "lora_name": j.lora_name, "state": j.state, "step": int(j.status.get("step") or 0),
                 "total_steps": j.status.get("total_steps"),
                 "started": _started(j)}
                for j in jobs.list_jobs(self.workspace, owner)[:limit]]

    def cancel_job(self, owner: str, job_id: str):
        from stylemix.training import jobs

        return jobs.cancel(self.workspace, check_name(job_id or "", "job id"), owner, timeout=30)

    @library_locked
    def resume_job(self, owner: str, job_id: str):
        from stylemix.training import jobs

        if zero_gpu():
            raise StyleMixError("Training is switched off on ZeroGPU Spaces.")
        job = jobs.get_job(self.workspace, check_name(job_id or "", "job id"), owner)
        self.quotas.check_jobs(len(self._active_jobs(owner)))
        try:
            existing = self.library.get(job.lora_name)
        except StyleMixError:
            existing = None
        if existing is not None and not access.is_owner(existing.meta, owner):
            # the name was taken while the job was stopped: finishing would replace someone else's LoRA
            raise access.AccessError(f"Cannot resume job {job.id}: the name {job.lora_name!r} now belongs to "
                                     "another LoRA in the shared library.")
        return jobs.resume(self.workspace, job.id, owner)

    # ---------------------------------------------------------------- library

    def visible_loras(self, viewer: str | None = None) -> list[LoraEntry]:
        """Every LoRA `viewer` may see (the Library table's rows are formatted in ui/library_tab.py)."""
        return list(self.library.visible_to(viewer))

    def lora_samples(self, owner: str | None, name: str) -> list[str]:
        entry = self.visible_entry(owner, name)
        return [str(p) for rel in entry.meta.get("samples") or [] if (p := _job_file(entry.folder, rel)) is not None]

    def lora_cards(self, names: list[str]) -> list[dict]:
        """The Compose tab's LoRA cards for `names` (the page's own list, already filtered for its user):
        each LoRA's summary plus `thumbnail`, its newest sample image (a path) or None."""
        cards = []
        for name in names:
            try:
                entry = self.library.get(name)
            except StyleMixError:  # removed since the page's list was made
                continue
            samples = [p for rel in entry.meta.get("samples") or [] if (p := _job_file(entry.folder, rel)) is not None]
            cards.append({**entry.summary(), "thumbnail": str(samples[-1]) if samples else None})
        return cards

    @library_locked
    def import_lora(self, owner: str, path: str, name: str, trigger_word: str | None = None) -> dict:
        """Import a file as a new LoRA owned by `owner`, private until they share it."""
        if not path:
            raise StyleMixError("Choose a .safetensors LoRA file to import.")
        name = check_name((name or "").strip() or Path(str(path)).stem, "LoRA name")
        self._check_name_free(owner, name)
        count, used = self.owned_usage(owner)
        self.quotas.check_loras(count + len(self._active_jobs(owner)), used, Path(path).stat().st_size)
        meta = {"owner": access.owner_key(owner), "visibility": access.PRIVATE}
        return self.library.import_file(path, name, trigger_word or None, extra_meta=meta).summary()

    @library_locked
    def replace_lora(self, owner: str, path: str, name: str, trigger_word: str | None = None) -> dict:
        """Replace the weights of one of the owner's LoRAs with a new file (same name, same visibility)."""
        if not path:
            raise StyleMixError("Choose a .safetensors LoRA file to replace it with.")
        entry = self.owned_entry(owner, name, "replace")
        self._check_not_training(name)
        count, used = self.owned_usage(owner)
        self.quotas.check_loras(count, used - folder_bytes(entry.folder), Path(path).stat().st_size, adding=0)
        meta = {"owner": entry.owner, "visibility": entry.visibility}
        with self.mixer.lock:  # waits for an image being made with the old weights
            return self.library.import_file(path, name, trigger_word or entry.trigger_word, overwrite=True,
                                            extra_meta=meta).summary()

    def export_lora(self, owner: str, name: str, fmt: str = "diffusers") -> Path:
        if fmt not in ("diffusers", "kohya"):
            raise StyleMixError(f"Unknown export format {fmt!r}: choose diffusers or kohya.")
        self.visible_entry(owner, name)
        dest = inside(self.user_dir(owner, "outputs"), "exports")
        dest.mkdir(parents=True, exist_ok=True)
        return self.library.export(check_lora_name(name or "", "LoRA name"), dest / f"{name}-{fmt}.safetensors", fmt)

    @library_locked
    def rename_lora(self, owner: str, old: str, new: str) -> dict:
        self.owned_entry(owner, old, "rename")
        new = check_name((new or "").strip(), "LoRA name")
        self._check_not_training(old)
        self._check_name_free(owner, new)
        with self.mixer.lock:  # waits for an image being made with it
            return self.library.rename(old, new).summary()

    @library_locked
    def delete_lora(self, owner: str, name: str) -> None:
        self.owned_entry(owner, name, "delete")
        self._check_not_training(name)
        with self.mixer.lock:
            self.library.remove(name)

    @library_locked
    def set_trigger_word(self, owner: str, name: str, trigger_word: str | None) -> dict:
        self.owned_entry(owner, name, "change the trigger word of")
        return self.library.set_trigger_word(name, (trigger_word or "").strip() or None).summary()

    @library_locked
    def set_visibility(self, owner: str, name: str, visibility: str) -> dict:
        """private: only the owner sees and uses it; shared: everyone may use it, only the owner changes it."""
        access.check_visibility(visibility)
        self.owned_entry(owner, name, "change the visibility of")
        return self.library.set_access(name, visibility=visibility).summary()

    def _check_not_training(self, name: str) -> None:
        from stylemix.training import jobs

        for j in jobs.list_jobs(self.workspace):
            if j.lora_name == name and j.state in (jobs.QUEUED, jobs.RUNNING):
                raise StyleMixError(f"LoRA {name!r} is being trained by job {j.id}; wait for it or cancel it first.")

    # ---------------------------------------------------------------- experiments

    def run_experiment(self, owner: str, kind: str, loras: list[str], prompts: list[str], seeds: list[int],
                       steps: int = 25, size: int = 512, values: list[float] | None = None,
                       progress=None, sampler: str = DEFAULT_SAMPLER) -> dict:
        """Run the seed protocol ("protocol"), a 2-LoRA weight sweep ("sweep"), balancing ("balance"), the
        comparison of one LoRA's saved epochs ("epochs") or of the mixing modes and schedule presets of one mix
        ("modes"), or the seed protocol scored by both style judges, CLIP and CSD, side by side ("judges")
        into outputs/<owner>/.

        Returns data, formatted for the page by ui/experiments_tab.py: {"kind", "out_dir", "names",
        "is_demo"} and "protocol" (experiments.ProtocolResult; also for "modes"), or "map"
        (weight_maps.WeightMap), "values", "files" and "clash" (clash.ClashMap) for a sweep, or "balance"
        (balance.BalanceResult) and "files"
        (the share map with the search path, two LoRAs only), or "epochs" (epochs.EpochsResult) and "files"
        (plot and contact sheet); and "record", the run as saved in its folder (`experiment_record`: what
        `open_experiment` returns after a reload).
        steps and sampler: as in Compose (Recipe.validate checks them, with the CLI's words).
        epochs: `loras` is the one LoRA (or one of its versions) and `values` its one weight (default 1).
        modes: `loras` are the mix's 2-4 LoRAs and `values` their weights (default equal).
        Only LoRAs the owner may see; at most `quotas.max_experiment_images` images, checked first.
        """
        names = [check_lora_name(n, "LoRA name") for n in (loras or [])]
        for n in names:
            self.visible_entry(owner, n)
        prompts = [p.strip() for p in prompts or [] if p and p.strip()]
        if not prompts:
            raise StyleMixError("Give at least one prompt (one per line).")
        if not seeds:
            raise StyleMixError("Give at least one seed.")
        # the settings every image of the run uses, checked as a Compose recipe is, before anything runs
        gen = {"steps": steps, "width": size, "height": size, "sampler": sampler}
        Recipe(prompt=prompts[0], seed=0, **gen).validate()
        versions = None
        if kind == "epochs":  # the versions are found first: their number sizes the run
            names, versions = self.epochs_to_compare(owner, names)
        counted = len(versions) if versions is not None else len(names)
        self.quotas.check_experiment(experiment_images(kind, counted, len(prompts), len(seeds), values))
        # long work takes the GPU per image and lets interactive requests go first (gpu_queue.py)
        with gpu_queue.background():
            result = self._run_experiment(owner, kind, names, prompts, seeds, gen, values, progress, versions)
        record = experiment_record(result, prompts, seeds, gen)
        atomic_write_text(Path(result["out_dir"]) / EXPERIMENT_FILE, json.dumps(record, indent=1))
        self.trim_outputs(owner)
        result["record"] = self.open_experiment(owner, record["id"])  # read back: the page shows what a reload will
        return result

    def lora_versions(self, owner: str | None, name: str) -> list[tuple[int, str]]:
        """The saved epochs (`name@eNN`) of a LoRA `owner` may see, as (epoch, name) by epoch.  Only versions
        the owner may see count, and only when the LoRA itself is visible: another user's private LoRA
        reads as missing, its versions included."""
        from stylemix.experiments.epochs import find_versions

        self.visible_entry(owner, name)
        return find_versions(name, [e.name for e in self.library.visible_to(owner)])

    def epochs_to_compare(self, owner: str, names: list[str]) -> tuple[list[str], list[tuple[int, str]]]:
        """([the final LoRA], its versions) for an epochs run: exactly one LoRA, which has saved epochs.
        A version chosen by name stands for its LoRA (watercolor@e05: the epochs of watercolor)."""
        from stylemix.experiments.epochs import epoch_rows, parse_version

        if len(names) != 1:
            raise StyleMixError(f"Comparing epochs needs exactly one LoRA; {len(names)} chosen"
                                f"{' (' + ', '.join(names) + ')' if names else ''}.")
        name = (parse_version(names[0]) or (names[0], 0))[0]
        versions = self.lora_versions(owner, name)
        epoch_rows(name, versions)  # refuses a LoRA without versions, naming the training option
        return [name], versions

    def list_experiments(self, owner: str, limit: int | None = None) -> list[dict]:
        """The owner's own saved experiment runs, newest first, at most `limit`: {"id", "kind", "names",
        "created"} each (from their folders under outputs/<owner>/experiments/; others' are never read).
        limit: at most this many (default MAX_LISTED_RUNS)."""
        limit = MAX_LISTED_RUNS if limit is None else limit
        runs = inside(self.user_dir(owner, "outputs"), "experiments")
        found = []
        for d in runs.iterdir() if runs.is_dir() else []:
            f = d / EXPERIMENT_FILE
            if d.is_dir() and not d.is_symlink() and f.is_file() and not f.is_symlink():
                found.append((f.stat().st_mtime, d.name, f))
        out = []
        for _, run_id, f in sorted(found, reverse=True)[:max(0, int(limit))]:
            rec = _read_json(f) if f.stat().st_size <= MAX_EXPERIMENT_FILE_BYTES else {}
            if rec.get("kind") in EXPERIMENT_KINDS:
                out.append({"id": run_id, "kind": rec["kind"], "names": [str(n) for n in rec.get("names") or []],
                            "created": str(rec.get("created") or "")})
        return out

    def open_experiment(self, owner: str, run_id: str) -> dict:
        """One of the owner's saved runs, as `run_experiment`'s "record", its image paths resolved inside the
        run's folder (a path that leaves it, or a missing file, is left out)."""
        check_name(run_id or "", "experiment run")
        folder = inside(self.user_dir(owner, "outputs"), "experiments", run_id)
        f = folder / EXPERIMENT_FILE
        if not f.is_file() or f.is_symlink() or f.stat().st_size > MAX_EXPERIMENT_FILE_BYTES:
            raise StyleMixError(f"No saved experiment run {run_id!r} in your outputs (it may have been removed to "
                                "stay within your storage limit).")
        rec = _read_json(f)
        if rec.get("kind") not in EXPERIMENT_KINDS:
            raise StyleMixError(f"The saved experiment run {run_id!r} is unreadable.")
        files = rec.get("files") if isinstance(rec.get("files"), dict) else {}
        rec["files"] = {str(k): str(p) for k, rel in files.items() if (p := _job_file(folder, rel)) is not None}
        return rec

    def _run_experiment(self, owner: str, kind: str, names: list[str], prompts: list[str], seeds: list[int],
                        gen: dict, values: list[float] | None, progress,
                        versions: list[tuple[int, str]] | None = None) -> dict:
        from stylemix.experiments.balance import BalanceConfig, balance_mix
        from stylemix.experiments.clash import clash_map, draw_heatmap
        from stylemix.experiments.protocol import ProtocolConfig, run_protocol
        from stylemix.scores.judge import StyleJudge
        from stylemix.experiments.weight_maps import weight_map_2d, write_map

        out = inside(self.user_dir(owner, "outputs"), "experiments",
                     f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}")
        steps, size = gen["steps"], gen["width"]
        say = (lambda d, t, m: progress(d, t, m)) if progress else None
        if kind == "protocol":
            if not names:
                raise StyleMixError("Choose at least one LoRA for the protocol.")
            mixes = [{a: 0.5, b: 0.5} for i, a in enumerate(names) for b in names[i + 1:]]
            config = ProtocolConfig(name="app-protocol", styles={n: n for n in names}, prompts=prompts,
                                    seeds=[int(s) for s in seeds], mixes=mixes, generation=gen).validate("experiment")
            result = run_protocol(self.mixer, config, out, progress=say)
            return {"kind": kind, "out_dir": str(out), "names": names, "protocol": result, "is_demo": result.is_demo}
        if kind == "sweep":
            if len(names) != 2:
                raise StyleMixError(f"A weight sweep needs exactly two LoRAs; {len(names)} chosen.")
            values = [float(v) for v in (values or [0.0, 0.5, 1.0])]
            if not 2 <= len(values) <= 6 or any(not -2 <= v <= 2 for v in values):
                raise StyleMixError(f"Invalid sweep values {values!r}: give 2-6 weights in [-2, 2].")
            recipe = Recipe(prompt=prompts[0], seed=int(seeds[0]), **gen).validate()
            judge = StyleJudge.for_mixer(self.mixer, names)
            wmap = weight_map_2d(self.mixer, recipe, names[0], names[1], values, judge=judge,
                                 progress=(lambda d, t, m: progress(d, t, m)) if progress else None)
            files = write_map(wmap, out)
            clash = clash_map(self.library, names[0], names[1])
            draw_heatmap(clash, out / "clash.png")
            files["clash"] = str(out / "clash.png")
            return {"kind": kind, "out_dir": str(out), "names": names, "values": values, "map": wmap,
                    "files": files, "clash": clash, "is_demo": wmap.is_demo}
        if kind == "balance":
            if not 2 <= len(names) <= 4:
                raise StyleMixError(f"Balancing needs two to four LoRAs; {len(names)} chosen.")
            targets = [float(v) for v in (values or [])]
            if len(targets) != len(names):
                raise StyleMixError(f"Give one target share per LoRA ({len(names)}), e.g. "
                                    f"{', '.join(f'{1 / len(names):.2g}' for _ in names)}; got {targets!r}.")
            recipe = Recipe(prompt=prompts[0], seed=int(seeds[0]), **gen).validate()
            result = balance_mix(self.mixer, recipe, dict(zip(names, targets)),
                                 BalanceConfig(preview_size=min(size, 256), preview_steps=min(int(steps), 8)),
                                 progress=say)
            files = {}
            if len(names) == 2:  # the path drawn on the two LoRAs' weight map
                judge = StyleJudge.for_mixer(self.mixer, names)
                top = max([1.0] + [p.weights.get(n, 0.0) for p in result.path for n in names])
                grid = [0.0, round(top / 3, 2), round(2 * top / 3, 2), round(top, 2)]  # 4x4 previews
                wmap = weight_map_2d(self.mixer, recipe.with_(steps=min(int(steps), 8)), names[0], names[1],
                                     grid, judge=judge)
                files = write_map(wmap, out, path_points=[p.weights for p in result.path])
            return {"kind": kind, "out_dir": str(out), "names": names, "balance": result, "files": files,
                    "is_demo": self.mixer.loaded.is_tiny}
        if kind == "modes":
            from stylemix.experiments.protocol import modes_comparison

            if not 2 <= len(names) <= 4:
                raise StyleMixError(f"Comparing modes needs one mix of two to four LoRAs; {len(names)} chosen.")
            weights = [float(v) for v in values] if values else [round(1 / len(names), 2)] * len(names)
            config = modes_comparison(names, weights, prompts, seeds, gen)
            result = run_protocol(self.mixer, config, out, progress=say)
            return {"kind": kind, "out_dir": str(out), "names": names, "protocol": result, "is_demo": result.is_demo}
        if kind == "epochs":
            from stylemix.experiments.epochs import run_epochs

            weights = [float(v) for v in (values or [1.0])]
            if len(weights) != 1:
                raise StyleMixError(f"Comparing epochs renders every epoch at one weight: give one (e.g. 1), "
                                    f"not {weights!r}.")
            result = run_epochs(self.mixer, names[0], versions or [], out, prompts, [int(s) for s in seeds], gen,
                                weights[0], progress=say)
            return {"kind": kind, "out_dir": str(out), "names": names, "epochs": result, "files": result.files,
                    "is_demo": result.is_demo}
        if kind == "judges":
            return self._compare_judges(names, prompts, seeds, gen, out, say)
        raise StyleMixError(f"Unknown experiment {kind!r}: choose protocol, sweep, balance, epochs, modes or judges.")

    def _compare_judges(self, names: list[str], prompts: list[str], seeds: list[int], gen: dict, out: Path,
                        say) -> dict:
        """The seed protocol scored by both style judges (CLIP and CSD), side by side: the images are made
        once (out/clip), copied to out/csd and scored there by CSD (the protocol scores a PNG it finds without
        its row and makes nothing again).  Each judge's numbers stay in its own columns: never averaged."""
        import shutil

        from stylemix.experiments.protocol import ProtocolConfig, run_protocol
        from stylemix.scores.judge import judges_side_by_side

        if not names:
            raise StyleMixError("Choose at least one LoRA to compare the style judges on.")
        judges, unavailable = judges_side_by_side(self.mixer, names)
        if len(judges) < 2:
            raise StyleMixError("Comparing the style judges needs both CLIP and CSD: "
                                + "; ".join(f"{k}: {why}" for k, why in unavailable.items())
                                + " (install CSD with `stylemix judge install csd`).")
        mixes = [{a: 0.5, b: 0.5} for i, a in enumerate(names) for b in names[i + 1:]]
        config = ProtocolConfig(name="app-judges", styles={n: n for n in names}, prompts=prompts,
                                seeds=[int(s) for s in seeds], mixes=mixes, generation=gen).validate("experiment")
        first = run_protocol(self.mixer, config, out / "clip", progress=say, judge=judges["clip"])
        shutil.copytree(out / "clip" / "images", out / "csd" / "images")
        second = run_protocol(self.mixer, config, out / "csd", progress=say, judge=judges["csd"])
        if second.generated:  # the copies were scored, not made again: one set of images for both judges
            raise StyleMixError(f"Comparing judges made {second.generated} image(s) twice; please report this.")
        return {"kind": "judges", "out_dir": str(out), "names": names, "protocol": first,
                "judges": {"clip": first, "csd": second}, "is_demo": first.is_demo or second.is_demo,
                "judge_names": {k: j.style_judge for k, j in judges.items()}}


EXPERIMENT_FILE = "experiment.json"  # in each run's folder: what the page shows of it, reopened after a reload
EXPERIMENT_KINDS = ("protocol", "sweep", "balance", "epochs", "modes", "judges")
PROTOCOL_KINDS = ("protocol", "modes")  # run by experiments.protocol: a summary table, plot and contact sheets
MAX_LISTED_RUNS = 20
MAX_EXPERIMENT_FILE_BYTES = 2_000_000


def experiment_record(result: dict, prompts: list[str], seeds: list[int], gen: dict) -> dict:
    """A run's results as plain JSON data (saved beside its files, returned by `open_experiment`):
    {"id", "kind", "created", "names", "prompts", "seeds", "settings", "is_demo", "files" (name -> path
    relative to the run's folder)} and per kind: "intro" and "summary" (the protocol's or modes' summary rows),
    "values", "cells" and "clash" {"overall", "blocks"} (a sweep), "balance" (BalanceResult.to_dict()), or
    "epochs" {"lora", "weight", "rows", "images", "clip_model", "has_centroid", "note"} (EpochsResult)."""
    out = Path(result["out_dir"])
    kind = result["kind"]
    rec = {"id": out.name, "kind": kind, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "names": result["names"],
           "prompts": prompts, "seeds": seeds, "settings": gen, "is_demo": bool(result["is_demo"])}
    files = result["protocol"].files if kind in PROTOCOL_KINDS else result.get("files") or {}
    rec["files"] = {k: os.path.relpath(p, out) for k, p in files.items()}
    if kind in PROTOCOL_KINDS:
        rec["intro"], rec["summary"] = result["protocol"].intro, result["protocol"].summary
    elif kind == "judges":
        by_judge = result["judges"]
        rec["files"] = {f"{j}_{k}": os.path.relpath(p, out) for j, r in by_judge.items() for k, p in r.files.items()}
        rec["intro"] = by_judge["clip"].intro
        rec["summary"] = judges_table({j: r.summary for j, r in by_judge.items()})
        rec["judge_names"] = result["judge_names"]
    elif kind == "sweep":
        rec["values"] = result["values"]
        rec["cells"] = [{k: c[k] for k in ("weights", "clip_score", "shares", "calibrated")}
                        for c in result["map"].to_dict()["cells"]]
        rec["clash"] = {"overall": result["clash"].overall, "blocks": result["clash"].blocks}
    elif kind == "epochs":
        full = result["epochs"].to_dict()
        rec["epochs"] = {k: full[k] for k in ("lora", "weight", "rows", "images", "clip_model", "has_centroid", "note")}
    else:
        rec["balance"] = result["balance"].to_dict()
    return rec


# a protocol summary's columns that do not depend on the style judge (the rest are the judge's numbers)
JUDGE_FREE_COLUMNS = ("config", "kind", "weights", "mode", "schedules", "n", "clip_mean", "clip_lo", "clip_hi")


def judges_table(summaries: dict[str, list[dict]]) -> list[dict]:
    """One row per configuration with each judge's style numbers in columns of its own ("style_sim_mean
    [csd]"), the judge-free columns (configuration, CLIP score) once.  Rows are matched by configuration."""
    judges = list(summaries)
    first = summaries[judges[0]]
    by_config = {j: {r["config"]: r for r in rows} for j, rows in summaries.items()}
    table = []
    for row in first:
        out = {k: row[k] for k in JUDGE_FREE_COLUMNS if k in row}
        for j in judges:
            other = by_config[j].get(row["config"], {})
            out.update({f"{k} [{j}]": v for k, v in other.items() if k not in JUDGE_FREE_COLUMNS})
        table.append(out)
    return table


EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
EXAMPLE_LORAS = Path(__file__).resolve().parents[1] / "assets" / "example_loras"
EXAMPLE_SETS = {"kenney_flat": "knyflt", "pixel_city": "pxcty"}  # example set -> trigger word


def model_banner(loaded, reason: str | None, examples: bool, on_zero_gpu: bool) -> tuple[str, list[str]]:
    """(the model's state in one line, the details a user may unfold), as Markdown.

    The line never holds a raw error: a model that failed to load is named, and why it failed (the
    loader's message, exception text included) is the first detail, shown as text."""
    details = []
    if reason:
        line = ("⚠️ **Model:** the requested model could not be loaded, so the built-in tiny demo model runs "
                "instead (pictures are noise, scores are demo values).")
        details.append(f"**Why the requested model could not be loaded:** `{_md_code(reason)}`")
    elif loaded.is_tiny:
        line = ("**Model:** built-in tiny demo model (the SD1.5 architecture with random weights): pictures "
                "look like coloured noise and every score is a demo value.")
    else:
        line = f"**Model:** {loaded.description}."
    if loaded.is_tiny:
        details.append(f"Running: {loaded.description}. It is StyleMix's offline model: the real SD1.5 "
                       "architecture with random weights, so everything works but nothing looks real.")
        details.append("For real images, start the app with `--model stable-diffusion-v1-5/stable-diffusion-v1-5` "
                       "(a Hugging Face id), a local diffusers folder, or an SD1.5 `.safetensors` checkpoint.")
    from stylemix.scores.selection import describe_style_judge

    judge_line, judge_detail = describe_style_judge(loaded.is_tiny)  # which judge measures style, said once here
    line = f"{line} {judge_line}"
    details.append(judge_detail)
    if examples:
        details.append("The example LoRAs (`kenney_flat`, `pixel_city`) were trained for the tiny model from the "
                       "example sets in a few steps: drag their sliders to see mixing work.")
    if on_zero_gpu:
        details.append("Running on a ZeroGPU Space: images are made on a GPU lent per request; training is "
                       "switched off here (see the README).")
    return line, details


def _whole(value):
    """A whole number from a form or an API caller ("128", 128.0) as an int; anything else as it came, for
    the config's check to name (never int("abc")'s message, never a silent default)."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return whole_number(value)


def _started(job) -> str | None:
    """When a job started (or was queued, or made): the jobs table's and the job view's "started"."""
    return job.status.get("started") or job.status.get("queued") or job.config.get("created")


def _md_code(text: str) -> str:
    """Text for inside an inline code span: one line, no backticks to end it early."""
    return " ".join(str(text).split()).replace("`", "'")


def experiment_images(kind: str, loras: int, prompts: int, seeds: int, values: list | None = None) -> int:
    """How many images an experiment run makes at most (for the per-run quota, checked before it starts)."""
    if kind == "protocol":
        return (1 + loras + loras * (loras - 1) // 2) * prompts * seeds
    if kind == "sweep":
        return len(values or [0.0, 0.5, 1.0]) ** 2 + 1
    if kind == "balance":
        from stylemix.experiments.balance import BalanceConfig

        c = BalanceConfig()
        return (1 + loras + c.max_evaluations) * len(c.preview_seeds) + (17 if loras == 2 else 0)
    if kind == "epochs":  # loras: the saved versions; with the base model and the final LoRA
        return (2 + loras) * prompts * seeds
    if kind == "judges":  # the protocol's images, made once and scored by both judges
        return (1 + loras + loras * (loras - 1) // 2) * prompts * seeds
    if kind == "modes":  # the base model and the mix in each mode and with each preset
        from stylemix.schedules import MODES, PRESETS

        return (1 + len(MODES) + len(PRESETS)) * prompts * seeds
    return 0


def zero_gpu() -> bool:
    """Running on a Hugging Face ZeroGPU Space (GPU lent per call, for a limited time)."""
    return bool(os.environ.get("SPACES_ZERO_GPU"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


MAX_SAMPLES_SHOWN = 120  # a job's gallery: every sample of an app-sized run, the newest of a very long one
_SAMPLE_NAME = re.compile(r"step-(\d+)-(\d+)\.png")  # trainers.lora.make_samples: step-XXXXXX-<prompt index>.png


def _job_samples(folder: Path, prompts: list[str]) -> list[dict]:
    """The sample images in folder/samples, by step then prompt: {"path", "step", "prompt"}."""
    found = []
    d = folder / "samples"
    for p in d.iterdir() if d.is_dir() else ():
        m = _SAMPLE_NAME.fullmatch(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), int(m.group(2)), p))
    return [{"path": str(p), "step": step, "prompt": prompts[i] if i < len(prompts) else ""}
            for step, i, p in sorted(found)]


def _job_file(base: Path, rel) -> Path | None:
    """base/rel if it is a file inside base (status files are data, never trusted as paths)."""
    try:
        p = inside(base, *Path(str(rel)).parts)
    except StyleMixError:
        return None
    return p if p.is_file() else None
