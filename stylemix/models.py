"""Base-model loading: a hub id, a local diffusers folder, or the built-in tiny SD1.5.

The tiny model is the real Stable Diffusion 1.5 architecture (the configs in
`stylemix/configs/sd15/`, copied from the released model) with every width shrunk and
random weights.  Block types, layers per block, the 12 text-encoder layers and all module
names are unchanged, so a LoRA key that works on `tiny` has the same name on the real model.
The tokenizer is the real CLIP BPE tokenizer, rebuilt from the vocabulary file that ships
inside the `open_clip_torch` wheel, so no download is ever needed for `tiny`.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger("stylemix")

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY = "tiny"
CONFIG_DIR = Path(__file__).parent / "configs" / "sd15"
CACHE_DIR = Path(os.environ.get("STYLEMIX_CACHE", Path.home() / ".cache" / "stylemix"))

# Shrunk widths for the tiny model.  Channel counts stay multiples of the 32 GroupNorm
# groups of the real configs; attention keeps 8 heads like SD1.5.
TINY_UNET = {"block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 32}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "projection_dim": 32}
TINY_VAE = {"block_out_channels": [32, 32, 64, 64]}
TINY_SEED = 0


from stylemix.errors import StyleMixError
from stylemix.gpu_queue import PriorityRLock


class ModelLoadError(StyleMixError):
    """The requested base model could not be loaded; the message says what was tried and what to do."""


def _read_config(name: str) -> dict:
    cfg = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}


def sd15_configs() -> dict[str, dict]:
    """The released SD1.5 component configs: unet, text_encoder, vae, scheduler."""
    return {n: _read_config(f"{n}_config") for n in ("unet", "text_encoder", "vae", "scheduler")}


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


# --------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    # The byte <-> unicode table of GPT-2/CLIP BPE (same as open_clip.tokenizer.bytes_to_unicode).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tokenizer_files() -> Path:
    """Write CLIP's vocab.json/merges.txt, rebuilt from open_clip's BPE file, to the cache."""
    import open_clip

    src = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    out = CACHE_DIR / "clip-tokenizer"
    if (out / "vocab.json").exists() and (out / "merges.txt").exists():
        return out
    merges = gzip.open(src).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]  # exactly the slice open_clip and OpenAI CLIP use
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    for name in ("vocab.json", "merges.txt"):
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    return out


@lru_cache(maxsize=1)
def clip_tokenizer():
    """The real CLIP tokenizer of SD1.5 (49408 tokens, 77 positions), built offline."""
    from transformers import CLIPTokenizer

    d = _tokenizer_files()
    return CLIPTokenizer(
        str(d / "vocab.json"), str(d / "merges.txt"),
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=77,
    )


# --------------------------------------------------------------------------- tiny model


def tiny_components(seed: int = TINY_SEED, full_size: bool = False) -> dict:
    """SD1.5 components with random weights: shrunk (default) or at real size (`full_size`).

    Deterministic: the same seed gives the same weights.  `full_size=True` is for
    benchmarks measuring real-scale costs (860M UNet parameters, about 3.4 GB in fp32).
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = sd15_configs()
    unet_cfg, text_cfg, vae_cfg = cfg["unet"], cfg["text_encoder"], cfg["vae"]
    if not full_size:
        unet_cfg = {**unet_cfg, **TINY_UNET}
        text_cfg = {**text_cfg, **TINY_TEXT}
        vae_cfg = {**vae_cfg, **TINY_VAE}
    text_cfg = {k: v for k, v in text_cfg.items() if k != "model_type"}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**vae_cfg)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": clip_tokenizer(),
        "scheduler": PNDMScheduler.from_config(cfg["scheduler"]),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def full_size_meta_unet():
    """The full SD1.5 UNet on the `meta` device (no memory): for comparing module names."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**sd15_configs()["unet"])


def full_size_meta_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {k: v for k, v in sd15_configs()["text_encoder"].items() if k != "model_type"}
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**cfg))


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedModel:
    pipe: object  # diffusers.StableDiffusionPipeline
    model_id: str  # what was asked for: hub id, folder or "tiny"
    device: torch.device
    dtype: torch.dtype
    # Serialises all work on this pipeline (generation, LoRA loading, weight changes) across users;
    # interactive requests are served before waiting background work (stylemix/gpu_queue.py).
    lock: PriorityRLock = field(default_factory=PriorityRLock, compare=False, repr=False)

    @property
    def is_tiny(self) -> bool:
        return self.model_id == TINY

    @property
    def description(self) -> str:
        if self.is_tiny:
            return f"built-in tiny SD1.5 (random weights, offline) on {self.device.type}"
        return f"{self.model_id} on {self.device.type} ({str(self.dtype).replace('torch.', '')})"


_cache: dict[tuple, LoadedModel] = {}
_cache_lock = threading.Lock()


def load_model(model: str | None = None, device: str | None = None, dtype: str | None = None,
               safety_checker: bool = False) -> LoadedModel:
    """Load (once, then cached by model/device/dtype) a StableDiffusionPipeline.

    model: hub id, local diffusers folder, or "tiny"; defaults to $STYLEMIX_MODEL, then SD1.5.
    Raises ModelLoadError with one readable sentence when it cannot be loaded.
    """
    model = model or os.environ.get("STYLEMIX_MODEL") or DEFAULT_MODEL
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    key = (model, str(dev), dt, safety_checker)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _load_uncached(model, dev, dt, safety_checker)
        return _cache[key]


def _load_uncached(model: str, dev: torch.device, dt: torch.dtype, safety_checker: bool) -> LoadedModel:
    from diffusers import StableDiffusionPipeline

    quiet_library_logs()
    if model == TINY:
        logger.warning("Using the built-in TINY model (random weights): images and scores are not real.")
        pipe = StableDiffusionPipeline(**tiny_components(), requires_safety_checker=False)
    else:
        path = Path(model).expanduser()
        looks_local = path.exists() or model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1]
        if looks_local and not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"Cannot load base model {model!r}: no diffusers folder there (model_index.json missing). "
                "Give a hub id, a diffusers folder, or --model tiny to try offline.")
        import diffusers
        from packaging.version import Version

        # diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name still works, with a warning)
        dtype_kw = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
        kwargs = {dtype_kw: dt}
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
    return LoadedModel(pipe=pipe, model_id=model, device=dev, dtype=dt)


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
