"""Mixing over time: per-step LoRA weight schedules, and the modes that rotate or average LoRAs.

A schedule says how one LoRA's U-Net weight moves over the denoising steps.  Its syntax is the one
artists already write in A1111 (docs/mixing-modes.md has the sources and the exact rules):

- sd-webui-loractl keyframes: `0@0,1@0.5` (weight@position, commas or semicolons, `~` for `@`).
  When every position is <= 1 they are fractions of the render, otherwise step numbers (0-based).
  Before the first keyframe the first weight holds, after the last the last; in between the weight is
  interpolated (`interp=`).  `unet=` and `te=` name the parts; the text encoder runs once, before the
  first step, so `te=` is one number.
- LoRA Block Weight's `start=N`, `stop=N` and `step=A-B`: the LoRA is on from step A and off from
  step B (step numbers; here also fractions < 1 of the render).
- `interp=linear|hold|ease_in|ease_out|ease_in_out|cosine`: the shape of each ramp between keyframes.

`compile_plan` turns a recipe's weights, schedules and mode into a steps x LoRAs table before
sampling; the mixer rewrites the weights only at the steps where the table's row changes, so a
constant schedule costs nothing and gives the plain mix's image bit for bit.

Modes (Zhong et al., "Multi-LoRA Composition for Image Generation", arXiv 2402.16843):
- merge: one weighted sum for each step (the default, and every other tool's only mode);
- switch: one LoRA at a time at its own weight, rotating every `switch_every` steps in the mix's order;
- composite: every step runs the U-Net once per LoRA (each alone at its weight) and averages the
  predictions before classifier-free guidance (`Mixer.generate`).

A position maps to a step like this (N steps, step i = 0 .. N-1): a fraction f sits at step
f * (N - 1), so 0 is the first step and 1 the last; a step number s of an N-step recipe sits at
s * (n - 1) / (N - 1) in an n-step preview of it, so a preview follows the same fractions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

INTERPS = ("linear", "hold", "ease_in", "ease_out", "ease_in_out", "cosine")
MODES = ("merge", "switch", "composite")
DEFAULT_SWITCH_EVERY = 5  # the paper's rotation period
WEIGHT_LIMIT = 2.0  # the same range as Recipe.loras
MAX_KEYFRAMES = 64
MAX_SCHEDULE_CHARS = 2000
_LAST = 1 - 1e-9  # start/stop at the last step, as a fraction (start=1 would be step 1)

_EASE = {
    "linear": lambda u: u,
    "hold": lambda u: 0.0,
    "ease_in": lambda u: u * u,
    "ease_out": lambda u: 1.0 - (1.0 - u) * (1.0 - u),
    "ease_in_out": lambda u: u * u * (3.0 - 2.0 * u),  # smoothstep
    "cosine": lambda u: 0.5 - 0.5 * math.cos(math.pi * u),
}


@dataclass(frozen=True)
class Schedule:
    """How one LoRA's weight moves over the steps.  Every field empty: the plain weight at every step."""

    unet: tuple[tuple[float, float], ...] = ()  # U-Net keyframes (weight, position); () = the LoRA's plain weight
    te: float | None = None  # text-encoder weight; None = the U-Net's weight at the first step (as in loractl)
    start: float | None = None  # LBW start=: off before this position (step number, or fraction < 1)
    stop: float | None = None  # LBW stop=: off from this position on
    interp: str = "linear"  # the shape of the ramps between keyframes

    @property
    def is_plain(self) -> bool:
        return self == Schedule()

    @property
    def fractions(self) -> bool:
        """True when the keyframes' positions are fractions of the render (all <= 1, as loractl decides)."""
        return bool(self.unet) and max(at for _, at in self.unet) <= 1

    def peak(self, weight: float) -> float:
        """The weight the recipe lists for this LoRA: its keyframe of largest magnitude, else `weight`."""
        if not self.unet:
            return weight
        return max((w for w, _ in self.unet), key=abs)

    def scaled(self, factor: float) -> "Schedule":
        """Every weight times `factor` (total-strength scaling); positions unchanged."""
        if factor == 1:
            return self
        return replace(self, unet=tuple((w * factor, at) for w, at in self.unet),
                       te=None if self.te is None else self.te * factor)

    def text(self) -> str:
        """The canonical text (what a recipe stores, and `parse_schedule` reads back)."""
        parts = []
        if self.unet:
            parts.append("unet=" + format_keyframes(self.unet))
        if self.te is not None:
            parts.append(f"te={_num(self.te)}")
        if self.start is not None:
            parts.append(f"start={_num(self.start)}")
        if self.stop is not None:
            parts.append(f"stop={_num(self.stop)}")
        if self.interp != "linear":
            parts.append(f"interp={self.interp}")
        return ":".join(parts)

    def check(self, steps: int) -> None:
        """ValueError when a step number lies beyond an N-step render (steps are numbered 0 .. N-1;
        stop may be N: never off)."""
        if self.unet and not self.fractions:
            last = max(at for _, at in self.unet)
            if last > steps - 1:
                raise ValueError(f"keyframe at step {_num(last)} is beyond the render's {steps} steps "
                                 f"(steps are numbered 0 to {steps - 1}; or use fractions 0-1).")
        for key, value, limit in (("start", self.start, steps - 1), ("stop", self.stop, steps)):
            if value is not None and value >= 1 and value > limit:
                raise ValueError(f"{key}={_num(value)} is beyond the render's {steps} steps (steps are numbered "
                                 f"0 to {steps - 1}; or use a fraction below 1).")

    def in_fractions(self, steps: int) -> "Schedule":
        """The same schedule with the step numbers of a `steps`-step render written as fractions, for a
        render with fewer steps (a preview) that follows the same fractions."""
        div = max(1, steps - 1)
        unet = self.unet
        if unet and not self.fractions:
            unet = tuple((w, at / div) for w, at in unet)

        def gate(v: float | None) -> float | None:
            if v is None or v < 1:
                return v
            if v >= steps:  # stop=N: never off
                return None
            return min(v / div, _LAST)  # the last step: a fraction just below 1 (1 itself reads as step 1)

        return replace(self, unet=unet, start=gate(self.start), stop=gate(self.stop))

    def unet_weight(self, weight: float, step: int, steps: int) -> float:
        """The U-Net weight at `step` (0-based) of a `steps`-step render; `weight` is the plain weight."""
        if self.start is not None and step < self._position(self.start, steps, gate=True):
            return 0.0
        if self.stop is not None and step >= self._position(self.stop, steps, gate=True):
            return 0.0
        if not self.unet:
            return weight
        points = [(self._position(at, steps), w) for w, at in self.unet]
        if step < points[0][0]:
            return points[0][1]
        for (p0, w0), (p1, w1) in zip(points, points[1:]):
            if p0 <= step < p1:
                return w0 + (w1 - w0) * _EASE[self.interp]((step - p0) / (p1 - p0))
        return points[-1][1]

    def _position(self, at: float, steps: int, gate: bool = False) -> float:
        """A keyframe position or start/stop as a (fractional) step index of this render."""
        is_fraction = at < 1 if gate else self.fractions
        return at * (steps - 1) if is_fraction else float(at)


# --------------------------------------------------------------------------- parsing

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_KEYFRAME = re.compile(rf"^\s*({_NUMBER})\s*[@~]\s*({_NUMBER})\s*$")


def is_keyframes(text: str) -> bool:
    """True when `text` looks like loractl keyframes (`w@s,...`), not a number or an lbw list."""
    return "@" in text or "~" in text


def parse_keyframes(text: str) -> tuple[tuple[float, float], ...]:
    """'0@0,1@0.5' -> ((0.0, 0.0), (1.0, 0.5)); ValueError naming the problem.

    As in loractl, commas or semicolons separate keyframes and `~` may stand for `@`.  Unlike loractl,
    keyframes out of order and a list mixing fractions with step numbers are refused (loractl sorts
    them, and reads 0.5 in `0@0.5,1@10` as step 0.5)."""
    if len(text) > MAX_SCHEDULE_CHARS:
        raise ValueError(f"the schedule is longer than {MAX_SCHEDULE_CHARS} characters.")
    items = [x for x in re.split(r"[,;]", text.strip())]
    if len(items) > MAX_KEYFRAMES:
        raise ValueError(f"{len(items)} keyframes: at most {MAX_KEYFRAMES}.")
    frames = []
    for item in items:
        m = _KEYFRAME.match(item)
        if not m:
            raise ValueError(f"keyframe {item.strip()!r} is not WEIGHT@POSITION (as in 0@0,1@0.5).")
        w, at = float(m.group(1)), float(m.group(2))
        if not math.isfinite(w) or abs(w) > WEIGHT_LIMIT:
            raise ValueError(f"keyframe {item.strip()!r}: weight {_num(w)} is outside [-2, 2].")
        if not math.isfinite(at) or at < 0:
            raise ValueError(f"keyframe {item.strip()!r}: position {_num(at)} must be 0 or more.")
        frames.append((w, at))
    for (_, a0), (_, a1) in zip(frames, frames[1:]):
        if a1 < a0:
            raise ValueError(f"keyframes out of order: position {_num(a1)} comes after {_num(a0)} "
                             "(write them from first to last).")
    if max(at for _, at in frames) > 1:
        odd = next((at for _, at in frames if at != int(at)), None)
        if odd is not None:
            raise ValueError(f"keyframes mix fractions and step numbers ({_num(odd)} with steps up to "
                             f"{_num(max(at for _, at in frames))}): use fractions 0-1 for all or step numbers for all.")
    return tuple(frames)


def format_keyframes(frames) -> str:
    return ",".join(f"{_num(w)}@{_num(at)}" for w, at in frames)


def parse_position(key: str, text: str) -> float:
    """start=/stop= value: a step number (0, 1, 2 ...) or a fraction of the render below 1 (0.3)."""
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{key}={text!r} is not a number (a step number, or a fraction below 1).") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{key}={text!r} must be 0 or more.")
    if v >= 1 and v != int(v):
        raise ValueError(f"{key}={text!r}: a step number is whole (or use a fraction below 1).")
    return v


def parse_interp(text: str) -> str:
    value = text.strip().lower()
    if value not in INTERPS:
        raise ValueError(f"interp={text!r} is not known; use one of {', '.join(INTERPS)}.")
    return value


def parse_step_range(text: str) -> tuple[float, float]:
    """LBW's step=A-B: on from A, off from B."""
    a, sep, b = text.partition("-")
    if not sep:
        raise ValueError(f"step={text!r}: write step=FIRST-LAST, e.g. step=5-10.")
    start, stop = parse_position("step", a.strip()), parse_position("step", b.strip())
    return start, stop


def parse_schedule(text: str) -> Schedule:
    """A recipe's schedule text (`Schedule.text()`): `unet=KEYFRAMES:te=W:start=S:stop=S:step=A-B:interp=X`,
    any of them, in any order; a bare keyframe list stands for unet=."""
    if not isinstance(text, str) or len(text) > MAX_SCHEDULE_CHARS:
        raise ValueError(f"a schedule must be text of at most {MAX_SCHEDULE_CHARS} characters.")
    fields: dict = {}
    for item in [i.strip() for i in text.split(":") if i.strip()]:
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq:
            if not is_keyframes(item):
                raise ValueError(f"{item!r} is not a schedule item (unet=, te=, start=, stop=, step=, interp=).")
            key, value = "unet", item
        apply_schedule_item(fields, key, value.strip())
    return make_schedule(fields)


def apply_schedule_item(fields: dict, key: str, value: str) -> bool:
    """Put one named schedule item into `fields`; False when `key` is not a schedule item."""
    if key in fields or (key == "step" and ("start" in fields or "stop" in fields)) or \
            (key in ("start", "stop") and "step" in fields):
        raise ValueError(f"{key}= is given twice.")
    if key == "unet":
        fields["unet"] = parse_keyframes(value) if is_keyframes(value) else _weight("unet", value)
    elif key == "te":
        if is_keyframes(value):
            raise ValueError(f"te={value!r}: the text encoder runs once per prompt, before the first step, so its "
                             "weight is one number; put the schedule on unet= (or on the weight).")
        fields["te"] = _weight("te", value)
    elif key in ("start", "stop"):
        fields[key] = parse_position(key, value)
    elif key == "step":
        fields["step"] = True
        fields["start"], fields["stop"] = parse_step_range(value)
    elif key == "interp":
        fields["interp"] = parse_interp(value)
    else:
        return False
    return True


def make_schedule(fields: dict) -> Schedule:
    """A Schedule from parsed items; the U-Net weight given as a plain number is the caller's (a tag's
    weight), so only keyframes land in Schedule.unet."""
    unet = fields.get("unet")
    sched = Schedule(unet=unet if isinstance(unet, tuple) else (), te=fields.get("te"),
                     start=fields.get("start"), stop=fields.get("stop"), interp=fields.get("interp", "linear"))
    if sched.interp != "linear" and not sched.unet:
        raise ValueError(f"interp={sched.interp} shapes the ramps between keyframes; give keyframes too "
                         "(e.g. 0@0,1@0.5).")
    if sched.start is not None and sched.stop is not None and sched.stop <= sched.start \
            and (sched.start < 1) == (sched.stop < 1):
        raise ValueError(f"stop={_num(sched.stop)} is not after start={_num(sched.start)}: the LoRA would never be on.")
    return sched


def _weight(key: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{key}={text!r} is not a number.") from None
    if not math.isfinite(v) or abs(v) > WEIGHT_LIMIT:
        raise ValueError(f"{key}={text!r} is outside [-2, 2].")
    return v


def _num(x: float) -> str:
    return f"{x:.10g}"


# --------------------------------------------------------------------------- the steps x LoRAs table


@dataclass
class WeightPlan:
    """What every step's U-Net weights are, decided before sampling.

    names: the LoRAs in the mix, in the recipe's order (the order Switch rotates in).
    rows: rows[i][j] = U-Net weight of names[j] at step i.
    te: each LoRA's text-encoder weight (one number: the text encoder runs once).
    """

    names: tuple[str, ...]
    rows: list[tuple[float, ...]]
    te: dict[str, float]
    mode: str = "merge"
    peaks: dict[str, float] = field(default_factory=dict)  # each LoRA's listed weight (scaled)

    def row(self, step: int) -> dict[str, float]:
        return dict(zip(self.names, self.rows[min(step, len(self.rows) - 1)]))

    def changes(self) -> list[int]:
        """The steps (after the first) where the weights must be rewritten."""
        return [i for i in range(1, len(self.rows)) if self.rows[i] != self.rows[i - 1]]

    def table(self) -> list[dict[str, float]]:
        return [self.row(i) for i in range(len(self.rows))]


def strength_factor(loras: dict[str, float], total_strength: float | None) -> float:
    """What `total_strength` multiplies every weight by: the listed weights' absolute sum becomes it."""
    if total_strength is None:
        return 1.0
    total = sum(abs(w) for w in loras.values())
    return total_strength / total if total > 0 else 1.0


def compile_plan(recipe, steps: int | None = None) -> WeightPlan:
    """The recipe's weights at every step as a table (`recipe` validated; `steps` defaults to its own)."""
    steps = steps or recipe.steps
    factor = strength_factor(recipe.loras, recipe.total_strength)
    schedules = {n: parse_schedule(t).scaled(factor) for n, t in recipe.schedules.items()}
    plain = Schedule()
    # in the mix: a LoRA with a weight, or with only a text-encoder weight (<lora:name:1:0>)
    names = tuple(n for n, w in recipe.loras.items() if w != 0 or schedules.get(n, plain).te)
    rows = []
    for i in range(steps):
        row = [schedules.get(n, plain).unet_weight(recipe.loras[n] * factor, i, steps) for n in names]
        if recipe.mode == "switch" and names:
            on = (i // recipe.switch_every) % len(names)
            row = [w if j == on else 0.0 for j, w in enumerate(row)]
        rows.append(tuple(row))
    te = {}
    for j, n in enumerate(names):
        s = schedules.get(n, plain)
        te[n] = s.te if s.te is not None else (rows[0][j] if rows else 0.0)
    return WeightPlan(names=names, rows=rows, te=te, mode=recipe.mode,
                      peaks={n: recipe.loras[n] * factor for n in names})


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """A named starting point: schedules (and block weights) an artist can load and edit."""

    name: str
    description: str
    # role -> schedule text built for a weight w ("{w}" is replaced)
    style: str
    subject: str | None = None
    style_lbw: str | None = None  # an lbw= value for the style LoRAs


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("style late", "Styles ramp in from 30% of the steps, once the base model has laid out the picture "
           "(the text encoder keeps each style's full weight, so trigger words work).",
           style="unet=0@0.3,{w}@0.6:te={w}"),
    Preset("content early, style late", "The first LoRA (a subject or character) leads the first half and fades; "
           "the styles ramp in from 30%.",
           subject="unet={w}@0,{w}@0.4,0@0.7:te={w}", style="unet=0@0.3,{w}@0.6:te={w}"),
    Preset("style on the decoder", "Styles only in the U-Net's decoder half (LBW OUTALL): the encoder and middle keep "
           "the base model's layout.", style="", style_lbw="OUTALL"),
)}


def apply_preset(preset: str, loras: dict[str, float]) -> tuple[dict[str, str], dict[str, str]]:
    """The preset's schedules and lbw values for a mix: ({name: schedule text}, {name: lbw value})."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    p = PRESETS[preset]
    schedules, lbw = {}, {}
    for i, (name, w) in enumerate((n, w) for n, w in loras.items() if w != 0):
        template = p.subject if (p.subject is not None and i == 0) else p.style
        if template:
            schedules[name] = parse_schedule(template.replace("{w}", _num(w))).text()
        if p.style_lbw and not (p.subject is not None and i == 0):
            lbw[name] = p.style_lbw
    return schedules, lbw
