"""Exact mix export: a mix of N LoRAs at chosen weights as one LoRA file.

A mix adds, in every layer, `sum_i w_i * m_i(block) * s_i * B_i A_i` to the base weight
(w_i: the LoRA's weight, m_i: its per-block multiplier, s_i = alpha_i / r_i: the scale it was
trained with).  That sum is itself a LoRA of rank r_1 + ... + r_N:

    A = [A_1; A_2; ...; A_N]                       (rows stacked)
    B = [c_1 B_1, c_2 B_2, ..., c_N B_N]           (columns stacked, c_i = w_i m_i s_i)
    B A = sum_i c_i B_i A_i                         exactly

written with alpha = rank (scale 1), so every loader (diffusers, A1111, ComfyUI, kohya scripts)
applies it as is.  A module that some LoRAs lack gets zero rows/columns for them, which keeps one
rank for the whole file (mixed ranks need rank_pattern, which not every tool reads).

`compress(..., rank=k)` then keeps the best rank-k approximation of each layer's update (SVD,
computed from QR factors of B and A^T, never forming the out x in matrix) and reports the error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from stylemix.lora import files as lora_files
from stylemix.errors import StyleMixError
from stylemix.paths import check_name

logger = logging.getLogger("stylemix")

FORMATS = ("diffusers", "kohya")


@dataclass
class MixExport:
    """A mix as one LoRA: canonical (diffusers/peft) state dict, header, and what went into it."""

    state: dict[str, torch.Tensor]
    header: dict[str, str]
    weights: dict[str, float]  # LoRA name -> weight (weight-0 LoRAs are left out)
    block_weights: dict[str, dict[str, float]]
    rank: int  # rank of the file: r_1 + ... + r_N, or the compressed rank
    sources: dict[str, str] = field(default_factory=dict)  # LoRA name -> sha256 of its weights file
    relative_error: float = 0.0  # ||dW - dW_k||_F / ||dW||_F over all layers (0: exact)
    worst_layer_error: float = 0.0  # the largest per-layer relative error
    worst_layer: str | None = None

    def info(self) -> dict:
        d = asdict(self)
        d.pop("state")
        d.pop("header")
        d["exact"] = self.relative_error == 0.0
        return d


def block_multiplier(module_key: str, blocks: dict[str, float]) -> float:
    """The per-block multiplier the mixer applies to a layer (most specific block id wins)."""
    from stylemix.mixer import block_of

    component, _, name = module_key.partition(".")
    if component == "text_encoder":
        ids = block_of("text_encoder", name)
    else:
        ids = block_of("unet", name)
    return next((float(blocks[b]) for b in ids if b in blocks), 1.0)


def _leaf(module_key: str) -> str:
    parts = module_key.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def mix_lora_states(loras: list[tuple[str, dict[str, torch.Tensor], dict[str, str]]], weights: dict[str, float],
                    block_weights: dict[str, dict[str, float]] | None = None) -> tuple[dict, int]:
    """Concatenate scaled LoRAs into one canonical state dict of rank sum(r_i) with scale 1.

    loras: (name, canonical state dict, header metadata) per LoRA, in mix order.
    Returns (state, rank).  Each module's A is [R, in], B is [out, R], R the same for every module.
    """
    block_weights = block_weights or {}
    parts: list[tuple[str, dict, float, dict]] = []  # name, modules, weight, per-module scales
    for name, state, metadata in loras:
        w = float(weights.get(name, 0.0))
        if w == 0:
            continue
        modules = lora_files.lora_modules(state)
        parts.append((name, modules, w, lora_files.module_scales(metadata, modules)))
    if not parts:
        raise StyleMixError("Nothing to export: every LoRA of the mix has weight 0.")
    ranks = []
    for name, modules, _, _ in parts:
        rs = {a.shape[0] for a, _ in modules.values()}
        ranks.append(max(rs))  # a LoRA with per-module ranks is padded to its largest
    total = sum(ranks)
    shapes: dict[str, tuple[tuple, tuple]] = {}  # module -> (A's shape after the rank, B's shape without it)
    for name, modules, _, _ in parts:
        for mod, (a, b) in modules.items():
            shape = (tuple(a.shape[1:]), (b.shape[0], *b.shape[2:]))
            if shapes.setdefault(mod, shape) != shape:
                raise StyleMixError(f"LoRA {name!r} has layer {mod!r} of shape {shape}, another LoRA of the mix "
                                    f"has {shapes[mod]}: made for different base models, they cannot be mixed.")
    state: dict[str, torch.Tensor] = {}
    for mod, (a_rest, (fout, *b_rest)) in sorted(shapes.items()):
        A = torch.zeros(total, *a_rest, dtype=torch.float32)  # conv layers keep peft's [r, in, kh, kw]
        B = torch.zeros(fout, total, *b_rest, dtype=torch.float32)
        offset = 0
        for (name, modules, w, scales), r_max in zip(parts, ranks):
            if mod in modules:
                a, b = modules[mod]
                r = a.shape[0]
                c = w * block_multiplier(mod, block_weights.get(name, {})) * scales[mod]
                A[offset : offset + r] = a.float()
                B[:, offset : offset + r] = b.float() * c
            offset += r_max
        state[f"{mod}.lora_A.weight"] = A
        state[f"{mod}.lora_B.weight"] = B
    return state, total


def adapter_header(state: dict[str, torch.Tensor], rank: int, extra: dict | None = None) -> dict[str, str]:
    """Header with peft LoraConfig fields per component (r = alpha = rank: scale 1), as diffusers writes it."""
    md: dict[str, object] = {}
    for comp in ("unet", "text_encoder"):
        leaves = sorted({_leaf(k[: -len(".lora_A.weight")]) for k in state
                         if k.startswith(comp + ".") and k.endswith(".lora_A.weight")})
        if leaves:
            md.update({f"{comp}.r": rank, f"{comp}.lora_alpha": rank, f"{comp}.target_modules": leaves,
                       f"{comp}.init_lora_weights": True, f"{comp}.lora_dropout": 0.0})
    header = {"lora_adapter_metadata": json.dumps(md, sort_keys=True), "format": "pt"}
    if extra:
        header["stylemix_mix"] = json.dumps(extra, sort_keys=True)
    return header


def compress(state: dict[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], float, float, str | None]:
    """Best rank-`rank` approximation of every layer's B @ A (Eckart-Young), via QR + a small SVD.

    Returns (state, relative Frobenius error over all layers, worst layer's error, worst layer).
    Layers whose update already has rank <= `rank` stay exact (zero-padded to `rank`).
    """
    if not isinstance(rank, int) or rank < 1:
        raise StyleMixError(f"Compression rank {rank!r} must be a positive integer.")
    out: dict[str, torch.Tensor] = {}
    kept_total = dropped_total = 0.0
    worst, worst_mod = 0.0, None
    for mod, (a, b) in lora_files.lora_modules(state).items():
        a_shape, b_shape = a.shape, b.shape  # conv layers: factor as matrices, keep peft's 4-D layout
        a64, b64 = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
        qb, rb = torch.linalg.qr(b64)  # B = Qb Rb,  Qb [out, R']
        qa, ra = torch.linalg.qr(a64.T)  # A^T = Qa Ra, Qa [in, R']
        u, s, vh = torch.linalg.svd(rb @ ra.T)  # B A = Qb (Rb Ra^T) Qa^T
        k = min(rank, s.numel())
        new_b = torch.zeros(b.shape[0], rank, dtype=torch.float64)
        new_a = torch.zeros(rank, a64.shape[1], dtype=torch.float64)
        # split the singular values evenly between the factors so neither grows large
        root = s[:k].sqrt()
        new_b[:, :k] = (qb @ u[:, :k]) * root
        new_a[:k] = root[:, None] * (vh[:k] @ qa.T)
        out[f"{mod}.lora_A.weight"] = new_a.float().reshape(rank, *a_shape[1:])
        out[f"{mod}.lora_B.weight"] = new_b.float().reshape(b_shape[0], rank, *b_shape[2:])
        total, dropped = float((s**2).sum()), float((s[k:] ** 2).sum())
        kept_total += total
        dropped_total += dropped
        err = (dropped / total) ** 0.5 if total > 0 else 0.0
        if err > worst:
            worst, worst_mod = err, mod
    rel = (dropped_total / kept_total) ** 0.5 if kept_total > 0 else 0.0
    return out, rel, worst, worst_mod


def export_mix(library, weights: dict[str, float], block_weights: dict[str, dict[str, float]] | None = None,
               rank: int | None = None) -> MixExport:
    """The mix `weights` (LoRA name -> weight) of `library`'s LoRAs as one LoRA, optionally compressed.

    Weight-0 LoRAs are left out.  block_weights: {LoRA: {block: multiplier}} as in `Recipe`.
    rank: compress to this rank by SVD (reported error); None keeps the exact rank r_1 + ... + r_N.
    """
    from stylemix.recipe import Recipe

    if not weights:
        raise StyleMixError("A mix to export needs at least one LoRA.")
    # the recipe's checks: names, weight range, block multipliers
    Recipe(prompt="", loras=dict(weights), block_weights=dict(block_weights or {})).validate()
    unknown = [n for n in (block_weights or {}) if n not in weights]
    if unknown:
        raise StyleMixError(f"Block weights given for {unknown[0]!r}, which is not in the mix.")
    loras, sources = [], {}
    for name in weights:
        entry = library.get(name)
        if not entry.compatible:
            raise StyleMixError(f"LoRA {name!r} cannot be used with this base model: {entry.problem}.")
        state, metadata = lora_files.read_lora_file(entry.weights)
        loras.append((name, state, metadata))
        sources[name] = entry.sha256
    active = {n: float(w) for n, w in weights.items() if w != 0}
    blocks = {n: dict(b) for n, b in (block_weights or {}).items() if n in active}
    state, total = mix_lora_states(loras, active, blocks)
    result = MixExport(state=state, header={}, weights=active, block_weights=blocks, rank=total, sources=sources)
    if rank is not None and rank < total:
        state, rel, worst, worst_mod = compress(state, rank)
        result.state, result.rank = state, rank
        result.relative_error, result.worst_layer_error, result.worst_layer = rel, worst, worst_mod
    elif rank is not None:
        logger.info("Compression rank %d >= the exact rank %d: exported exactly.", rank, total)
    result.header = adapter_header(result.state, result.rank, {
        "weights": active, "block_weights": blocks, "sources": sources, "rank": result.rank,
        "exact_rank": total, "relative_error": result.relative_error})
    return result


def write_mix(result: MixExport, dest: str | Path, fmt: str = "diffusers", name: str = "mix") -> Path:
    """Write an exported mix to `dest` (a .safetensors file) in 'diffusers' or 'kohya' layout."""
    from stylemix.lora.canonical import to_kohya

    dest = Path(dest)
    if dest.suffix != ".safetensors":
        raise StyleMixError(f"Export target {dest.name!r} must end in .safetensors.")
    if fmt == "diffusers":
        lora_files.write_safetensors(dest, result.state, result.header)
    elif fmt == "kohya":
        kohya, kmeta = to_kohya(result.state, result.header, float(result.rank))
        kmeta["ss_output_name"] = name
        kmeta["stylemix_mix"] = result.header.get("stylemix_mix", "{}")
        lora_files.write_safetensors(dest, kohya, kmeta)
    else:
        raise StyleMixError(f"Unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}.")
    return dest


def add_mix_to_library(library, result: MixExport, name: str, trigger_words: list[str] | None = None,
                       overwrite: bool = False):
    """Store an exported mix as a new LoRA of the library (its metadata says what it was mixed from)."""
    check_name(name, "LoRA name")
    if name in result.weights:
        raise StyleMixError(f"The mix cannot be stored as {name!r}: that is one of the LoRAs it is made of.")
    meta = {"trigger_word": None, "base_model": getattr(library, "base_model", None), "alpha": float(result.rank),
            "mix": {**result.info(), "trigger_words": list(trigger_words or [])}}
    return library.add(name, result.state, result.header, meta, overwrite=overwrite)


def mix_trigger_words(library, weights: dict[str, float]) -> list[str]:
    """Trigger words of the mix's active LoRAs, in mix order (prompt them with the exported LoRA)."""
    words = []
    for n, w in weights.items():
        t = library.get(n).trigger_word if w else None
        if t and t not in words:
            words.append(t)
    return words
