"""Write a diffusers SD1.5 pipeline as an original-layout (LDM) single-file checkpoint, for tests.

Written from the documented CompVis/LDM key layout (not with diffusers' converter, which would
then be tested with itself):

- UNet under `model.diffusion_model.`: `time_embed.{0,2}`, `input_blocks.0.0` (conv_in), then per
  level i and layer j `input_blocks.{3i+j+1}.0` (resnet) / `.1` (transformer), the downsampler at
  `input_blocks.{3i+3}.0.op`; `middle_block.{0,1,2}`; per up level i and layer j
  `output_blocks.{3i+j}.0` (resnet) / `.1` (transformer), the upsampler at `output_blocks.{3i+2}.{1|2}.conv`;
  `out.{0,2}`.  Resnets: in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection.
- VAE under `first_stage_model.`: `encoder.down.{i}.block.{j}`, `encoder.down.{i}.downsample`,
  `decoder.up.{3-i}.block.{j}` (LDM counts decoder levels from the bottom), `*.mid.block_{1,2}`,
  `*.mid.attn_1.{norm,q,k,v,proj_out}` as 1x1 convolutions, nin_shortcut, norm_out.
- Text encoder under `cond_stage_model.transformer.text_model.` (the HF CLIP names).
- EMA weights under `model_ema.<UNet key without dots>` (how LDM's LitEma names its buffers).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    name, leaf = rest.rsplit(".", 1)
    return f"{RESNET[name]}.{leaf}"


def unet_to_ldm(key: str, layers_per_block: int = 2) -> str:
    n = layers_per_block
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    stem, leaf = key.rsplit(".", 1)
    if stem in fixed:
        return f"{fixed[stem]}.{leaf}"
    if m := re.match(r"down_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + i * (n + 1) + j
        return f"input_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = i * (n + 1) + j
        return f"output_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    raise KeyError(key)


def _unet_upsamplers(unet_state: dict, n: int = 2) -> dict[str, str]:
    """Upsampler convs sit after the resnet (index 1) or after resnet + transformer (index 2)."""
    out = {}
    for key in unet_state:
        if m := re.match(r"up_blocks\.(\d)\.upsamplers\.0\.conv\.(.+)", key):
            i = int(m[1])
            has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in unet_state)
            out[key] = f"output_blocks.{i * (n + 1) + n}.{2 if has_attn else 1}.conv.{m[2]}"
    return out


def vae_to_ldm(key: str, levels: int = 4) -> str:
    for side in ("encoder", "decoder"):
        fixed = {f"{side}.conv_in": f"{side}.conv_in", f"{side}.conv_out": f"{side}.conv_out",
                 f"{side}.conv_norm_out": f"{side}.norm_out"}
        stem, leaf = key.rsplit(".", 1)
        if stem in fixed:
            return f"{fixed[stem]}.{leaf}"
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key
    resnet = {"conv_shortcut": "nin_shortcut"}
    if m := re.match(r"encoder\.down_blocks\.(\d)\.resnets\.(\d)\.(\w+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{resnet.get(m[3], m[3])}.{m[4]}"
    if m := re.match(r"encoder\.down_blocks\.(\d)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(\w+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{resnet.get(m[3], m[3])}.{m[4]}"
    if m := re.match(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}.{m[4]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
    raise KeyError(key)


def pipeline_to_ldm(pipe, ema: str = "none", vae: bool = True, dtype: torch.dtype = torch.float32,
                    other_unet: dict | None = None) -> dict[str, torch.Tensor]:
    """The LDM state dict of `pipe`.

    ema: "none" (UNet under model.diffusion_model.), or "both": the pipe's UNet as the EMA weights
    (model_ema.*) and `other_unet` (a diffusers UNet state dict) as the non-EMA ones.
    """
    unet = pipe.unet.state_dict()
    ups = _unet_upsamplers(unet)
    unet_ldm = {ups.get(k) or unet_to_ldm(k): v for k, v in unet.items()}
    out: dict[str, torch.Tensor] = {}
    if ema == "both":
        other = {ups.get(k) or unet_to_ldm(k): v for k, v in other_unet.items()}
        out.update({f"model.diffusion_model.{k}": v for k, v in other.items()})
        out.update({"model_ema." + "diffusion_model" + k.replace(".", ""): v for k, v in unet_ldm.items()})
    else:
        out.update({f"model.diffusion_model.{k}": v for k, v in unet_ldm.items()})
    for k, v in pipe.text_encoder.state_dict().items():
        k = k.removeprefix("text_model.")  # transformers < 5.6 keeps the text_model level
        out[f"cond_stage_model.transformer.text_model.{k}"] = v
    # real checkpoints carry CLIP's position_ids buffer (int64)
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    if vae:
        for k, v in pipe.vae.state_dict().items():
            ldm = vae_to_ldm(k)
            if ".mid.attn_1." in ldm and v.ndim == 2:
                v = v[:, :, None, None]  # LDM's VAE attention projections are 1x1 convolutions
            out[f"first_stage_model.{ldm}"] = v
    assert len(out) == len(set(out)), "two diffusers keys mapped to one LDM key"
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in out.items()}


def write_ldm_checkpoint(pipe, path: Path, **kwargs) -> Path:
    from safetensors.torch import save_file

    save_file(pipeline_to_ldm(pipe, **kwargs), str(path))
    return path


def write_sparse_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A safetensors file with `state`'s names, dtypes and shapes and no data written (a sparse file).

    `state` may be on the `meta` device: a full-size SD1.5 checkpoint costs no memory and no disk,
    and only a reader that looks at the header alone can be tested with it.
    """
    names = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
    header, offset = {}, 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def write_header_only(path: Path, shapes: dict[str, list[int]], dtype: str = "F16") -> Path:
    """A valid safetensors file whose tensors are all-zero and tiny: for header-based refusal tests."""
    from safetensors.torch import save_file

    dt = {"F16": torch.float16, "F32": torch.float32}[dtype]
    save_file({k: torch.zeros(s, dtype=dt) for k, s in shapes.items()}, str(path))
    return path
