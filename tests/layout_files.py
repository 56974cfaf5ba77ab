"""LoRA files in the layouts other tools write, for the tiny model, and their ΔW computed independently.

Key names follow each tool's documented convention, written out here rather than taken from
StyleMix's converters:
- kohya sd-scripts `networks.lora`: `lora_unet_` + the diffusers module path with '.' -> '_'
  (kohya's UNet for SD1.5 uses diffusers' names), `lora_te_text_model_…` for the text encoder,
  `.lora_down.weight` [r, in(, kh, kw)], `.lora_up.weight` [out, r(, 1, 1)], `.alpha`.
- LyCORIS: files made by LyCORIS itself (`lycoris.kohya.create_network(...).save_weights`).
- A1111 / LDM names: an explicit table of original-UNet paths (LDM_NAMES).

`reference_delta` rebuilds each layer's ΔW from the raw tensors of the saved file with the
formulas as LyCORIS and kohya document them (scale = alpha / rank).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# module kinds kohya's networks.lora trains by default (transformer blocks + text encoder attention/MLP)
ATTN_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
CONV_LEAVES = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")

# A1111 / LDM UNet paths and the diffusers module each one is (SD1.5, written out by hand)
LDM_NAMES = {
    "input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks_2_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
    "input_blocks_4_1_transformer_blocks_0_attn2_to_k": "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "input_blocks_8_1_transformer_blocks_0_ff_net_2": "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2",
    "middle_block_1_transformer_blocks_0_attn1_to_out_0": "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "middle_block_1_proj_out": "mid_block.attentions.0.proj_out",
    "output_blocks_3_1_transformer_blocks_0_attn2_to_v": "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "output_blocks_11_1_proj_out": "up_blocks.3.attentions.2.proj_out",
    # LoCon layers in LDM names: resnets (in_layers.2 = conv1, out_layers.3 = conv2, emb_layers.1,
    # skip_connection), the downsampler `op` and the upsampler `conv`
    "input_blocks_4_0_in_layers_2": "down_blocks.1.resnets.0.conv1",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "middle_block_0_emb_layers_1": "mid_block.resnets.0.time_emb_proj",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_0_0_in_layers_2": "up_blocks.0.resnets.0.conv1",
}


def layer_modules(pipe, attn: bool = True, conv: bool = False, te: bool = True) -> dict[str, torch.nn.Module]:
    """{diffusers-style path with component ('unet.…', 'text_encoder.text_model.…'): module} kohya would train."""
    out = {}
    for name, m in pipe.unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        in_attn = ".attentions." in name and name.endswith(ATTN_LEAVES)
        in_conv = (".resnets." in name or "samplers" in name) and name.endswith(CONV_LEAVES)
        if (attn and in_attn) or (conv and in_conv):
            out[f"unet.{name}"] = m
    if te:
        for name, m in pipe.text_encoder.named_modules():
            if isinstance(m, torch.nn.Linear) and name.endswith(TE_LEAVES):
                path = name if name.startswith("text_model.") else "text_model." + name
                out[f"text_encoder.{path}"] = m
    return out


def kohya_name(path: str) -> str:
    comp, _, rest = path.partition(".")
    return ("lora_unet_" if comp == "unet" else "lora_te_") + rest.replace(".", "_")


def kohya_lora(path: Path, pipe, seed: int, rank=4, alpha=None, conv_rank=None, attn=True, conv=False, te=True,
               cp=False, dtype=torch.float16, metadata: dict | None = None, names: dict[str, str] | None = None
               ) -> tuple[Path, dict[str, str]]:
    """A kohya `networks.lora` file (LoCon with conv=True).  rank/alpha may be callables of the path
    (block-wise dims); alpha None writes no `.alpha` key.  Returns (file, {kohya name: module path})."""
    g = torch.Generator().manual_seed(seed)
    state, mapping = {}, {}
    modules = layer_modules(pipe, attn, conv, te)
    if names is not None:
        modules = {p: m for p, m in modules.items() if p[len("unet."):] in names.values()}
    for p, m in modules.items():
        name = kohya_name(p)
        if names is not None:
            name = "lora_unet_" + next(k for k, v in names.items() if f"unet.{v}" == p)
        is_conv = isinstance(m, torch.nn.Conv2d)
        big = is_conv and m.kernel_size != (1, 1)
        r = (conv_rank if big and conv_rank else rank)
        r = r(p) if callable(r) else r
        if is_conv:
            kh, kw = m.kernel_size
            if cp and big:
                state[f"{name}.lora_down.weight"] = torch.randn(r, m.in_channels, 1, 1, generator=g) * 0.3
                state[f"{name}.lora_mid.weight"] = torch.randn(r, r, kh, kw, generator=g) * 0.3
            else:
                state[f"{name}.lora_down.weight"] = torch.randn(r, m.in_channels, kh, kw, generator=g) * 0.3
            state[f"{name}.lora_up.weight"] = torch.randn(m.out_channels, r, 1, 1, generator=g) * 0.3
        else:
            state[f"{name}.lora_down.weight"] = torch.randn(r, m.in_features, generator=g) * 0.3
            state[f"{name}.lora_up.weight"] = torch.randn(m.out_features, r, generator=g) * 0.3
        a = alpha(p) if callable(alpha) else alpha
        if a is not None:
            state[f"{name}.alpha"] = torch.tensor(float(a))
        mapping[name] = p
    save_file({k: v.to(dtype) for k, v in state.items()}, str(path), metadata=metadata)
    return path, mapping


LYCORIS_PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


def lycoris_file(path: Path, pipe, algo: str, seed: int, dim=4, alpha=2, conv_dim=4, conv_alpha=2, **kwargs
                 ) -> tuple[Path, dict[str, str], dict[str, torch.Tensor]]:
    """A file made by LyCORIS itself (its kohya network, as sd-scripts --network_module lycoris.kohya runs it),
    with random factors.  LyCORIS hooks `pipe`'s modules: pass a pipeline made for this alone.  Returns (file, {lora name: module path}, {lora name: LyCORIS's own ΔW})."""
    from lycoris import kohya

    preset = path.with_suffix(".preset.toml")
    preset.write_text(LYCORIS_PRESET)
    torch.manual_seed(seed)
    net = kohya.create_network(1.0, dim, alpha, pipe.vae, pipe.text_encoder, pipe.unet, algo=algo,
                               conv_dim=conv_dim, conv_alpha=conv_alpha, preset=str(preset), **kwargs)
    net.apply_to(pipe.text_encoder, pipe.unet, True, True)  # registers the layers (and hooks `pipe`'s modules)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    names = {id(m): f"unet.{n}" for n, m in pipe.unet.named_modules()}
    for n, m in pipe.text_encoder.named_modules():
        names[id(m)] = "text_encoder." + (n if n.startswith("text_model.") else "text_model." + n)
    mapping, deltas = {}, {}
    for lora in net.unet_loras + net.text_encoder_loras:
        mapping[lora.lora_name] = names[id(lora.org_module[0])]
        # what LyCORIS's forward adds to the layer (its LoHa/LoKr get_diff_weight applies the scale a second time)
        own = lora.get_weight(lora.shape) if hasattr(lora, "get_weight") else lora.get_diff_weight(multiplier=1)[0]
        deltas[lora.lora_name] = own.detach().float()
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya",
                                                "ss_network_args": json.dumps({"algo": algo})})
    return path, mapping, deltas


def reference_delta(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW [out, in·kh·kw] of one layer from its raw file tensors (kohya / LyCORIS definitions)."""
    t = {k: v.double() for k, v in tensors.items()}
    alpha = t.get("alpha")
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        r = down.shape[0]
        if "lora_mid.weight" in t:
            w = torch.einsum("m n k l, i m, n j -> i j k l", t["lora_mid.weight"], up.flatten(1), down.flatten(1))
        else:
            w = up.flatten(1) @ down.flatten(1)
        scale = 1.0 if alpha is None else float(alpha) / r
        return (w.reshape(w.shape[0], -1) * scale).float()
    if "hada_w1_a" in t:
        if "hada_t1" in t:
            w1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        else:
            w1, w2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        scale = 1.0 if alpha is None else float(alpha) / t["hada_w1_b"].shape[0]
        return ((w1 * w2).reshape(w1.shape[0], -1) * scale).float()
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    dim = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
    scale = float(alpha) / dim if (dim and alpha is not None) else 1.0
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    w = torch.kron(w1.contiguous(), w2.contiguous())
    return (w.reshape(w.shape[0], -1) * scale).float()


def reference_deltas(path: Path, mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """{module path: ΔW} for every layer of the file at `path`."""
    state = load_file(str(path))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        mod, _, suffix = k.partition(".")
        groups.setdefault(mod, {})[suffix] = v
    return {mapping[m]: reference_delta(t) for m, t in groups.items()}
