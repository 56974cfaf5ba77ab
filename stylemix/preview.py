"""Live previews while a weight slider moves: fast, interruptible, and never mistaken for the real image.

A preview is the recipe made cheaper: fewer steps at a smaller size (`PreviewConfig`), which works on
any model with nothing extra.  Where the user has them (`STYLEMIX_PREVIEW_LORA`, `STYLEMIX_PREVIEW_TAESD`,
see the README) a preview also adds a few-step LoRA (LCM-LoRA, Hyper-SD or TCD) to the style mix, with
that LoRA's own scheduler and CFG, and decodes with TAESD (diffusers' `AutoencoderTiny`).  The style
LoRAs stay merged in place as for any render; the few-step LoRA runs on peft's unmerged path on top
(`RenderOptions`): merged, it would rewrite most of the UNet at every switch between a preview and a
full render (bench/RESULTS.md).  The tiny model gets random stand-ins for both, built here, so the whole
path runs offline.

Only the newest request matters (`Previewer`): every request takes a ticket per channel (one browser
session); a preview whose ticket is no longer the newest stops between denoising steps through the
pipeline's own interrupt flag, so a preview never waits for an older one to finish.  An exact render
(`Previewer.render_exact`) stops every running preview until it has its pipeline, and is never
interrupted itself.  It goes through plain `Mixer.generate` without options: the few-step LoRA's path
is switched off, the style layers are merged from their kept originals, and the image is bit for bit
what a pipeline that never previewed makes (tests/test_preview.py).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stylemix.errors import StyleMixError
from stylemix.mixer import Mixer, MixResult, RenderOptions
from stylemix.pipelines import checkout, members
from stylemix.recipe import Recipe
from stylemix.schedules import parse_schedule

logger = logging.getLogger("stylemix")

FEWSTEP_ADAPTER = "sm_preview_fewstep"  # the few-step LoRA's adapter id in the pipeline
TINY = "tiny"  # a config value: the random stand-in built for the tiny model
NONE_VALUES = ("", "none", "off", "0")


@dataclass(frozen=True)
class FewStepKind:
    """What a family of few-step LoRAs needs: its scheduler, steps, CFG and weight (their model cards)."""

    label: str
    scheduler: str  # diffusers class name
    scheduler_config: dict
    steps: int
    guidance: float  # <= 1 turns CFG off: one UNet batch instead of two
    weight: float = 1.0


FEWSTEP_KINDS = {
    "lcm": FewStepKind("LCM-LoRA", "LCMScheduler", {}, 4, 1.0),
    "tcd": FewStepKind("TCD-LoRA", "TCDScheduler", {}, 4, 1.0),
    "hyper": FewStepKind("Hyper-SD", "DDIMScheduler", {"timestep_spacing": "trailing"}, 4, 1.0),
}


@dataclass
class PreviewConfig:
    """How previews are made cheaper than the recipe.  Absent LoRA/TAESD = fewer steps, smaller size only."""

    steps: int | None = None  # None: the few-step LoRA's steps, else a quarter of the recipe's (at least 2)
    scale: float = 0.5  # of each side, rounded down to a multiple of 8 ...
    min_side: int = 64  # ... but never below this (nor above the recipe's own size)
    fewstep_lora: str | None = None  # hub id ("org/repo" or "org/repo/file.safetensors"), local path, or "tiny"
    fewstep_kind: str | None = None  # lcm, tcd or hyper; None: read from the LoRA's name
    taesd: str | None = None  # hub id or local diffusers folder of an AutoencoderTiny, or "tiny"

    def __post_init__(self):
        if self.steps is not None and not 1 <= int(self.steps) <= 50:
            raise StyleMixError(f"preview steps {self.steps!r}: use 1-50.")
        if not 0.1 <= float(self.scale) <= 1.0:
            raise StyleMixError(f"preview scale {self.scale!r}: use a fraction of each side in 0.1-1.")
        for attr in ("fewstep_lora", "taesd"):
            if isinstance(getattr(self, attr), str) and getattr(self, attr).strip().lower() in NONE_VALUES:
                setattr(self, attr, None)
        if self.fewstep_lora and self.kind() is None:
            raise StyleMixError(
                f"Cannot tell which few-step LoRA {self.fewstep_lora!r} is: set STYLEMIX_PREVIEW_LORA_KIND "
                f"(or --preview-lora-kind) to one of {', '.join(FEWSTEP_KINDS)}.")

    def kind(self) -> FewStepKind | None:
        if not self.fewstep_lora:
            return None
        if self.fewstep_kind:
            if self.fewstep_kind not in FEWSTEP_KINDS:
                raise StyleMixError(f"preview LoRA kind {self.fewstep_kind!r}: choose one of "
                                    f"{', '.join(FEWSTEP_KINDS)}.")
            return FEWSTEP_KINDS[self.fewstep_kind]
        if self.fewstep_lora == TINY:
            return FEWSTEP_KINDS["lcm"]
        name = self.fewstep_lora.lower()
        return next((k for key, k in FEWSTEP_KINDS.items() if key in name), None)

    @classmethod
    def from_env(cls, tiny_model: bool, env: dict | None = None, **overrides) -> "PreviewConfig":
        """From STYLEMIX_PREVIEW_{LORA,LORA_KIND,TAESD,STEPS,SCALE}; `overrides` (CLI options) win when not None.

        On the tiny model the random stand-ins are the default, so the whole preview path runs
        offline; "none" switches either off.
        """
        env = os.environ if env is None else env
        values = {"fewstep_lora": env.get("STYLEMIX_PREVIEW_LORA", TINY if tiny_model else None),
                  "fewstep_kind": env.get("STYLEMIX_PREVIEW_LORA_KIND") or None,
                  "taesd": env.get("STYLEMIX_PREVIEW_TAESD", TINY if tiny_model else None)}
        for key, cast in (("steps", int), ("scale", float)):
            raw = env.get(f"STYLEMIX_PREVIEW_{key.upper()}")
            if raw:
                try:
                    values[key] = cast(raw)
                except ValueError:
                    raise StyleMixError(f"STYLEMIX_PREVIEW_{key.upper()}={raw!r} is not a number.") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class PreviewResult:
    image: object  # PIL image
    recipe: Recipe  # the preview's own (cheaper) recipe, not the one to save
    label: str  # "Preview — 4 steps, 256×256 (LCM-LoRA, TAESD)"
    seconds: float  # from the request to the decoded image
    result: MixResult


# --------------------------------------------------------------------------- tiny stand-ins


FEWSTEP_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "time_emb_proj"]  # LCM-LoRA's own targets: attention, MLPs and the ResNets


def tiny_fewstep_lora(path: Path | None = None, seed: int = 7) -> Path:
    """The tiny model's few-step LoRA stand-in (random, deterministic), saved once in the cache."""
    from stylemix.models import CACHE_DIR, tiny_components

    path = Path(path) if path else CACHE_DIR / "preview-standins" / f"tiny-fewstep-lora-{seed}.safetensors"
    if path.is_file():
        return path
    return random_fewstep_lora(path, tiny_components()["unet"], seed)


def random_fewstep_lora(path: Path, unet: torch.nn.Module, seed: int = 7, rank: int = 4) -> Path:
    """A random LoRA on LCM-LoRA's own targets (attention, MLPs, ResNet convs) of `unet`, saved to `path`.

    Costs what a trained few-step LoRA costs (the full-size one is for benchmarks); small B matrices
    keep the preview near the full image, as a trained one would.  `unet` is left without adapters.
    """
    from peft import LoraConfig

    from stylemix.lora.files import save_lora_weights

    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=FEWSTEP_TARGETS),
                     adapter_name="fewstep")
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lora_weights(path, unet, None, adapter_name="fewstep")  # atomic: parallel tests never see half a file
    unet.unload_lora()
    return path


def tiny_taesd(seed: int = 8, full_size: bool = False):
    """A random AutoencoderTiny with the VAE's 8x latent scale: TAESD's architecture, shrunk (or at real
    size, for benchmarks: diffusers' defaults are TAESD's configuration)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    if full_size:
        return AutoencoderTiny().eval()
    return AutoencoderTiny(encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).eval()


def _hub_lora(source: str) -> tuple[str, str | None]:
    """(what load_lora_weights gets, weight_name): a local path as is; "org/repo/file.safetensors" split."""
    if Path(source).expanduser().exists():
        p = Path(source).expanduser()
        return (str(p.parent), p.name) if p.is_file() else (str(p), None)
    parts = source.split("/")
    if len(parts) == 3 and parts[2].endswith(".safetensors"):
        return "/".join(parts[:2]), parts[2]
    if len(parts) != 2 or source.startswith((".", "/", "~")):
        raise StyleMixError(f"preview LoRA {source!r}: no such file, and not a hub id (org/repo or "
                            "org/repo/file.safetensors).")
    return source, None


# --------------------------------------------------------------------------- the previewer


class Previewer:
    """Previews for one mixer, newest request first.  Thread-safe; one per app (or per benchmark)."""

    def __init__(self, mixer: Mixer, config: PreviewConfig | None = None):
        self.mixer = mixer
        self.config = config or PreviewConfig()
        self._tickets = itertools.count(1)
        self._latest: dict[str, int] = {}  # channel -> its newest ticket
        self._exact: dict[str, str] = {}  # channel -> the exact render last asked for (its recipe, seed aside)
        self._exact_waiting = 0  # exact renders asked for and not finished: previews stop for them
        self._guard = threading.Lock()  # for the counters above (never held while rendering)
        self._ready = False
        self._decoder = None
        self._scheduler = None
        # each pipeline's own few-step scheduler and TAESD (a pool of pipelines, stylemix/pipelines.py):
        # a scheduler keeps the running loop's state, and a decoder lives on its pipeline's device
        self._per_pipeline: dict[int, tuple[object, object]] = {}
        self.stats = {"started": 0, "done": 0, "interrupted": 0, "superseded": 0, "running": 0, "max_running": 0}

    # ----------------------------------------------------------- set-up

    def setup(self) -> "Previewer":
        """Load the few-step LoRA and TAESD named in the config (once); errors name the bad value."""
        if self._ready:
            return self
        loaded, cfg = self.mixer.loaded, self.config
        with self.mixer.lock:
            kind = cfg.kind()
            if kind:
                if cfg.fewstep_lora == TINY and not loaded.is_tiny:
                    raise StyleMixError("preview LoRA 'tiny' is the tiny model's random stand-in; this model is "
                                        f"{loaded.model_id!r}: give a real few-step LoRA or 'none'.")
                source, weight_name = ((str(tiny_fewstep_lora()), None) if cfg.fewstep_lora == TINY
                                       else _hub_lora(cfg.fewstep_lora))
                try:
                    self.mixer.load_extra_adapter(source, FEWSTEP_ADAPTER, weight_name)
                except Exception as e:  # offline, wrong file, wrong base model: one readable line
                    raise StyleMixError(f"Cannot load the preview LoRA {cfg.fewstep_lora!r} "
                                        f"({type(e).__name__}: {str(e)[:200]}).") from e
            taesd = self._load_taesd(cfg.taesd) if cfg.taesd else None
            for i, m in enumerate(members(self.mixer)):
                sched = None
                if kind:
                    import diffusers

                    sched = getattr(diffusers, kind.scheduler).from_config(m.state.scheduler_config,
                                                                           **kind.scheduler_config)
                decoder = None
                if taesd is not None:
                    decoder = (taesd if i == 0 else copy.deepcopy(taesd)).to(m.loaded.device, m.loaded.dtype)
                self._per_pipeline[id(m)] = (sched, decoder)
            self._scheduler, self._decoder = self._per_pipeline[id(members(self.mixer)[0])]
        self._ready = True
        return self

    def _load_taesd(self, source: str):
        if source == TINY:
            if not self.mixer.loaded.is_tiny:
                raise StyleMixError("preview TAESD 'tiny' is the tiny model's random stand-in; give "
                                    "madebyollin/taesd (or a local copy) or 'none' for this model.")
            return tiny_taesd()
        from diffusers import AutoencoderTiny

        try:
            return AutoencoderTiny.from_pretrained(str(Path(source).expanduser()) if Path(source).expanduser().exists()
                                                   else source).eval()
        except Exception as e:  # noqa: BLE001
            raise StyleMixError(f"Cannot load the preview TAESD {source!r} ({type(e).__name__}: "
                                f"{str(e)[:200]}).") from e

    # ----------------------------------------------------------- what a preview is

    def preview_recipe(self, recipe: Recipe, mixer: Mixer | None = None) -> tuple[Recipe, RenderOptions, str]:
        """The cheaper recipe, the render options and the label of a preview of `recipe` (mixer: the
        pipeline it renders on, in a pool; its own scheduler and decoder)."""
        self.setup()
        scheduler, decoder = self._per_pipeline.get(id(mixer), (self._scheduler, self._decoder))
        cfg, kind = self.config, self.config.kind()

        def side(v: int) -> int:
            return min(v, max(cfg.min_side, int(v * cfg.scale) // 8 * 8))

        steps = cfg.steps or (kind.steps if kind else min(recipe.steps, max(2, round(recipe.steps / 4))))
        changes = {"steps": steps, "width": side(recipe.width), "height": side(recipe.height), "batch_size": 1,
                   # step numbers of the recipe's schedules as fractions: the preview's fewer steps follow them
                   "schedules": {n: parse_schedule(t).in_fractions(recipe.steps).text()
                                 for n, t in recipe.schedules.items()},
                   "switch_every": max(1, round(recipe.switch_every * steps / recipe.steps))}
        if kind:
            changes["guidance"] = kind.guidance
        cheap = recipe.with_(**changes)
        options = RenderOptions(extra_adapters={FEWSTEP_ADAPTER: kind.weight} if kind else {},
                                scheduler=scheduler, decoder=decoder, noise_on_device=True)
        extras = [x for x in (kind.label if kind else None, "TAESD" if decoder is not None else None) if x]
        label = f"Preview — {steps} steps, {cheap.width}×{cheap.height}" + (f" ({', '.join(extras)})" if extras else "")
        return cheap, options, label

    # ----------------------------------------------------------- requests

    def _take_ticket(self, channel: str) -> int:
        with self._guard:
            ticket = next(self._tickets)
            self._latest[channel] = ticket
            return ticket

    def _stale(self, channel: str, ticket: int) -> bool:
        return self._latest.get(channel) != ticket or self._exact_waiting > 0

    def preview(self, recipe: Recipe, channel: str = "default") -> PreviewResult | None:
        """A preview of `recipe`, or None when a newer request (or an exact render) made it pointless.

        A newer preview on the same channel interrupts this one between steps; an exact render
        interrupts every preview.  A preview of the recipe whose exact render was last asked for on
        this channel is skipped: that image is on its way (a drag's last event often arrives after
        the release).
        """
        t0 = time.perf_counter()
        recipe.validate()
        ticket = self._take_ticket(channel)
        key = _recipe_key(recipe)
        with self._guard:
            if self._exact.get(channel) == key:
                self.stats["superseded"] += 1
                return None
            self._exact.pop(channel, None)
        self.setup()
        with checkout(self.mixer) as mixer:  # the mixer's pipeline, or a pool's first free one
            if self._stale(channel, ticket):  # superseded while waiting for the pipeline
                self.stats["superseded"] += 1
                return None
            cheap, options, label = self.preview_recipe(recipe, mixer)
            options.should_stop = lambda: self._stale(channel, ticket)
            with self._guard:  # a pool runs previews on several pipelines at once
                self.stats["started"] += 1
                self.stats["running"] += 1
                self.stats["max_running"] = max(self.stats["max_running"], self.stats["running"])
            try:
                result = mixer.generate(cheap, options=options)
            finally:
                with self._guard:
                    self.stats["running"] -= 1
        if result.interrupted:
            self.stats["interrupted"] += 1
            return None
        self.stats["done"] += 1
        return PreviewResult(image=result.images[0], recipe=cheap, label=label,
                             seconds=time.perf_counter() - t0, result=result)

    @contextmanager
    def exact(self, recipe: Recipe, channel: str = "default"):
        """Around an exact render: running previews stop at their next step, waiting ones give up.

        Yields `started()`: called once the render holds its pipeline, previews stop stopping for it
        (with a pool of pipelines, previews go on on the others while it renders)."""
        with self._guard:
            self._exact_waiting += 1
            self._exact[channel] = _recipe_key(recipe)
            self._latest[channel] = next(self._tickets)  # previews already asked for on this channel are old
        pending = [True]

        def started() -> None:
            with self._guard:
                if pending:
                    pending.clear()
                    self._exact_waiting -= 1

        try:
            yield started
        finally:
            started()

    def render_exact(self, recipe: Recipe, channel: str = "default", progress=None) -> MixResult:
        """The recipe's exact image (plain `Mixer.generate`), ahead of any preview."""
        with self.exact(recipe, channel) as started, checkout(self.mixer) as mixer:
            started()
            return mixer.generate(recipe, progress=progress)


def _recipe_key(recipe: Recipe) -> str:
    # the seed aside: an unlocked seed is drawn per render, and a preview shows the seed box's value
    return json.dumps(recipe.with_(seed=0).to_dict(), sort_keys=True)
