"""One layer's weight update, as every converter returns it: ΔW = scale · up @ down.

Every layout StyleMix reads (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, diffusers/peft) becomes a list
of `LayerUpdate`s: an exact low-rank factorisation of that layer's ΔW.  LoHa and LoKr fit this
without loss: a Hadamard product of two rank-r factors is a rank-r² LoRA, and a Kronecker product
of rank r1 and r2 factors is a rank r1·r2 LoRA.  Where that rank reaches the layer's own size,
ΔW is stored densely behind an identity factor (still exact: multiplying by I adds only zeros).
So the mixer, the exporters and the clash map handle one kind of thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stylemix.errors import StyleMixError
from stylemix.lora.names import Target


@dataclass
class LayerUpdate:
    key: str  # canonical module key
    down: torch.Tensor  # [r, in] for a Linear, [r, in, kh, kw] for a Conv2d (peft's lora_A layout)
    up: torch.Tensor  # [out, r] for a Linear, [out, r, 1, 1] for a Conv2d (peft's lora_B layout)
    scale: float  # ΔW = scale * up @ down (kohya/LyCORIS alpha / rank)
    rank: int  # the rank as the tool that made it counts it (a LoHa's dim, not r²)
    kind: str  # 'LoRA', 'LoHa' or 'LoKr'

    def delta(self) -> torch.Tensor:
        """ΔW as a matrix [out, in * kh * kw] (fp32)."""
        r = self.down.shape[0]
        return self.scale * (self.up.reshape(-1, r).float() @ self.down.reshape(r, -1).float())


def low_rank_update(key: str, target: Target, up: torch.Tensor, down: torch.Tensor, scale: float, rank: int,
                    kind: str) -> LayerUpdate:
    """A LayerUpdate from factors up [out, r] and down [r, in*kh*kw] (any float dtype), shapes checked
    against the layer; a rank at or above the layer's size is stored as dense ΔW (exact, no larger)."""
    up, down = up.float(), down.float()
    r = down.shape[0]
    if up.dim() != 2 or down.dim() != 2 or up.shape[1] != r:
        raise StyleMixError(f"LoRA layer {key!r}: factors {tuple(up.shape)} and {tuple(down.shape)} do not chain.")
    if target.out_features == 0:  # no model to size against: widths from the file, kernel from SD1.5
        k = target.kernel[0] * target.kernel[1]
        if down.shape[1] % k:
            raise StyleMixError(f"LoRA layer {key!r}: {down.shape[1]} input values is no whole number of "
                                f"{target.kernel[0]}x{target.kernel[1]} kernels.")
        target = Target(key, target.kind, up.shape[0], down.shape[1] // k, target.kernel)
    if up.shape[0] != target.out_features or down.shape[1] != target.flat_in:
        k = target.kernel[0] * target.kernel[1]
        raise StyleMixError("LoRA " + mismatch(target, down.shape[1] // k if down.shape[1] % k == 0 else down.shape[1],
                                               up.shape[0]))
    up, down = up.reshape(target.out_features, r), down.reshape(r, target.flat_in)
    if r >= min(target.out_features, target.flat_in) and r > 1:
        dense = (up.double() @ down.double()).float()
        if target.out_features <= target.flat_in:
            up, down = torch.eye(target.out_features), dense
        else:
            up, down = dense, torch.eye(target.flat_in)
    return LayerUpdate(key, *_peft_shapes(target, down, up), scale=scale, rank=rank, kind=kind)


def mismatch(target: Target, lora_in: int, lora_out: int, kernel: tuple[int, int] | None = None) -> str:
    """'layer X does not fit the loaded base model: …' with a guess at the model the LoRA was made for."""
    kernel = kernel or target.kernel
    hint = ""
    if 2048 in (lora_in, lora_out):
        hint = " (made for SDXL?)"
    elif {lora_in, lora_out} & {1024, 1280}:
        hint = " (made for SD2.x or another base model?)"
    ks = lambda k: "" if k == (1, 1) else " %dx%d" % k  # noqa: E731
    return (f"layer {target.key!r} does not fit the loaded base model: the model's {target.kind} is "
            f"{target.in_features}->{target.out_features}{ks(target.kernel)}, the LoRA's is "
            f"{lora_in}->{lora_out}{ks(kernel)}{hint}")


def _peft_shapes(target: Target, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if target.kind == "linear":
        return down.contiguous(), up.contiguous()
    r = down.shape[0]
    return (down.reshape(r, target.in_features, *target.kernel).contiguous(),
            up.reshape(target.out_features, r, 1, 1).contiguous())


def kohya_scale(alpha: torch.Tensor | None, rank: int, key: str) -> float:
    """kohya/LyCORIS: scale = alpha / rank; a missing alpha (or 0, which kohya itself replaces) means alpha = rank."""
    if alpha is None:
        return 1.0
    if alpha.numel() != 1:
        raise StyleMixError(f"LoRA layer {key!r}: alpha must be one number, it has shape {tuple(alpha.shape)}.")
    a = float(alpha.float().item())
    if a != a or a in (float("inf"), float("-inf")):
        raise StyleMixError(f"LoRA layer {key!r} has a non-finite alpha.")
    return 1.0 if a == 0 else a / rank
