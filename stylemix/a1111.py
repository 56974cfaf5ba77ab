"""A1111 habits: `<lora:name:weight>` prompt tags and LoRA Block Weight (LBW) block ids.

Both are read here and nowhere else.  `Recipe.validate` moves the tags of a prompt into the
recipe's LoRA weights and per-block weights (so the CLI, the app, recipe JSON and A1111 PNG text
all get the same behaviour), and `stylemix.mixer.block_of` maps each LoRA layer to its LBW id.

LBW ids are those of hako-mikan's sd-webui-lora-block-weight: the U-Net's LDM block numbers.
input_blocks.(1+3b+a) holds diffusers' `down_blocks.b.{resnets,attentions}.a`, input_blocks.(3b+3)
the downsampler of down block b, output_blocks.(3b+a) holds `up_blocks.b.{resnets,attentions}.a`
and output_blocks.(3b+2) also the upsampler of up block b.  A plain LoRA (attention layers only)
touches 17 of them; LoCon/LyCORIS files (resnets, samplers, conv_in) touch all 26.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from stylemix.errors import StyleMixError
from stylemix.paths import check_lora_name
from stylemix.schedules import Schedule, apply_schedule_item, is_keyframes, make_schedule

LBW_IDS_17: tuple[str, ...] = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04",
                               "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
LBW_IDS_26: tuple[str, ...] = (("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",)
                               + tuple(f"OUT{i:02d}" for i in range(12)))
LBW_IDS = frozenset(LBW_IDS_26)

# The extension's built-in presets (its DEF_WEIGHT_PRESET), 17 values in LBW_IDS_17 order.
LBW_PRESETS: dict[str, tuple[float, ...]] = {
    name: tuple(float(x) for x in values.split(","))
    for name, values in {
        "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
        "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
        "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
        "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
        "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
        "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
        "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
        "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
        "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
        "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    }.items()
}
TAG_WEIGHT_LIMIT = 2.0  # the same range as Recipe.loras
LBW_VALUE_LIMIT = 4.0  # the same range as Recipe.block_weights

_UNET_PART = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)(\.|$)")


def lbw_block(component: str, module_name: str) -> str | None:
    """The LBW id of a LoRA layer (diffusers module name), or None for layers no LBW id covers
    (time_embedding, conv_norm_out, conv_out: the extension leaves those at full weight too)."""
    if component == "text_encoder":
        return "BASE"
    if module_name.startswith("mid_block."):
        return "M00"
    if module_name == "conv_in" or module_name.startswith("conv_in."):
        return "IN00"
    m = _UNET_PART.match(module_name)
    if not m:
        return None
    b, kind, a = int(m.group(2)), m.group(3), int(m.group(4))
    if m.group(1) == "down_blocks":
        return f"IN{3 * b + 3 if kind == 'downsamplers' else 1 + 3 * b + a:02d}"
    return f"OUT{3 * b + 2 if kind == 'upsamplers' else 3 * b + a:02d}"


def lbw_weights(spec: str) -> dict[str, float]:
    """`lbw=` value -> a multiplier for each of the 26 LBW ids.

    spec: a preset (OUTD, ...), 17 numbers (BASE, IN01 ... OUT11) or 26 numbers (BASE, IN00 ...
    OUT11), comma-separated.  With 17 numbers the 9 ids only LoCon/LyCORIS layers have (IN00, IN03,
    IN06, IN09-IN11, OUT00-OUT02) get 0, exactly as sd-webui-lora-block-weight expands them.
    """
    text = (spec or "").strip()
    if text.upper() in LBW_PRESETS:
        values: tuple[float, ...] = LBW_PRESETS[text.upper()]
    else:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) == 1 and not _is_float(text):
            raise ValueError(f"lbw={text!r}: unknown preset; use one of {', '.join(LBW_PRESETS)}, "
                             "or 17 or 26 comma-separated numbers.")
        if len(parts) not in (17, 26):
            raise ValueError(f"lbw={text!r}: give a preset ({', '.join(LBW_PRESETS)}) or 17 or 26 "
                             f"comma-separated numbers, not {len(parts)} value(s).")
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            bad = next(p for p in parts if not _is_float(p))
            raise ValueError(f"lbw={text!r}: {bad!r} is not a number (random values R/U/X are not "
                             "supported).") from None
    for v in values:
        if not math.isfinite(v) or abs(v) > LBW_VALUE_LIMIT:
            raise ValueError(f"lbw={text!r}: {v:g} is outside [-{LBW_VALUE_LIMIT:g}, {LBW_VALUE_LIMIT:g}].")
    ids = LBW_IDS_17 if len(values) == 17 else LBW_IDS_26
    out = {i: 0.0 for i in LBW_IDS_26}
    out.update(zip(ids, values))
    return out


def lbw_text(blocks: dict[str, float]) -> str | None:
    """The shortest `lbw=` value for a LoRA's per-block weights, if they are exactly an LBW set:
    17 numbers when the 9 LoCon-only ids are 0 (what 17 numbers expand to), else 26; None otherwise."""
    if set(blocks) != LBW_IDS:
        return None
    ids = LBW_IDS_17 if all(blocks[i] == 0 for i in LBW_IDS_26 if i not in LBW_IDS_17) else LBW_IDS_26
    return ",".join(f"{blocks[i]:g}" for i in ids)


# --------------------------------------------------------------------------- prompt tags

# <lora:...> and A1111's <lyco:...> alias (case-insensitive: <LoRA:...> is no plain text either).
_TAG = re.compile(r"<(lora|lyco):([^<>]*)>", re.IGNORECASE)
_TAG_START = re.compile(r"<(lora|lyco):", re.IGNORECASE)


@dataclass
class LoraTag:
    name: str
    weight: float
    block_weights: dict[str, float] = field(default_factory=dict)  # LBW id -> multiplier (from lbw=)
    text: str = ""  # the tag as written
    schedule: Schedule = field(default_factory=Schedule)  # keyframes, te=, start=/stop=, interp= (stylemix.schedules)


def parse_prompt_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Split A1111 `<lora:name[:weight][:lbw=SPEC]>` tags from a prompt.

    Returns the prompt without its tags (commas and spaces left by them tidied; unchanged when it
    has none) and the tags in order.  Raises ValueError naming a malformed tag, a weight outside
    [-2, 2], an unsupported argument or a LoRA tagged twice.
    """
    tags = [_parse_tag(m.group(0), m.group(2)) for m in _TAG.finditer(prompt)]
    rest = _TAG.sub(" ", prompt) if tags else prompt
    loose = _TAG_START.search(rest)
    if loose:
        raise ValueError(f"Malformed LoRA tag {rest[loose.start():loose.start() + 40]!r}: "
                         "it has no closing '>' (write <lora:NAME:WEIGHT>).")
    seen: set[str] = set()
    for t in tags:
        if t.name in seen:
            raise ValueError(f"LoRA {t.name!r} is tagged twice in the prompt; keep one <lora:{t.name}:...> tag.")
        seen.add(t.name)
    if not tags:
        return prompt, []
    # tidy what the tags leave: ", ," -> ",", runs of spaces, spaces before commas, loose ends
    rest = re.sub(r"[ \t]*,(?:[ \t]*,)+", ",", rest)
    rest = re.sub(r"[ \t]{2,}", " ", rest)
    rest = re.sub(r"[ \t]+,", ",", rest)
    rest = "\n".join(line.lstrip(" \t,").rstrip(" \t") for line in rest.split("\n"))
    return rest.strip(" \t\n,"), tags


def _parse_tag(text: str, body: str) -> LoraTag:
    items = [i.strip() for i in body.split(":")]
    name = items[0]
    if not name:
        raise ValueError(f"Malformed LoRA tag {text!r}: it names no LoRA (write <lora:NAME:WEIGHT>).")
    try:
        check_lora_name(name, "LoRA name")
        weight, lbw, schedule = parse_lora_args(items[1:])
    except (StyleMixError, ValueError) as e:
        raise ValueError(f"LoRA tag {text!r}: {e}") from None
    return LoraTag(name=name, weight=weight, block_weights=lbw, text=text, schedule=schedule)


def parse_lora_args(items: list[str]) -> tuple[float, dict[str, float], Schedule]:
    """What follows a LoRA's name in a `<lora:NAME:...>` tag (or `--lora NAME=...`), split at ':'.

    Returns (weight, LBW block weights, schedule).  The grammar is A1111's with its two extensions:
    positional `TE[:UNET]` (A1111 1.5: one number is both), each a number or loractl keyframes
    (`0@0,1@0.5`); a second positional that is an LBW preset or 17/26 numbers is `lbw=` (LoRA Block
    Weight's positional form); named te=, unet=, lbw=, start=, stop=, step=A-B and interp=.
    The weight is the U-Net's: the peak keyframe when the U-Net is scheduled (stylemix.schedules).
    """
    positional: list[str] = []
    fields: dict = {}
    lbw = None
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().lower() if eq else ""
        if not eq:
            if len(positional) == 1 and not is_keyframes(item) and not _is_float(item):
                if lbw is not None:  # <lora:name:1:OUTD>: LBW's positional form
                    raise ValueError("lbw is given twice.")
                lbw = lbw_weights(item)
                continue
            positional.append(item)
            if len(positional) > 2:
                raise ValueError(f"{item!r}: a tag takes at most two weights (text encoder, then U-Net); "
                                 "dyn= and a third number are not supported.")
            if not item:
                raise ValueError("a weight is empty.")
            if not is_keyframes(item) and not _is_float(item):
                raise ValueError(f"the weight {item!r} is not a number.")
            if not is_keyframes(item) and (not math.isfinite(float(item)) or abs(float(item)) > TAG_WEIGHT_LIMIT):
                raise ValueError(f"weight {float(item):g} is outside [-2, 2].")
        elif key == "lbw":
            if lbw is not None:
                raise ValueError("lbw is given twice.")
            lbw = lbw_weights(value)
        elif key in ("hr", "hrte", "hrunet"):
            raise ValueError(f"{key}= sets loractl's hires-fix pass; StyleMix renders in one pass, so leave it out.")
        elif not apply_schedule_item(fields, key, value.strip()):
            raise ValueError(f"{item!r} is not supported; a tag takes a name, weights (te, unet, or keyframes "
                             "w@s,...), lbw=, start=, stop=, step=A-B and interp=.")
    if positional:
        first = positional[0]
        if "te" in fields:  # A1111 reads the first weight as te= (and unet= follows te= unless given)
            raise ValueError("te is given twice (the first weight is the text encoder's); write te=...:unet=... "
                             "or the two weights TE:UNET.")
        if len(positional) == 2 or "unet" in fields:
            apply_schedule_item(fields, "te", first)  # refuses keyframes: the text encoder runs once
            if len(positional) == 2:
                apply_schedule_item(fields, "unet", positional[1])
        else:
            apply_schedule_item(fields, "unet", first)
    if "unet" not in fields and "te" in fields:
        fields["unet"] = fields["te"]  # A1111: te= alone sets both (loractl cascades it the same way)
    unet = fields.get("unet", 1.0)
    schedule = make_schedule(fields)
    weight = schedule.peak(unet if isinstance(unet, float) else 0.0)
    if schedule.te is not None and not schedule.unet and schedule.te == weight:
        schedule = replace(schedule, te=None)  # te equal to the weight: the plain form
    if not math.isfinite(weight) or abs(weight) > TAG_WEIGHT_LIMIT:
        raise ValueError(f"weight {weight:g} is outside [-2, 2].")
    return weight, lbw or {}, schedule


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True
