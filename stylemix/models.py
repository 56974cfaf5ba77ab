"""Base-model loading: a hub id, a local diffusers folder, a single-file checkpoint, or the built-in tiny SD1.5.

Single-file (`.safetensors`, original LDM layout) checkpoints are identified and loaded by
`stylemix/checkpoints.py`.

The architecture itself (configs, the tiny model's widths, the rebuilt CLIP tokenizer, building
components with random weights) is `stylemix/architecture.py`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger("stylemix")

TINY = "tiny"

# The architecture's names, re-exported: `stylemix.models` is where callers look for them.
from stylemix.architecture import (  # noqa: F401
    CACHE_DIR, CONFIG_DIR, DEFAULT_MODEL, TINY_SEED, TINY_TEXT, TINY_UNET, TINY_VAE, clip_tokenizer, dtype_kwargs,
    full_size_meta_text_encoder, full_size_meta_unet, sd15_configs, tiny_components)
from stylemix.errors import ModelLoadError, StyleMixError  # noqa: F401
from stylemix.gpu_queue import ModelThread, PriorityRLock


# --------------------------------------------------------------------------- device, dtype


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` if given, else cuda, then Apple mps, then cpu."""
    if requested and requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """fp16 on cuda (bf16 where fp16 is not wanted is an override), fp16 on mps, fp32 on cpu.

    fp16 is the inference default on CUDA because SD1.5 was released in fp16 and every
    consumer GPU runs it; training picks bf16 where supported (see trainers/lora.py).
    """
    if requested and requested != "auto":
        if requested not in _DTYPES:
            raise ValueError(f"Unknown dtype {requested!r}; choose one of auto, fp32, fp16, bf16.")
        return _DTYPES[requested]
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.float32


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedModel:
    pipe: object  # diffusers.StableDiffusionPipeline
    model_id: str  # what was asked for: hub id, folder, checkpoint file or "tiny"
    device: torch.device
    dtype: torch.dtype
    # For a single-file checkpoint: what the file is (checkpoints.CheckpointInfo.summary); else "".
    source: str = field(default="", compare=False)
    # "tiny" when the weights have the tiny widths (the built-in model, or a file saved from it)
    arch: str = field(default="sd15", compare=False)
    # Serialises all work on this pipeline (generation, LoRA loading, weight changes) across users;
    # interactive requests are served before waiting background work (stylemix/gpu_queue.py).
    lock: PriorityRLock = field(default_factory=PriorityRLock, compare=False, repr=False)
    # Runs every denoising loop and decode of a compiled pipeline on one thread, whoever holds the
    # lock: torch records CUDA graphs per thread (stylemix/gpu_queue.py).
    model_thread: ModelThread = field(default_factory=ModelThread, compare=False, repr=False)

    @property
    def is_tiny(self) -> bool:
        """Random demo weights: the built-in model, or a single file with its widths (never a real model)."""
        return self.model_id == TINY or self.arch == TINY

    @property
    def description(self) -> str:
        if self.model_id == TINY:
            return f"built-in tiny SD1.5 (random weights, offline) on {self.device.type}"
        what = f"{self.model_id} ({self.source})" if self.source else self.model_id
        return f"{what} on {self.device.type} ({str(self.dtype).replace('torch.', '')})"


_cache: dict[tuple, LoadedModel] = {}
_cache_lock = threading.Lock()


def load_model(model: str | None = None, device: str | None = None, dtype: str | None = None,
               safety_checker: bool = False, replica: int = 0) -> LoadedModel:
    """Load (once, then cached by model/device/dtype) a StableDiffusionPipeline.

    model: hub id, local diffusers folder, single-file SD1.5 checkpoint (.safetensors), or "tiny";
    defaults to $STYLEMIX_MODEL, then SD1.5.
    replica: another copy of the same model on the same device (STYLEMIX_DEVICES=cpu,cpu runs two
    pipelines on one device; each needs its own weights, since a mix is written into them).
    Raises ModelLoadError with one readable sentence when it cannot be loaded.
    """
    model = model or os.environ.get("STYLEMIX_MODEL") or DEFAULT_MODEL
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    from stylemix.checkpoints import cache_token

    # a checkpoint file replaced on disk (or another $STYLEMIX_VAE) is a different model
    key = (model, str(dev), dt, safety_checker, cache_token(model)) + ((replica,) if replica else ())
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _load_uncached(model, dev, dt, safety_checker)
        return _cache[key]


def _load_uncached(model: str, dev: torch.device, dt: torch.dtype, safety_checker: bool) -> LoadedModel:
    from diffusers import StableDiffusionPipeline

    from stylemix import checkpoints

    quiet_library_logs()
    source, arch = "", "sd15"
    if model == TINY:
        logger.warning("Using the built-in TINY model (random weights): images and scores are not real.")
        pipe = StableDiffusionPipeline(**tiny_components(), requires_safety_checker=False)
    elif checkpoints.is_single_file(model):
        pipe, info = checkpoints.load_single_file(model, dt, safety_checker)
        source, arch = info.summary, info.arch
        if arch == TINY:
            logger.warning("%s has the TINY model's widths (random demo weights): images and scores are not real.",
                           info.path.name)
    else:
        path = Path(model).expanduser()
        looks_local = path.exists() or model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1]
        if looks_local and not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"Cannot load base model {model!r}: no diffusers folder there (model_index.json missing). "
                "Give a hub id, a diffusers folder, an SD1.5 .safetensors checkpoint, or --model tiny to try offline.")
        kwargs = dtype_kwargs(dt)
        if not safety_checker:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(str(path) if looks_local else model, **kwargs)
        except Exception as e:  # offline, gated, wrong files: one readable line, cause kept for logs
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(
                f"Cannot load base model {model!r} ({type(e).__name__}: {first[:200]}). "
                "Check the name and your connection, or use --model tiny to try offline.") from e
    pipe.to(dev)
    if model == TINY and dt != torch.float32:  # loaded models already come in `dt` via torch_dtype
        pipe.to(dtype=dt)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, model_id=model, device=dev, dtype=dt, source=source, arch=arch)


def clear_model_cache() -> None:
    with _cache_lock:
        _cache.clear()


def tiny_pipeline(seed: int = TINY_SEED):
    """A fresh, uncached tiny StableDiffusionPipeline on cpu (tests, examples, benchmarks)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(seed), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quiet_library_logs() -> None:
    """transformers 5 prints a load report for every adapter load; keep the console readable."""
    import diffusers
    import transformers

    import warnings

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    # peft warns on every second adapter; several resident adapters is exactly what the mixer wants
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
