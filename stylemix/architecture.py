"""The Stable Diffusion 1.5 architecture: released configs, the tiny model's widths, the CLIP tokenizer.

The tiny model is the real SD1.5 architecture (the configs in `stylemix/configs/sd15/`, copied
from the released model) with every width shrunk and random weights.  Block types, layers per
block, the 12 text-encoder layers and all module names are unchanged, so a LoRA key that works on
`tiny` has the same name on the real model.  The tokenizer is the real CLIP BPE tokenizer,
rebuilt from the vocabulary file that ships inside the `open_clip_torch` wheel, so no download
is ever needed for `tiny`.

Nothing here loads a model from disk or the Hub (that is `models.py` and `checkpoints.py`).
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CONFIG_DIR = Path(__file__).parent / "configs" / "sd15"
CACHE_DIR = Path(os.environ.get("STYLEMIX_CACHE", Path.home() / ".cache" / "stylemix"))

# Shrunk widths for the tiny model.  Channel counts stay multiples of the 32 GroupNorm
# groups of the real configs; attention keeps 8 heads like SD1.5.
TINY_UNET = {"block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 32}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "projection_dim": 32}
TINY_VAE = {"block_out_channels": [32, 32, 64, 64]}
TINY_SEED = 0


def _read_config(name: str) -> dict:
    cfg = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}


def sd15_configs() -> dict[str, dict]:
    """The released SD1.5 component configs: unet, text_encoder, vae, scheduler."""
    return {n: _read_config(f"{n}_config") for n in ("unet", "text_encoder", "vae", "scheduler")}


def dtype_kwargs(dt: torch.dtype) -> dict:
    """The dtype keyword of diffusers loaders: 0.42 renamed `torch_dtype` to `dtype` (the old one warns)."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype": dt}


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
