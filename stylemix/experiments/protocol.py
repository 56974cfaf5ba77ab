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
On several processes (`stylemix evaluate --num-processes N`, or under `accelerate launch` / torchrun)
the images are split between them (one GPU each) with accelerate's `split_between_processes`; each image
has its own seeded generator, so every image, score and the summary are those of one process, bit for
bit on the CPU.  Each process appends its rows to its own part file as it goes (an interrupted run
resumes), the rows are gathered on the main process, which writes results.csv once, in the protocol's
order, and the summaries.  Several machines need --out on a folder that all of them see.

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
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stylemix.errors import StyleMixError
from stylemix.a1111 import lbw_weights
from stylemix.paths import atomic_write_text, check_name
from stylemix.recipe import DEFAULT_SAMPLER, Recipe
from stylemix.schedules import DEFAULT_SWITCH_EVERY, MODES, PRESETS, apply_preset, parse_schedule

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
    id: str  # "base", "anime", "watercolor_pixelart_0.6_0.4", "watercolor_pixelart_0.6_0.4@switch"
    kind: str  # "base", "single" or "mix"
    styles: dict[str, float]  # style -> weight
    loras: dict[str, float] = field(default_factory=dict)  # LoRA -> weight, once styles are mapped
    mode: str = "merge"  # merge | switch | composite (stylemix.schedules)
    switch_every: int = DEFAULT_SWITCH_EVERY
    preset: str = ""  # the schedules.PRESETS entry its schedules and block weights came from
    schedules: dict[str, str] = field(default_factory=dict)  # style -> schedule text
    block_weights: dict[str, dict[str, float]] = field(default_factory=dict)  # style -> {block: multiplier}

    @property
    def is_plain(self) -> bool:
        """A weighted sum at every step: what every configuration was before modes and schedules."""
        return self.mode == "merge" and not self.schedules and not self.block_weights

    def recipe_fields(self) -> dict:
        """What this configuration sets in each of its images' recipes (LoRA names once mapped, style names
        before: `ProtocolConfig.validate` checks the recipe before any LoRA is looked up)."""
        names = dict(zip(self.styles, self.loras)) if self.loras else {s: s for s in self.styles}
        return {"loras": {names[s]: w for s, w in self.styles.items()},
                "schedules": {names[s]: t for s, t in self.schedules.items()},
                "block_weights": {names[s]: dict(b) for s, b in self.block_weights.items()},
                "mode": self.mode, "switch_every": self.switch_every}

    def info(self) -> dict:
        """run.json's entry; the keys of modes and schedules only where set, so a plain run's fingerprint (and
        the resume of a run made before modes existed) does not change."""
        out = {"id": self.id, "kind": self.kind, "styles": self.styles, "loras": self.loras}
        if not self.is_plain:
            out.update(mode=self.mode, switch_every=self.switch_every, preset=self.preset,
                       schedules=self.schedules, block_weights=self.block_weights)
        return out

    def schedule_text(self) -> str:
        """The results' "schedules" cell: the preset's name, else style: schedule pairs ("" for none)."""
        if self.preset:
            return f"preset: {self.preset}"
        return "; ".join(f"{s}: {t}" for s, t in self.schedules.items())


@dataclass
class MixSpec:
    """One [[mixes]] entry: the styles' weights and how the mix runs over the steps (default: a plain merge)."""

    weights: dict[str, float]
    mode: str | None = None  # merge | switch | composite; None: merge, and the id names no mode
    switch_every: int | None = None  # switch mode only; None: schedules.DEFAULT_SWITCH_EVERY
    preset: str | None = None  # a schedules.PRESETS name: its schedules and block weights for this mix
    schedules: dict[str, str] = field(default_factory=dict)  # style -> schedule text
    label: str | None = None  # the id's part after "@" instead of the one made from mode, preset, schedules

    KEYS = ("weights", "mode", "switch_every", "preset", "schedules", "label")

    @property
    def is_plain(self) -> bool:
        return self.mode is None and self.switch_every is None and self.preset is None and not self.schedules \
            and self.label is None

    @property
    def id(self) -> str:
        """"watercolor_pixelart_0.6_0.4" (the report's names), then "@switch", "@style-late", "@merge",
        "@switch-2" (every 2 steps), "@schedule" or "@<label>" for anything but a plain mix."""
        base = "_".join(self.weights) + "_" + "_".join(f"{float(w):g}" for w in self.weights.values())
        if self.is_plain:
            return base
        if self.label is not None:
            return f"{base}@{self.label}"
        parts = []
        if self.mode is not None:
            every = self.switch_every not in (None, DEFAULT_SWITCH_EVERY)
            parts.append(f"{self.mode}-{self.switch_every}" if every else str(self.mode))
        if self.preset is not None:
            parts.append(re.sub(r"[^a-z0-9]+", "-", str(self.preset).lower()).strip("-"))
        if self.schedules:
            parts.append("schedule")
        return f"{base}@{'+'.join(parts) or 'merge'}"

    def expanded(self, modes: list[str], presets: list[str]) -> list["MixSpec"]:
        """A plain mix once per mode and once per preset of the protocol's comparison (itself when it
        names none; a mix that sets its own mode, preset or schedules is never expanded)."""
        if not self.is_plain or not (modes or presets):
            return [self]
        out = [MixSpec(dict(self.weights), mode=m) for m in modes] or [self]  # no modes: the plain mix, as reference
        return out + [MixSpec(dict(self.weights), preset=p) for p in presets]

    def check(self, source: str, styles: dict[str, str]) -> None:
        """StyleMixError naming this configuration for a bad weight, mode, preset, label or schedule."""
        def bad(problem: str) -> StyleMixError:
            return StyleMixError(f"{source}: configuration {self.id!r}: {problem}")

        if len(self.weights) < 2:
            raise bad(f"mix {self.weights!r} needs at least two styles.")
        for s, w in self.weights.items():
            if s not in styles:
                raise bad(f"mix {self.weights!r} uses style {s!r}, which is not in [styles].")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not -2 <= w <= 2:
                raise bad(f"weight of {s!r} in mix {self.weights!r} must be a number in [-2, 2].")
        if self.mode is not None and self.mode not in MODES:
            raise bad(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}.")
        if self.switch_every is not None and self.mode != "switch":
            raise bad("switch_every applies to mode = \"switch\" only.")
        if self.preset is not None and (not isinstance(self.preset, str) or self.preset not in PRESETS):
            raise bad(f"unknown preset {self.preset!r}; choose one of: {', '.join(map(repr, PRESETS))}.")
        if self.preset is not None and self.schedules:
            raise bad("give a preset or schedules, not both (a preset is a set of schedules).")
        if self.label is not None:
            try:
                check_name(self.label, "configuration label")
            except StyleMixError as e:
                raise bad(str(e)) from None
        if not isinstance(self.schedules, dict):
            raise bad("schedules must be a table of style = \"schedule\".")
        for s, text in self.schedules.items():
            self._check_schedule(s, text, bad)

    def _check_schedule(self, style: str, text, bad) -> None:
        if style not in self.weights:
            raise bad(f"schedule of {style!r}: that style is not in the mix ({', '.join(self.weights)}).")
        try:
            sched = parse_schedule(text)
        except ValueError as e:
            raise bad(f"schedule of {style!r}: {e}") from None
        # a recipe lists a keyframed LoRA at its peak: a peak other than the mix's weight would render
        # another mix than the configuration's name and weights column say
        peak, w = sched.peak(0.0), float(self.weights[style])
        if sched.unet and abs(peak - w) > 1e-9:
            raise bad(f"schedule of {style!r} peaks at {peak:g} but the mix gives {style!r} weight {w:g}; "
                      f"keyframe weights are the LoRA's own (as in loractl): write them up to {w:g}.")

    def configuration(self) -> Configuration:
        styles = {s: float(w) for s, w in self.weights.items()}
        schedules, lbw = apply_preset(self.preset, styles) if self.preset else (dict(self.schedules), {})
        return Configuration(self.id, "mix", styles, mode=self.mode or "merge",
                             switch_every=DEFAULT_SWITCH_EVERY if self.switch_every is None else self.switch_every,
                             preset=self.preset or "",
                             schedules={s: parse_schedule(t).text() for s, t in schedules.items()},
                             block_weights={s: lbw_weights(v) for s, v in lbw.items()})


@dataclass
class ProtocolConfig:
    name: str = "protocol"
    styles: dict[str, str] = field(default_factory=dict)  # style -> LoRA name or "auto"
    triggers: dict[str, str] = field(default_factory=dict)  # style -> trigger word that identifies its LoRA
    singles: list[str] | str = "all"  # styles run alone at weight 1.0
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    # MixSpec, or a plain style -> weight table; 2, 3, 4... styles
    mixes: list[MixSpec | dict[str, float]] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)  # each plain mix once per mode (a comparison of modes)
    presets: list[str] = field(default_factory=list)  # ... and once per schedule preset
    generation: dict = field(default_factory=dict)  # Recipe fields: steps, sampler, guidance, width, height...
    tiny_generation: dict = field(default_factory=dict)  # replaces `generation` values with the tiny model
    clip_model: str = "ViT-B-32"
    pretrained: str = "openai"

    def __post_init__(self):
        self.mixes = [m if isinstance(m, MixSpec) else MixSpec(dict(m)) for m in self.mixes]

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
        cfg = cls(name=str(data.get("name", "protocol")), styles={k: str(v) for k, v in table("styles").items()},
                  triggers={k: str(v) for k, v in table("triggers").items()},
                  singles=proto.get("singles", "all"), prompts=proto.get("prompts", []),
                  seeds=proto.get("seeds", [0, 1]), mixes=_mix_specs(data.get("mixes", []), source),
                  modes=proto.get("modes", []), presets=proto.get("presets", []),
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
        self._check_comparison(source)
        for mix in self.mixes:
            mix.check(source, self.styles)
        for key in list(self.generation) + list(self.tiny_generation):
            if key not in GENERATION_KEYS:
                raise StyleMixError(f"{source}: unknown [generation] key {key!r} (known: {', '.join(sorted(GENERATION_KEYS))}).")
        Recipe(prompt="x", **self.generation).validate()
        Recipe(prompt="x", **{**self.generation, **self.tiny_generation}).validate()
        configs = self.configurations()
        for c in configs:
            self._check_recipes(c, source)
        n = len(configs) * len(self.prompts) * len(self.seeds)
        if n > MAX_IMAGES:
            raise StyleMixError(f"{source}: {n} images is more than one run makes ({MAX_IMAGES}).")
        return self

    def configurations(self, mapping: dict[str, str] | None = None) -> list[Configuration]:
        singles = list(self.styles) if self.singles == "all" else list(self.singles)
        out = [Configuration("base", "base", {})]
        out += [Configuration(s, "single", {s: 1.0}) for s in singles]
        out += [m.configuration() for mix in self.mixes for m in mix.expanded(self.modes, self.presets)]
        ids = [c.id for c in out]
        dup = next((i for i in ids if ids.count(i) > 1), None)
        if dup:
            raise StyleMixError(f"Configuration {dup!r} appears twice in the protocol (two mixes of the same "
                                "name: give one a `label`).")
        if mapping is not None:
            for c in out:
                c.loras = {mapping[s]: w for s, w in c.styles.items()}
        return out

    def _check_comparison(self, source: str) -> None:
        """protocol.modes and protocol.presets: lists of known names, each once."""
        for key, known in (("modes", MODES), ("presets", tuple(PRESETS))):
            values = getattr(self, key)
            if not isinstance(values, list) or len(set(map(str, values))) != len(values):
                raise StyleMixError(f"{source}: protocol.{key} must be a list of distinct names "
                                    f"({', '.join(map(repr, known))}); got {values!r}.")
            for v in values:
                if v not in known:
                    raise StyleMixError(f"{source}: protocol.{key}: unknown {key[:-1]} {v!r}; choose from: "
                                        f"{', '.join(map(repr, known))}.")

    def _check_recipes(self, c: Configuration, source: str) -> None:
        """The configuration's recipe at both settings (a schedule's step numbers must fit the tiny model's
        fewer steps too), refused naming the configuration before anything renders."""
        for tiny in (False, True):
            try:
                Recipe(prompt="x", **self.settings(tiny), **c.recipe_fields()).validate()
            except (ValueError, StyleMixError) as e:
                where = " (with [generation.tiny]'s settings)" if tiny and self.tiny_generation else ""
                raise StyleMixError(f"{source}: configuration {c.id!r}{where}: {e}") from None

    def used_styles(self) -> list[str]:
        used = {s for c in self.configurations() for s in c.styles}
        return [s for s in self.styles if s in used]

    def settings(self, tiny: bool) -> dict:
        """Recipe fields for every image (the tiny model's overrides applied when `tiny`)."""
        base = {"steps": 25, "sampler": DEFAULT_SAMPLER, "guidance": 7.5, "width": 512, "height": 512}
        return {**base, **self.generation, **(self.tiny_generation if tiny else {})}


def _mix_specs(mixes, source: str) -> list[MixSpec]:
    """[[mixes]] entries as MixSpecs; an unknown key is named (a typo would silently run a plain merge)."""
    if not isinstance(mixes, list) or not all(isinstance(m, dict) and isinstance(m.get("weights"), dict)
                                              for m in mixes):
        raise StyleMixError(f"{source}: each [[mixes]] entry needs a `weights = {{style = weight, ...}}` table.")
    for m in mixes:
        unknown = sorted(set(m) - set(MixSpec.KEYS))
        if unknown:
            raise StyleMixError(f"{source}: [[mixes]] entry {m['weights']!r}: unknown key {unknown[0]!r} "
                                f"(known: {', '.join(MixSpec.KEYS)}).")
    return [MixSpec(**{k: dict(v) if isinstance(v, dict) else v for k, v in m.items()}) for m in mixes]


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
    cols = ["config", "kind", "loras", "mode", "schedules", "prompt_index", "prompt", "seed", "file", "clip_score",
            "style_judge"]
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
    processes: int = 1  # the processes that made the images
    seconds: float = 0.0  # wall time of making and scoring this call's images (all processes)

    def summary_table(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of summary.csv, cells written exactly as in the file (without CSV quoting)."""
        if not self.summary:
            return [], []
        cols = list(self.summary[0])
        return cols, [[_cell_text(r[k]) for k in cols] for r in self.summary]


def run_protocol(mixer, config: ProtocolConfig, out_dir: str | os.PathLike, overrides: dict[str, str] | None = None,
                 progress: Callable[[int, int, str], None] | None = None, judge=None) -> ProtocolResult:
    """Run (or resume) the protocol into `out_dir`; returns what was done and the files written."""
    from stylemix.launch import distributed_state
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
                "configurations": [c.info() for c in configs],
                "clip_model": judge.scorer.name, "is_demo": judge.is_demo}
    if judge.style_judge != judge.scorer.name:
        # CSD judged style: part of the run, so a folder scored with one judge never resumes with the other
        # (a CLIP-only run keeps the fingerprint it had before judges could differ)
        run_info["style_judge"] = judge.style_judge
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
    # Several processes: accelerate's state, asked for the CPU backend when the model runs on the CPU (else
    # each process would believe it is alone, do every image and write the same files).
    state = distributed_state(str(mixer.loaded.device))
    main = state is None or state.is_main_process
    processes = 1 if state is None else state.num_processes
    if main:
        atomic_write_text(run_file, json.dumps({**run_info, "processes": processes}, indent=2))
    columns = _columns(styles)
    results = out / "results.csv"
    if main:
        _upgrade_columns(results, columns)
    if state is not None:
        state.wait_for_everyone()
        _check_shared(run_file, fingerprint, state.process_index)
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
    if state is not None:  # the main process's view, so that every process splits the same list
        from accelerate.utils import broadcast_object_list

        done = broadcast_object_list([done])[0]
    todo = [j for j in jobs if j.key not in done]
    counts = {"generated": 0, "rescored": 0, "done": len(done)}
    base_recipe = Recipe(prompt="", **settings)
    # One app over several GPUs (a MixerPool, stylemix/pipelines.py): one thread per pipeline makes images,
    # each on whichever pipeline is free; scoring and the rows are taken one at a time (`rows_lock`), and
    # results.csv is rewritten in the protocol's order at the end, so the files are those of one pipeline.
    from stylemix.pipelines import members

    threads = len(members(mixer)) if state is None else 1
    rows_lock = threading.Lock()

    def do(job: ProtocolImage) -> None:
        path = out / job.rel_path
        recipe = base_recipe.with_(prompt=job.prompt, seed=job.seed, **job.config.recipe_fields())
        if path.is_file():
            image = open_image(path)  # made before an interruption: scored again, not regenerated
            made_now = "rescored"
        else:
            res = mixer.generate(recipe)
            image = res.images[0]
            save_png(image, path, res.recipe, res.prompt_used,
                     extra={"protocol": {"config": job.config.id, "styles": job.config.styles,
                                         **({"preset": job.config.preset} if job.config.preset else {})}})
            made_now = "generated"
        with rows_lock:
            counts[made_now] += 1
            score_and_record(job, image)

    def score_and_record(job: ProtocolImage, image) -> None:
        base = None
        base_path = out / ProtocolImage(configs[0], job.prompt_index, job.prompt, job.seed).rel_path
        if job.config.kind != "base" and base_path.is_file():
            base = [open_image(base_path)]
        elif job.config.kind != "base" and state is not None:  # another machine made it, into its own folder
            raise StyleMixError(f"{base_path} is missing on process {state.process_index}: on several machines, "
                                "--out must be a folder that every machine sees.")
        s = judge.score([image], job.prompt, base_images=base)[0]
        row = {"config": job.config.id, "kind": job.config.kind,
               "loras": json.dumps(job.config.loras), "mode": job.config.mode,
               "schedules": job.config.schedule_text(), "prompt_index": job.prompt_index, "prompt": job.prompt,
               "seed": job.seed, "file": job.rel_path, "clip_score": _fmt(s.clip_score),
               "style_judge": s.style_judge or judge.style_judge}
        by_style = {st: mapping[st] for st in styles}
        cal = {st: s.calibrated.get(by_style[st]) for st in styles}
        # shares only when every style of the mix is measured: one missing style would read as 0%
        measured = all(cal[st] is not None for st in job.config.styles)
        shares = mix_shares({st: cal[st] for st in job.config.styles}, NOISE_FLOOR) if job.config.kind == "mix" and measured else {}
        for st in styles:
            row[f"sim_{st}"] = _fmt(s.similarity.get(by_style[st]))
            row[f"cal_{st}"] = _fmt(cal[st])
            row[f"share_{st}"] = _fmt(shares.get(st))
        _append_row(part, columns, row)  # at once: an interrupted run keeps it
        made[job.key] = row
        counts["done"] += processes  # (shown by the main process: every process moves at about its pace)
        if progress and main:
            progress(min(counts["done"], len(jobs)), len(jobs),
                     f"{job.config.id} | prompt {job.prompt_index} | seed {job.seed}")

    made: dict = {}
    if progress and main:
        progress(counts["done"], len(jobs), "resuming" if done else "starting")
    t0 = time.perf_counter()
    # base images first: every other image is calibrated against the base image of its prompt and seed
    for phase in ([j for j in todo if j.config.kind == "base"], [j for j in todo if j.config.kind != "base"]):
        if state is None and threads > 1:
            _in_threads(do, phase, threads)
        elif state is None:
            for job in phase:
                do(job)
        else:
            with state.split_between_processes(phase) as mine:  # consecutive shares, in the protocol's order
                for job in mine:
                    do(job)
            state.wait_for_everyone()  # the next phase reads this one's base images
    if state is not None:  # every process's rows and counts, on the main process
        from accelerate.utils import gather_object

        gathered = gather_object([(made, counts["generated"], counts["rescored"])])
        made = {k: r for m, _, _ in gathered for k, r in m.items()}
        counts["generated"], counts["rescored"] = sum(g for _, g, _ in gathered), sum(r for _, _, r in gathered)
    seconds = time.perf_counter() - t0
    files, summary, markdown = {}, [], ""
    if main:
        if state is not None or threads > 1:  # rows written as images were done: in the protocol's order now
            _merge_parts(out, results, columns, [j.key for j in jobs], {**done_rows, **made})
        if progress:
            progress(len(jobs), len(jobs), "done")
        files, summary, markdown = write_summaries(out, config, configs, styles, judge.scorer.is_demo, run_info)
    if state is not None:
        state.wait_for_everyone()  # the part files are merged before any process returns (or starts again)
    return ProtocolResult(out, len(jobs), counts["generated"], counts["rescored"], files, mapping,
                          judge.scorer.is_demo, summary, markdown, _intro(judge.scorer.is_demo, run_info),
                          processes, round(seconds, 3))


def _in_threads(fn: Callable, items: list, workers: int) -> None:
    """`fn(item)` for every item on `workers` threads (one per pipeline of a pool), at the caller's GPU-queue
    priority (an experiment's images keep yielding to interactive renders); the first error is raised once
    every thread has stopped."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    from stylemix import gpu_queue

    yielding = gpu_queue.current_priority() == gpu_queue.BACKGROUND

    def one(item) -> None:
        if yielding:
            with gpu_queue.background():
                fn(item)
        else:
            fn(item)

    # each item in a copy of the caller's context: a progress callback (Gradio's) finds its request there
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="protocol-image") as pool:
        futures = [pool.submit(contextvars.copy_context().run, one, item) for item in items]
    for f in futures:
        f.result()


def _upgrade_columns(results: Path, columns: list[str]) -> None:
    """A results.csv written before the mode and schedules columns existed, rewritten with them (its rows are
    plain merges), so the rows appended now line up with its header."""
    if not results.is_file():
        return
    with open(results, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    if not header or header == columns:
        return
    rows = _read_rows(results)
    text = [",".join(columns)]
    for r in rows:
        r.setdefault("mode", "merge")
        text.append(_csv_line([r.get(k) or "" for k in columns]))
    atomic_write_text(results, "\n".join(text) + "\n")


def _csv_line(cells: list[str]) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(cells)
    return buf.getvalue()


def _merge_parts(out: Path, results: Path, columns: list[str], keys: list[tuple], rows: dict) -> None:
    """results.csv written once by the main process: one row per image, in the protocol's order (the order
    of a one-process run, so the summary's sums run in the same order, bit for bit), then the part files of
    every process removed.  `rows`: {(config, prompt_index, seed): row}, earlier runs' and this run's."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)  # as _append_row writes, so both paths give the same bytes
    w.writeheader()
    for key in keys:
        if key in rows:
            w.writerow({k: rows[key].get(k, "") for k in columns})
    atomic_write_text(results, buf.getvalue())
    for p in sorted(out.glob("results.part*.csv")):
        p.unlink()


def _check_shared(run_file: Path, fingerprint: str, index: int) -> None:
    """Every process must see the main process's run.json: the folder is one folder for all of them."""
    try:
        ok = json.loads(run_file.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise StyleMixError(f"Process {index} cannot see {run_file} written by the main process: on several "
                            "machines, --out must be a folder that every machine sees (a shared file system).")


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
    from stylemix.scores.scoring import check_one_judge

    check_one_judge(rows)  # means over similarities of two judges would mean nothing: refused
    out = []
    for c in configs:
        rs = [r for r in rows if r.get("config") == c.id]
        row = {"config": c.id, "kind": c.kind, "weights": " ".join(f"{s}={w:g}" for s, w in c.styles.items()),
               "mode": _mode_text(c), "schedules": c.schedule_text(), "n": len(rs)}
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


def _mode_text(c: Configuration) -> str:
    return f"switch every {c.switch_every}" if c.mode == "switch" else c.mode


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
    return '"' + s.replace('"', '""') + '"' if "," in s or '"' in s else s


def _ci(m, lo, hi, digits=4) -> str:
    if m is None:
        return "-"
    return f"{m:.{digits}f}" + (f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None else "")


def _intro(is_demo: bool, info: dict) -> str:
    """summary.md's text before the table: what ran, with which model, judge and settings."""
    judge = info.get("style_judge") or info["clip_model"]
    head = [f"# {info['name']}: {info['model']}, CLIP {info['clip_model']}, style judge {judge}", ""]
    if is_demo or info.get("is_tiny"):
        head += ["**DEMO VALUES: the built-in tiny model and/or tiny random CLIP/CSD; these numbers measure "
                 "nothing.**", ""]
    head += [f"Mapping: {', '.join(f'{s} -> {n}' for s, n in info['mapping'].items())}. "
             f"Settings: {', '.join(f'{k}={v}' for k, v in info['settings'].items())}. "
             f"{len(info['prompts'])} prompts x {len(info['seeds'])} seeds. Means with 95% t-intervals.", ""]
    return "\n".join(head)


def _markdown(summary: list[dict], styles: list[str], is_demo: bool, info: dict) -> str:
    head = _intro(is_demo, info).split("\n")
    cols = ["configuration", "mode", "schedules", "n", "CLIP score", "style similarity"] + \
        [f"sim {s}" for s in styles] + \
        [f"share {s}" for s in styles]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        cells = [r["config"], r["mode"], r["schedules"] or "-", str(r["n"]),
                 _ci(r["clip_mean"], r["clip_lo"], r["clip_hi"]),
                 _ci(r["style_sim_mean"], r["style_sim_lo"], r["style_sim_hi"])]
        cells += [_ci(r[f"sim_{s}_mean"], r[f"sim_{s}_lo"], r[f"sim_{s}_hi"]) for s in styles]
        cells += [_ci(r[f"share_{s}_mean"], r[f"share_{s}_lo"], r[f"share_{s}_hi"], 2) for s in styles]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(head + lines) + "\n"


def label_lines(cid: str, width: int) -> list[str]:
    """A configuration id on lines of at most `width` characters, the mode or schedule ("@switch") on its
    own line: cut at a fixed width, the ids of one mix's variants would all read the same."""
    base, at, variant = cid.partition("@")
    chunks = [base[i:i + width] for i in range(0, len(base), width)] or [""]
    if at:
        chunks += [(at + variant)[i:i + width] for i in range(0, len(variant) + 1, width)]
    return chunks


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
        lines = label_lines(c.id, 32)[:thumb // 12]
        for k, line in enumerate(lines):
            d.text((4, top + r * thumb + thumb // 2 - 6 * len(lines) + 12 * k), line, fill="black")
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
    y_text = m + 20
    for x, y, cid in means:
        cx, cy = px(x, y)
        d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=color[cid], outline="black")
        for line in label_lines(cid, 30)[:3]:
            d.text((left + size + 8, y_text), line, fill=color[cid])
            y_text += 12
        y_text += 4
    return img


# --------------------------------------------------------------------------- the app's comparison of modes


def modes_comparison(loras: list[str], weights: list[float], prompts: list[str], seeds: list[int],
                     generation: dict, name: str = "app-modes") -> ProtocolConfig:
    """The Experiments tab's "modes" run: one mix of `loras` at `weights` in every mode (merge, switch,
    composite) and with every schedule preset, on the same prompts and seeds, the base model first (the
    calibration's anchor).  No singles: the comparison is between ways of running one mix."""
    if len(weights) != len(loras):
        raise StyleMixError(f"Give one weight per LoRA ({len(loras)}), e.g. "
                            f"{', '.join(f'{round(1 / max(1, len(loras)), 2):g}' for _ in loras)}; got {weights!r}.")
    mix = dict(zip(loras, weights))
    # a short render rotates too: every LoRA gets a turn of up to DEFAULT_SWITCH_EVERY steps
    every = min(DEFAULT_SWITCH_EVERY, max(1, int(generation.get("steps", 25)) // max(1, len(loras))))
    specs = [MixSpec(dict(mix), mode=m, switch_every=every if m == "switch" else None) for m in MODES]
    specs += [MixSpec(dict(mix), preset=p) for p in PRESETS]
    config = ProtocolConfig(name=name, styles={n: n for n in loras}, singles=[], prompts=list(prompts),
                            seeds=[int(s) for s in seeds], mixes=specs, generation=dict(generation))
    return config.validate("experiment")
