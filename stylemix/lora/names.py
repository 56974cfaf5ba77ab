"""Module names: which layers of an SD1.5 model a LoRA can target, and what other tools call them.

A LoRA file names each layer it changes.  StyleMix's canonical name is the diffusers module path
with its component (`unet.down_blocks.0.attentions.0.proj_in`, `text_encoder.text_model.encoder.
layers.0.mlp.fc1`).  Other tools write the same layer as:

- kohya sd-scripts / LyCORIS (`lora_unet_…`, `lora_te_…`): the diffusers path with every `.`
  turned into `_` (kohya trains SD1.5 on a UNet with diffusers' module names).  The text encoder
  part is `text_model_encoder_…` (transformers 4) or `encoder_…` (transformers 5, which drops the
  `text_model` level).
- A1111 / LDM names (`lora_unet_input_blocks_4_1_proj_in`, `…_middle_block_1_…`,
  `…_output_blocks_3_0_in_layers_2`): the original CompVis UNet's paths, mapped here.

Names are resolved through a table built from the real module list of the SD1.5 architecture
(the vendored configs on the `meta` device: no memory, no download), so an unknown or mistyped
name is an error that names it, never a silent miss.  The names are the same for the tiny model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from stylemix.errors import StyleMixError


@dataclass(frozen=True)
class Target:
    """One layer a LoRA can change."""

    key: str  # canonical: 'unet.<module>' or 'text_encoder.text_model.<module>'
    kind: str  # 'linear' or 'conv'
    out_features: int
    in_features: int
    kernel: tuple[int, int] = (1, 1)

    @property
    def flat_in(self) -> int:
        """Columns of the weight viewed as a matrix [out, in * kh * kw]."""
        return self.in_features * self.kernel[0] * self.kernel[1]


def canonical_text_encoder_key(key: str) -> str:
    """transformers 5 drops the `text_model.` level from CLIPTextModel; files keep the released names."""
    prefix = "text_encoder."
    if key.startswith(prefix) and not key.startswith(prefix + "text_model."):
        return prefix + "text_model." + key[len(prefix):]
    return key


def module_targets(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> dict[str, Target]:
    """Every Linear and Conv2d of the UNet and text encoder, by canonical key (peft wrappers looked through)."""
    out: dict[str, Target] = {}
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is None:
            continue
        for name, mod in model.named_modules():
            if ".base_layer" in name or ".lora_" in name or name.endswith(("base_layer", "lora_A", "lora_B")):
                continue
            base = getattr(mod, "base_layer", mod)  # a module already wrapped by peft
            key = canonical_text_encoder_key(f"{prefix}.{name}")
            if isinstance(base, torch.nn.Linear):
                out[key] = Target(key, "linear", base.out_features, base.in_features)
            elif isinstance(base, torch.nn.Conv2d):
                out[key] = Target(key, "conv", base.out_channels, base.in_channels, tuple(base.kernel_size))
    return out


def pipeline_targets(pipe) -> dict[str, Target]:
    """Every layer of a loaded pipeline a LoRA could change (what the library checks LoRAs against)."""
    return module_targets(pipe.unet, pipe.text_encoder)


@lru_cache(maxsize=1)
def sd15_targets() -> dict[str, Target]:
    """The targets of the full-size SD1.5 architecture (built on `meta`: names and shapes, no weights)."""
    from stylemix.architecture import full_size_meta_text_encoder, full_size_meta_unet

    return module_targets(full_size_meta_unet(), full_size_meta_text_encoder())


# --------------------------------------------------------------------------- LDM (A1111) names

_RESNET_INNER = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def ldm_to_diffusers(name: str) -> str | None:
    """An SD1.5 LDM UNet module path ('input_blocks.4.1.proj_in') as diffusers names it, or None.

    SD1.5 has 2 layers per block; input block n = 1 + 3b + a is down block b's layer a (a = 2 is
    the downsampler), output block n = 3b + a is up block b's layer a (the upsampler follows layer 2).
    """
    for ldm, diff in _TOP.items():
        if name == ldm or name.startswith(ldm + "."):
            return diff + name[len(ldm):]
    m = re.match(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:(\d+)\.)?(.*)$", name)
    if not m:
        return None
    part, n, sub, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if part == "middle_block":  # middle_block.0 / .2 resnets, .1 attention (no sub index)
        sub, rest = str(n), rest
        prefix = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}.get(sub)
        return _inner(prefix, rest, resnet=sub != "1") if prefix else None
    if sub is None:
        return None
    sub = int(sub)
    if part == "input_blocks":
        if not 1 <= n <= 11:
            return None
        b, a = (n - 1) // 3, (n - 1) % 3
        if a == 2:  # downsampler: input_blocks.3.0.op
            return f"down_blocks.{b}.downsamplers.0.conv" if sub == 0 and rest == "op" else None
        if sub == 0:
            return _inner(f"down_blocks.{b}.resnets.{a}", rest, resnet=True)
        return _inner(f"down_blocks.{b}.attentions.{a}", rest, resnet=False) if sub == 1 else None
    b, a = n // 3, n % 3  # output_blocks
    if not 0 <= n <= 11:
        return None
    if sub == 0:
        return _inner(f"up_blocks.{b}.resnets.{a}", rest, resnet=True)
    if a == 2 and rest == "conv" and b < 3 and sub == (1 if b == 0 else 2):  # up block 0 has no attentions
        return f"up_blocks.{b}.upsamplers.0.conv"
    return _inner(f"up_blocks.{b}.attentions.{a}", rest, resnet=False) if sub == 1 and b > 0 else None


def _inner(prefix: str, rest: str, resnet: bool) -> str:
    if resnet:
        return f"{prefix}.{_RESNET_INNER.get(rest, rest)}"
    return f"{prefix}.{rest}"


# --------------------------------------------------------------------------- kohya names


@lru_cache(maxsize=4)
def _kohya_table(names: tuple[str, ...]) -> dict[str, str]:
    table: dict[str, str] = {}
    for key in names:
        comp, _, path = key.partition(".")
        if comp == "unet":
            table["lora_unet_" + path.replace(".", "_")] = key
        else:
            flat = path.replace(".", "_")  # text_model_encoder_layers_0_…
            # `lora_te1_`: diffusers' own kohya conversion names the SD1.5 text encoder like SDXL's first one
            for prefix in ("lora_te_", "lora_te1_"):
                table[prefix + flat] = key
                table[prefix + flat[len("text_model_"):]] = key  # as written under transformers 5
    return table


@lru_cache(maxsize=4)
def _ldm_table(names: tuple[str, ...]) -> dict[str, str]:
    """kohya-style LDM names ('lora_unet_input_blocks_4_1_proj_in') of every UNet target."""
    known = set(names)
    table: dict[str, str] = {}
    for ldm in _all_ldm_names():
        diff = ldm_to_diffusers(ldm)
        if diff is not None and f"unet.{diff}" in known:
            table["lora_unet_" + ldm.replace(".", "_")] = f"unet.{diff}"
    return table


@lru_cache(maxsize=1)
def _all_ldm_names() -> tuple[str, ...]:
    """Every LDM path of an SD1.5 UNet layer a LoRA can target (generated, then mapped above)."""
    attn = ["proj_in", "proj_out"] + [f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2")
                                      for p in ("to_q", "to_k", "to_v", "to_out.0")]
    attn += ["transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"]
    res = ["in_layers.2", "emb_layers.1", "out_layers.3", "skip_connection"]
    out = list(_TOP)
    for n in range(1, 12):
        out += [f"input_blocks.{n}.0.{r}" for r in res] + [f"input_blocks.{n}.1.{a}" for a in attn]
        out.append(f"input_blocks.{n}.0.op")
    for n in range(12):
        out += [f"output_blocks.{n}.0.{r}" for r in res] + [f"output_blocks.{n}.1.{a}" for a in attn]
        out += [f"output_blocks.{n}.1.conv", f"output_blocks.{n}.2.conv"]
    out += [f"middle_block.0.{r}" for r in res] + [f"middle_block.2.{r}" for r in res]
    out += [f"middle_block.1.{a}" for a in attn]
    return tuple(out)


def kohya_names(targets: dict[str, Target]) -> dict[str, str]:
    """{kohya/LyCORIS/A1111 module name ('lora_unet_…', 'lora_te_…'): canonical key} for these targets."""
    names = tuple(sorted(targets))
    return {**_ldm_table(names), **_kohya_table(names)}


def resolve_kohya(module: str, table: dict[str, str]) -> str:
    """The canonical key of a kohya-style module name (`table` from `kohya_names`), or raise naming it."""
    key = table.get(module)
    if key is None:
        raise StyleMixError(f"LoRA layer {module!r} matches no layer of the SD1.5 UNet or text encoder "
                            "(a LoRA for another model, or a misspelt key).")
    return key


def to_kohya_name(key: str) -> str:
    """Canonical key -> kohya module name (diffusers-style, `lora_te_text_model_…` as sd-scripts writes it)."""
    comp, _, path = key.partition(".")
    return ("lora_unet_" if comp == "unet" else "lora_te_") + path.replace(".", "_")


# --------------------------------------------------------------------------- what a layer is


def part_of(key: str) -> str:
    """'text encoder', 'UNet attention' (transformer blocks, proj_in/out) or 'UNet other' (resnets, samplers…)."""
    if key.startswith("text_encoder."):
        return "text encoder"
    return "UNet attention" if ".attentions." in key else "UNet other"
