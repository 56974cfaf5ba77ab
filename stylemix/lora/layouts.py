"""Which layout a LoRA file is in, which model it was made for, and the converter for each layer.

Two families of key names exist for SD1.5:
- kohya-style `lora_unet_<module>.<suffix>` / `lora_te_<module>.<suffix>` (kohya sd-scripts, LyCORIS,
  A1111, Civitai): the suffixes tell the layer type, one converter module per type below;
- diffusers/peft `unet.<module>.lora_A.weight` (and older diffusers names): convert_diffusers.py.

A new kohya-style layer type is one new `convert_<type>.py` with SUFFIXES, KIND and `convert()`,
added to CONVERTERS.
"""

from __future__ import annotations

import re

import torch

from stylemix.errors import StyleMixError
from stylemix.lora import convert_diffusers, convert_kohya, convert_loha, convert_lokr, files
from stylemix.lora.names import Target, kohya_names, resolve_kohya
from stylemix.lora.update import LayerUpdate

# checked in order: the first whose marker suffix a layer has converts it
CONVERTERS = [(convert_loha, "hada_w1_a"), (convert_loha, "hada_w1_b"), (convert_lokr, "lokr_w1"),
              (convert_lokr, "lokr_w1_a"), (convert_lokr, "lokr_w2"), (convert_lokr, "lokr_w2_a"),
              (convert_kohya, "lora_down.weight"), (convert_kohya, "lora_up.weight")]

# layer types other tools write that are not a weighted sum of low-rank updates StyleMix can mix
UNSUPPORTED = {"dora_scale": files.DORA_REFUSAL,
               "oft_blocks": "OFT/BOFT layers (an orthogonal rotation of W, not an additive update)",
               "oft_diag": "OFT/BOFT layers (an orthogonal rotation of W, not an additive update)",
               "on_input": "(IA)³ layers (a learned rescaling, not an additive update)",
               "diff": "LyCORIS 'full' (dense diff) layers",
               "diff_b": "LyCORIS 'full' (dense diff) layers",
               "w_norm": "LyCORIS norm layers", "b_norm": "LyCORIS norm layers",
               "a1.weight": "GLoRA layers", "lora_up.bias": "LoRA biases"}

# Only SDXL has these.  `lora_te1_` alone is no tell: SDXL's first text encoder is SD1.5's CLIP-L, and
# diffusers' kohya conversion writes SD1.5 files with it; SDXL UNet layers are told by name or width.
SDXL_PREFIXES = ("lora_te2_", "text_encoder_2.", "lora_unet_label_emb", "unet.add_embedding")


def layout(state: dict[str, torch.Tensor]) -> str:
    """'kohya' (lora_unet_/lora_te_ keys), 'diffusers' (unet./text_encoder.), or raise naming the problem."""
    keys = list(state)
    sdxl = [k for k in keys if k.startswith(SDXL_PREFIXES) or "add_embedding" in k or "label_emb" in k]
    sd1 = [k for k in keys if k.startswith("lora_te_")]
    te1 = [k for k in keys if k.startswith("lora_te1_")]
    if sd1 and (sdxl or te1):
        raise StyleMixError(f"This file mixes SDXL keys ({(sdxl or te1)[0]!r}) with SD1.5 keys ({sd1[0]!r}); "
                            "it is not a LoRA any tool could load. Refusing it.")
    if sdxl:
        raise StyleMixError(f"This LoRA is for SDXL (key {sdxl[0]!r}: a second text encoder or SDXL embeddings); "
                            "StyleMix works with Stable Diffusion 1.5 LoRAs.")
    if all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in keys):
        return "kohya"
    if all(k.startswith(("unet.", "text_encoder.")) for k in keys):
        return "diffusers"
    unknown = next((k for k in keys if not k.startswith(("lora_unet_", "lora_te_", "unet.", "text_encoder."))), keys[0])
    raise StyleMixError(f"Unrecognised LoRA layout (key {unknown!r}): expected kohya/LyCORIS/A1111 keys "
                        "('lora_unet_…lora_down.weight', '…hada_w1_a', '…lokr_w1') or diffusers/peft keys "
                        "('unet.…lora_A.weight').")


def group_kohya(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{'lora_unet_…': {'lora_down.weight': t, 'alpha': t, …}} (kohya module names hold no '.')."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        module, dot, suffix = k.partition(".")
        if not dot:
            raise StyleMixError(f"LoRA key {k!r} has no layer suffix (like '.lora_down.weight').")
        groups.setdefault(module, {})[suffix] = v
    return groups


def kohya_layers(state: dict[str, torch.Tensor], targets: dict[str, Target]) -> list[LayerUpdate]:
    out, seen, table = [], {}, kohya_names(targets)
    for module, tensors in group_kohya(state).items():
        bad = next((s for s in tensors if s in UNSUPPORTED), None)
        if bad == "dora_scale":
            raise StyleMixError(files.DORA_REFUSAL)
        if bad:
            raise StyleMixError(f"Layer {module!r} is one of the {UNSUPPORTED[bad]}, which StyleMix cannot mix "
                                "by weight; only LoRA, LoCon, LoHa and LoKr layers are supported.")
        converter = next((c for c, marker in CONVERTERS if marker in tensors), None)
        if converter is None:
            raise StyleMixError(f"Layer {module!r} has only {sorted(tensors)}: no lora_down/lora_up, "
                                "hada_w*_a/_b or lokr_w* weights (truncated file, or an unknown layer type).")
        unknown = sorted(set(tensors) - converter.SUFFIXES)
        if unknown:
            raise StyleMixError(f"Layer {module!r} has keys {unknown} that a {converter.KIND} layer does not have.")
        key = _resolve(module, table)
        if key in seen:
            raise StyleMixError(f"Layers {seen[key]!r} and {module!r} both change {key!r}.")
        seen[key] = module
        out.append(converter.convert(key, targets[key], tensors))
    return out


def _resolve(module: str, table: dict[str, str]) -> str:
    try:
        return resolve_kohya(module, table)
    except StyleMixError:
        # SDXL's LDM names: input blocks only go to 8 and its attentions hold up to 10 transformer blocks
        if re.search(r"transformer_blocks_[1-9]", module) or "label_emb" in module:
            raise StyleMixError(f"This LoRA is for SDXL (layer {module!r} exists only in the SDXL UNet); "
                                "StyleMix works with Stable Diffusion 1.5 LoRAs.") from None
        raise


def layers(state: dict[str, torch.Tensor], metadata: dict[str, str], targets: dict[str, Target]
           ) -> tuple[str, list[LayerUpdate]]:
    """(layout, one LayerUpdate per layer) for any supported SD1.5 LoRA file."""
    fmt = layout(state)
    updates = kohya_layers(state, targets) if fmt == "kohya" else convert_diffusers.layers(state, metadata, targets)
    if not updates:
        raise StyleMixError("This LoRA holds no UNet or text-encoder layers.")
    return fmt, updates
