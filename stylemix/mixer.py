"""The multi-LoRA mixer: every loaded LoRA stays resident, a request only changes weights.

LoRAs are loaded once with diffusers' `load_lora_weights(..., adapter_name=...)`.  Weights are
then applied through peft's own per-layer API (`set_adapter`, `set_scale`, `enable_adapters`)
on a list of LoRA layers collected once per load.  That is exactly what diffusers'
`set_adapters` does, minus its walk over every module of the UNet and text encoder on each
call (diffusers issue 11816: 190-920 ms per change at full scale); see bench/RESULTS.md.

Guarantees (tests/test_mixer.py):
- weight 0 switches a LoRA off in every layer; all weights 0 gives the base model's image
  bit for bit (adapters disabled, so each layer runs only its base weight);
- different weights give different images; the same recipe gives the same image;
- no `fuse_lora`, and no `cross_attention_kwargs={"scale": ...}`, which would overwrite the
  per-adapter scales (the likely cause of the seed report's identical 0.6/0.4 and 0.5/0.5 rows).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from stylemix.a1111 import lbw_block
from stylemix.errors import StyleMixError
from stylemix.lora.library import LoraLibrary
from stylemix.lora.names import pipeline_targets
from stylemix.lora.files import WEIGHTS_NAME
from stylemix.models import LoadedModel
from stylemix.recipe import SAMPLERS, Recipe
from stylemix.schedules import WeightPlan, compile_plan, strength_factor

logger = logging.getLogger("stylemix")

# One adapter load at a time in the whole process, whichever pipeline it is for: peft builds the new
# layers inside `init_empty_weights`, which patches torch's `Module.register_parameter` globally, so two
# pipelines of a pool loading at once break each other's load (stylemix/pipelines.py).
_ADAPTER_LOAD_LOCK = threading.Lock()

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


def block_of(component: str, module_name: str) -> tuple[str, ...]:
    """Block ids of a LoRA layer, most specific first: ('IN04', 'down.1', 'down'), ('M00', 'mid'),
    ('BASE', 'text_encoder'); the A1111 LBW id (stylemix.a1111.lbw_block) leads where there is one."""
    lbw = lbw_block(component, module_name)
    lead = (lbw,) if lbw else ()
    if component == "text_encoder":
        return lead + ("text_encoder",)
    m = _BLOCK.match(module_name)
    if not m:
        return lead + ("other",)  # conv_in (IN00), time_embedding, conv_out
    if m.group(3):
        return lead + ("mid",)
    kind = "down" if m.group(1) == "down_blocks" else "up"
    return lead + (f"{kind}.{m.group(2)}", kind)


@dataclass
class _Layer:
    component: str  # "unet" or "text_encoder"
    name: str
    module: torch.nn.Module  # a peft LoraLayer
    blocks: tuple[str, ...]
    adapters: frozenset = frozenset()
    active: tuple | None = None  # adapters last activated here (None: unknown), to skip redundant calls
    want: tuple = ()  # ((adapter id, peft scaling), ...) the current weights ask of this layer

    @property
    def key(self) -> tuple[str, str]:
        return (self.component, self.name)


@dataclass
class _PipelineState:
    """What the mixers sharing one pipeline must agree on; kept on the pipeline object itself."""

    scheduler_config: dict
    weights_key: tuple | None = None  # the weights the layers are set to
    layers_owner: object = None  # the mixer whose layer list set them
    original: dict = field(default_factory=dict)  # (component, layer) -> (weight, copy of its own value)
    merged: dict = field(default_factory=dict)  # (component, layer) -> the `want` merged into that weight
    # UNet attention projections fused (stylemix.accel.fuse_qkv): peft's unmerged path would skip
    # q/k/v there, so extra adapters are merged like library LoRAs
    fused_qkv: bool = False


@dataclass
class MixResult:
    images: list  # PIL images
    recipe: Recipe  # as requested, with model and LoRA hashes filled in
    prompt_used: str  # the prompt after trigger words were added
    weights_used: dict[str, float]  # after total-strength scaling (a scheduled LoRA: its peak)
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False  # `RenderOptions.should_stop` ended it between steps: no images
    # the U-Net weight each LoRA had at each step, as the step callback saw the layers set (one dict
    # per step), and each LoRA's text-encoder weight
    step_weights: list[dict[str, float]] = field(default_factory=list)
    te_weights: dict[str, float] = field(default_factory=dict)
    unet_passes: int = 0  # U-Net forward passes per image (composite: one per LoRA per step)


@dataclass
class RenderOptions:
    """What a fast preview changes about `Mixer.generate` (stylemix/preview.py); full renders pass none.

    extra_adapters: resident adapter id -> weight, for this render only (a few-step LoRA).  They run
    on peft's own unmerged path on top of the merged style mix, never written into the weights: a
    few-step LoRA touches nearly every UNet layer (LCM-LoRA: its ResNet convs too), so merging it
    would re-merge, and keep an original copy of, most of the UNet each time a preview follows a full
    render (4-9 s on a CPU at full size), where its unmerged path costs a few per cent of a step at
    preview sizes.  The next render without it just switches that path off.  (With the UNet's attention
    projections fused, `stylemix.accel.fuse_qkv`, that path would skip q/k/v: extras are merged there.)
    """

    extra_adapters: dict[str, float] = field(default_factory=dict)
    scheduler: object | None = None  # replaces the recipe's sampler (the few-step LoRA's own scheduler)
    decoder: torch.nn.Module | None = None  # decodes the latents instead of the pipeline's VAE (TAESD)
    should_stop: Callable[[], bool] | None = None  # checked after each step: True interrupts the render
    # Where the seed's noise is drawn.  Full renders draw it on the CPU, so a seed gives the same image
    # on cuda, mps and cpu.  Previews draw it on the model's device: a stochastic sampler (LCM, TCD)
    # draws noise every step, and a CPU draw copied to the GPU is a host sync inside the loop.
    noise_on_device: bool = False


class Mixer:
    """One pipeline, its resident LoRAs, and a lock that serialises GPU work across users.

    merge=True (default): before each generation, each LoRA layer's weighted sum
    W + sum_i w_i * (alpha_i/r_i) * B_i A_i is written into the layer's weight, computed from a kept
    copy of the original W, so it is exact and can be re-weighted or undone at any time (never
    `fuse_lora`, whose unfuse drifts).  A denoising step then costs what the base model's does,
    however many LoRAs are mixed; peft's unmerged path adds 4 kernels per adapter per layer
    (2.2x per step with 4 LoRAs on an H100, bench/RESULTS.md).  merge=False keeps peft's path.
    """

    def __init__(self, loaded: LoadedModel, library: LoraLibrary, merge: bool = True):
        self.loaded = loaded
        self.pipe = loaded.pipe
        self.library = library
        self.merge = merge
        if library.targets is None:
            library.targets = pipeline_targets(self.pipe)
        self.lock = loaded.lock  # one lock per pipeline: mixers sharing a cached pipeline take turns
        self._adapters: dict[str, tuple[str, str]] = {}  # LoRA name -> (adapter id, sha256)
        self._stats: dict[str, tuple[int, int, int]] = {}  # LoRA name -> its file's (mtime_ns, size, inode) at load
        self._layers: list[_Layer] = []
        self._unet_now: dict[str, float] = {}  # the U-Net weight each LoRA is set to now (recorded per step)
        self._embeds: OrderedDict = OrderedDict()  # prompt-embedding cache
        self._schedulers: dict[str, object] = {}
        if not hasattr(self.pipe, "_stylemix_state"):
            # Samplers are built from the model's own scheduler config, remembered the first time:
            # later mixers see pipe.scheduler already replaced by some sampler.
            self.pipe._stylemix_state = _PipelineState(scheduler_config=dict(self.pipe.scheduler.config))
        self.state: _PipelineState = self.pipe._stylemix_state

    # ---------------------------------------------------------------- loading

    def loaded_names(self) -> list[str]:
        return list(self._adapters)

    def _file_stat(self, name: str) -> tuple[int, int, int] | None:
        try:
            st = (self.library.root / name / WEIGHTS_NAME).stat()
        except OSError:
            return None
        # the inode too: another app process sharing the library may replace a LoRA with a file of the
        # same size within one timestamp tick; every library write is a new file renamed in
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def ensure_loaded(self, names) -> None:
        """Load each named LoRA once (again only if its file changed on disk)."""
        with self.lock:
            changed = False
            for name in names:
                if name in self._adapters and self._stats.get(name) == self._file_stat(name):
                    continue  # resident and unchanged: no library lookup, no hashing
                entry = self.library.get(name)
                if not entry.compatible:
                    raise StyleMixError(f"LoRA {name!r} cannot be used with this base model: {entry.problem}.")
                sha = entry.sha256
                self._stats[name] = self._file_stat(name)
                if name in self._adapters and self._adapters[name][1] == sha:
                    continue
                self.restore_base_weights()  # peft must wrap the original weights, not a merged mix
                if name in self._adapters:  # retrained or replaced under the same name
                    self._drop(name)
                # Content-addressed adapter ids: another mixer on the same (cached) pipeline that
                # already loaded this exact file shares the resident adapter instead of reloading it.
                adapter_id = f"sm_{sha[:16]}"
                if adapter_id not in self._resident_ids():
                    t = time.perf_counter()
                    with _ADAPTER_LOAD_LOCK:
                        self.pipe.load_lora_weights(str(entry.weights), adapter_name=adapter_id)
                    logger.info("loaded LoRA %s as %s in %.2fs", name, adapter_id, time.perf_counter() - t)
                self._adapters[name] = (adapter_id, sha)
                changed = True
            if changed:
                self._collect_layers()

    def load_extra_adapter(self, source: str, adapter_id: str, weight_name: str | None = None) -> None:
        """Load a LoRA from outside the library (a hub id or a file/folder) as `adapter_id`, once.

        It stays off until `set_weights(..., extra_adapters={adapter_id: w})` asks for it; the preview's
        few-step LoRA is loaded this way.
        """
        with self.lock:
            if adapter_id in self._resident_ids():
                return
            self.restore_base_weights()  # peft must wrap the original weights, not a merged mix
            kwargs = {"weight_name": weight_name} if weight_name else {}
            with _ADAPTER_LOAD_LOCK:
                self.pipe.load_lora_weights(source, adapter_name=adapter_id, **kwargs)
            self._collect_layers()

    def unload(self, name: str) -> None:
        with self.lock:
            if name in self._adapters:
                self.restore_base_weights()
                self._drop(name)
                self._collect_layers()

    def _drop(self, name: str) -> None:
        adapter_id, _ = self._adapters.pop(name)
        self._stats.pop(name, None)
        if adapter_id in self._resident_ids() and adapter_id not in {a for a, _ in self._adapters.values()}:
            self.pipe.delete_adapters([adapter_id])

    def _resident_ids(self) -> set[str]:
        return {a for ids in self.pipe.get_list_adapters().values() for a in ids}

    def _collect_layers(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = []
        for component, model in (("unet", self.pipe.unet), ("text_encoder", self.pipe.text_encoder)):
            for name, module in model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    adapters = frozenset(getattr(module, "lora_A", {}).keys())
                    layers.append(_Layer(component, name, module, block_of(component, name), adapters))
                    if self.merge and not _mergeable(module):
                        logger.warning("LoRA layer %s.%s cannot be merged exactly; using peft's unmerged path.",
                                       component, name)
                        self.merge = False
        self._layers = layers
        self.state.weights_key = None
        self._embeds.clear()

    # ---------------------------------------------------------------- weights

    def effective_weights(self, recipe: Recipe) -> dict[str, float]:
        """The weights that reach the model: as given, or scaled to `total_strength` (absolute sum)."""
        factor = strength_factor(recipe.loras, recipe.total_strength)
        return {n: float(w) * factor for n, w in recipe.loras.items()}

    def set_weights(self, weights: dict[str, float], block_weights: dict[str, dict[str, float]] | None = None,
                    extra_adapters: dict[str, float] | None = None, te_weights: dict[str, float] | None = None) -> None:
        """Set LoRA weights (0 = off) and optional per-block multipliers; loads what is missing.

        `extra_adapters` (adapter id -> weight) adds adapters loaded outside the library, such as the
        preview's few-step LoRA: weighted like library LoRAs (no block multipliers) but always run
        on peft's unmerged path (see `RenderOptions`).

        te_weights: the text encoder's weight of each LoRA where it differs from its U-Net weight (a
        schedule's te=, stylemix.schedules); a LoRA missing there has the same weight in both.

        Cheap (milliseconds, no tensor math): it records each layer's adapters and peft scales.
        With merge=True the weighted sums are written into the layers by `apply()` (called by
        `generate`); with merge=False peft's active adapters and scales are set here.
        """
        with self.lock:
            te_weights = te_weights or {}
            self.ensure_loaded([n for n in {**weights, **te_weights}
                                if weights.get(n, 0) != 0 or te_weights.get(n, 0) != 0])
            self._set_weights(weights, block_weights, extra_adapters, te_weights)

    def _set_weights(self, weights, block_weights=None, extra_adapters=None, te_weights=None) -> None:
        """set_weights for LoRAs already loaded, the lock held (also called between denoising steps)."""
        block_weights, te_weights = block_weights or {}, te_weights or {}
        by_id = {}
        for n in {**weights, **te_weights}:
            w_unet, w_te = weights.get(n, 0.0), te_weights.get(n, weights.get(n, 0.0))
            if (w_unet != 0 or w_te != 0) and n in self._adapters:
                by_id[self._adapters[n][0]] = (float(w_unet), float(w_te), block_weights.get(n, {}))
        self._unet_now = {n: float(w) for n, w in weights.items()}
        extras = {a: float(w) for a, w in (extra_adapters or {}).items() if w != 0}
        unmerged = set() if self.state.fused_qkv else set(extras)  # adapters left on peft's path
        by_id.update({a: (w, w, {}) for a, w in extras.items()})
        key = (self.merge, tuple(sorted((a, wu, wt, tuple(sorted(b.items())))
                                        for a, (wu, wt, b) in by_id.items())))
        if self.state.layers_owner is not self:  # another mixer on this pipeline set the layers
            for layer in self._layers:
                layer.active = None
        elif key == self.state.weights_key:
            return
        for layer in self._layers:
            te = layer.component == "text_encoder"
            active = tuple(a for a in by_id if a in layer.adapters and by_id[a][1 if te else 0] != 0)
            want = []
            for a in active:
                w_unet, w_te, blocks = by_id[a]
                w = w_te if te else w_unet
                mult = next((blocks[b] for b in layer.blocks if b in blocks), 1.0)
                layer.module.set_scale(a, w * mult)  # peft's own alpha/r (or rsLoRA) scaling
                if a not in unmerged:
                    want.append((a, layer.module.scaling[a]))
            layer.want = tuple(want)
            if self.merge:
                # the merged weight carries the library LoRAs; only extras stay on peft's path
                active = tuple(a for a in active if a in unmerged)
            if not active:
                if layer.active != () or not layer.module.disable_adapters:
                    layer.module.enable_adapters(False)
                    layer.active = ()
            elif active != layer.active or layer.module.disable_adapters:
                layer.module.enable_adapters(True)
                layer.module.set_adapter(list(active), inference_mode=True)
                layer.active = active
        self.state.weights_key = key
        self.state.layers_owner = self

    @torch.no_grad()
    def apply(self) -> int:
        """merge=True: write each layer's weighted LoRA sum into its weight; returns layers rewritten.

        On a GPU, layers of one shape with the same active adapters are merged together in one
        batched matmul (a few groups for SD1.5): a handful of kernels instead of a few per layer, so a
        weight change costs milliseconds, where each launch is the cost (bench/RESULTS.md).  On the
        CPU each layer is merged into its own storage (`_merge_group`).
        """
        if not self.merge:
            return 0
        with self.lock:
            return self._apply()

    @torch.no_grad()
    def _apply(self) -> int:
        """apply() with the lock held (also called between denoising steps)."""
        state, groups, changed = self.state, {}, 0
        if len(state.merged) > len(self._layers):
            # another mixer on this pipeline (a cached model shared by two services) merged layers this one
            # has not loaded: their original weights go back, or a render here would carry its LoRAs
            mine = {layer.key for layer in self._layers}
            for key, parts in state.merged.items():
                if parts and key not in mine:
                    weight, original = state.original[key]
                    weight.copy_(original)
                    state.merged[key] = ()
                    changed += 1
        for layer in self._layers:
            if state.merged.get(layer.key, ()) == layer.want:
                continue
            changed += 1
            weight = layer.module.get_base_layer().weight
            if layer.key not in state.original:
                state.original[layer.key] = (weight, weight.detach().clone())
            if not layer.want:
                weight.copy_(state.original[layer.key][1])
                state.merged[layer.key] = ()
                continue
            ids = tuple(a for a, _ in layer.want)
            ranks = tuple(layer.module.lora_A[a].weight.shape[0] for a in ids)
            groups.setdefault((tuple(weight.shape), ids, ranks), []).append(layer)
        for (_, ids, ranks), layers in groups.items():
            self._merge_group(layers, ids, ranks)
        return changed

    def _merge_group(self, layers: list[_Layer], ids: tuple, ranks: tuple) -> None:
        """W_l = W_l(original) + B_l diag(s_l) A_l for every layer l of the group.

        On a GPU (cuda, mps) one baddbmm for the whole group: there each kernel launch is the cost.
        On the CPU one addmm per layer written straight into the weight: there memory traffic is the
        cost, and the batched form stacks the originals and copies its result back (176 full-size
        layers: 0.10 s against 0.33-0.68 s, bench/RESULTS.md).  Both give the same bits.
        """
        if self.loaded.device.type == "cpu":
            for layer in layers:
                self._merge_layer(layer, ids, ranks)
            return
        originals = [self.state.original[layer.key][1] for layer in layers]
        dtype, device = originals[0].dtype, originals[0].device
        # A and B of the active adapters, stacked for this merge only: a cache of stacks per set of active
        # adapters grew with every new mix (40 3-LoRA mixes: 3840 stacks), and the copy is small next
        # to the originals stacked below (rank x width against width x width per layer)
        factors = [_factors(layer, ids, ranks) for layer in layers]
        a = torch.stack([f for f, _ in factors]).to(dtype)
        b = torch.stack([f for _, f in factors]).to(dtype)
        scales = torch.tensor([_rank_scales(layer, ranks) for layer in layers],
                              dtype=dtype).to(device, non_blocking=True)
        flat = torch.stack([o.reshape(o.shape[0], -1) for o in originals])
        merged = torch.baddbmm(flat, b * scales[:, None, :], a)
        targets = [layer.module.get_base_layer().weight for layer in layers]
        torch._foreach_copy_(targets, [m.reshape(t.shape) for m, t in zip(merged.unbind(0), targets)])
        for layer in layers:
            self.state.merged[layer.key] = layer.want

    def _merge_layer(self, layer: _Layer, ids: tuple, ranks: tuple) -> None:
        """W = W(original) + B diag(s) A for one layer, computed into W's own storage."""
        original = self.state.original[layer.key][1]
        # the active adapters' A and B side by side, for this merge only (see _merge_group: not cached)
        a, b = (f.to(original.dtype) for f in _factors(layer, ids, ranks))
        scales = torch.tensor(_rank_scales(layer, ranks), dtype=original.dtype).to(original.device)
        weight = layer.module.get_base_layer().weight
        flat = original.reshape(original.shape[0], -1)
        if weight.is_contiguous():
            torch.addmm(flat, b * scales, a, out=weight.view(weight.shape[0], -1))
        else:  # a channels_last conv weight (compiled): no flat view of it, so compute then copy in
            weight.copy_(torch.addmm(flat, b * scales, a).view(weight.shape))
        self.state.merged[layer.key] = layer.want

    @torch.no_grad()
    def restore_base_weights(self) -> None:
        """Put every merged layer's original weight back (exactly: a kept copy, not a subtraction)
        and re-enable peft's adapter path, as plain diffusers leaves it."""
        with self.lock:
            for key, (weight, original) in self.state.original.items():
                if self.state.merged.get(key):
                    weight.copy_(original)
                    self.state.merged[key] = ()
            for layer in self._layers:
                layer.want = ()
                layer.module.enable_adapters(True)  # hand back a pipeline plain diffusers/peft can drive
            self.state.weights_key = None
            self.state.layers_owner = None  # force a full re-sync of peft's per-layer state next time

    # ---------------------------------------------------------------- generation

    def prompt_with_triggers(self, recipe: Recipe, weights: dict[str, float]) -> str:
        if not recipe.add_trigger_words:
            return recipe.prompt
        words = []
        for name, w in weights.items():
            trig = self.library.get(name).trigger_word if w != 0 else None
            if trig and trig not in words and not re.search(rf"\b{re.escape(trig)}\b", recipe.prompt):
                words.append(trig)
        return ", ".join(words + [recipe.prompt]) if words else recipe.prompt

    def _scheduler(self, sampler: str):
        if sampler not in self._schedulers:
            import diffusers

            cls_name, extra = SAMPLERS[sampler]
            cls = getattr(diffusers, cls_name)
            self._schedulers[sampler] = cls.from_config(self.state.scheduler_config, **extra)
        return self._schedulers[sampler]

    def _encode(self, prompt: str, negative: str, guidance: float, te_key: tuple):
        """Prompt embeddings, cached while the prompt and the text-encoder LoRA weights are unchanged."""
        cfg = guidance > 1.0
        key = (prompt, negative, cfg, te_key)
        if key in self._embeds:
            self._embeds.move_to_end(key)
            return self._embeds[key]
        pos, neg = self.pipe.encode_prompt(prompt, self.loaded.device, 1, cfg, negative_prompt=negative or None)
        self._embeds[key] = (pos, neg)
        while len(self._embeds) > 32:
            self._embeds.popitem(last=False)
        return pos, neg

    def generate(self, recipe: Recipe, progress: Callable[[int, int], None] | None = None,
                 options: RenderOptions | None = None) -> MixResult:
        """Make the recipe's images.  Thread-safe: requests from many users run one at a time.

        The recipe's schedules and mode are compiled into a steps x LoRAs table first
        (stylemix.schedules.compile_plan); the step callback rewrites the weights only where the table's
        row changes, so a recipe without schedules runs exactly as a plain mix.  Composite mode runs the
        U-Net once per LoRA at each step (`_composite_unet`).
        `options` is for previews only (stylemix/preview.py); without it this is the exact recipe
        image, the same pixels as `stylemix generate`.
        """
        recipe.validate()
        opts = options or RenderOptions()
        timings = {}
        with self.lock:
            t0 = time.perf_counter()
            weights = self.effective_weights(recipe)
            plan = compile_plan(recipe)
            self.ensure_loaded(plan.names)
            block_weights, extras = recipe.block_weights, opts.extra_adapters
            self._set_weights(plan.row(0), block_weights, extras, plan.te)
            timings["set_weights_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            timings["layers_merged"] = self._apply() if self.merge else 0
            timings["merge_s"] = time.perf_counter() - t0
            prompt = self.prompt_with_triggers(recipe, weights)
            # the embeddings depend on each text-encoder LoRA's weight and its BASE / text_encoder block multiplier
            te_ids = {a for l in self._layers if l.component == "text_encoder" for a in l.adapters}
            te_blocks = block_of("text_encoder", "")
            te_key = tuple(sorted((n, w, next((bw[b] for b in te_blocks if b in bw), 1.0))
                                  for n, w in plan.te.items() for bw in [block_weights.get(n, {})]
                                  if w != 0 and self._adapters[n][0] in te_ids))
            te_key += tuple(sorted((a, w) for a, w in extras.items() if w != 0 and a in te_ids))
            t1 = time.perf_counter()
            pos, neg = self._encode(prompt, recipe.negative_prompt, recipe.guidance, te_key)
            timings["encode_s"] = time.perf_counter() - t1
            self.pipe.scheduler = opts.scheduler or self._scheduler(recipe.sampler)
            seeds = [recipe.seed + i for i in range(recipe.batch_size)]
            # CPU generators: the same seed gives the same image on cuda, mps and cpu (RenderOptions)
            noise_device = self.loaded.device if opts.noise_on_device else torch.device("cpu")
            gens = [torch.Generator(noise_device).manual_seed(s) for s in seeds]
            stopped, recorded, now = [], [], {"step": 0, "passes": 0, "rewrite_s": 0.0}

            def on_step(pipe, step, timestep, kwargs):
                # what the layers were set to for this step, then the next step's row where it changes
                recorded.append(dict(self._unet_now) if plan.mode != "composite" else plan.row(step))
                now["step"] = step + 1
                if plan.mode != "composite" and step + 1 < len(plan.rows) and plan.rows[step + 1] != plan.rows[step]:
                    t = time.perf_counter()
                    self._set_weights(plan.row(step + 1), block_weights, extras, plan.te)
                    self._apply() if self.merge else None
                    now["rewrite_s"] += time.perf_counter() - t
                if progress:
                    progress(step + 1, recipe.steps)
                if opts.should_stop and opts.should_stop():
                    pipe._interrupt = True  # diffusers skips the remaining steps (its own interrupt flag)
                    stopped.append(step + 1)
                return kwargs

            # A preview decodes its latents itself (TAESD, or nothing at all once interrupted);
            # a full render keeps the pipeline's own decode, so its pixels never change.
            own_decode = opts.decoder is not None or opts.should_stop is not None

            def denoise_and_decode() -> list:
                out = self.pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=recipe.steps,
                                guidance_scale=recipe.guidance, width=recipe.width, height=recipe.height,
                                num_images_per_prompt=recipe.batch_size, generator=gens,
                                output_type="latent" if own_decode else "pil", callback_on_step_end=on_step)
                if stopped and stopped[0] < self.pipe._num_timesteps:  # stopped before the last step
                    return []
                return decode_latents(self.pipe, out.images, opts.decoder) if own_decode else out.images

            def run() -> list:
                if plan.mode != "composite":
                    return denoise_and_decode()
                with self._composite_unet(plan, block_weights, extras, now):
                    return denoise_and_decode()

            t2 = time.perf_counter()
            if getattr(self.pipe, "_stylemix_compiled", None):
                # on the pipeline's one model thread, while this thread holds the lock: torch records
                # CUDA graphs per thread.  Eager pipelines stay on the caller's thread: on a CPU a
                # second thread starts a second OpenMP pool (the tests ran 40% slower that way).
                images = self.loaded.model_thread.run(run)
            else:
                images = run()
            timings["denoise_decode_s"] = time.perf_counter() - t2
            timings["schedule_rewrites"] = len(plan.changes()) if plan.mode != "composite" else 0
            timings["schedule_rewrite_s"] = now["rewrite_s"]
        hashes = {n: self.library.get(n).short_hash for n, w in weights.items() if w != 0}
        done = recipe.with_(model=self.loaded.model_id, lora_hashes=hashes)
        passes = now["passes"] // max(1, len(recorded)) if plan.mode == "composite" else 1
        return MixResult(images=list(images), recipe=done, prompt_used=prompt, weights_used=weights,
                         seeds=seeds, timings=timings, interrupted=not images, step_weights=recorded,
                         te_weights=dict(plan.te), unet_passes=passes)

    @contextmanager
    def _composite_unet(self, plan: WeightPlan, block_weights, extras, now: dict):
        """LoRA Composite (Zhong et al., arXiv 2402.16843): while it is entered, each U-Net call of the
        pipeline runs the U-Net once per LoRA of the mix, that LoRA alone at its weight for the step, and
        returns the mean prediction.  The pipeline batches the unconditional and conditional inputs, so
        each half is averaged on its own, and classifier-free guidance is applied to the means after.
        The text encoder ran once before, with every LoRA's te weight (stylemix.schedules)."""
        unet = self.pipe.unet
        # nn.Module.__call__ runs `_compiled_call_impl` when it is set (nn.Module.compile sets it): taking
        # that slot wraps the whole call, so a compiled U-Net stays compiled for each pass and an eager one
        # runs its own hooks; patching `forward` would put this loop inside the compiled graph.
        compiled = unet._compiled_call_impl
        inner = compiled if compiled is not None else unet._call_impl

        def composite_call(*args, **kwargs):
            row = plan.row(now["step"])
            total = None
            for name in plan.names:
                self._set_weights({name: row[name]}, block_weights, extras, plan.te)
                self._apply() if self.merge else None
                out = inner(*args, **{**kwargs, "return_dict": False})[0]
                now["passes"] += 1
                total = out.clone() if total is None else total + out  # clone: a CUDA graph reuses its output
            mean = total / len(plan.names)
            if kwargs.get("return_dict", True):
                from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

                return UNet2DConditionOutput(sample=mean)
            return (mean,)

        unet._compiled_call_impl = composite_call
        try:
            yield
        finally:
            unet._compiled_call_impl = compiled


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, decoder: torch.nn.Module | None = None) -> list:
    """PIL images from the pipeline's latents, as the pipeline decodes them, with `decoder` (e.g. TAESD,
    whose scaling factor is 1) in place of the VAE when given; the safety checker runs as it would."""
    vae = decoder if decoder is not None else pipe.vae
    latents = latents.to(next(vae.parameters()).dtype)
    image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    image, nsfw = pipe.run_safety_checker(image, latents.device, latents.dtype)
    denorm = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
    return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=denorm)


def _factors(layer: _Layer, ids: tuple, ranks: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The active adapters' A (rows) and B (columns) of one layer side by side: B @ A is their sum
    (one adapter: views of its own A and B, no copy)."""
    if len(ids) == 1:
        return (layer.module.lora_A[ids[0]].weight.reshape(ranks[0], -1),
                layer.module.lora_B[ids[0]].weight.reshape(-1, ranks[0]))
    a = torch.cat([layer.module.lora_A[i].weight.reshape(r, -1) for i, r in zip(ids, ranks)])
    b = torch.cat([layer.module.lora_B[i].weight.reshape(-1, r) for i, r in zip(ids, ranks)], dim=1)
    return a, b


def _rank_scales(layer: _Layer, ranks: tuple) -> list[float]:
    """Each adapter's scale repeated over its rank: the diagonal between B and A."""
    return [s for (_, s), r in zip(layer.want, ranks) for _ in range(r)]


def _mergeable(module) -> bool:
    """Plain LoRA on a Linear or Conv2d (no DoRA): its delta-W is B @ A, merged exactly."""
    base = module.get_base_layer()
    dora = any(getattr(module, "use_dora", {}).values())
    return isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)) and not dora
