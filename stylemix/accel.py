"""torch.compile for the denoising loop, with LoRA weight changes that cost no recompile.

The mixer changes LoRA weights by writing each layer's weighted sum into the same weight storage
(`Mixer.apply`), so a compiled UNet sees the same parameters at the same addresses after every change:
dynamo's guards (shapes, dtypes, strides, peft's Python flags) still hold, nothing is recompiled, and
CUDA graphs (mode "reduce-overhead") replay without re-recording.  That only holds with inductor's
*freezing* off: freezing folds the weights into the graph as constants, and a new weight would need a
new graph.  `compile_counters()` exposes torch's own counters so the benchmark (bench/bench_live.py)
and the tests can check the claim over 100 changes.  CUDA graphs also belong to the thread that
recorded them, so every render of a compiled pipeline runs on its one model thread
(`stylemix.gpu_queue.ModelThread`), whichever of the server's worker threads took the request.

What still compiles: a new image size, batch or sampler timestep dtype (one graph each; `warm_up` does
the default ones at start), and loading a LoRA onto layers not wrapped yet (the module tree changes).

`fuse_qkv` (opt-in, `STYLEMIX_FUSE_QKV=1`) fuses each UNet attention's projections into one matmul
and keeps LoRA mixing exact by making the old projections' weights views of the fused weight.  Off
by default until bench/bench_live.py --fuse-qkv measures that it pays on a GPU.
"""

from __future__ import annotations

import logging
import os

import torch

from stylemix.errors import StyleMixError

logger = logging.getLogger("stylemix")

# CUDA graphs without autotuning: a full-size UNet compiles in about a minute; "max-autotune" takes
# several.  Measured against eager in bench/bench_live.py (--compile-mode chooses another).
DEFAULT_MODE = "reduce-overhead"
_cudagraph_records = [0]


def compile_wanted(device: torch.device, requested: bool | None = None) -> bool:
    """--compile/--no-compile, else $STYLEMIX_COMPILE (1/0), else on for CUDA only.

    Off on CPU and mps: there compiling takes minutes and has not been measured to help.
    """
    if requested is not None:
        return bool(requested)
    env = _env_switch("STYLEMIX_COMPILE", "use 1 or 0 (or leave it unset for automatic)")
    return device.type == "cuda" if env is None else env


def fuse_qkv_wanted(requested: bool | None = None) -> bool:
    """--fuse-qkv, else $STYLEMIX_FUSE_QKV (1/0), else off: not yet measured to pay (bench/RESULTS.md)."""
    if requested is not None:
        return bool(requested)
    return bool(_env_switch("STYLEMIX_FUSE_QKV", "use 1 or 0"))


def _env_switch(name: str, hint: str) -> bool | None:
    """An on/off environment variable: True, False, or None when unset; anything else is an error."""
    env = os.environ.get(name, "").strip().lower()
    if env in ("1", "true", "on", "yes"):
        return True
    if env in ("0", "false", "off", "no"):
        return False
    if env:
        raise StyleMixError(f"{name}={env!r}: {hint}.")
    return None


def fuse_qkv(mixer) -> int:
    """Fuse the UNet's attention projections (q, k, v of self-attention; k, v of cross-attention) into
    one matmul each, with diffusers' `fuse_qkv_projections`; returns the attention modules fused.

    The fused layer is a new weight that peft's LoRA layers on to_q/to_k/to_v never see.  So each of
    those layers' weight becomes a view of its rows of the fused weight: the mixer's in-place merge
    (`Mixer.apply`) then writes each LoRA sum straight into the fused weight's slices.  Adapters on
    peft's unmerged path would be skipped there, so after fusing the mixer merges the preview's
    few-step LoRA too (`_PipelineState.fused_qkv`), and a mixer that cannot merge is refused.
    """
    from diffusers.models.attention_processor import Attention

    pipe, state = mixer.pipe, mixer.state
    if state.fused_qkv:
        return 0
    if not mixer.merge:
        raise StyleMixError("Fused QKV needs merged LoRAs: a loaded LoRA here can only run unmerged "
                            "(DoRA or an unusual layer); start without STYLEMIX_FUSE_QKV.")
    with mixer.lock:
        mixer.restore_base_weights()  # the fused weight is built from the base weights, not a mix
        pipe.unet.fuse_qkv_projections()
        fused, rebound = 0, []
        for name, module in pipe.unet.named_modules():
            if not isinstance(module, Attention):
                continue
            if getattr(module, "to_qkv", None) is not None and not module.is_cross_attention:
                parts, target = ("to_q", "to_k", "to_v"), module.to_qkv
            elif getattr(module, "to_kv", None) is not None:
                parts, target = ("to_k", "to_v"), module.to_kv
            else:
                continue
            row = 0
            for part in parts:
                proj = getattr(module, part)
                base = proj.get_base_layer() if hasattr(proj, "get_base_layer") else proj
                rows = base.weight.shape[0]
                base.weight = torch.nn.Parameter(target.weight[row:row + rows], requires_grad=False)
                if base.bias is not None:
                    base.bias = torch.nn.Parameter(target.bias[row:row + rows], requires_grad=False)
                row += rows
                rebound.append(("unet", f"{name}.{part}"))
            fused += 1
        for key in rebound:  # kept originals of the replaced weights: taken again from the views
            state.original.pop(key, None)
            state.merged.pop(key, None)
        state.fused_qkv = True  # restore_base_weights above already made the next apply re-sync every layer
    logger.info("fused QKV projections in %d UNet attention modules", fused)
    return fused


def compile_pipeline(pipe, mode: str | None = DEFAULT_MODE, backend: str = "inductor", vae: bool = True) -> None:
    """Compile the UNet forward (and the VAE decoder) in place, channels_last, one graph per shape.

    In place (`nn.Module.compile`), so module names, peft's layers and the mixer's kept weight
    references are unchanged.  `backend="eager"` or "aot_eager" exercise dynamo alone (CPU tests).
    """
    import torch._dynamo
    import torch._inductor.config

    torch._inductor.config.freezing = False  # frozen weights would make every LoRA change a recompile
    # one specialised graph per (size, batch): the few shapes in use, each its own CUDA graph
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    kwargs = {"backend": backend, "dynamic": False}
    if backend == "inductor" and mode:
        kwargs["mode"] = mode
    if getattr(pipe, "_stylemix_compiled", None):
        return
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet.compile(**kwargs)
    if vae:
        pipe.vae.to(memory_format=torch.channels_last)
        pipe.vae.decoder.compile(**kwargs)
    pipe._stylemix_compiled = dict(kwargs)
    _count_cudagraph_records()
    logger.info("torch.compile on for the UNet%s: %s", " and VAE decoder" if vae else "", kwargs)


def _count_cudagraph_records() -> None:
    """Count CUDA-graph recordings (torch has no public counter): wraps cudagraph trees' `_record` once."""
    try:
        from torch._inductor.cudagraph_trees import CUDAGraphNode
    except ImportError:  # pragma: no cover - a torch without cudagraph trees records nothing
        return
    if getattr(CUDAGraphNode._record, "_stylemix_counted", False):
        return
    original = CUDAGraphNode._record

    def _record(self, *args, **kwargs):
        _cudagraph_records[0] += 1
        return original(self, *args, **kwargs)

    _record._stylemix_counted = True
    CUDAGraphNode._record = _record


def compile_counters() -> dict[str, int]:
    """Graphs dynamo has compiled (recompiles included) and CUDA graphs recorded, so far in this process."""
    from torch._dynamo.utils import counters

    return {"graphs_compiled": int(counters["stats"]["unique_graphs"]),
            "cudagraph_recordings": _cudagraph_records[0],
            "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}


def warm_up(mixer, recipes: list, previewer=None) -> dict[str, float]:
    """Render each recipe once (and its preview), so the shapes in use compile now, not mid-drag."""
    import time

    times = {}
    for recipe in recipes:
        t = time.perf_counter()
        mixer.generate(recipe)
        if previewer is not None:
            previewer.preview(recipe, channel="__warm_up__")
        times[f"{recipe.width}x{recipe.height}"] = round(time.perf_counter() - t, 1)
    logger.info("compiled shapes warmed up in %s s", times)
    return times
