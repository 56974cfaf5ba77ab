"""The seed protocol, reproducible: base model, single LoRAs and mixes x prompts x seeds, scored.

`run_protocol` makes every image of a `ProtocolConfig` (a TOML file; the seed report's
experiment ships as `configs/seed_protocol.toml`), scores it and writes into one folder:

    images/<configuration>/p<prompt>_s<seed>.png   each with its full recipe (PNG chunks)
    results.csv       one row per image: CLIP score, similarity / calibrated / share per style
    summary.csv/.md   one row per configuration: means with 95% t-intervals
    contact_p<i>.png  per prompt: configurations (rows) x seeds (columns)
    plot.png          CLIP score against style similarity, per image and per configuration
    run.json          the resolved run (style -> LoRA mapping, settings, fingerprint)

Resumable: a row in results.csv whose PNG exists is never redone; a PNG without its row (an
interruption between the two) is scored again from disk, not regenerated.  The folder belongs
to one run: another configuration is refused with a clear message instead of mixing results.
Under `accelerate launch` the images are split between processes (one GPU each); each writes
its own part file, which the main process merges.

Calibrated similarity (scoring.py) uses the base-model image of the same prompt and seed as the
low anchor, so the base configuration always runs and runs first.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stylemix.errors import StyleMixError
from stylemix.paths import atomic_write_text, check_name
from stylemix.recipe import DEFAULT_SAMPLER, Recipe

logger = logging.getLogger("stylemix")

DEFAULT_CONFIG = Path(__file__).parents[1] / "configs" / "seed_protocol.toml"
GENERATION_KEYS = {"steps", "sampler", "guidance", "width", "height", "negative_prompt", "add_trigger_words"}
MAX_IMAGES = 20000
# two-sided 95% Student t quantiles by degrees of freedom (normal beyond 30)
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


# --------------------------------------------------------------------------- configuration


@dataclass
class Configuration:
    id: str  # "base", "anime", "watercolor_pixelart_0.6_0.4" (the report's names)
    kind: str  # "base", "single" or "mix"
    styles: dict[str, float]  # style -> weight
    loras: dict[str, float] = field(default_factory=dict)  # LoRA -> weight, once styles are mapped


@dataclass
class ProtocolConfig:
    name: str = "protocol"
    styles: dict[str, str] = field(default_factory=dict)  # style -> LoRA name or "auto"
    triggers: dict[str, str] = field(default_factory=dict)  # style -> trigger word that identifies its LoRA
    singles: list[str] | str = "all"  # styles run alone at weight 1.0
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    mixes: list[dict[str, float]] = field(default_factory=list)  # style -> weight; 2, 3, 4... styles
    generation: dict = field(default_factory=dict)  # Recipe fields: steps, sampler, guidance, width, height...
    tiny_generation: dict = field(default_factory=dict)  # replaces `generation` values with the tiny model
    clip_model: str = "ViT-B-32"
    pretrained: str = "openai"

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "ProtocolConfig":
        """Read a TOML protocol file (default: the seed report's experiment)."""
        path = Path(path) if path is not None else DEFAULT_CONFIG
        if not path.is_file():
            raise StyleMixError(f"Protocol config not found: {path}")
        if path.stat().st_size > 1024 * 1024:
            raise StyleMixError(f"{path}: a protocol config is a small text file; this one is over 1 MB.")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise StyleMixError(f"{path}: not valid TOML ({e}).") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "ProtocolConfig":
        def table(key, d=data):
            v = d.get(key, {})
            if not isinstance(v, dict):
                raise StyleMixError(f"{source}: [{key}] must be a table.")
            return v

        known = {"name", "styles", "triggers", "protocol", "mixes", "generation", "scoring"}
        unknown = set(data) - known
        if unknown:
            raise StyleMixError(f"{source}: unknown section {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))}).")
        proto, gen, scoring = table("protocol"), dict(table("generation")), table("scoring")
        tiny = gen.pop("tiny", {})
        mixes = data.get("mixes", [])
        if not isinstance(mixes, list) or not all(isinstance(m, dict) and isinstance(m.get("weights"), dict)
                                                  for m in mixes):
            raise StyleMixError(f"{source}: each [[mixes]] entry needs a `weights = {{style = weight, ...}}` table.")
        cfg = cls(name=str(data.get("name", "protocol")), styles={k: str(v) for k, v in table("styles").items()},
                  triggers={k: str(v) for k, v in table("triggers").items()},
                  singles=proto.get("singles", "all"), prompts=proto.get("prompts", []),
                  seeds=proto.get("seeds", [0, 1]), mixes=[dict(m["weights"]) for m in mixes],
                  generation=gen, tiny_generation=dict(tiny),
                  clip_model=str(scoring.get("clip_model", "ViT-B-32")),
                  pretrained=str(scoring.get("pretrained", "openai")))
        return cfg.validate(source)

    def validate(self, source: str = "config") -> "ProtocolConfig":
        if not self.styles:
            raise StyleMixError(f"{source}: [styles] names no style.")
        for s in self.styles:
            check_name(s, "style name")
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise StyleMixError(f"{source}: protocol.prompts must be a non-empty list of non-empty prompts.")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63
                                     for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise StyleMixError(f"{source}: protocol.seeds must be distinct non-negative integers; got {self.seeds!r}.")
        singles = list(self.styles) if self.singles == "all" else self.singles
        if not isinstance(singles, list):
            raise StyleMixError(f"{source}: protocol.singles must be \"all\" or a list of style names.")
        for s in singles:
            if s not in self.styles:
                raise StyleMixError(f"{source}: single style {s!r} is not in [styles] ({', '.join(self.styles)}).")
        for mix in self.mixes:
            if len(mix) < 2:
                raise StyleMixError(f"{source}: mix {mix!r} needs at least two styles.")
            for s, w in mix.items():
                if s not in self.styles:
                    raise StyleMixError(f"{source}: mix {mix!r} uses style {s!r}, which is not in [styles].")
                if not isinstance(w, (int, float)) or isinstance(w, bool) or not -2 <= w <= 2:
                    raise StyleMixError(f"{source}: weight of {s!r} in mix {mix!r} must be a number in [-2, 2].")
        for key in list(self.generation) + list(self.tiny_generation):
            if key not in GENERATION_KEYS:
                raise StyleMixError(f"{source}: unknown [generation] key {key!r} (known: {', '.join(sorted(GENERATION_KEYS))}).")
        Recipe(prompt="x", **self.generation).validate()
        Recipe(prompt="x", **{**self.generation, **self.tiny_generation}).validate()
        n = len(self.configurations()) * len(self.prompts) * len(self.seeds)
        if n > MAX_IMAGES:
            raise StyleMixError(f"{source}: {n} images is more than one run makes ({MAX_IMAGES}).")
        return self

    def configurations(self, mapping: dict[str, str] | None = None) -> list[Configuration]:
        singles = list(self.styles) if self.singles == "all" else list(self.singles)
        out = [Configuration("base", "base", {})]
        out += [Configuration(s, "single", {s: 1.0}) for s in singles]
        for mix in self.mixes:
            cid = "_".join(mix) + "_" + "_".join(f"{float(w):g}" for w in mix.values())
            out.append(Configuration(cid, "mix", {s: float(w) for s, w in mix.items()}))
        ids = [c.id for c in out]
        dup = next((i for i in ids if ids.count(i) > 1), None)
        if dup:
            raise StyleMixError(f"Configuration {dup!r} appears twice in the protocol.")
        if mapping is not None:
            for c in out:
                c.loras = {mapping[s]: w for s, w in c.styles.items()}
        return out

    def used_styles(self) -> list[str]:
        used = {s for c in self.configurations() for s in c.styles}
        return [s for s in self.styles if s in used]

    def settings(self, tiny: bool) -> dict:
        """Recipe fields for every image (the tiny model's overrides applied when `tiny`)."""
        base = {"steps": 25, "sampler": DEFAULT_SAMPLER, "guidance": 7.5, "width": 512, "height": 512}
        return {**base, **self.generation, **(self.tiny_generation if tiny else {})}


def resolve_styles(config: ProtocolConfig, library, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Style -> LoRA name for every style the protocol uses, or an error naming the style that has none."""
    overrides = dict(overrides or {})
    for s in overrides:
        if s not in config.styles:
            raise StyleMixError(f"--map names style {s!r}, which the protocol does not have "
                                f"(styles: {', '.join(config.styles)}).")
    names = library.names()
    triggers = {n: library.get(n).trigger_word for n in names}
    mapping = {}
    for style in config.used_styles():
        want = overrides.get(style, config.styles[style])
        if want and want != "auto":
            if want not in names:
                raise StyleMixError(f"Style {style!r} maps to LoRA {want!r}, which is not in the library "
                                    f"(LoRAs: {', '.join(names) or 'none'}). Use --map {style}=LORA_NAME.")
            mapping[style] = want
            continue
        norm = re.sub(r"[^a-z0-9]", "", style.lower())
        for rule, found in (
                ("name", [n for n in names if n == style]),
                ("trigger word", [n for n in names if config.triggers.get(style) and triggers[n] == config.triggers[style]]),
                ("name", [n for n in names if norm and norm in re.sub(r"[^a-z0-9]", "", n.lower())])):
            if len(found) == 1:
                mapping[style] = found[0]
                break
            if len(found) > 1:
                raise StyleMixError(f"Style {style!r} matches several LoRAs by {rule} ({', '.join(found)}); "
                                    f"choose one with --map {style}=LORA_NAME.")
        else:
            raise StyleMixError(f"Style {style!r} has no LoRA in the library (LoRAs: {', '.join(names) or 'none'}). "
                                f"Train one, or map the style with --map {style}=LORA_NAME.")
    loras = list(mapping.values())
    dup = next((n for n in loras if loras.count(n) > 1), None)
    if dup:
        styles = [s for s, n in mapping.items() if n == dup]
        raise StyleMixError(f"Styles {', '.join(styles)} all map to LoRA {dup!r}; give each its own with --map.")
    return mapping


# --------------------------------------------------------------------------- running


@dataclass
class ProtocolImage:
    config: Configuration
    prompt_index: int
    prompt: str
    seed: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.config.id, self.prompt_index, self.seed)

    @property
    def rel_path(self) -> str:
        return f"images/{self.config.id}/p{self.prompt_index}_s{self.seed}.png"


def _columns(styles: list[str]) -> list[str]:
    cols = ["config", "kind", "loras", "prompt_index", "prompt", "seed", "file", "clip_score"]
    for s in styles:
        cols += [f"sim_{s}", f"cal_{s}", f"share_{s}"]
    return cols


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _append_row(path: Path, columns: list[str], row: dict) -> None:
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in columns})
        f.flush()
        os.fsync(f.fileno())


def _fmt(x) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.6f}"


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class ProtocolResult:
    out_dir: Path
    total: int  # images in the protocol
    generated: int  # images generated by this call (the rest were already done)
    rescored: int  # PNGs found on disk without their row, scored again
    files: dict[str, str]  # summary files written
    mapping: dict[str, str]
    is_demo: bool
    summary: list[dict] = field(default_factory=list)  # summary.csv's rows, as data (empty on non-main processes)
    markdown: str = ""  # summary.md's text: `intro`, then the summary as a Markdown table
    intro: str = ""  # summary.md's text before its table (what ran, demo or not), for a page that shows the table

    def summary_table(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of summary.csv, cells written exactly as in the file (without CSV quoting)."""
        if not self.summary:
            return [], []
        cols = list(self.summary[0])
        return cols, [[_cell_text(r[k]) for k in cols] for r in self.summary]


def run_protocol(mixer, config: ProtocolConfig, out_dir: str | os.PathLike, overrides: dict[str, str] | None = None,
                 progress: Callable[[int, int, str], None] | None = None, judge=None) -> ProtocolResult:
    """Run (or resume) the protocol into `out_dir`; returns what was done and the files written."""
    from stylemix.recipe import save_png
    from stylemix.scores.scoring import NOISE_FLOOR, mix_shares, open_image
    from stylemix.scores.judge import StyleJudge

    out = Path(out_dir)
    mapping = resolve_styles(config, mixer.library, overrides)
    configs = config.configurations(mapping)
    tiny = mixer.loaded.is_tiny
    settings = config.settings(tiny)
    if tiny and config.tiny_generation:
        logger.warning("TINY model: protocol images use %s instead of the configured %s (random weights; "
                       "images and scores are demo values).", config.tiny_generation,
                       {k: config.settings(False)[k] for k in config.tiny_generation})
    styles = config.used_styles()
    judge = judge or StyleJudge.for_mixer(mixer, list(mapping.values()), config.clip_model, config.pretrained)
    run_info = {"name": config.name, "model": mixer.loaded.model_id, "is_tiny": tiny, "mapping": mapping,
                "lora_hashes": {s: mixer.library.get(n).short_hash for s, n in mapping.items()},
                "settings": settings, "prompts": config.prompts, "seeds": config.seeds,
                "configurations": [{"id": c.id, "kind": c.kind, "styles": c.styles, "loras": c.loras} for c in configs],
                "clip_model": judge.scorer.name, "is_demo": judge.scorer.is_demo}
    fingerprint = hashlib.sha256(json.dumps(run_info, sort_keys=True).encode()).hexdigest()[:16]
    run_info["fingerprint"] = fingerprint
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if run_file.is_file():
        try:
            old = json.loads(run_file.read_text()).get("fingerprint")
        except (ValueError, AttributeError):
            old = None
        if old != fingerprint:
            raise StyleMixError(f"{out} holds results of a different run (other LoRAs, prompts, seeds, settings or "
                                "model); use a new --out folder to keep both.")
    state = None
    if _distributed():
        from accelerate import PartialState

        state = PartialState()
    if state is None or state.is_main_process:
        atomic_write_text(run_file, json.dumps(run_info, indent=2))
    columns = _columns(styles)
    results = out / "results.csv"
    part = results if state is None else out / f"results.part{state.process_index}.csv"
    done_rows = {}
    for p in [results, *sorted(out.glob("results.part*.csv"))]:
        for r in _read_rows(p):
            try:
                done_rows[(r["config"], int(r["prompt_index"]), int(r["seed"]))] = r
            except (KeyError, ValueError):
                continue
    jobs = [ProtocolImage(c, i, p, s) for c in configs for i, p in enumerate(config.prompts) for s in config.seeds]
    done = {j.key for j in jobs if j.key in done_rows and (out / j.rel_path).is_file()}
    todo = [j for j in jobs if j.key not in done]
    counts = {"generated": 0, "rescored": 0, "done": len(done)}
    base_recipe = Recipe(prompt="", **settings)

    def do(job: ProtocolImage) -> None:
        path = out / job.rel_path
        recipe = base_recipe.with_(prompt=job.prompt, seed=job.seed, loras=dict(job.config.loras))
        if path.is_file():
            image = open_image(path)  # made before an interruption: scored again, not regenerated
            counts["rescored"] += 1
        else:
            res = mixer.generate(recipe)
            image = res.images[0]
            save_png(image, path, res.recipe, res.prompt_used,
                     extra={"protocol": {"config": job.config.id, "styles": job.config.styles}})
            counts["generated"] += 1
        base = None
        base_path = out / ProtocolImage(configs[0], job.prompt_index, job.prompt, job.seed).rel_path
        if job.config.kind != "base" and base_path.is_file():
            base = [open_image(base_path)]
        s = judge.score([image], job.prompt, base_images=base)[0]
        row = {"config": job.config.id, "kind": job.config.kind,
               "loras": json.dumps(job.config.loras), "prompt_index": job.prompt_index, "prompt": job.prompt,
               "seed": job.seed, "file": job.rel_path, "clip_score": _fmt(s.clip_score)}
        by_style = {st: mapping[st] for st in styles}
        cal = {st: s.calibrated.get(by_style[st]) for st in styles}
        # shares only when every style of the mix is measured: one missing style would read as 0%
        measured = all(cal[st] is not None for st in job.config.styles)
        shares = mix_shares({st: cal[st] for st in job.config.styles}, NOISE_FLOOR) if job.config.kind == "mix" and measured else {}
        for st in styles:
            row[f"sim_{st}"] = _fmt(s.similarity.get(by_style[st]))
            row[f"cal_{st}"] = _fmt(cal[st])
            row[f"share_{st}"] = _fmt(shares.get(st))
        _append_row(part, columns, row)
        counts["done"] += 1
        if progress:
            progress(counts["done"], len(jobs), f"{job.config.id} | prompt {job.prompt_index} | seed {job.seed}")

    if progress:
        progress(counts["done"], len(jobs), "resuming" if done else "starting")
    # base images first: every other image is calibrated against the base image of its prompt and seed
    for phase in ([j for j in todo if j.config.kind == "base"], [j for j in todo if j.config.kind != "base"]):
        if state is None:
            for job in phase:
                do(job)
        else:
            with state.split_between_processes(phase) as mine:
                for job in mine:
                    do(job)
            state.wait_for_everyone()
    files, summary, markdown = {}, [], ""
    if state is None or state.is_main_process:
        if state is not None:
            _merge_parts(out, results, columns)
        files, summary, markdown = write_summaries(out, config, configs, styles, judge.scorer.is_demo, run_info)
    return ProtocolResult(out, len(jobs), counts["generated"], counts["rescored"], files, mapping,
                          judge.scorer.is_demo, summary, markdown, _intro(judge.scorer.is_demo, run_info))


def _merge_parts(out: Path, results: Path, columns: list[str]) -> None:
    seen = {(r["config"], r["prompt_index"], r["seed"]) for r in _read_rows(results)}
    for p in sorted(out.glob("results.part*.csv")):
        for r in _read_rows(p):
            k = (r["config"], r["prompt_index"], r["seed"])
            if k not in seen:
                _append_row(results, columns, r)
                seen.add(k)
        p.unlink()


# --------------------------------------------------------------------------- summaries


def mean_ci(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """Mean and its two-sided 95% Student-t interval (None where it does not exist)."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None, None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    t = _T95[len(xs) - 2] if len(xs) - 1 <= len(_T95) else 1.96
    h = t * sd / math.sqrt(len(xs))
    return m, m - h, m + h


def _num(s: str | None) -> float | None:
    try:
        return float(s) if s not in (None, "") else None
    except ValueError:
        return None


def summarise(rows: list[dict], configs: list[Configuration], styles: list[str]) -> list[dict]:
    out = []
    for c in configs:
        rs = [r for r in rows if r.get("config") == c.id]
        row = {"config": c.id, "kind": c.kind, "weights": " ".join(f"{s}={w:g}" for s, w in c.styles.items()),
               "n": len(rs)}
        row["clip_mean"], row["clip_lo"], row["clip_hi"] = mean_ci([_num(r["clip_score"]) for r in rs])
        per_image_sim = [[_num(r.get(f"sim_{s}")) for s in c.styles] for r in rs]
        per_image_sim = [[x for x in v if x is not None] for v in per_image_sim]  # the styles with a centroid
        style_sim = [sum(v) / len(v) for v in per_image_sim if v]
        row["style_sim_mean"], row["style_sim_lo"], row["style_sim_hi"] = mean_ci(style_sim)
        for s in styles:
            for key in ("sim", "share"):
                vals = [_num(r.get(f"{key}_{s}")) for r in rs] if s in c.styles else []
                row[f"{key}_{s}_mean"], row[f"{key}_{s}_lo"], row[f"{key}_{s}_hi"] = mean_ci(vals)
        out.append(row)
    return out


def write_summaries(out: Path, config: ProtocolConfig, configs: list[Configuration], styles: list[str],
                    is_demo: bool, run_info: dict) -> tuple[dict[str, str], list[dict], str]:
    """Write summary.csv/.md, the plot and the contact sheets; returns (files, summary rows, markdown)."""
    # a row redone after its PNG went missing appears twice: the last one counts
    rows = list({(r.get("config"), r.get("prompt_index"), r.get("seed")): r
                 for r in _read_rows(out / "results.csv")}.values())
    summary = summarise(rows, configs, styles)
    cols = list(summary[0])
    lines = [",".join(cols)]
    for r in summary:
        lines.append(",".join(_csv_cell(r[k]) for k in cols))
    atomic_write_text(out / "summary.csv", "\n".join(lines) + "\n")
    markdown = _markdown(summary, styles, is_demo, run_info)
    atomic_write_text(out / "summary.md", markdown)
    files = {"results": str(out / "results.csv"), "summary_csv": str(out / "summary.csv"),
             "summary_md": str(out / "summary.md"), "plot": str(out / "plot.png")}
    draw_scatter(rows, summary, configs).save(out / "plot.png")
    for i, prompt in enumerate(config.prompts):
        p = out / f"contact_p{i}.png"
        draw_contact_sheet(out, configs, i, prompt, config.seeds).save(p)
        files[f"contact_p{i}"] = str(p)
    return files, summary, markdown


def _cell_text(v) -> str:
    """A summary value as text: "" for none, floats to 6 places."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def _csv_cell(v) -> str:
    s = _cell_text(v)
    return f'"{s}"' if "," in s or '"' in s else s


def _ci(m, lo, hi, digits=4) -> str:
    if m is None:
        return "-"
    return f"{m:.{digits}f}" + (f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None else "")


def _intro(is_demo: bool, info: dict) -> str:
    """summary.md's text before the table: what ran, with which model, judge and settings."""
    head = [f"# {info['name']}: {info['model']}, CLIP {info['clip_model']}", ""]
    if is_demo or info.get("is_tiny"):
        head += ["**DEMO VALUES: the built-in tiny model and/or tiny random CLIP; these numbers measure nothing.**", ""]
    head += [f"Mapping: {', '.join(f'{s} -> {n}' for s, n in info['mapping'].items())}. "
             f"Settings: {', '.join(f'{k}={v}' for k, v in info['settings'].items())}. "
             f"{len(info['prompts'])} prompts x {len(info['seeds'])} seeds. Means with 95% t-intervals.", ""]
    return "\n".join(head)


def _markdown(summary: list[dict], styles: list[str], is_demo: bool, info: dict) -> str:
    head = _intro(is_demo, info).split("\n")
    cols = ["configuration", "n", "CLIP score", "style similarity"] + [f"sim {s}" for s in styles] + \
        [f"share {s}" for s in styles]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        cells = [r["config"], str(r["n"]), _ci(r["clip_mean"], r["clip_lo"], r["clip_hi"]),
                 _ci(r["style_sim_mean"], r["style_sim_lo"], r["style_sim_hi"])]
        cells += [_ci(r[f"sim_{s}_mean"], r[f"sim_{s}_lo"], r[f"sim_{s}_hi"]) for s in styles]
        cells += [_ci(r[f"share_{s}_mean"], r[f"share_{s}_lo"], r[f"share_{s}_hi"], 2) for s in styles]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(head + lines) + "\n"


def draw_contact_sheet(out: Path, configs: list[Configuration], prompt_index: int, prompt: str, seeds: list[int],
                       thumb: int = 96):
    """One prompt: a row per configuration, a column per seed, labelled."""
    from PIL import Image, ImageDraw

    from stylemix.scores.scoring import open_image

    label_w, top = 200, 20
    sheet = Image.new("RGB", (label_w + len(seeds) * thumb, top + len(configs) * thumb), "white")
    d = ImageDraw.Draw(sheet)
    d.text((4, 4), f"p{prompt_index}: {prompt[:80]}", fill="black")
    for r, c in enumerate(configs):
        d.text((4, top + r * thumb + thumb // 2 - 5), c.id[:32], fill="black")
        for k, seed in enumerate(seeds):
            p = out / ProtocolImage(c, prompt_index, prompt, seed).rel_path
            if p.is_file():
                sheet.paste(open_image(p).resize((thumb, thumb)), (label_w + k * thumb, top + r * thumb))
    return sheet


def draw_scatter(rows: list[dict], summary: list[dict], configs: list[Configuration], size: int = 480):
    """CLIP score (y) against style similarity (x): small dots per image, labelled large dots per configuration."""
    from PIL import Image, ImageDraw

    from stylemix.experiments.weight_maps import PALETTE

    kinds = {c.id: c for c in configs}
    pts = []
    for r in rows:
        c = kinds.get(r.get("config"))
        if c is None or c.kind == "base":
            continue
        sims = [v for v in (_num(r.get(f"sim_{s}")) for s in c.styles) if v is not None]
        clip = _num(r.get("clip_score"))
        if clip is not None and sims:
            pts.append((sum(sims) / len(sims), clip, c.id))
    means = [(s["style_sim_mean"], s["clip_mean"], s["config"]) for s in summary
             if s["style_sim_mean"] is not None and s["clip_mean"] is not None]
    base_clip = next((s["clip_mean"] for s in summary if s["kind"] == "base"), None)
    m, left, bottom = 30, 60, 40
    img = Image.new("RGB", (size + left + 200, size + bottom + m), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 6), "CLIP score vs style similarity (mean over the mix's styles)", fill="black")
    xs = [p[0] for p in pts + means] or [0.0, 1.0]
    ys = [p[1] for p in pts + means] + ([base_clip] if base_clip is not None else []) or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1e-3), (y1 if y1 > y0 else y0 + 1e-3)

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (size - 20) + 10, m + (1 - (y - y0) / (y1 - y0)) * (size - 20) + 10)

    d.rectangle([left, m, left + size, m + size], outline="grey")
    if not pts:
        d.text((left + 20, m + size // 2), "no style similarity measured (LoRAs without style centroids)", fill="black")
    dx, dy = (max(3, 2 - math.floor(math.log10(span))) for span in (x1 - x0, y1 - y0))  # enough digits to differ
    for t in range(5):
        xv, yv = x0 + (x1 - x0) * t / 4, y0 + (y1 - y0) * t / 4
        d.text((px(xv, y0)[0] - 12, m + size + 4), f"{xv:.{dx}f}", fill="black")
        d.text((4, px(x0, yv)[1] - 5), f"{yv:.{dy}f}", fill="black")
    d.text((left + size // 2 - 40, m + size + 20), "style similarity", fill="black")
    if base_clip is not None:
        y = px(x0, base_clip)[1]
        for xx in range(left, left + size, 8):
            d.line([(xx, y), (xx + 4, y)], fill=(120, 120, 120))
        d.text((left + size + 4, y - 5), "base model CLIP", fill=(120, 120, 120))
    color = {c.id: PALETTE[i % len(PALETTE)] for i, c in enumerate(configs)}
    for x, y, cid in pts:
        cx, cy = px(x, y)
        d.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=color[cid])
    for k, (x, y, cid) in enumerate(means):
        cx, cy = px(x, y)
        d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=color[cid], outline="black")
        d.text((left + size + 8, m + 20 + 14 * k), cid[:30], fill=color[cid])
    return img
