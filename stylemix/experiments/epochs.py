"""Compare the epochs of one LoRA: its saved versions and the final LoRA on the same prompts and seeds.

`stylemix train --save-every-epochs N` keeps the LoRA of every Nth epoch as a library entry named
`<name>@eNN` (two or more digits).  `run_epochs` renders every prompt x seed with the base model
(the reference row) and with each version alone, then the final LoRA (labelled "final", the last
epoch), all at one weight and with the same settings, and scores every image:

- the CLIP score (how well the image matches the prompt);
- the style similarity to the FINAL LoRA's style centroid (the style the artist trained): the raw
  cosine and the calibrated value (0 = the base image of the same prompt and seed, 1 = the
  style's own images; scoring.py).  A final LoRA without a centroid gives CLIP scores only, and
  the result says so (`note`).

Results come back as data (`EpochsResult`) and are written into one folder:

    images/<row>/p<prompt>_s<seed>.png   each with its recipe (PNG chunks); <row>: base, e02, ..., final
    epochs.json                          the table and every image's scores
    plot.png                             CLIP score and style similarity against the epoch
    contact.png                          rows: base and the epochs; columns: prompt x seed
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from stylemix.errors import StyleMixError
from stylemix.paths import atomic_write_text
from stylemix.recipe import Recipe

# the library's name of a saved epoch: the final LoRA's name, "@e", the epoch with at least two digits
_VERSION = re.compile(r"(?P<name>.+)@e(?P<epoch>\d{2,})")
NO_VERSIONS_HINT = "train with --save-every-epochs N to compare epochs"


# --------------------------------------------------------------------------- versions


def version_name(name: str, epoch: int) -> str:
    """The library name of epoch `epoch` of LoRA `name`: watercolor, 5 -> watercolor@e05."""
    return f"{name}@e{int(epoch):02d}"


def parse_version(name: str) -> tuple[str, int] | None:
    """(final LoRA's name, epoch) of a version's name, or None for any other name."""
    m = _VERSION.fullmatch(name or "")
    return (m["name"], int(m["epoch"])) if m else None


def find_versions(name: str, names: Iterable[str]) -> list[tuple[int, str]]:
    """The saved epochs of LoRA `name` among `names`, as (epoch, library name), by epoch (e2 before e10)."""
    found = [(p[1], n) for n in names if (p := parse_version(n)) is not None and p[0] == name]
    return sorted(found)


# --------------------------------------------------------------------------- the experiment


@dataclass
class EpochRow:
    """One row of the comparison: the base model, one saved epoch, or the final LoRA."""

    label: str  # "base", "e02", ..., "final"; also the row's image folder
    lora: str | None  # the library LoRA rendered alone; None for the base model
    epoch: int | None  # the saved epoch; None for base and final


@dataclass
class EpochsResult:
    out_dir: Path
    lora: str  # the final LoRA
    weight: float  # every epoch's weight
    rows: list[dict]  # the table: base, the epochs in order, final; means over prompts x seeds
    images: list[dict]  # one per image: row, prompt index, seed, file (relative to out_dir) and its scores
    files: dict[str, str]  # "plot", "contact", "json" -> path
    clip_model: str
    is_demo: bool
    has_centroid: bool  # False: the final LoRA has no style centroid, so only CLIP scores
    note: str = ""  # what a reader must know about the numbers (no centroid)
    style_judge: str | None = None  # what measured the style similarities (CLIP or CSD)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


def epoch_rows(lora: str, versions: list[tuple[int, str]]) -> list[EpochRow]:
    """Base, the versions by epoch, then the final LoRA; refuses a LoRA without versions."""
    if not versions:
        raise StyleMixError(f"LoRA {lora!r} has no saved epochs (versions named {version_name(lora, 5)} ...): "
                            f"{NO_VERSIONS_HINT}.")
    epochs = [e for e, _ in versions]
    if len(set(epochs)) != len(epochs):
        raise StyleMixError(f"Epochs of {lora!r} given twice: {sorted(epochs)}.")
    return ([EpochRow("base", None, None)] + [EpochRow(f"e{e:02d}", n, e) for e, n in sorted(versions)]
            + [EpochRow("final", lora, None)])


def run_epochs(mixer, lora: str, versions: list[tuple[int, str]], out_dir: str | Path, prompts: list[str],
               seeds: list[int], settings: dict, weight: float = 1.0,
               progress: Callable[[int, int, str], None] | None = None, judge=None) -> EpochsResult:
    """Render and score every row x prompt x seed into `out_dir` (see the module's docstring).

    versions: the saved epochs as (epoch, library LoRA name), e.g. find_versions(lora, library names).
    settings: Recipe fields every image shares (steps, sampler, width, height...).
    judge: a StyleJudge for [lora] (default: the mixer's, tiny random CLIP for the tiny model).
    """
    from stylemix.recipe import save_png
    from stylemix.scores.judge import StyleJudge

    rows = epoch_rows(lora, versions)
    base_recipe = Recipe(prompt=prompts[0] if prompts else "", seed=0, **settings)
    for r in rows:  # every setting and weight checked (the Recipe's words) before any image is made
        base_recipe.with_(loras={r.lora: weight} if r.lora else {}).validate()
    judge = judge or StyleJudge.for_mixer(mixer, [lora])
    has_centroid = lora in judge.centroids
    out = Path(out_dir)
    total = len(rows) * len(prompts) * len(seeds)
    records, bases = [], {}
    for row in rows:  # base first: every other image is calibrated against the base image of its prompt and seed
        for i, prompt in enumerate(prompts):
            for seed in seeds:
                recipe = base_recipe.with_(prompt=prompt, seed=int(seed), loras={row.lora: weight} if row.lora else {})
                res = mixer.generate(recipe)
                image = res.images[0]
                rel = f"images/{row.label}/p{i}_s{seed}.png"
                save_png(image, out / rel, res.recipe, res.prompt_used,
                         extra={"epochs": {"lora": lora, "row": row.label, "weight": weight}})
                if row.lora is None:
                    bases[(i, seed)] = image
                base = None if row.lora is None else [bases[(i, seed)]]
                s = judge.score([image], prompt, base_images=base)[0]
                records.append({"row": row.label, "lora": row.lora, "prompt_index": i, "prompt": prompt,
                                "seed": int(seed), "file": rel, "clip_score": s.clip_score,
                                "style_similarity": s.similarity.get(lora),
                                # the base image is calibration's 0 itself: no calibrated value of its own
                                "style_calibrated": s.calibrated.get(lora) if row.lora else None})
                if progress:
                    progress(len(records), total, f"{row.label} | prompt {i} | seed {seed}")
    table = summarise(rows, records, weight)
    note = "" if has_centroid else (
        f"{lora!r} has no style centroid for the style judge {judge.style_judge}: CLIP scores only, no style "
        f"similarity. Compute one with `stylemix score REFERENCE_IMAGES... --save-centroid {lora}`.")
    result = EpochsResult(out, lora, weight, table, records, {}, judge.scorer.name, judge.is_demo,
                          has_centroid, note, style_judge=judge.style_judge)
    result.files = write_files(result, rows, prompts, seeds)
    return result


def _mean(values: list) -> float | None:
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(rows: list[EpochRow], records: list[dict], weight: float) -> list[dict]:
    """One table row per epoch row: means over its prompts x seeds (None where nothing was measured)."""
    out = []
    for r in rows:
        mine = [x for x in records if x["row"] == r.label]
        out.append({"epoch": r.label, "lora": r.lora or "", "weight": weight if r.lora else 0.0, "n": len(mine),
                    "clip_mean": _mean([x["clip_score"] for x in mine]),
                    "style_sim_mean": _mean([x["style_similarity"] for x in mine]),
                    "style_cal_mean": _mean([x["style_calibrated"] for x in mine])})
    return out


# --------------------------------------------------------------------------- files


def write_files(result: EpochsResult, rows: list[EpochRow], prompts: list[str], seeds: list[int]) -> dict[str, str]:
    out = result.out_dir
    files = {"plot": str(out / "plot.png"), "contact": str(out / "contact.png"), "json": str(out / "epochs.json")}
    draw_plot(result).save(files["plot"])
    draw_contact_sheet(out, rows, prompts, seeds).save(files["contact"])
    atomic_write_text(out / "epochs.json", json.dumps({**result.to_dict(), "files": files}, indent=1))
    return files


def draw_contact_sheet(out: Path, rows: list[EpochRow], prompts: list[str], seeds: list[int], thumb: int = 96):
    """Rows: base and the epochs; columns: every prompt x seed, labelled."""
    from PIL import Image, ImageDraw

    from stylemix.scores.scoring import open_image

    cols = [(i, s) for i in range(len(prompts)) for s in seeds]
    label_w, top = 90, 20
    sheet = Image.new("RGB", (label_w + len(cols) * thumb, top + len(rows) * thumb), "white")
    d = ImageDraw.Draw(sheet)
    for k, (i, s) in enumerate(cols):
        d.text((label_w + k * thumb + 4, 4), f"p{i} s{s}", fill="black")
    for r, row in enumerate(rows):
        d.text((4, top + r * thumb + thumb // 2 - 5), row.label, fill="black")
        for k, (i, s) in enumerate(cols):
            p = out / f"images/{row.label}/p{i}_s{s}.png"
            if p.is_file():
                sheet.paste(open_image(p).resize((thumb, thumb)), (label_w + k * thumb, top + r * thumb))
    return sheet


def draw_plot(result: EpochsResult, width: int = 480, height: int = 220):
    """Two panels, one point per epoch (in order, final last): the mean CLIP score, then the mean style
    similarity; the base model's value as a dashed line."""
    from PIL import Image, ImageDraw

    panels = [("clip_mean", "CLIP score (prompt match)")]
    if result.has_centroid:
        panels.append(("style_sim_mean", f"style similarity to {result.lora}'s centroid"))
    left, top, gap = 60, 30, 50
    img = Image.new("RGB", (left + width + 20, top + len(panels) * (height + gap)), "white")
    d = ImageDraw.Draw(img)
    title = f"Epochs of {result.lora} at weight {result.weight:g}" + (" (DEMO VALUES)" if result.is_demo else "")
    d.text((left, 6), title, fill="black")
    epochs = [r for r in result.rows if r["epoch"] != "base"]
    base = next(r for r in result.rows if r["epoch"] == "base")
    for k, (key, label) in enumerate(panels):
        y_top = top + k * (height + gap)
        _panel(d, [(r["epoch"], r[key]) for r in epochs], base[key], label, (left, y_top, width, height))
    if not result.has_centroid:
        d.text((left, top + height + 20), "no style similarity: the final LoRA has no style centroid", fill="black")
    return img


def _panel(d, points: list[tuple[str, float | None]], base: float | None, label: str, box) -> None:
    """One line chart: labelled epochs evenly spaced on x, values on y, the base model dashed."""
    from stylemix.experiments.weight_maps import PALETTE

    x0, y0, w, h = box
    d.rectangle([x0, y0, x0 + w, y0 + h], outline="grey")
    d.text((x0 + 4, y0 + 4), label, fill="black")
    ys = [v for _, v in points if v is not None] + ([base] if base is not None else [])
    if not ys:
        d.text((x0 + 20, y0 + h // 2), "not measured", fill="black")
        return
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1e-3
    pad = 20  # keep points off the frame

    def px(k, v):
        x = x0 + pad + (w - 2 * pad) * (k / max(len(points) - 1, 1))
        return x, y0 + pad + (1 - (v - lo) / (hi - lo)) * (h - 2 * pad)

    for v in (lo, hi):
        d.text((4, px(0, v)[1] - 5), f"{v:.4g}", fill="black")
    if base is not None:
        y = px(0, base)[1]
        for xx in range(x0, x0 + w, 8):
            d.line([(xx, y), (xx + 4, y)], fill=(120, 120, 120))
        d.text((x0 + w - 70, y - 12), "base model", fill=(120, 120, 120))
    dots = [(px(k, v), name) for k, (name, v) in enumerate(points) if v is not None]
    if len(dots) > 1:
        d.line([p for p, _ in dots], fill=PALETTE[1], width=2)
    for (cx, cy), _ in dots:
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=PALETTE[0], outline="black")
    for k, (name, _) in enumerate(points):
        d.text((px(k, lo)[0] - 10, y0 + h + 4), name, fill="black")
