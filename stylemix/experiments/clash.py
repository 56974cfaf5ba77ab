"""Clash map: where two LoRAs' weight updates overlap, layer by layer.

For one layer the updates are dW_i = c_i B_i A_i (c_i = weight x alpha_i / r_i).  Their cosine
in Frobenius space says how they interact where they meet: near +1 they push the same way
(stacking them over-cooks that layer), near -1 they cancel (the two styles fight there), near 0
they touch independent directions and add cleanly.  Computed without ever forming an
out x in matrix, from rank-sized products only:

    <B1 A1, B2 A2>_F = trace((B1^T B2) (A2 A1^T)) = sum((B1^T B2) * (A1 A2^T))
    ||B A||_F^2      = sum((B^T B) * (A A^T))

Per block (the mixer's block ids: text_encoder, down.0..3, mid, up.0..3) the cosine is that of
the block's concatenated updates: sum of inner products over the root of the summed squared
norms, so large layers count for what they change.  The heat map shows one row per block, one
cell per layer, red for same direction, blue for opposite; the last column is the block's total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from stylemix.lora import files as lora_files
from stylemix.errors import StyleMixError

BLOCK_ORDER = ["text_encoder", "down.0", "down.1", "down.2", "down.3", "mid", "up.0", "up.1", "up.2", "up.3", "other"]


@dataclass
class LayerClash:
    module: str  # canonical module key, e.g. "unet.down_blocks.0.attentions.0....attn1.to_q"
    block: str  # the layer's coarse block id (its BLOCK_ORDER row)
    cosine: float | None  # None where one update is zero
    norm_a: float  # ||dW_a||_F
    norm_b: float
    inner: float  # <dW_a, dW_b>_F


@dataclass
class ClashMap:
    lora_a: str
    lora_b: str
    layers: list[LayerClash]
    blocks: dict[str, float | None]  # block id -> cosine of the block's whole update
    overall: float | None  # cosine of the whole updates (every shared layer)
    only_a: int = 0  # layers only LoRA a changes (no clash possible there)
    only_b: int = 0

    def to_dict(self) -> dict:
        return {"lora_a": self.lora_a, "lora_b": self.lora_b, "overall": self.overall, "blocks": self.blocks,
                "only_a": self.only_a, "only_b": self.only_b,
                "layers": [vars(layer) for layer in self.layers]}

    def worst_blocks(self, n: int = 3) -> list[tuple[str, float]]:
        """Blocks with the most negative cosine first: where turning one LoRA down helps most."""
        items = [(b, c) for b, c in self.blocks.items() if c is not None]
        return sorted(items, key=lambda x: x[1])[:n]


def _block(module_key: str) -> str:
    from stylemix.mixer import block_of

    component, _, name = module_key.partition(".")
    ids = block_of("text_encoder" if component == "text_encoder" else "unet", name)
    return next(b for b in ids if b in BLOCK_ORDER)  # the coarse row (block_of leads with the finer LBW id)


def delta_inner(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> float:
    """<B1 A1, B2 A2>_F from r-sized products (float64)."""
    return float(((b1.double().T @ b2.double()) * (a1.double() @ a2.double().T)).sum())


def clash_states(state_a: dict, meta_a: dict, state_b: dict, meta_b: dict, name_a: str = "a", name_b: str = "b",
                 weight_a: float = 1.0, weight_b: float = 1.0) -> ClashMap:
    """Per-layer and per-block cosine between the updates of two canonical LoRA state dicts."""
    mods_a, mods_b = lora_files.lora_modules(state_a), lora_files.lora_modules(state_b)
    sc_a, sc_b = lora_files.module_scales(meta_a, mods_a), lora_files.module_scales(meta_b, mods_b)
    layers = []
    sums: dict[str, list[float]] = {}
    for mod in sorted(set(mods_a) & set(mods_b)):
        # conv layers (LoCon, LoHa, LoKr) as matrices [out, in * kh * kw]
        (a1, b1), (a2, b2) = [(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)) for a, b in (mods_a[mod], mods_b[mod])]
        if a1.shape[1] != a2.shape[1] or b1.shape[0] != b2.shape[0]:
            raise StyleMixError(f"Layer {mod!r} has different shapes in {name_a!r} and {name_b!r}: "
                                "they were made for different base models.")
        c1 = weight_a * sc_a[mod]
        c2 = weight_b * sc_b[mod]
        inner = c1 * c2 * delta_inner(a1, b1, a2, b2)
        n1 = abs(c1) * math.sqrt(max(delta_inner(a1, b1, a1, b1), 0.0))
        n2 = abs(c2) * math.sqrt(max(delta_inner(a2, b2, a2, b2), 0.0))
        cos = inner / (n1 * n2) if n1 > 0 and n2 > 0 else None
        block = _block(mod)
        layers.append(LayerClash(mod, block, None if cos is None else max(-1.0, min(1.0, cos)), n1, n2, inner))
        s = sums.setdefault(block, [0.0, 0.0, 0.0])
        s[0] += inner
        s[1] += n1 * n1
        s[2] += n2 * n2
    if not layers:
        raise StyleMixError(f"LoRAs {name_a!r} and {name_b!r} change no layer in common: they cannot clash.")

    def cosine(s):
        return s[0] / math.sqrt(s[1] * s[2]) if s[1] > 0 and s[2] > 0 else None

    blocks = {b: cosine(sums[b]) for b in BLOCK_ORDER if b in sums}
    total = [sum(s[i] for s in sums.values()) for i in range(3)]
    return ClashMap(name_a, name_b, layers, blocks, cosine(total),
                    only_a=len(set(mods_a) - set(mods_b)), only_b=len(set(mods_b) - set(mods_a)))


def clash_map(library, lora_a: str, lora_b: str, weight_a: float = 1.0, weight_b: float = 1.0) -> ClashMap:
    """The clash map of two LoRAs of the library (weights only flip signs: cosines ignore magnitude)."""
    if lora_a == lora_b:
        raise StyleMixError(f"A clash map needs two different LoRAs; got {lora_a!r} twice.")
    sa, ma = lora_files.read_lora_file(library.get(lora_a).weights)
    sb, mb = lora_files.read_lora_file(library.get(lora_b).weights)
    return clash_states(sa, ma, sb, mb, lora_a, lora_b, weight_a, weight_b)


# --------------------------------------------------------------------------- drawing


def diverging_color(value: float | None) -> tuple[int, int, int]:
    """-1 blue, 0 white, +1 red; None grey."""
    if value is None or not math.isfinite(value):
        return (200, 200, 200)
    v = max(-1.0, min(1.0, value))
    if v >= 0:
        return (255, int(255 * (1 - v)), int(255 * (1 - v)))
    return (int(255 * (1 + v)), int(255 * (1 + v)), 255)


def draw_heatmap(clash: ClashMap, path: str | Path | None = None, cell: int = 10):
    """Heat map PNG: one row per block, one cell per layer, then a wide cell with the block's cosine."""
    from PIL import Image, ImageDraw

    rows = [b for b in BLOCK_ORDER if b in clash.blocks]
    per_block = {b: [layer for layer in clash.layers if layer.block == b] for b in rows}
    ncols = max(len(v) for v in per_block.values())
    label_w, total_w, head_h = 90, 60, 34
    width = label_w + ncols * cell + 10 + total_w + 10
    height = head_h + len(rows) * (cell + 4) + 40
    img = Image.new("RGB", (max(width, 360), height), "white")
    d = ImageDraw.Draw(img)
    overall = "-" if clash.overall is None else f"{clash.overall:+.2f}"
    d.text((6, 4), f"clash {clash.lora_a} vs {clash.lora_b}: cosine of weight updates (overall {overall})", fill="black")
    d.text((label_w, 18), "layers ->", fill="grey")
    d.text((label_w + ncols * cell + 10, 18), "block", fill="grey")
    for i, b in enumerate(rows):
        y = head_h + i * (cell + 4)
        d.text((6, y - 1), b, fill="black")
        for j, layer in enumerate(per_block[b]):
            x = label_w + j * cell
            d.rectangle([x, y, x + cell - 2, y + cell - 1], fill=diverging_color(layer.cosine))
        x = label_w + ncols * cell + 10
        c = clash.blocks[b]
        d.rectangle([x, y, x + total_w, y + cell - 1], fill=diverging_color(c))
        d.text((x + 4, y - 1), "-" if c is None else f"{c:+.2f}", fill="black")
    # legend
    y = head_h + len(rows) * (cell + 4) + 10
    for k in range(101):
        d.line([(label_w + k * 2, y), (label_w + k * 2, y + 8)], fill=diverging_color(-1 + k / 50))
    d.text((label_w - 22, y - 2), "-1", fill="black")
    d.text((label_w + 204, y - 2), "+1 (same direction)", fill="black")
    d.text((label_w + 90, y + 10), "0", fill="black")
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    return img
