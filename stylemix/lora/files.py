"""LoRA weight files: safe reading, format detection, saving, kohya/A1111 conversion.

Canonical on-disk form (what the trainer writes and the library stores): one
`pytorch_lora_weights.safetensors` in diffusers/peft layout, keys
`unet.<module>.lora_A.weight` / `.lora_B.weight` and `text_encoder.text_model.<module>...`
(the released SD1.5 module names, which every tool expects), with peft's LoraConfig of each
component in the `lora_adapter_metadata` header field, so plain diffusers
`load_lora_weights` restores the trained alpha.  Only safetensors is ever read: a pickle file
is refused by its header before any byte of it is deserialised.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import torch

from stylemix.errors import StyleMixError
from stylemix.lora.names import canonical_text_encoder_key

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
MAX_LORA_BYTES = 2 * 1024**3  # a rank-128 SD1.5 LoRA is ~150 MB; 2 GB is an upload limit, not a model limit
MAX_HEADER_BYTES = 100 * 1024**2

DORA_REFUSAL = ("This is a DoRA (weight-decomposed LoRA). Its update rescales every output channel of W + ΔW "
                "by a learned magnitude, so it is not a weighted sum W + w·ΔW and cannot be mixed by weight "
                "with other LoRAs exactly; StyleMix refuses it rather than merge it wrongly. Use a plain LoRA, "
                "LoCon, LoHa or LoKr version of the style.")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


# --------------------------------------------------------------------------- reading


def check_safetensors_header(path: Path, max_bytes: int = MAX_LORA_BYTES) -> dict:
    """Parse and return the JSON header of a safetensors file, refusing anything else (or over `max_bytes`).

    A pickle (torch.save) file starts with b'\\x80' or a zip signature: it fails here with a
    clear message before any loader could execute it.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise StyleMixError(f"{path.name}: {size / 1e9:.1f} GB is larger than the {max_bytes / 1e9:.0f} GB limit.")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise StyleMixError(f"{path.name}: not a safetensors file (only {size} bytes).")
        (n,) = struct.unpack("<Q", head)
        raw = f.read(n) if 1 < n <= MAX_HEADER_BYTES and 8 + n <= size else b""
    if not raw.startswith(b"{"):
        # torch.save writes a zip ("PK"); a bare pickle starts with PROTO (0x80) and its version
        if head[:2] == b"PK" or (head[0] == 0x80 and 2 <= head[1] <= 5):
            raise StyleMixError(f"{path.name}: this is a pickle/PyTorch checkpoint, not safetensors. "
                                "StyleMix only loads safetensors files (pickle can run code).")
        raise StyleMixError(f"{path.name}: not a valid safetensors file (bad header).")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StyleMixError(f"{path.name}: not a valid safetensors file (header is not JSON).") from None
    if not isinstance(header, dict):
        raise StyleMixError(f"{path.name}: not a valid safetensors file (header is not an object).")
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise StyleMixError(f"{path.name}: the file is truncated ({size} bytes, header promises {8 + n + end}).")
    return header


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a LoRA safetensors file (state dict, header metadata), after checking it is one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StyleMixError(f"LoRA file not found: {path}")
    check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise StyleMixError(f"{path.name}: could not read it as safetensors ({e}).") from None
    if not state:
        raise StyleMixError(f"{path.name}: the file holds no tensors.")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise StyleMixError(f"{path.name}: {len(bad)} tensors contain NaN or inf (first: {bad[0]}); refusing to load.")
    return state, metadata


# --------------------------------------------------------------------------- saving


def peft_state_dict(model: torch.nn.Module, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
    """The adapter's weights as `prefix.<module>.lora_A.weight` tensors (fp32, contiguous, on cpu)."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    out = {}
    for k, v in sd.items():
        key = f"{prefix}.{k}"
        if prefix == "text_encoder":
            key = canonical_text_encoder_key(key)
        out[key] = v.detach().to("cpu", torch.float32).contiguous()
    return out


def lora_config_metadata(model: torch.nn.Module, adapter_name: str) -> dict:
    cfg = model.peft_config[adapter_name].to_dict()
    for k, v in list(cfg.items()):
        if isinstance(v, set):
            cfg[k] = sorted(v)
    return cfg


def adapter_state(unet: torch.nn.Module | None, text_encoder: torch.nn.Module | None,
                  adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapter `adapter_name` of unet/text_encoder as (state dict, safetensors header), in the library's
    canonical layout.  Refuses non-finite weights."""
    state: dict[str, torch.Tensor] = {}
    metadata: dict[str, dict] = {}
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is None or adapter_name not in getattr(model, "peft_config", {}):
            continue
        state.update(peft_state_dict(model, adapter_name, prefix))
        for k, v in lora_config_metadata(model, adapter_name).items():
            metadata[f"{prefix}.{k}"] = v
    if not state:
        raise StyleMixError(f"No LoRA adapter named {adapter_name!r} to save.")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise StyleMixError(f"Refusing to save LoRA weights with NaN/inf ({len(bad)} tensors, first {bad[0]}).")
    return state, {"lora_adapter_metadata": json.dumps(metadata, sort_keys=True), "format": "pt"}


def save_lora_weights(path: str | os.PathLike, unet: torch.nn.Module | None, text_encoder: torch.nn.Module | None,
                      adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Write the adapter `adapter_name` of unet/text_encoder to `path` (a .safetensors file), atomically.

    Refuses to write non-finite weights.  Returns the saved state dict.
    """
    state, header = adapter_state(unet, text_encoder, adapter_name)
    write_safetensors(Path(path), state, header)
    return state


def write_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- structure


def lora_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft-layout state dict -> {module key (with component prefix): (A [r, in], B [out, r])}."""
    out = {}
    for k, a in state.items():
        if k.endswith(".lora_A.weight"):
            mod = k[: -len(".lora_A.weight")]
            b = state.get(mod + ".lora_B.weight")
            if b is None:
                raise StyleMixError(f"LoRA key {k!r} has no matching lora_B weight.")
            out[mod] = (a, b)
    return out


def adapter_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """{'unet': {...}, 'text_encoder': {...}}: peft's LoraConfig fields per component, from the header."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        md = json.loads(raw)
    except json.JSONDecodeError:
        raise StyleMixError("LoRA file has an unreadable lora_adapter_metadata header.") from None
    if not isinstance(md, dict):
        raise StyleMixError("LoRA file has an unreadable lora_adapter_metadata header.")
    out: dict[str, dict] = {}
    for k, v in md.items():
        comp, _, field = k.partition(".")
        if comp in ("unet", "text_encoder") and field:
            out.setdefault(comp, {})[field] = v
    return out


def _pattern_value(patterns, key: str, default):
    # peft's own rule (peft.utils.other.get_pattern_key): a pattern matches the end of the module path
    if isinstance(patterns, dict):
        for pattern, value in patterns.items():
            if isinstance(pattern, str) and re.match(rf"(.*\.)?({pattern})$", key):
                return value
    return default


def module_scales(metadata: dict[str, str], modules) -> dict[str, float]:
    """Each canonical module's peft scale (lora_alpha / r, or / sqrt(r) with rsLoRA), as diffusers loads it."""
    configs = adapter_configs(metadata)
    out = {}
    for key in modules:
        comp, _, path = key.partition(".")
        cfg = configs.get(comp, {})
        if comp == "text_encoder" and path.startswith("text_model."):
            path = path[len("text_model."):]  # peft patterns may be written either way
        r = _pattern_value(cfg.get("rank_pattern"), path, cfg.get("r"))
        alpha = _pattern_value(cfg.get("alpha_pattern"), path, cfg.get("lora_alpha"))
        if not (is_finite_number(r) and is_finite_number(alpha)) or r <= 0:
            out[key] = 1.0  # no config: diffusers loads alpha = rank
        else:
            out[key] = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else float(r))
    return out


def adapter_alpha(metadata: dict[str, str]) -> float | None:
    """The one lora_alpha of a uniformly configured file (a trained LoRA's alpha), else None."""
    cfgs = adapter_configs(metadata)
    alphas = {c.get("lora_alpha") for c in cfgs.values() if not c.get("alpha_pattern")}
    return float(alphas.pop()) if len(alphas) == 1 and is_finite_number(next(iter(alphas))) else None


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
