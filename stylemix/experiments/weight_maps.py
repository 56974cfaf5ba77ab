"""Weight maps: how two (or more) styles trade off across a sweep of weights, for one prompt and seed.

- `weight_map_2d`: a grid of weights for two LoRAs (other LoRAs of the mix held fixed), one
  image per cell, scored: every style's share and the CLIP score.  Drawn as an image grid and
  as heat maps (share of the first LoRA, CLIP score); `balance.py` draws its search path on it.
- `weight_map_lines`: for three or four LoRAs, sweeps along chosen straight lines in weight
  space (e.g. from pure A to an even B+C mix), drawn as stacked share bars with the CLIP score.

Every cell is scored against the same base-model image (all weights 0, same prompt and seed),
the low anchor of calibrated similarity, so shares across the map are comparable.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from stylemix.errors import StyleMixError
from stylemix.scores.judge import StyleJudge  # noqa: F401  (the judge every sweep scores with)
from stylemix.recipe import Recipe

logger = logging.getLogger("stylemix")

PALETTE = [(220, 60, 60), (50, 110, 220), (40, 170, 80), (230, 160, 30), (150, 70, 190), (30, 170, 180)]
MAX_CELLS = 400


# --------------------------------------------------------------------------- sweeps


@dataclass
class MapCell:
    weights: dict[str, float]
    image: object = None  # PIL image
    clip_score: float | None = None
    shares: dict[str, float] = field(default_factory=dict)
    similarity: dict[str, float] = field(default_factory=dict)
    calibrated: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"weights": self.weights, "clip_score": self.clip_score, "shares": self.shares,
                "similarity": self.similarity, "calibrated": self.calibrated}


@dataclass
class WeightMap:
    names: list[str]  # the LoRAs swept (all LoRAs of the mix)
    cells: list[MapCell]
    recipe: Recipe  # prompt, seed and settings every cell shares
    kind: str  # "grid" or "lines"
    axes: tuple[list[float], list[float]] | None = None  # grid: values of names[0] (columns), names[1] (rows)
    lines: int = 0  # lines: how many lines; cells are line-major
    points_per_line: int = 0
    clip_model: str | None = None
    is_demo: bool = False
    style_judge: str | None = None  # what measured the similarities and shares (CLIP or CSD)

    def to_dict(self) -> dict:
        return {"names": self.names, "kind": self.kind, "axes": self.axes, "lines": self.lines,
                "points_per_line": self.points_per_line, "clip_model": self.clip_model, "is_demo": self.is_demo,
                "style_judge": self.style_judge,
                "recipe": self.recipe.to_dict(), "cells": [c.to_dict() for c in self.cells]}


def grid_points(a: str, b: str, values_a: Sequence[float], values_b: Sequence[float],
                fixed: dict[str, float] | None = None) -> list[dict[str, float]]:
    """Row-major grid: rows follow values_b, columns values_a; `fixed` LoRAs keep their weight."""
    return [{a: float(va), b: float(vb), **(fixed or {})} for vb in values_b for va in values_a]


def line_points(start: dict[str, float], end: dict[str, float], n: int) -> list[dict[str, float]]:
    """n evenly spaced weight vectors from `start` to `end` (LoRAs missing from one end are 0 there)."""
    if n < 2:
        raise StyleMixError(f"A line needs at least 2 points; got {n}.")
    names = list(dict.fromkeys([*start, *end]))
    return [{k: round(start.get(k, 0.0) + (end.get(k, 0.0) - start.get(k, 0.0)) * i / (n - 1), 6) for k in names}
            for i in range(n)]


def sweep(mixer, recipe: Recipe, points: list[dict[str, float]], judge: StyleJudge | None = None,
          progress: Callable[[int, int, str], None] | None = None) -> list[MapCell]:
    """One image per weight vector, same prompt/seed/settings; scored against the base image."""
    if not points:
        raise StyleMixError("A sweep needs at least one weight vector.")
    if len(points) > MAX_CELLS:
        raise StyleMixError(f"{len(points)} images is more than a map holds ({MAX_CELLS}); use fewer values.")
    recipe = recipe.with_(batch_size=1)
    for p in points:  # every point checked before any image is made
        recipe.with_(loras=p).validate()
    base = mixer.generate(recipe.with_(loras={})).images[0] if judge else None
    cells = []
    for i, p in enumerate(points):
        res = mixer.generate(recipe.with_(loras=dict(p)))
        cell = MapCell(weights=dict(p), image=res.images[0])
        if judge is not None:
            s = judge.score([cell.image], recipe.prompt, base_images=[base], weights=cell.weights)[0]
            cell.clip_score, cell.shares, cell.similarity, cell.calibrated = s.clip_score, s.shares, s.similarity, s.calibrated
        cells.append(cell)
        if progress:
            progress(i + 1, len(points), ", ".join(f"{k}={v:g}" for k, v in p.items()))
    return cells


def weight_map_2d(mixer, recipe: Recipe, a: str, b: str, values_a: Sequence[float],
                  values_b: Sequence[float] | None = None, fixed: dict[str, float] | None = None,
                  judge: StyleJudge | None = None, progress=None) -> WeightMap:
    """Grid sweep of LoRAs a (columns) and b (rows); `fixed`: other LoRAs of an N-way mix at set weights."""
    if a == b:
        raise StyleMixError(f"A weight map needs two different LoRAs; got {a!r} twice.")
    values_b = list(values_b if values_b is not None else values_a)
    names = [a, b, *[n for n in (fixed or {}) if n not in (a, b)]]
    cells = sweep(mixer, recipe, grid_points(a, b, values_a, values_b, fixed), judge, progress)
    return WeightMap(names, cells, recipe, "grid", axes=(list(map(float, values_a)), list(map(float, values_b))),
                     **_judged_by(judge))


def weight_map_lines(mixer, recipe: Recipe, lines: list[tuple[dict[str, float], dict[str, float]]], n: int = 5,
                     judge: StyleJudge | None = None, progress=None) -> WeightMap:
    """Sweeps along straight lines in weight space (for 3+ LoRAs, where a full grid is too many images)."""
    if not lines:
        raise StyleMixError("Give at least one line (start and end weights).")
    points = [p for start, end in lines for p in line_points(start, end, n)]
    names = list(dict.fromkeys(k for p in points for k in p))
    cells = sweep(mixer, recipe, points, judge, progress)
    return WeightMap(names, cells, recipe, "lines", lines=len(lines), points_per_line=n,
                     **_judged_by(judge))


def _judged_by(judge: StyleJudge | None) -> dict:
    """The WeightMap fields that say which models scored it: one map is always one judge's."""
    if judge is None:
        return {}
    return {"clip_model": judge.scorer.name, "is_demo": judge.is_demo, "style_judge": judge.style_judge}


# --------------------------------------------------------------------------- drawing


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def draw_image_grid(wmap: WeightMap, thumb: int = 128):
    """The map's images in their layout, each captioned with its weights (and shares when scored)."""
    from PIL import Image, ImageDraw

    if wmap.kind == "grid":
        cols, rows = len(wmap.axes[0]), len(wmap.axes[1])
    else:
        cols, rows = wmap.points_per_line, wmap.lines
    cap = 26
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + cap)), "white")
    d = ImageDraw.Draw(sheet)
    for i, cell in enumerate(wmap.cells):
        r, c = divmod(i, cols)
        x, y = c * thumb, r * (thumb + cap)
        if cell.image is not None:
            sheet.paste(cell.image.convert("RGB").resize((thumb, thumb)), (x, y))
        d.text((x + 2, y + thumb), " ".join(f"{v:g}" for v in cell.weights.values()), fill="black", font=_font())
        if cell.shares:
            d.text((x + 2, y + thumb + 12), "/".join(f"{100 * v:.0f}" for v in cell.shares.values()) + "%",
                   fill="grey", font=_font())
    return sheet


def _lerp_color(t: float) -> tuple[int, int, int]:
    t = max(0.0, min(1.0, t))  # white -> dark blue
    return (int(255 - 215 * t), int(255 - 175 * t), int(255 - 75 * t))


def _index_coord(values: list[float], v: float) -> float:
    import numpy as np

    return float(np.interp(v, values, range(len(values)))) if len(values) > 1 else 0.0


def draw_share_map(wmap: WeightMap, path_points: list[dict[str, float]] | None = None, cell: int = 48):
    """Grid maps: heat maps of the first LoRA's share and of the CLIP score, with an optional path
    (balance.py's search) drawn over both.  Line sweeps: stacked share bars and the CLIP score."""
    from PIL import Image, ImageDraw

    if wmap.kind != "grid":
        return _draw_lines(wmap)
    va, vb = wmap.axes
    a, b = wmap.names[:2]
    clips = [c.clip_score for c in wmap.cells if c.clip_score is not None]
    lo, hi = (min(clips), max(clips)) if clips else (0.0, 1.0)
    pad, top = 50, 40
    panel_w, panel_h = len(va) * cell, len(vb) * cell
    img = Image.new("RGB", (2 * (panel_w + pad) + pad, panel_h + top + 40), "white")
    d = ImageDraw.Draw(img)
    title = f"{wmap.recipe.prompt[:50]!r} seed {wmap.recipe.seed}" + ("  [DEMO VALUES]" if wmap.is_demo else "")
    d.text((pad, 4), title, fill="black", font=_font())
    panels = [(f"share of {a}", lambda c: c.shares.get(a), 0.0, 1.0),
              (f"CLIP score ({lo:.3f}..{hi:.3f})", lambda c: c.clip_score, lo, hi)]
    for k, (label, get, vmin, vmax) in enumerate(panels):
        x0 = pad + k * (panel_w + pad)
        d.text((x0, top - 16), label, fill="black", font=_font())
        for i, c in enumerate(wmap.cells):
            r, col = divmod(i, len(va))
            v = get(c)
            x, y = x0 + col * cell, top + (len(vb) - 1 - r) * cell  # b grows upwards
            fill = (200, 200, 200) if v is None else _lerp_color((v - vmin) / (vmax - vmin) if vmax > vmin else 0.5)
            d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fill, outline="white")
            if v is not None:
                d.text((x + 3, y + cell // 2 - 5), f"{v:.2f}", fill="black" if (v - vmin) < 0.6 * (vmax - vmin + 1e-9)
                       else "white", font=_font())
        for col, v in enumerate(va):
            d.text((x0 + col * cell + 3, top + panel_h + 2), f"{v:g}", fill="black", font=_font())
        for r, v in enumerate(vb):
            d.text((x0 - 28, top + (len(vb) - 1 - r) * cell + cell // 2 - 5), f"{v:g}", fill="black", font=_font())
        d.text((x0 + panel_w // 2 - 10, top + panel_h + 16), f"{a} ->", fill="black", font=_font())
        d.text((x0 - 45, top - 28), f"{b} ^", fill="black", font=_font())
        if path_points:
            xy = [(x0 + (_index_coord(va, p.get(a, 0.0)) + 0.5) * cell,
                   top + (len(vb) - 1 - _index_coord(vb, p.get(b, 0.0)) + 0.5) * cell) for p in path_points]
            if len(xy) > 1:
                d.line(xy, fill=(230, 40, 40), width=2)
            for j, (x, y) in enumerate(xy):
                rad = 4 if j < len(xy) - 1 else 6
                d.ellipse([x - rad, y - rad, x + rad, y + rad], outline=(230, 40, 40), width=2)
    return img


def _draw_lines(wmap: WeightMap):
    from PIL import Image, ImageDraw

    bar_w, bar_h, gap, left = 40, 120, 30, 10
    n, L = wmap.points_per_line, wmap.lines
    img = Image.new("RGB", (left + n * (bar_w + 6) + 140, L * (bar_h + gap + 24) + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 4), "shares (stacked) and CLIP score (dot) along each line" +
           ("  [DEMO VALUES]" if wmap.is_demo else ""), fill="black", font=_font())
    clips = [c.clip_score for c in wmap.cells if c.clip_score is not None]
    lo, hi = (min(clips), max(clips)) if clips else (0.0, 1.0)
    for li in range(L):
        y0 = 24 + li * (bar_h + gap + 24)
        for j in range(n):
            c = wmap.cells[li * n + j]
            x = left + j * (bar_w + 6)
            y = y0 + bar_h
            for k, name in enumerate(wmap.names):
                h = int(bar_h * c.shares.get(name, 0.0))
                if h:
                    d.rectangle([x, y - h, x + bar_w, y], fill=PALETTE[k % len(PALETTE)])
                y -= h
            d.rectangle([x, y0, x + bar_w, y0 + bar_h], outline=(120, 120, 120))
            if c.clip_score is not None:
                t = (c.clip_score - lo) / (hi - lo) if hi > lo else 0.5
                cy = y0 + bar_h - int(t * bar_h)
                d.ellipse([x + bar_w // 2 - 4, cy - 4, x + bar_w // 2 + 4, cy + 4], fill="black")
            d.text((x, y0 + bar_h + 2), "/".join(f"{v:g}" for v in c.weights.values()), fill="black", font=_font())
    for k, name in enumerate(wmap.names):
        x = left + n * (bar_w + 6) + 10
        d.rectangle([x, 24 + k * 16, x + 10, 34 + k * 16], fill=PALETTE[k % len(PALETTE)])
        d.text((x + 14, 24 + k * 16), name, fill="black", font=_font())
    return img


def write_map(wmap: WeightMap, out_dir: str | Path, path_points: list[dict[str, float]] | None = None) -> dict:
    """Write grid.png, map.png and map.json into `out_dir` (created); returns their paths."""
    from stylemix.paths import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"grid": out / "grid.png", "map": out / "map.png", "json": out / "map.json"}
    draw_image_grid(wmap).save(files["grid"])
    draw_share_map(wmap, path_points).save(files["map"])
    atomic_write_text(files["json"], json.dumps(wmap.to_dict(), indent=2))
    return {k: str(v) for k, v in files.items()}
