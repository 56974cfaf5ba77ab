"""The canonical form the library stores, what a LoRA is (kind, ranks, parts), and kohya export.

Canonical file: `pytorch_lora_weights.safetensors` with diffusers/peft keys
(`unet.<module>.lora_A.weight`, `.lora_B.weight`; conv layers in peft's Conv2d layout) and peft's
LoraConfig per component in the `lora_adapter_metadata` header, so plain diffusers
`load_lora_weights` loads it exactly.  Imported layers have their scale (alpha / rank) folded into
lora_B and alpha = rank per layer, so every layer loads with scale 1 whatever its rank.
"""

from __future__ import annotations

import json
from collections import Counter

import torch

from stylemix.lora import files
from stylemix.lora.names import part_of, to_kohya_name
from stylemix.lora.update import LayerUpdate

# kohya training metadata worth keeping and showing (strings from a stranger's file: length-capped)
KOHYA_FIELDS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                "ss_sd_model_name", "ss_output_name", "ss_training_comment")
MAX_FIELD = 200
MAX_TAGS = 20


def canonical_state(updates: list[LayerUpdate]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, header) of the canonical file for these layers."""
    from peft import LoraConfig

    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, dict[str, int]] = {"unet": {}, "text_encoder": {}}
    for u in updates:
        state[f"{u.key}.lora_A.weight"] = u.down.float().contiguous()
        state[f"{u.key}.lora_B.weight"] = (u.up.float() * u.scale).contiguous()
        comp, _, path = u.key.partition(".")
        if comp == "text_encoder":
            path = path[len("text_model."):] if path.startswith("text_model.") else path  # matches transformers 4 and 5
        ranks[comp][path] = u.down.shape[0]
    metadata = {}
    for comp, by_path in ranks.items():
        if not by_path:
            continue
        r = Counter(by_path.values()).most_common(1)[0][0]
        pattern = {p: v for p, v in by_path.items() if v != r}
        cfg = LoraConfig(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern),
                         target_modules=sorted(by_path)).to_dict()
        for k, v in cfg.items():
            metadata[f"{comp}.{k}"] = sorted(v) if isinstance(v, set) else v
    header = {"lora_adapter_metadata": json.dumps(metadata, sort_keys=True, default=str), "format": "pt"}
    return state, header


def describe(updates: list[LayerUpdate], layout: str, metadata: dict[str, str]) -> dict:
    """What the Library shows: kind, ranks, the parts it covers, kohya's training metadata."""
    kinds = sorted({u.kind for u in updates})
    parts = {part_of(u.key) for u in updates}
    if kinds == ["LoRA"] and "UNet other" in parts:
        kinds = ["LoCon"]  # kohya/LyCORIS call a LoRA that also trains the resnets' convs LoCon
    covers = []
    if parts & {"UNet attention", "UNet other"}:
        covers.append("UNet all" if "UNet other" in parts else "UNet attention")
    if "text encoder" in parts:
        covers.append("text encoder")
    ranks = sorted({u.rank for u in updates})
    return {"kind": " + ".join(kinds), "ranks": ranks, "covers": covers, "layers": len(updates),
            "layout": layout, "kohya": kohya_metadata(metadata)}


def kohya_metadata(metadata: dict[str, str]) -> dict:
    out = {k: _clean(metadata[k]) for k in KOHYA_FIELDS if isinstance(metadata.get(k), str)}
    tags = tag_counts(metadata)
    if tags:
        out["ss_tag_frequency"] = dict(tags.most_common(MAX_TAGS))
    return out


def tag_counts(metadata: dict[str, str]) -> Counter:
    """kohya's `ss_tag_frequency` ({folder: {tag: count}}) summed over folders; empty if absent or malformed."""
    counts: Counter = Counter()
    try:
        freq = json.loads(metadata.get("ss_tag_frequency", "{}"))
        for tags in freq.values():
            for tag, n in tags.items():
                if isinstance(tag, str) and isinstance(n, int) and n > 0:
                    counts[_clean(tag.strip())] += n
    except (ValueError, TypeError, AttributeError):
        return Counter()
    return counts


def _clean(s: str) -> str:
    return "".join(c for c in s if c.isprintable())[:MAX_FIELD]


# --------------------------------------------------------------------------- kohya export


def to_kohya(state: dict[str, torch.Tensor], metadata: dict[str, str], alpha: float | None
             ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Canonical -> kohya/A1111 keys (`lora_unet_…`, `lora_te_text_model_…`, `.lora_down/.lora_up/.alpha`).

    Every layer is written with `alpha` (the trained or imported alpha; rank where unknown) and
    lora_up scaled so kohya's alpha / rank reproduces the canonical layer exactly.  (diffusers' own
    kohya conversion names the SD1 text encoder `lora_te1_`, SDXL's name, and writes alpha = rank.)
    """
    modules = files.lora_modules(state)
    scales = files.module_scales(metadata, modules)
    out: dict[str, torch.Tensor] = {}
    ranks = set()
    for key, (a, b) in modules.items():
        rank = a.shape[0]
        ranks.add(rank)
        layer_alpha = float(alpha) if alpha else float(rank)
        name = to_kohya_name(key)
        out[f"{name}.lora_down.weight"] = a.contiguous()
        out[f"{name}.lora_up.weight"] = (b.float() * (scales[key] * rank / layer_alpha)).contiguous()
        out[f"{name}.alpha"] = torch.tensor(layer_alpha)
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"}
    if len(ranks) == 1:
        meta["ss_network_dim"] = str(ranks.pop())
        meta["ss_network_alpha"] = str(float(alpha) if alpha else meta["ss_network_dim"])
    return out, meta
