"""LyCORIS LoHa layers: ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b).

    <module>.hada_w1_a [out, r]   .hada_w1_b [r, in·kh·kw]   (and the same for w2)
    with CP/Tucker (LyCORIS `use_tucker` on convs): .hada_t1 / .hada_t2 [r, r, kh, kw],
    .hada_w1_a [r, out], .hada_w1_b [r, in]: each half is einsum('ijkl,jr,ip->prkl', t, w_b, w_a)
    <module>.alpha   optional; scale = alpha / r (r = hada_w1_b.shape[0]), missing means 1

Exact as a LoRA: (Σ_i u_i v_iᵀ) ⊙ (Σ_j x_j y_jᵀ) = Σ_ij (u_i ⊙ x_j)(v_i ⊙ y_j)ᵀ, rank r1·r2.
The reference is LyCORIS's own `lycoris.functional.loha` (tests/test_lora_layouts.py checks against it).
"""

from __future__ import annotations

import torch

from stylemix.errors import StyleMixError
from stylemix.lora.names import Target
from stylemix.lora.update import LayerUpdate, kohya_scale, low_rank_update

SUFFIXES = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}
KIND = "LoHa"


def half(key: str, w_a: torch.Tensor | None, w_b: torch.Tensor | None, t: torch.Tensor | None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One Hadamard factor as (U [out, r], V [r, in·kh·kw])."""
    if w_a is None or w_b is None:
        raise StyleMixError(f"LoHa layer {key!r} is missing one of its hada_w*_a / hada_w*_b factors (truncated file?).")
    w_a, w_b = w_a.float(), w_b.float()
    if t is None:
        if w_a.dim() != 2 or w_a.shape[1] != w_b.shape[0]:
            raise StyleMixError(f"LoHa layer {key!r}: factors {tuple(w_a.shape)} and {tuple(w_b.shape)} do not chain.")
        return w_a, w_b.reshape(w_b.shape[0], -1)
    if t.dim() != 4 or w_a.dim() != 2 or w_b.dim() != 2 or t.shape[:2] != (w_a.shape[0], w_b.shape[0]):
        raise StyleMixError(f"LoHa layer {key!r}: Tucker core {tuple(t.shape)} does not fit its factors.")
    v = torch.einsum("i j k l, j c -> i c k l", t.float(), w_b)
    return w_a.T, v.reshape(v.shape[0], -1)


def hadamard_as_lora(u1, v1, u2, v2) -> tuple[torch.Tensor, torch.Tensor]:
    """(u1 v1) ⊙ (u2 v2) = up @ down with up [out, r1·r2], down [r1·r2, in]."""
    if u1.shape[0] != u2.shape[0] or v1.shape[1] != v2.shape[1]:
        raise StyleMixError(f"LoHa halves have different shapes: {tuple(u1.shape)}x{tuple(v1.shape)} and "
                            f"{tuple(u2.shape)}x{tuple(v2.shape)}.")
    up = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1)
    down = (v1[:, None, :] * v2[None, :, :]).reshape(-1, v1.shape[1])
    return up, down


def convert(key: str, target: Target, t: dict[str, torch.Tensor]) -> LayerUpdate:
    if ("hada_t1" in t) != ("hada_t2" in t):
        raise StyleMixError(f"LoHa layer {key!r} has only one of hada_t1 / hada_t2 (truncated file?).")
    u1, v1 = half(key, t.get("hada_w1_a"), t.get("hada_w1_b"), t.get("hada_t1"))
    u2, v2 = half(key, t.get("hada_w2_a"), t.get("hada_w2_b"), t.get("hada_t2"))
    up, down = hadamard_as_lora(u1, v1, u2, v2)
    rank = t["hada_w1_b"].shape[0]
    return low_rank_update(key, target, up, down, kohya_scale(t.get("alpha"), rank, key), rank, KIND)
