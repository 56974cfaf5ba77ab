"""kohya sd-scripts `networks.lora` and LyCORIS `locon` layers: `lora_down`, `lora_up`, `alpha`.

    <module>.lora_down.weight   [r, in] (Linear), [r, in, 1, 1] (1x1 conv), [r, in, kh, kw] (LoCon)
    <module>.lora_up.weight     [out, r] or [out, r, 1, 1]
    <module>.lora_mid.weight    optional, LyCORIS CP/Tucker: [r, r, kh, kw] (down is then [r, in, 1, 1])
    <module>.alpha              optional scalar; scale = alpha / r, and missing means alpha = r

kohya trains every Linear and 1x1 Conv2d of the transformer blocks (proj_in, proj_out, attention,
feed-forward) and the text encoder's attention and MLP; with conv_dim (LoCon) also the resnets'
3x3 convs, shortcuts, time embedding projections and the down/upsamplers.  Ranks and alphas are per
layer (block-wise dims).
"""

from __future__ import annotations

import torch

from stylemix.errors import StyleMixError
from stylemix.lora.names import Target
from stylemix.lora.update import LayerUpdate, kohya_scale, low_rank_update

SUFFIXES = {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"}
KIND = "LoRA"


def convert(key: str, target: Target, t: dict[str, torch.Tensor]) -> LayerUpdate:
    down, up = t.get("lora_down.weight"), t.get("lora_up.weight")
    if down is None or up is None:
        missing = "lora_down" if down is None else "lora_up"
        raise StyleMixError(f"LoRA layer {key!r} has no {missing} weight (the file is incomplete).")
    if down.dim() not in (2, 4) or up.dim() not in (2, 4):
        raise StyleMixError(f"LoRA layer {key!r}: lora_down/lora_up must be 2-D or 4-D tensors.")
    rank = down.shape[0]
    mid = t.get("lora_mid.weight")
    if mid is not None:  # CP decomposition: ΔW[:, :, k, l] = up · mid[:, :, k, l] · down
        if mid.dim() != 4 or mid.shape[:2] != (up.shape[1], rank):
            raise StyleMixError(f"LoRA layer {key!r}: lora_mid {tuple(mid.shape)} does not fit its lora_down/lora_up.")
        down = torch.einsum("m n k l, n j -> m j k l", mid.float(), down.float().reshape(rank, -1))
        rank = up.shape[1]
    elif up.shape[1] != rank:
        raise StyleMixError(f"LoRA layer {key!r}: lora_up has rank {up.shape[1]}, lora_down has rank {rank}.")
    return low_rank_update(key, target, up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1),
                           kohya_scale(t.get("alpha"), rank, key), rank, KIND)
