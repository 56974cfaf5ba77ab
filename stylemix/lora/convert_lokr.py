"""LyCORIS LoKr layers: ΔW = scale · kron(w1, w2).

    <module>.lokr_w1 [a, b]            or .lokr_w1_a [a, r] and .lokr_w1_b [r, b]
    <module>.lokr_w2 [c, d(, kh, kw)]  or .lokr_w2_a [c, r] and .lokr_w2_b [r, d·kh·kw]
                                       or (Tucker) .lokr_t2 [r, r, kh, kw], .lokr_w2_a [r, c], .lokr_w2_b [r, d]
    <module>.alpha   scale = alpha / r, r from lokr_w1_b (else lokr_w2_b); with neither factor
                     decomposed the scale is 1 (as LyCORIS and A1111 apply it)

The layer's weight is [a·c, b·d(, kh, kw)].  Exact as a LoRA: with w1 = U1 V1 and w2 = U2 V2,
kron(w1, w2) = kron(U1, U2) @ kron(V1, V2), rank r1·r2; an undecomposed factor uses the identity
on its shorter side.  The reference is LyCORIS's own `lycoris.functional.lokr`.
"""

from __future__ import annotations

import torch

from stylemix.errors import StyleMixError
from stylemix.lora.convert_loha import half
from stylemix.lora.names import Target
from stylemix.lora.update import LayerUpdate, kohya_scale, low_rank_update

SUFFIXES = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}
KIND = "LoKr"


def _factor(key: str, name: str, t: dict[str, torch.Tensor], tucker: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    full = t.get(f"lokr_{name}")
    if full is not None:
        if f"lokr_{name}_a" in t or f"lokr_{name}_b" in t:
            raise StyleMixError(f"LoKr layer {key!r} has both lokr_{name} and its factors lokr_{name}_a/_b.")
        m = full.float().reshape(full.shape[0], -1)
        if m.shape[0] <= m.shape[1]:
            return torch.eye(m.shape[0]), m
        return m, torch.eye(m.shape[1])
    if f"lokr_{name}_a" not in t and f"lokr_{name}_b" not in t:
        raise StyleMixError(f"LoKr layer {key!r} has neither lokr_{name} nor lokr_{name}_a/_b (truncated file?).")
    return half(key, t.get(f"lokr_{name}_a"), t.get(f"lokr_{name}_b"), tucker)


def convert(key: str, target: Target, t: dict[str, torch.Tensor]) -> LayerUpdate:
    u1, v1 = _factor(key, "w1", t)
    u2, v2 = _factor(key, "w2", t, t.get("lokr_t2"))
    # (torch.kron needs contiguous inputs: w_a.T of a Tucker factor is a view)
    up, down = torch.kron(u1.contiguous(), u2.contiguous()), torch.kron(v1.contiguous(), v2.contiguous())
    rank_source = t.get("lokr_w1_b", t.get("lokr_w2_b"))
    if rank_source is None:
        scale = 1.0
        rank = up.shape[1]
    else:
        rank = rank_source.shape[0]
        scale = kohya_scale(t.get("alpha"), rank, key)
    return low_rank_update(key, target, up, down, scale, rank, KIND)
