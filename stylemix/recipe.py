"""A generation recipe: everything needed to make an image again, and its PNG form.

The same dataclass is the mixer's request and what every saved PNG carries, twice:
an A1111-compatible `parameters` text chunk (so A1111, Civitai and other tools read it) and a
`stylemix` JSON chunk (exact, including LoRA weights and per-block weights).  A PNG from the
outside world is hostile: chunks are size-limited and every field is validated.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from PIL import Image, PngImagePlugin

from stylemix.a1111 import LBW_IDS, lbw_text, lbw_weights, parse_prompt_tags
from stylemix.schedules import DEFAULT_SWITCH_EVERY, MODES, Schedule, format_keyframes, parse_schedule
from stylemix.errors import StyleMixError
from stylemix.paths import check_lora_name

# A1111 sampler names -> (diffusers scheduler class, extra config)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
DEFAULT_SAMPLER = "DPM++ 2M Karras"
# Per-block weight ids (stylemix.mixer.block_of): the most specific one present wins for a layer.
# Coarse ids (down, down.0 ... up.3, mid, text_encoder) and A1111 LoRA Block Weight ids (BASE,
# IN00 ... IN11, M00, OUT00 ... OUT11; stylemix.a1111), which are finer than down.0 ... up.3.
COARSE_BLOCK_IDS = frozenset({"down", "mid", "up", "text_encoder"}
                             | {f"{k}.{i}" for k in ("down", "up") for i in range(4)})
BLOCK_IDS = COARSE_BLOCK_IDS | LBW_IDS
BLOCK_IDS_HELP = "down, down.0-3, mid, up, up.0-3, text_encoder, or an LBW id: BASE, IN00-IN11, M00, OUT00-OUT11"
# The limits every recipe is held to (Recipe.validate): the CLI and the app's inputs rely on these.
WEIGHT_LIMIT = 2.0
MAX_STEPS = 150
GUIDANCE_LIMIT = 30.0
SIZE_LIMITS = (64, 2048)  # each side, a multiple of 8
SEED_LIMIT = 2**63
MAX_PROMPT_CHARS = 2000
MAX_CHUNK_BYTES = 256 * 1024
MAX_LORAS = 64


@dataclass
class Recipe:
    prompt: str
    negative_prompt: str = ""
    loras: dict[str, float] = field(default_factory=dict)  # LoRA name -> weight in [-2, 2]; 0 = off
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5  # classifier-free guidance scale (A1111's "CFG scale")
    width: int = 512
    height: int = 512
    sampler: str = DEFAULT_SAMPLER
    batch_size: int = 1  # images 2..n use seeds seed+1.., as A1111 does
    add_trigger_words: bool = True  # put the active LoRAs' trigger words in front of the prompt
    total_strength: float | None = None  # if set, weights are scaled so their absolute sum equals this
    block_weights: dict[str, dict[str, float]] = field(default_factory=dict)  # LoRA -> {block: multiplier}
    # LoRA -> its schedule over the steps (stylemix.schedules: "unet=0@0,1@0.5:te=1:start=0.3:interp=cosine");
    # with U-Net keyframes the LoRA's weight in `loras` is their peak
    schedules: dict[str, str] = field(default_factory=dict)
    mode: str = "merge"  # merge | switch | composite (stylemix.schedules)
    switch_every: int = DEFAULT_SWITCH_EVERY  # switch mode: steps each LoRA stays on
    model: str | None = None  # filled in by the mixer: the base model that made the image
    lora_hashes: dict[str, str] = field(default_factory=dict)  # filled in by the mixer: name -> sha256[:12]

    def validate(self) -> "Recipe":
        """Take the prompt's <lora:...> tags (see `take_prompt_tags`), then raise ValueError naming
        the first bad field; return self."""
        if not isinstance(self.prompt, str) or len(self.prompt) > MAX_PROMPT_CHARS * 4:
            raise ValueError(f"prompt must be text of at most {MAX_PROMPT_CHARS} characters.")
        self.take_prompt_tags()
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt must be text of at most {MAX_PROMPT_CHARS} characters.")
        if not isinstance(self.negative_prompt, str) or len(self.negative_prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"negative_prompt must be text of at most {MAX_PROMPT_CHARS} characters.")
        if not isinstance(self.loras, dict) or len(self.loras) > MAX_LORAS:
            raise ValueError(f"loras must be a mapping of at most {MAX_LORAS} names to weights.")
        for name, w in self.loras.items():
            check_lora_name(name, "LoRA name")
            if not _is_number(w) or abs(w) > WEIGHT_LIMIT:
                raise ValueError(f"weight of LoRA {name!r} is {_shown(w)}; it must be a number in "
                                 f"[{-WEIGHT_LIMIT:g}, {WEIGHT_LIMIT:g}].")
        for name, blocks in self.block_weights.items():
            check_lora_name(name, "LoRA name")
            if not isinstance(blocks, dict) or not all(isinstance(k, str) and _is_number(v) and abs(v) <= 4
                                                       for k, v in blocks.items()):
                raise ValueError(f"block_weights of {name!r} must map block names to numbers in [-4, 4].")
            unknown = sorted(set(blocks) - BLOCK_IDS)
            if unknown:
                raise ValueError(f"block_weights of {name!r}: unknown block {unknown[0]!r}; "
                                 f"use {BLOCK_IDS_HELP}.")
        self._check_schedules()
        if not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed {_shown(self.seed)} must be an integer in [0, 2^63).")
        if not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps {_shown(self.steps)} must be an integer from 1 to {MAX_STEPS}.")
        if not _is_number(self.guidance) or not 0 <= self.guidance <= GUIDANCE_LIMIT:
            raise ValueError(f"guidance {_shown(self.guidance)} must be a number from 0 to {GUIDANCE_LIMIT:g}.")
        for dim in ("width", "height"):
            v = getattr(self, dim)
            if not _is_int(v) or v % 8 or not SIZE_LIMITS[0] <= v <= SIZE_LIMITS[1]:
                raise ValueError(f"{dim} {_shown(v)} must be a multiple of 8 from {SIZE_LIMITS[0]} to "
                                 f"{SIZE_LIMITS[1]}.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}.")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 8:
            raise ValueError(f"batch_size {self.batch_size!r} must be from 1 to 8.")
        if self.total_strength is not None and (not _is_number(self.total_strength) or not 0 < self.total_strength <= 4):
            raise ValueError(f"total_strength {self.total_strength!r} must be a number in (0, 4] or None.")
        if self.mode not in MODES:
            raise ValueError(f"mode {_shown(self.mode)} is not known; choose one of: {', '.join(MODES)}.")
        if not _is_int(self.switch_every) or not 1 <= self.switch_every <= MAX_STEPS:
            raise ValueError(f"switch_every {_shown(self.switch_every)} must be a whole number of steps from 1 "
                             f"to {MAX_STEPS}.")
        if self.mode == "composite" and not any(self.loras.values()):
            raise ValueError("composite mode needs at least one LoRA in the mix (it runs the U-Net once per LoRA).")
        for name, text in self.schedules.items():
            try:
                parse_schedule(text).check(self.steps)
            except ValueError as e:
                raise ValueError(f"schedule of LoRA {name!r}: {e}") from None
        return self

    def _check_schedules(self) -> None:
        """Each schedule parses, belongs to a LoRA of the mix, and is stored in its canonical text; a
        LoRA with U-Net keyframes lists their peak as its weight."""
        if not isinstance(self.schedules, dict) or len(self.schedules) > MAX_LORAS:
            raise ValueError(f"schedules must be a mapping of at most {MAX_LORAS} LoRA names to schedule texts.")
        canonical = {}
        for name, text in self.schedules.items():
            check_lora_name(name, "LoRA name")
            if name not in self.loras:
                raise ValueError(f"schedule of LoRA {name!r}: that LoRA is not in the mix (add it to loras).")
            try:
                sched = parse_schedule(text)
            except ValueError as e:
                raise ValueError(f"schedule of LoRA {name!r}: {e}") from None
            if sched.unet:
                self.loras[name] = sched.peak(0.0)
            if not sched.is_plain:
                canonical[name] = sched.text()
        self.schedules = canonical

    def schedule(self, name: str) -> Schedule:
        """The parsed schedule of one LoRA (the plain weight at every step when it has none)."""
        return parse_schedule(self.schedules[name]) if name in self.schedules else Schedule()

    def take_prompt_tags(self) -> "Recipe":
        """Move A1111 `<lora:name:weight[:lbw=...]>` tags out of the prompt into `loras` (the tag's
        weight replaces the LoRA's) and `block_weights` (lbw= replaces the LoRA's per-block weights).

        Done in `validate`, the step every recipe passes (CLI, app, recipe JSON, PNG text, mixer),
        so a tag behaves the same everywhere and the model never sees it.  Idempotent.
        """
        if not isinstance(self.loras, dict) or not isinstance(self.block_weights, dict):
            return self  # validate names the bad field
        prompt, tags = parse_prompt_tags(self.prompt)
        if tags:
            self.prompt = prompt
            self.loras = {**self.loras, **{t.name: t.weight for t in tags}}
            self.block_weights = {**self.block_weights, **{t.name: dict(t.block_weights)
                                                           for t in tags if t.block_weights}}
            if isinstance(self.schedules, dict):  # a tag replaces the LoRA's schedule too
                tagged = {t.name for t in tags}
                self.schedules = {**{n: text for n, text in self.schedules.items() if n not in tagged},
                                  **{t.name: t.schedule.text() for t in tags if not t.schedule.is_plain}}
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        if not isinstance(data, dict):
            raise ValueError("A recipe must be a JSON object.")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "prompt" not in kwargs:
            raise ValueError("A recipe needs a prompt.")
        for k in ("loras", "block_weights", "lora_hashes", "schedules"):
            if k in kwargs and not isinstance(kwargs[k], dict):
                raise ValueError(f"recipe field {k!r} must be an object.")
        for k in ("seed", "steps", "width", "height", "batch_size", "switch_every"):
            if isinstance(kwargs.get(k), float) and kwargs[k].is_integer():
                kwargs[k] = int(kwargs[k])
        return cls(**kwargs).validate()

    def with_(self, **changes) -> "Recipe":
        return Recipe(**{**asdict(self), **changes})


# LORA:lbw=PRESET or LORA:lbw=17/26 numbers inside a comma-separated block-weight text
_LBW_ITEM = re.compile(r"([^\s,:=]+):lbw=((?:[-+0-9.eE]+[ \t]*,[ \t]*){16,25}[-+0-9.eE]+|[A-Za-z][\w.]*)")


def parse_block_weights(items: str | list[str]) -> dict[str, dict[str, float]]:
    """'anime:up=0.5, pixelart:down.1=0, ink:lbw=OUTD' (or a list of such items) -> {lora: {block: multiplier}}.

    BLOCK is a coarse id or an LBW id (IN04, OUT07 ...); `LORA:lbw=PRESET_OR_17_OR_26_NUMBERS` sets all
    26 LBW ids at once, as in a `<lora:name:w:lbw=...>` prompt tag.
    """
    lbw_items: list[tuple[str, str]] = []
    if isinstance(items, str):
        lbw_items = _LBW_ITEM.findall(items)
        items = [x for x in re.split(r"[,\s]+", _LBW_ITEM.sub(" ", items)) if x]
    out: dict[str, dict[str, float]] = {}
    for lora, spec in lbw_items:
        out.setdefault(lora, {}).update(lbw_weights(spec))
    for item in items or []:
        lora, sep, rest = item.partition(":")
        block, sep2, mult = rest.partition("=")
        if sep and sep2 and lora and block.strip().lower() == "lbw":
            out.setdefault(lora, {}).update(lbw_weights(mult))
            continue
        try:
            m = float(mult)
        except ValueError:
            sep2 = ""
        if not sep or not sep2 or not lora:
            raise ValueError(f"Block weight {item!r}: expected LORA:BLOCK=MULTIPLIER, e.g. anime:up.1=0.5.")
        if block not in BLOCK_IDS:
            raise ValueError(f"Block weight {item!r}: unknown block {block!r}; use {BLOCK_IDS_HELP}.")
        out.setdefault(lora, {})[block] = m
    return out


def format_block_weights(block_weights: dict[str, dict[str, float]], names=None) -> str:
    """The text form `parse_block_weights` reads back: 'anime:up=0.5, ink:lbw=1,0,...' (LoRAs in `names` only)."""
    parts = []
    for n, blocks in block_weights.items():
        if names is not None and n not in names:
            continue
        lbw = lbw_text(blocks)
        parts += [f"{n}:lbw={lbw}"] if lbw else [f"{n}:{b}={m:g}" for b, m in blocks.items()]
    return ", ".join(parts)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shown(value) -> str:
    """A bad value as a message shows it: a cleared box reads "(empty)", not "None"; 50.0 reads "50",
    as typed (the CLI parses --guidance 50 as 50.0, a form may send 50)."""
    if value is None or value == "":
        return "(empty)"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def parse_size(text) -> tuple[int, int]:
    """'512x768' -> (512, 768); ValueError naming the text when it is not WIDTHxHEIGHT (the numbers
    themselves are checked by Recipe.validate)."""
    parts = str(text if text is not None else "").strip().lower().split("x")
    try:
        width, height = (int(p.strip()) for p in parts)
    except ValueError:
        raise ValueError(f"size {_shown(text)}: write it as WIDTHxHEIGHT, e.g. 512x512.") from None
    return width, height


def whole_number(value):
    """A number from a form (1.0, 7) as an int when it is whole; anything else unchanged, so that
    Recipe.validate names it (a form sends 25.0 for 25, and None for a cleared box)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# --------------------------------------------------------------------------- A1111 text


def a1111_parameters(recipe: Recipe, prompt_used: str | None = None) -> str:
    """The `parameters` text A1111 writes: prompt with <lora:name:w> tags, then settings.

    A LoRA whose per-block weights are exactly an LBW set gets `:lbw=...`, as A1111's LoRA Block
    Weight extension writes and reads it."""
    tags = " ".join(_lora_tag(n, w, recipe.block_weights.get(n, {}), recipe.schedule(n), recipe.steps)
                    for n, w in recipe.loras.items() if w != 0)
    lines = [" ".join(x for x in (prompt_used or recipe.prompt, tags) if x)]
    if recipe.negative_prompt:
        lines.append(f"Negative prompt: {recipe.negative_prompt}")
    sampler, schedule_type = split_sampler(recipe.sampler)
    settings = [f"Steps: {recipe.steps}", f"Sampler: {sampler}"]
    if schedule_type != "Automatic":
        settings.append(f"Schedule type: {schedule_type}")  # A1111 1.9+ writes the sampler and its schedule apart
    settings += [f"CFG scale: {_fmt(recipe.guidance)}", f"Seed: {recipe.seed}", f"Size: {recipe.width}x{recipe.height}"]
    if recipe.mode != "merge":  # no A1111 equivalent: read back by StyleMix, ignored by A1111
        settings.append(f"StyleMix mode: {recipe.mode}" + (f" every {recipe.switch_every}" if recipe.mode == "switch" else ""))
    if recipe.model:
        settings.append(f"Model: {recipe.model}")
    hashes = {n: h for n, h in recipe.lora_hashes.items() if recipe.loras.get(n)}
    if hashes:
        settings.append('Lora hashes: "' + ", ".join(f"{n}: {h}" for n, h in hashes.items()) + '"')
    settings.append("Version: StyleMix")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def _lora_tag(name: str, weight: float, blocks: dict[str, float], schedule: Schedule, steps: int) -> str:
    """One LoRA as A1111 and its extensions write it: `<lora:NAME:W>`, loractl's keyframes
    (`<lora:NAME:0@0,1@0.5>`, `te=`/`unet=`), LoRA Block Weight's `lbw=` and `start=`/`stop=`
    (step numbers: LBW reads no fractions, so a fraction becomes the first step it covers)."""
    if schedule.unet:
        kf = format_keyframes(schedule.unet)
        args = [kf] if schedule.te is None else [f"te={_fmt(schedule.te)}", f"unet={kf}"]
    elif schedule.te is not None:
        args = [_fmt(schedule.te), _fmt(weight)]  # A1111's positional TE:UNET
    else:
        args = [_fmt(weight)]
    lbw = lbw_text(blocks)
    if lbw:
        args.append(f"lbw={lbw}")
    for key in ("start", "stop"):
        at = getattr(schedule, key)
        if at is not None:
            args.append(f"{key}={math.ceil(at * (steps - 1) - 1e-9) if at < 1 else int(at)}")
    if schedule.interp != "linear":
        args.append(f"interp={schedule.interp}")
    return f"<lora:{name}:{':'.join(args)}>"


def split_sampler(sampler: str) -> tuple[str, str]:
    """'DPM++ 2M Karras' -> ('DPM++ 2M', 'Karras'): A1111 1.9+ names the sampler and the schedule apart."""
    if sampler.endswith(" Karras"):
        return sampler[: -len(" Karras")], "Karras"
    return sampler, "Automatic"


def join_sampler(sampler: str, schedule_type: str | None) -> str:
    """A1111's sampler and schedule type (1.9+) as one StyleMix sampler name; the old one-name form
    ('DPM++ 2M Karras', before 1.9) comes in with no schedule type and stays as it is."""
    sampler, schedule_type = sampler.strip(), (schedule_type or "Automatic").strip()
    if schedule_type.lower() not in ("automatic", ""):
        joined = f"{sampler} {schedule_type}"
        if joined in SAMPLERS:
            return joined
    return sampler


def _fmt(x: float) -> str:
    return f"{x:g}"


def parse_a1111_parameters(text: str) -> Recipe:
    """Best-effort reader of A1111's `parameters` text (images made elsewhere)."""
    if not isinstance(text, str) or len(text) > MAX_CHUNK_BYTES:
        raise ValueError("parameters text is missing or too long.")
    lines = text.strip().split("\n")
    settings_line = lines[-1] if len(lines) > 1 and "Steps:" in lines[-1] else ""
    body = lines[:-1] if settings_line else lines
    neg = ""
    prompt_lines = []
    for i, line in enumerate(body):
        if line.startswith("Negative prompt:"):
            neg = "\n".join([line[len("Negative prompt:"):].strip()] + body[i + 1:])
            break
        prompt_lines.append(line)
    prompt = "\n".join(prompt_lines).strip()  # its <lora:...> tags become loras in validate()
    kv = dict(re.findall(r"(\w[\w ]*?): (\"[^\"]*\"|[^,]+)", settings_line))
    recipe = Recipe(prompt=prompt, negative_prompt=neg).take_prompt_tags()
    conv = {"Steps": ("steps", int), "CFG scale": ("guidance", float), "Seed": ("seed", int),
            "Sampler": ("sampler", lambda v: join_sampler(v, kv.get("Schedule type"))), "Model": ("model", str)}
    for key, (attr, typ) in conv.items():
        if key in kv:
            try:
                setattr(recipe, attr, typ(kv[key].strip()))
            except ValueError:
                raise ValueError(f"Unreadable {key!r} value {kv[key]!r} in PNG parameters.") from None
    if "Size" in kv:
        m = re.fullmatch(r"(\d+)x(\d+)", kv["Size"].strip())
        if m:
            recipe.width, recipe.height = int(m.group(1)), int(m.group(2))
    if recipe.sampler not in SAMPLERS:
        recipe.sampler = DEFAULT_SAMPLER
    m = re.fullmatch(r"(merge|switch|composite)(?: every (\d+))?", kv.get("StyleMix mode", "").strip())
    if m:
        recipe.mode = m.group(1)
        if m.group(2):
            recipe.switch_every = int(m.group(2))
    return recipe.validate()


# --------------------------------------------------------------------------- PNG


def png_info(recipe: Recipe, prompt_used: str | None = None, extra: dict | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(recipe, prompt_used))
    payload = {"version": 1, "recipe": recipe.to_dict(), **(extra or {})}
    # key order matters: the LoRAs' order is the order of their trigger words in the prompt
    info.add_itxt("stylemix", json.dumps(payload), zip=True)
    return info


def save_png(image: Image.Image, path: str | Path, recipe: Recipe, prompt_used: str | None = None,
             extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=png_info(recipe, prompt_used, extra))
    tmp.replace(path)
    return path


def read_recipe(source: str | Path | Image.Image) -> Recipe:
    """The recipe stored in a PNG: StyleMix's own chunk if present, else A1111's `parameters`."""
    if isinstance(source, Image.Image):
        img = source
    else:
        path = Path(source)
        if not path.is_file():
            raise StyleMixError(f"No such file: {path}")
        try:
            img = Image.open(path)
        except Exception:
            raise StyleMixError(f"{path.name} is not an image StyleMix can read.") from None
    text = getattr(img, "text", None) or img.info or {}
    raw = text.get("stylemix")
    try:
        if isinstance(raw, str):
            if len(raw) > MAX_CHUNK_BYTES:
                raise ValueError("stylemix chunk is too large")
            payload = json.loads(raw)
            if not isinstance(payload, dict) or not isinstance(payload.get("recipe"), dict):
                raise ValueError("stylemix chunk has no recipe")
            return Recipe.from_dict(payload["recipe"])
        if isinstance(text.get("parameters"), str):
            return parse_a1111_parameters(text["parameters"])
    except (ValueError, TypeError, json.JSONDecodeError, StyleMixError) as e:
        raise StyleMixError(f"The image's recipe is unusable: {e}") from None
    raise StyleMixError("This image carries no StyleMix or A1111 recipe.")
