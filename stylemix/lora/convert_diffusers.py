"""diffusers / peft layers: `unet.<module>.lora_A.weight` and `.lora_B.weight`, and older diffusers names.

    unet.<module>.lora_A.weight [r, in(, kh, kw)], .lora_B.weight [out, r(, 1, 1)]
    text_encoder.(text_model.)<module>.lora_A.weight …
    header `lora_adapter_metadata`: peft's LoraConfig per component (r, lora_alpha, rank_pattern,
    alpha_pattern, use_rslora); scale = lora_alpha / r per layer, as peft applies it

Older diffusers files (`…to_q_lora.down.weight` attention processors, `…lora_linear_layer.down.
weight`, `….lora.down.weight`) are first renamed by diffusers' own `lora_state_dict`.
"""

from __future__ import annotations

import torch

from stylemix.errors import StyleMixError
from stylemix.lora import files
from stylemix.lora.names import Target, canonical_text_encoder_key
from stylemix.lora.update import LayerUpdate, low_rank_update

KIND = "LoRA"
OLD_MARKERS = (".lora.down.", ".lora.up.", ".lora_linear_layer.", "_lora.down.", "_lora.up.")


def is_old_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(m in k for k in state for m in OLD_MARKERS)


def to_peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older diffusers layouts -> peft names, with diffusers' own converter."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft

    try:
        converted, alphas = StableDiffusionPipeline.lora_state_dict(dict(state), unet_config=None)
    except Exception as e:
        raise StyleMixError(f"Could not read this older diffusers LoRA layout ({e}).") from None
    if alphas:
        raise StyleMixError("This older diffusers LoRA carries network alphas, which StyleMix does not read; "
                            "convert it with a current diffusers `save_lora_weights` first.")
    out: dict[str, torch.Tensor] = {}
    for prefix in ("unet", "text_encoder"):
        part = {k[len(prefix) + 1:]: v for k, v in converted.items() if k.startswith(prefix + ".")}
        if part:
            part = convert_unet_state_dict_to_peft(part) if prefix == "unet" else convert_state_dict_to_peft(part)
            out.update({f"{prefix}.{k}": v for k, v in part.items()})
    return out


def layers(state: dict[str, torch.Tensor], metadata: dict[str, str], targets: dict[str, Target]) -> list[LayerUpdate]:
    if is_old_layout(state):
        state = to_peft_names(state)
    state = {canonical_text_encoder_key(k): v for k, v in state.items()}
    if any("lora_magnitude_vector" in k for k in state):
        raise StyleMixError(files.DORA_REFUSAL)
    extra = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if extra:
        raise StyleMixError(f"Unrecognised key {extra[0]!r} in a diffusers/peft LoRA (only lora_A/lora_B weights "
                            "are supported; lora biases and other adapters are not).")
    modules = files.lora_modules(state)
    orphans = [k for k in state if k.endswith(".lora_B.weight") and k[: -len(".lora_B.weight")] not in modules]
    if orphans:
        raise StyleMixError(f"LoRA key {orphans[0]!r} has no matching lora_A weight.")
    scales = files.module_scales(metadata, modules)
    out = []
    for key, (a, b) in modules.items():
        if key not in targets:
            raise StyleMixError(f"LoRA layer {key!r} does not exist in the SD1.5 UNet or text encoder.")
        out.append(low_rank_update(key, targets[key], b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1),
                                   scales[key], a.shape[0], KIND))
    return out
