"""Single-file SD1.5 checkpoints (`.safetensors` with the original LDM key names) as base models.

A file from Civitai or saved by A1111 -- full or EMA-only, fp16 or fp32, with or without a
baked-in VAE -- is first identified from its safetensors HEADER alone (key names and shapes, no
tensor is read), so a file StyleMix cannot use is refused at once with a message naming what it
is: a pickle (`.ckpt`), SDXL, SD 2.x, an inpainting UNet, or unknown widths.  Then diffusers'
`from_single_file` loads it fully offline: the component configs come from the vendored SD1.5
configs (`stylemix/configs/sd15/`, with the tiny widths where the file has them) written to a
temporary folder, and the tokenizer is the rebuilt CLIP tokenizer, so no Hub call is made.

VAE rule: a checkpoint without `first_stage_model.*` weights needs a VAE from elsewhere:
$STYLEMIX_VAE (a `.safetensors` VAE file or a diffusers VAE folder), else the SD1.5 VAE from the
Hub (or the local Hub cache when offline); if neither is there, a ModelLoadError says so.

EMA rule: a file with both `model.diffusion_model.*` and `model_ema.*` weights runs on the EMA
weights (what the released SD1.5 diffusers model is made of, and better for inference).  An
EMA-only file keeps its weights under `model.diffusion_model.*` (how pruning scripts write it).
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from stylemix.architecture import (CONFIG_DIR, DEFAULT_MODEL, TINY_TEXT, TINY_UNET, TINY_VAE, clip_tokenizer,
                                   dtype_kwargs)
from stylemix.errors import ModelLoadError, StyleMixError
from stylemix.lora.files import check_safetensors_header

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# torch.save / pickle formats: never opened, because unpickling runs whatever code the file holds
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# SD1.5 fp32 with EMA is ~7.7 GB; the limit only stops absurd files, it is not a model limit
MAX_CHECKPOINT_BYTES = 16 * 1024**3
VAE_ENV = "STYLEMIX_VAE"

UNET = "model.diffusion_model."
EMA = "model_ema."
TEXT = "cond_stage_model.transformer.text_model."
VAE = "first_stage_model."

CONVERT_HINT = ("Convert it to .safetensors somewhere it cannot hurt you -- a throwaway sandbox (container or VM "
                "with no access to your files), e.g. torch.load(path, weights_only=True) then "
                "safetensors.torch.save_file -- or download the model's .safetensors release instead.")


def is_single_file(model: str) -> bool:
    """True when `model` names a checkpoint file (by suffix, or an existing file) rather than a hub id/folder."""
    path = Path(model).expanduser()
    return path.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES or path.is_file()


def cache_token(model: str) -> tuple | None:
    """What besides the name makes a loaded single file stale: its size/mtime and $STYLEMIX_VAE."""
    if not is_single_file(model):
        return None
    try:
        st = Path(model).expanduser().stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, os.environ.get(VAE_ENV)


# --------------------------------------------------------------------------- architectures


def _raw_config(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def architecture_configs(arch: str) -> dict[str, dict]:
    """Diffusers component configs (with `_class_name`) of a known architecture: 'sd15' or 'tiny'."""
    unet, text, vae = _raw_config("unet_config"), _raw_config("text_encoder_config"), _raw_config("vae_config")
    if arch == "tiny":
        unet, text, vae = {**unet, **TINY_UNET}, {**text, **TINY_TEXT}, {**vae, **TINY_VAE}
    elif arch != "sd15":
        raise ValueError(f"Unknown architecture {arch!r}")
    return {"unet": unet, "text_encoder": text, "vae": vae, "scheduler": _raw_config("scheduler_config")}


def _signature(cfg: dict[str, dict]) -> dict:
    """The widths a checkpoint header reveals, for matching against a known architecture."""
    t = cfg["text_encoder"]
    return {"unet": list(cfg["unet"]["block_out_channels"]), "context": cfg["unet"]["cross_attention_dim"],
            "text": [t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]],
            "vae": list(cfg["vae"]["block_out_channels"])}


ARCH_NAMES = {"sd15": "SD1.5", "tiny": "StyleMix's built-in tiny SD1.5 widths (random test/demo weights)"}


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    arch: str  # "sd15" or "tiny"
    weights_dtype: str  # of the UNet weights in the file: fp16, fp32, bf16
    has_ema: bool  # both non-EMA and EMA UNet weights: the EMA ones are used
    has_vae: bool  # a baked-in VAE (first_stage_model.*)

    @property
    def summary(self) -> str:
        parts = ["tiny-width SD1.5 single file (random demo weights, not a real model)" if self.arch == "tiny"
                 else "SD1.5 single file", f"{self.weights_dtype} weights"]
        if self.has_ema:
            parts.append("EMA weights")
        parts.append("baked-in VAE" if self.has_vae else "VAE from " + (os.environ.get(VAE_ENV) or DEFAULT_MODEL))
        return ", ".join(parts)


# --------------------------------------------------------------------------- inspection (header only)


def _refuse(path: Path, what: str, role: str = "a base model") -> ModelLoadError:
    return ModelLoadError(f"Cannot use {path.name} as {role}: {what}")


def read_checkpoint_header(path: Path, role: str = "a base model") -> dict:
    """The safetensors header of a checkpoint; pickles are refused by suffix and by their first bytes."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _refuse(path, f"'{path.suffix}' is a pickle checkpoint, and loading a pickle runs any code inside it, "
                            f"so StyleMix never opens one. {CONVERT_HINT}", role)
    if not path.is_file():
        raise ModelLoadError(f"Cannot load base model {str(path)!r}: no such checkpoint file.")
    with open(path, "rb") as f:
        head = f.read(8)
    # A pickle renamed .safetensors: torch.save writes a zip ("PK"), a bare pickle starts with PROTO 0x80.
    if head[:2] == b"PK" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise _refuse(path, f"it is a pickle/PyTorch checkpoint with a .safetensors name, and loading a pickle runs "
                            f"any code inside it, so StyleMix never opens one. {CONVERT_HINT}", role)
    try:
        return check_safetensors_header(path, max_bytes=MAX_CHECKPOINT_BYTES)
    except StyleMixError as e:
        raise _refuse(path, str(e), role) from None


def _shape(header: dict, key: str) -> list[int] | None:
    entry = header.get(key)
    return list(entry["shape"]) if isinstance(entry, dict) and "shape" in entry else None


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """What a single-file checkpoint is, from its header only; ModelLoadError naming it when unusable."""
    path = Path(path).expanduser()
    header = read_checkpoint_header(path)
    keys = [k for k in header if k != "__metadata__"]
    if any(k.startswith("conditioner.") for k in keys):
        second = any(k.startswith("conditioner.embedders.1.") for k in keys)
        raise _refuse(path, "it is an SDXL checkpoint (" + (
            "a second text encoder, conditioner.embedders.1, and 2048-wide cross-attention" if second
            else "an SDXL refiner: SDXL's conditioner.embedders text encoder") +
            "). StyleMix works with Stable Diffusion 1.5 checkpoints.")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        inpaint = " inpainting" if (_shape(header, UNET + "input_blocks.0.0.weight") or [0, 0])[1] == 9 else ""
        raise _refuse(path, f"it is a Stable Diffusion 2.x{inpaint} checkpoint (OpenCLIP text encoder, "
                            "cond_stage_model.model.*, 1024-wide; usually v-prediction). "
                            "StyleMix works with Stable Diffusion 1.5 checkpoints.")
    if any(".lora_down." in k or ".lora_A." in k or k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        raise _refuse(path, "it is a LoRA, not a base model: import it into the LoRA library instead.")
    unet_keys = [k for k in keys if k.startswith(UNET)]
    if not unet_keys:
        hint = ("it holds only EMA UNet weights under model_ema.*; re-save it with them under "
                "model.diffusion_model.* (an 'EMA-only' prune)" if any(k.startswith(EMA) for k in keys) else
                "it is not an SD1.5 checkpoint in the original (LDM) layout: no model.diffusion_model.* UNet "
                f"weights (first key: {keys[0] if keys else 'none'!r})")
        raise _refuse(path, hint + ".")
    conv_in = _shape(header, UNET + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise _refuse(path, "its UNet has no input_blocks.0.0.weight, so it is not an SD1.5 UNet.")
    if conv_in[1] != 4:
        what = {9: "an inpainting checkpoint (its UNet takes 9 input channels: latents, mask, masked image)",
                8: "an instruct-pix2pix style checkpoint (its UNet takes 8 input channels)"}.get(
            conv_in[1], f"not a text-to-image SD1.5 UNet (it takes {conv_in[1]} input channels, not 4)")
        raise _refuse(path, f"it is {what}. StyleMix works with text-to-image SD1.5 checkpoints.")
    contexts = {_shape(header, k)[1] for k in unet_keys if k.endswith("attn2.to_k.weight")}
    if contexts & {1024, 2048}:
        raise _refuse(path, f"its UNet cross-attention is {max(contexts)} wide (SD1.5 is 768): it is an "
                            f"{'SDXL' if 2048 in contexts else 'SD 2.x'} model. StyleMix works with SD1.5 checkpoints.")
    if not any(k.startswith(TEXT) for k in keys):
        raise _refuse(path, "it has no SD1.5 text encoder (cond_stage_model.transformer.text_model.* weights); "
                            "a UNet-only file cannot be used as a base model.")

    found = _widths(header, keys)
    has_vae = found["vae"] is not None
    arch = None
    for name in ("sd15", "tiny"):
        sig = _signature(architecture_configs(name))
        if all(found[k] == sig[k] for k in ("unet", "context", "text")) and (not has_vae or found["vae"] == sig["vae"]):
            arch = name
    if arch is None:
        known = "; ".join(f"{ARCH_NAMES[n].split(' (')[0]}: {_describe(_signature(architecture_configs(n)))}"
                          for n in ("sd15", "tiny"))
        raise _refuse(path, f"its widths ({_describe(found)}) match no known SD1.5 architecture ({known}).")
    # diffusers leaves a weight the file lacks on the `meta` device and then fails to move it, unreadably:
    # count each component's weights here instead (LDM and diffusers layouts map one to one)
    for comp, prefix, n_have in (("UNet", UNET, len(unet_keys)),
                                 ("text encoder", TEXT, sum(k.startswith(TEXT) and not k.endswith("position_ids")
                                                            for k in keys)),
                                 ("VAE", VAE, sum(k.startswith(VAE) for k in keys) if has_vae else None)):
        n_want = expected_weight_counts(arch)[comp]
        if n_have is not None and n_have < n_want:
            raise _refuse(path, f"it is incomplete: its {comp} ({prefix}*) has {n_have} weights where "
                                f"{ARCH_NAMES[arch].split(' (')[0]} has {n_want}.")
    has_both = sum(k.startswith(EMA) for k in keys) > 100  # diffusers' own threshold for "has EMA weights"
    dtypes = sorted({header[k].get("dtype", "?") for k in unet_keys})
    names = {"F16": "fp16", "F32": "fp32", "BF16": "bf16"}
    return CheckpointInfo(path=path, arch=arch, weights_dtype="/".join(names.get(d, d) for d in dtypes),
                          has_ema=has_both, has_vae=has_vae)


@lru_cache(maxsize=None)
def expected_weight_counts(arch: str) -> dict[str, int]:
    """Tensors per component of an architecture, counted on the `meta` device (no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "model_type")}  # noqa: E731
    cfgs = architecture_configs(arch)
    with torch.device("meta"):
        models = {"UNet": UNet2DConditionModel(**strip(cfgs["unet"])),
                  "text encoder": CLIPTextModel(CLIPTextConfig(**strip(cfgs["text_encoder"]))),
                  "VAE": AutoencoderKL(**strip(cfgs["vae"]))}
    return {name: sum(not k.endswith("position_ids") for k in m.state_dict()) for name, m in models.items()}


def _widths(header: dict, keys: list[str]) -> dict:
    def first_dim(key: str) -> int | None:
        s = _shape(header, key)
        return s[0] if s else None

    # out_layers.3 is a level's second conv: its output width is that level's block_out_channels
    unet = [first_dim(f"{UNET}input_blocks.{i}.0.out_layers.3.weight") for i in (1, 4, 7, 10)]
    contexts = sorted({_shape(header, k)[1] for k in keys if k.startswith(UNET) and k.endswith("attn2.to_k.weight")})
    tok = _shape(header, TEXT + "embeddings.token_embedding.weight")
    layers = {int(m.group(1)) for k in keys if (m := re.match(re.escape(TEXT) + r"encoder\.layers\.(\d+)\.", k))}
    text = [tok[1] if tok else None, first_dim(TEXT + "encoder.layers.0.mlp.fc1.weight"), len(layers)]
    vae = None
    if any(k.startswith(VAE) for k in keys):
        vae = [first_dim(f"{VAE}encoder.down.{i}.block.1.conv2.weight") for i in range(4)]
    return {"unet": unet, "context": contexts[0] if len(contexts) == 1 else contexts, "text": text, "vae": vae}


def _describe(sig: dict) -> str:
    text = sig["text"]
    out = (f"UNet {sig['unet']}, cross-attention {sig['context']}, "
           f"text encoder {text[0]} wide/{text[1]} MLP/{text[2]} layers")
    return out + (f", VAE {sig['vae']}" if sig.get("vae") is not None else "")


# --------------------------------------------------------------------------- loading


def _write_config_folder(folder: Path, arch: str) -> None:
    """A diffusers model folder without weights: what `from_single_file(config=...)` reads offline."""
    cfgs = architecture_configs(arch)
    (folder / "model_index.json").write_text((CONFIG_DIR / "model_index.json").read_text())
    for name in ("unet", "text_encoder", "vae"):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(cfgs[name]))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfgs["scheduler"]))


def _external_vae(info: CheckpointInfo, config_folder: Path, dt: torch.dtype):
    """The VAE for a checkpoint without one: $STYLEMIX_VAE, else the SD1.5 VAE from the Hub (cache)."""
    from diffusers import AutoencoderKL

    source = os.environ.get(VAE_ENV)
    what = f"{info.path.name} has no baked-in VAE (no first_stage_model.* weights)"
    try:
        if source:
            p = Path(source).expanduser()
            if p.is_file():
                header = read_checkpoint_header(p, role=f"the VAE ({VAE_ENV})")  # pickles refused here too
                if not any(k.startswith(("encoder.", VAE + "encoder.", "decoder.")) for k in header):
                    raise ModelLoadError(f"{VAE_ENV}={source} is not a VAE file (no encoder./decoder. weights).")
                vae = AutoencoderKL.from_single_file(str(p), config=str(config_folder), subfolder="vae",
                                                     local_files_only=True, **dtype_kwargs(dt))
            elif (p / "config.json").is_file() or (p / "vae" / "config.json").is_file():
                sub = {} if (p / "config.json").is_file() else {"subfolder": "vae"}
                vae = AutoencoderKL.from_pretrained(str(p), local_files_only=True, **sub, **dtype_kwargs(dt))
            else:
                raise ModelLoadError(f"{what}, and {VAE_ENV}={source} is neither a VAE .safetensors file nor a "
                                     "diffusers VAE folder.")
        else:
            vae = AutoencoderKL.from_pretrained(DEFAULT_MODEL, subfolder="vae", **dtype_kwargs(dt))
    except ModelLoadError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(
            f"{what}, and the VAE from {source or DEFAULT_MODEL} could not be loaded ({type(e).__name__}: "
            f"{first[:160]}). Set {VAE_ENV} to a VAE .safetensors file or diffusers VAE folder "
            "(e.g. vae-ft-mse-840000-ema-pruned.safetensors), or go online once so the SD1.5 VAE is cached.") from e
    want = architecture_configs(info.arch)["vae"]["block_out_channels"]
    if list(vae.config.block_out_channels) != list(want):
        raise ModelLoadError(f"{what}, and the VAE from {source or DEFAULT_MODEL} has widths "
                             f"{list(vae.config.block_out_channels)}, not the {list(want)} this checkpoint needs.")
    return vae


def _safety_checker_parts(dt: torch.dtype) -> dict:
    """A single file has no safety checker: the released SD1.5 one, from the Hub (cache)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    try:
        return {"safety_checker": StableDiffusionSafetyChecker.from_pretrained(
                    DEFAULT_MODEL, subfolder="safety_checker", **dtype_kwargs(dt)),
                "feature_extractor": CLIPImageProcessor.from_pretrained(DEFAULT_MODEL, subfolder="feature_extractor")}
    except Exception as e:
        raise ModelLoadError(f"The safety checker (from {DEFAULT_MODEL}) could not be loaded ({type(e).__name__}); "
                             "go online once, or run without --safety-checker.") from e


def load_single_file(model: str, dt: torch.dtype, safety_checker: bool = False):
    """(StableDiffusionPipeline in `dt` on cpu, CheckpointInfo) for a single-file SD1.5 checkpoint, offline."""
    from diffusers import StableDiffusionPipeline

    info = inspect_checkpoint(model)  # every refusal happens here, before a byte of weights is read
    with tempfile.TemporaryDirectory(prefix="stylemix-sd15-config-") as tmp:
        folder = Path(tmp)
        _write_config_folder(folder, info.arch)
        parts: dict = {"tokenizer": clip_tokenizer(), "safety_checker": None, "feature_extractor": None}
        if safety_checker:
            parts.update(_safety_checker_parts(dt))
        if not info.has_vae:
            parts["vae"] = _external_vae(info, folder, dt)
        from diffusers.utils import logging as diffusers_logging

        bar_was_on = diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.disable_progress_bar()  # its per-component bar is noise in the CLI's one-line output
        try:
            # No dtype here: diffusers would cast right away, and a weight the file lacks (left on the
            # `meta` device) would fail that cast with an unreadable error; the check below names it.
            pipe = StableDiffusionPipeline.from_single_file(
                str(info.path), config=str(folder), local_files_only=True, extract_ema=info.has_ema,
                requires_safety_checker=safety_checker, **parts)
        except Exception as e:  # a corrupt or odd file: one readable line, the cause kept for logs
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if "meta tensor" in first:
                first = "some weights are missing from the file"
            raise ModelLoadError(f"Cannot load checkpoint {info.path.name} ({type(e).__name__}: {first[:200]}).") from e
        finally:
            if bar_was_on:
                diffusers_logging.enable_progress_bar()
    # diffusers leaves weights the file lacks on the `meta` device instead of failing: fail here, by name
    for comp in ("unet", "text_encoder", "vae"):
        missing = [n for n, p in getattr(pipe, comp).named_parameters() if p.device.type == "meta"]
        if missing:
            raise ModelLoadError(f"Cannot load checkpoint {info.path.name}: it lacks {len(missing)} {comp} weights "
                                 f"(first: {missing[0]}), so the file is incomplete or not SD1.5.")
    pipe.to(dtype=dt)  # fp16 and fp32 files alike run in the dtype picked for the device
    return pipe, info
