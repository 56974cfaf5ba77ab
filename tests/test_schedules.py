"""Schedule syntax (loractl keyframes, LoRA Block Weight's start/stop/step, interp) and the steps x LoRAs
table it compiles to: no model, pure parsing and arithmetic (stylemix/schedules.py)."""

import math

import pytest

from stylemix.a1111 import parse_lora_args, parse_prompt_tags
from stylemix.recipe import Recipe, a1111_parameters, join_sampler, parse_a1111_parameters, split_sampler
from stylemix.schedules import INTERPS, PRESETS, Schedule, apply_preset, compile_plan, parse_schedule


def plan(prompt, steps=10, **kw):
    return compile_plan(Recipe(prompt=prompt, steps=steps, **kw).validate())


def column(p, name):
    return [row[name] for row in p.table()]


@pytest.mark.parametrize("text", [
    "unet=0@0,1@0.5", "unet=0@5,1@6:te=1", "te=0.5", "start=0.3", "stop=10", "start=2:stop=8",
    "unet=0@0,1@1:interp=cosine", "unet=1@0,0.25@0.5,1@1:te=0:start=0.1:stop=0.9:interp=hold",
])
def test_schedule_text_round_trips(text):
    s = parse_schedule(text)
    assert parse_schedule(s.text()) == s
    assert s.text() == text


def test_loractl_separators_and_step_range_are_read():
    assert parse_schedule("0@0;1@0.5") == parse_schedule("0~0,1~0.5") == parse_schedule("unet=0@0,1@0.5")
    assert parse_schedule("step=5-10") == Schedule(start=5, stop=10)


@pytest.mark.parametrize("tag, weight, schedule", [
    ("<lora:a:0.7>", 0.7, Schedule()),
    ("<lora:a:0@0,1@0.5>", 1.0, Schedule(unet=((0, 0), (1, 0.5)))),  # loractl: the weight itself
    ("<lora:a:1:0@5,1@6>", 1.0, Schedule(unet=((0, 5), (1, 6)), te=1.0)),  # loractl README's warmup
    ("<lora:a:te=1:unet=0@0,1@1>", 1.0, Schedule(unet=((0, 0), (1, 1)), te=1.0)),
    ("<lora:a:0.5:1>", 1.0, Schedule(te=0.5)),  # A1111 1.5: TE:UNET
    ("<lora:a:te=0.5>", 0.5, Schedule()),  # te= alone sets both, as in A1111
    ("<lora:a:1:lbw=ALL:stop=10>", 1.0, Schedule(stop=10)),  # LoRA Block Weight
    ("<lora:a:1:step=5-10>", 1.0, Schedule(start=5, stop=10)),
    ("<lora:a:-1@0,0.5@1:interp=ease_in>", -1.0, Schedule(unet=((-1, 0), (0.5, 1)), interp="ease_in")),
])
def test_prompt_tags_carry_schedules(tag, weight, schedule):
    _, tags = parse_prompt_tags(f"a cat {tag}")
    assert (tags[0].weight, tags[0].schedule) == (weight, schedule)


@pytest.mark.parametrize("args, message", [
    ("1@0.5,0@0.2", "keyframes out of order: position 0.2 comes after 0.5"),
    ("0@0.5,1@10", "mix fractions and step numbers"),
    ("1:interp=bounce", "interp='bounce' is not known; use one of linear, hold"),
    ("1:interp=cosine", "interp=cosine shapes the ramps between keyframes"),
    ("te=0@0,1@1", "the text encoder runs once per prompt"),
    ("nan@0,1@1", "not WEIGHT@POSITION"),
    ("3@0,1@1", "weight 3 is outside"),
    ("1:start=5:stop=2", "stop=2 is not after start=5"),
    ("1:start=x", "start='x' is not a number"),
    ("1:step=5", "write step=FIRST-LAST"),
    ("1:start=2.5", "a step number is whole"),
    ("1:hr=0.5", "hires-fix pass"),
    ("1:start=1:step=2-3", "given twice"),
])
def test_bad_schedules_get_one_message_naming_the_problem(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_lora_args(args.split(":"))


def test_recipe_errors_name_the_lora():
    with pytest.raises(ValueError, match=r"schedule of LoRA 'wc': keyframe at step 30 is beyond the render's 20 steps"):
        Recipe(prompt="x", loras={"wc": 1}, schedules={"wc": "0@0,1@30"}, steps=20).validate()
    with pytest.raises(ValueError, match=r"schedule of LoRA 'px': stop=25 is beyond"):
        Recipe(prompt="x", loras={"px": 1}, schedules={"px": "stop=25"}, steps=20).validate()
    with pytest.raises(ValueError, match=r"schedule of LoRA 'ghost': that LoRA is not in the mix"):
        Recipe(prompt="x", loras={"wc": 1}, schedules={"ghost": "start=0.3"}).validate()
    with pytest.raises(ValueError, match=r"switch_every 0 must be a whole number of steps"):
        Recipe(prompt="x", loras={"wc": 1}, mode="switch", switch_every=0).validate()
    with pytest.raises(ValueError, match=r"mode 'blend' is not known; choose one of: merge, switch, composite"):
        Recipe(prompt="x", mode="blend").validate()
    with pytest.raises(ValueError, match=r"composite mode needs at least one LoRA"):
        Recipe(prompt="x", loras={"wc": 0}, mode="composite").validate()


def test_loractl_interpolation_holds_before_the_first_and_after_the_last_keyframe():
    # loractl's own test: 0.5@5,1.0@10 over 30 steps -> 0.5 at 0..5, 0.8 at 8, 1.0 from 10
    w = column(plan("x <lora:a:0.5@5,1@10>", steps=30), "a")
    assert w[0] == w[5] == 0.5 and math.isclose(w[8], 0.8) and w[10] == w[29] == 1.0


def test_fractions_map_to_steps_as_documented():
    # a fraction f sits at step f * (N - 1): 0@0,1@1 over 11 steps is i / 10
    w = column(plan("x <lora:a:0@0,1@1>", steps=11), "a")
    assert all(math.isclose(v, i / 10) for i, v in enumerate(w))
    gate = column(plan("x <lora:a:1:start=0.3:stop=0.8>", steps=11), "a")
    assert gate == [0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
    lbw = column(plan("x <lora:a:1:step=2-5>", steps=8), "a")
    assert lbw == [0, 0, 1, 1, 1, 0, 0, 0]  # LBW: on from step 2, off from step 5


@pytest.mark.parametrize("interp", INTERPS)
def test_every_interp_runs_from_the_first_to_the_last_weight(interp):
    w = column(plan(f"x <lora:a:0@0,1@1:interp={interp}>", steps=9), "a")
    assert w[0] == 0 and w[-1] == 1 and all(0 <= v <= 1 for v in w)
    if interp == "hold":
        assert w[:-1] == [0] * 8
    if interp == "ease_in":
        assert w[4] < 0.5
    if interp == "ease_out":
        assert w[4] > 0.5
    if interp in ("linear", "ease_in_out", "cosine"):
        assert math.isclose(w[4], 0.5)


def test_text_encoder_weight_is_one_number():
    p = plan("x <lora:a:0@0,1@0.5> <lora:b:1:0@0,1@1> <lora:c:0.4:start=0.5>")
    assert p.te == {"a": 0.0, "b": 1.0, "c": 0.0}  # te: as given, else the U-Net's weight at the first step


def test_constant_schedule_compiles_to_one_row_and_changes_only_where_rows_change():
    assert plan("x <lora:a:0.6@0,0.6@1>").changes() == []
    assert plan("x <lora:a:0.6>").changes() == []
    assert plan("x <lora:a:1:start=4>", steps=10).changes() == [4]


def test_switch_rotates_in_the_mix_order_every_k_steps():
    p = plan("x <lora:a:0.5> <lora:b:0.8> <lora:c:0.3>", steps=7, mode="switch", switch_every=2)
    assert [tuple(r.values()) for r in p.table()] == [
        (0.5, 0, 0), (0.5, 0, 0), (0, 0.8, 0), (0, 0.8, 0), (0, 0, 0.3), (0, 0, 0.3), (0.5, 0, 0)]
    assert p.te == {"a": 0.5, "b": 0.0, "c": 0.0}  # the text encoder sees the LoRA of the first step


def test_total_strength_scales_schedules_too():
    p = plan("x <lora:a:0@0,1@1> <lora:b:1>", steps=3, total_strength=1.0)
    assert column(p, "a") == [0, 0.25, 0.5] and column(p, "b") == [0.5] * 3


def test_previews_follow_the_same_fractions():
    s = parse_schedule("0@0,1@10:start=5:stop=15").in_fractions(21)
    assert s.unet == ((0, 0), (1, 0.5)) and s.start == 0.25 and s.stop == 0.75
    assert parse_schedule("stop=20").in_fractions(20).stop is None  # stop at the end: never off
    last = parse_schedule("start=19").in_fractions(20)
    assert last.unet_weight(1, 3, 4) == 1 and last.unet_weight(1, 2, 4) == 0  # the last step stays the last


def test_a1111_text_writes_loractl_and_lbw_syntax_and_reads_it_back():
    r = Recipe(prompt="a cat <lora:wc:0@0,1@0.5> <lora:px:0.5:1:lbw=OUTD:start=0.3> <lora:ink:1:interp=hold:"
                      "unet=0@0,1@1>", steps=21, mode="switch", switch_every=3).validate()
    text = a1111_parameters(r)
    assert "<lora:wc:0@0,1@0.5>" in text
    assert "<lora:px:0.5:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0:start=6>" in text  # 0.3 of 21 steps: step 6
    assert "StyleMix mode: switch every 3" in text
    back = parse_a1111_parameters(text)
    assert compile_plan(back).table() == compile_plan(r).table()
    assert (back.mode, back.switch_every, back.loras) == ("switch", 3, r.loras)


# A1111 before 1.9 wrote the schedule into the sampler's name; 1.9 and later write it apart.
A1111_OLD = ("a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, "
             "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.8.0")
A1111_NEW = ("a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
             "Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")
A1111_NEW_AUTO = ("a cat\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, "
                  "Size: 512x512, Version: v1.10.1")


def test_a1111_sampler_and_schedule_type_both_forms():
    assert parse_a1111_parameters(A1111_OLD).sampler == "DPM++ 2M Karras"
    assert parse_a1111_parameters(A1111_NEW).sampler == "DPM++ 2M Karras"
    assert parse_a1111_parameters(A1111_NEW_AUTO).sampler == "Euler a"
    assert split_sampler("DPM++ 2M Karras") == ("DPM++ 2M", "Karras") and join_sampler("DPM++ 2M", "Karras") == \
        "DPM++ 2M Karras"
    text = a1111_parameters(Recipe(prompt="a cat", sampler="DPM++ 2M Karras"))
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in text  # the form A1111 1.9+ writes and reads
    assert "Schedule type" not in a1111_parameters(Recipe(prompt="a cat", sampler="Euler a"))


def test_presets_build_editable_schedules():
    assert set(PRESETS) == {"style late", "content early, style late", "style on the decoder"}
    schedules, lbw = apply_preset("content early, style late", {"subject": 1.0, "wc": 0.8, "off": 0})
    assert schedules == {"subject": "unet=1@0,1@0.4,0@0.7:te=1", "wc": "unet=0@0.3,0.8@0.6:te=0.8"}
    late = compile_plan(Recipe(prompt="x", loras={"wc": 0.8}, schedules={"wc": apply_preset("style late", {"wc": 0.8})[0]["wc"]},
                               steps=11).validate())
    assert column(late, "wc")[:4] == [0, 0, 0, 0] and column(late, "wc")[-1] == 0.8
    assert apply_preset("style on the decoder", {"wc": 1})[1] == {"wc": "OUTALL"}
    with pytest.raises(ValueError, match="Unknown preset 'fast'"):
        apply_preset("fast", {"wc": 1})
