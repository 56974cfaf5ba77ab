"""What a LoRA trains (`--network`): the layers of each network, as peft LoraConfigs.

    attention  the UNet's attention projections and the text encoder's (the seed report's choice)
    kohya      kohya sd-scripts' default for SD1.5 (networks/lora.py): every Linear and 1x1 conv of the
               UNet's transformer blocks (attention, feed-forward, proj_in/proj_out) and the text
               encoder's attention and MLP
    locon      kohya plus the resnets and the down/up samplers (kohya's `conv_dim`): their 3x3 convs at
               --conv-rank/--conv-alpha, their 1x1 shortcut and time-embedding Linear at --rank/--alpha

Layers are named by their leaf module path, as peft's `target_modules` matches them (the end of the
module name); the conv rank and alpha are peft's `rank_pattern`/`alpha_pattern`, which are saved with
the LoRA, so the library and plain diffusers read each layer's scale back.
"""

from __future__ import annotations

from dataclasses import dataclass

ADAPTER = "default"

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_TRANSFORMER = UNET_ATTENTION + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]  # kohya: Transformer2DModel
RESNET_LINEAR = ["time_emb_proj", "conv_shortcut"]  # Linear / 1x1 in ResnetBlock2D: network rank (kohya)
CONV_3X3 = ["conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]  # ResnetBlock2D, Down/Upsample2D
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIPAttention
TEXT_MLP = ["fc1", "fc2"]  # CLIPMLP


@dataclass(frozen=True)
class Network:
    unet: tuple[str, ...]  # UNet layers at rank / alpha
    conv: tuple[str, ...]  # UNet layers at conv_rank / conv_alpha
    text: tuple[str, ...]  # text-encoder layers (when the text encoder trains)
    kind: str  # how the library names it: LoRA or LoCon
    covers: str  # 'UNet attention' or 'UNet all'


NETWORKS = {
    "attention": Network(tuple(UNET_ATTENTION), (), tuple(TEXT_ATTENTION), "LoRA", "UNet attention"),
    "kohya": Network(tuple(UNET_TRANSFORMER), (), tuple(TEXT_ATTENTION + TEXT_MLP), "LoRA", "UNet attention"),
    "locon": Network(tuple(UNET_TRANSFORMER + RESNET_LINEAR), tuple(CONV_3X3), tuple(TEXT_ATTENTION + TEXT_MLP),
                     "LoCon", "UNet all"),
}


def targets(config) -> dict[str, list[str]]:
    """{'unet': [...], 'text_encoder': [...]}: the layers trained (config.unet_targets / text_targets, when
    given, replace the network's); text_encoder is empty with the text encoder frozen."""
    net = NETWORKS[config.network]
    unet = list(config.unet_targets) or list(net.unet) + list(net.conv)
    text = list(config.text_targets) or list(net.text)
    return {"unet": unet, "text_encoder": text if config.train_text_encoder else []}


def lora_configs(config):
    """(UNet LoraConfig, text-encoder LoraConfig or None) for `config`."""
    from peft import LoraConfig

    net = NETWORKS[config.network]
    layers = targets(config)
    conv_rank = config.conv_rank or config.rank
    conv_alpha = config.conv_alpha if config.conv_alpha is not None else config.alpha
    conv = [c for c in net.conv if c in layers["unet"]]
    # init "gaussian" (A ~ N(0, 1/r), B = 0): the update starts at zero, as kohya's (which draws A uniformly)
    unet = LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                      target_modules=layers["unet"],
                      rank_pattern={c: conv_rank for c in conv if conv_rank != config.rank},
                      alpha_pattern={c: conv_alpha for c in conv if conv_alpha != config.alpha})
    text = None
    if layers["text_encoder"]:
        text = LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                          target_modules=layers["text_encoder"])
    return unet, text


def add_networks(config, unet, text_encoder) -> dict:
    """Add the LoRA layers to the models; returns the trained models by component ({'unet': ...,
    'text_encoder': ... when it trains})."""
    unet_cfg, text_cfg = lora_configs(config)
    unet.add_adapter(unet_cfg, adapter_name=ADAPTER)
    models = {"unet": unet}
    if text_cfg is not None:
        text_encoder.add_adapter(text_cfg, adapter_name=ADAPTER)
        models["text_encoder"] = text_encoder
    return models


def library_meta(config) -> dict:
    """What stylemix.json says about the network: kind, parts covered, ranks and layer names."""
    net = NETWORKS[config.network]
    layers = targets(config)
    ranks = {config.rank} | ({config.conv_rank or config.rank} if net.conv else set())
    return {"network": config.network, "kind": net.kind,
            "covers": [net.covers] + (["text encoder"] if layers["text_encoder"] else []),
            "ranks": sorted(ranks), "target_modules": layers}
