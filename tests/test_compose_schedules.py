"""The Compose tab's mix and schedule helpers (ui/compose_tab.py), without a browser or a model: the
schedule boxes as recipe schedules and back, the mix kept in order, presets, the plot's data, the mode's note."""

from __future__ import annotations

import json

import pytest

from stylemix.recipe import Recipe
from ui.compose_tab import (add_to_mix, card_matches, change_mix, card_text, collect_schedules_js, collect_weights_js,
                            compose_recipe, form_schedule, mode_note, mode_used_text, plot_frame, preset_for_mix,
                            read_schedules, remove_from_mix, schedule_form, schedule_problems, schedules_form_json,
                            weights_used_text, _schedule_problem)


def recipe(weights, schedules="{}", mode="merge", every=5, steps=5, strength=0, blocks=""):
    return compose_recipe("a cat", "", json.dumps(weights), 1, steps, "64x64", "Euler", 7.5, strength, True, blocks,
                          json.dumps(schedules) if isinstance(schedules, dict) else schedules, mode, every)


def test_schedule_boxes_become_the_recipes_schedule_text():
    assert form_schedule("wc", {"start": None, "end": None, "keyframes": ""}) == ""
    assert form_schedule("wc", {"start": 0, "end": 1, "keyframes": " "}) == ""  # the whole render: plain
    assert form_schedule("wc", {"start": 0.3, "end": None, "keyframes": ""}) == "start=0.3"
    assert form_schedule("wc", {"start": 0.25, "end": 0.75, "keyframes": "0@0,1@0.5"}) == \
        "unet=0@0,1@0.5:start=0.25:stop=0.75"
    assert form_schedule("wc", {"keyframes": "0@0.3,1@0.6:te=1:interp=cosine"}) == \
        "unet=0@0.3,1@0.6:te=1:interp=cosine"
    assert form_schedule("wc", "unet=0@0,1@0.5:start=0.3") == "unet=0@0,1@0.5:start=0.3"  # an API caller's text
    # step numbers stay in the keyframe box; the boxes themselves are fractions
    assert form_schedule("wc", {"start": 0.5, "keyframes": "0@0,1@10"}) == "unet=0@0,1@10:start=0.5"


@pytest.mark.parametrize("fields, problem", [
    ({"keyframes": "1@0.5,0@0"}, "schedule of LoRA 'wc': keyframes out of order"),
    ({"keyframes": "0@"}, "schedule of LoRA 'wc': keyframe '0@' is not WEIGHT@POSITION"),
    ({"keyframes": "3@0"}, "schedule of LoRA 'wc': keyframe '3@0': weight 3 is outside [-2, 2]."),
    ({"start": 1.5}, "schedule of LoRA 'wc': start 1.5 must be a fraction of the render from 0 to 1"),
    ({"end": -0.1}, "schedule of LoRA 'wc': end -0.1 must be a fraction"),
    ({"end": " 1.5 "}, "schedule of LoRA 'wc': end 1.5 must be a fraction"),  # typed text, shown as typed
    ({"start": "abc"}, "schedule of LoRA 'wc': start 'abc' is not a number"),
    ({"start": 0.6, "end": 0.4}, "schedule of LoRA 'wc': end 0.4 is not after start 0.6"),
    ({"start": 1}, "schedule of LoRA 'wc': start 1 is the end of the render"),
    ({"start": 0.2, "keyframes": "0@0,1@1:start=0.3"}, "schedule of LoRA 'wc': start is given twice"),
])
def test_bad_schedule_boxes_are_named_with_the_lora(fields, problem):
    with pytest.raises(ValueError) as e:
        form_schedule("wc", fields)
    assert str(e.value).startswith(problem), str(e.value)
    assert _schedule_problem("wc", fields).startswith(problem.replace("<", "&lt;"))  # the message under the boxes


def test_schedule_problems_name_each_lora_and_know_the_steps():
    assert _schedule_problem("wc", {"keyframes": "0@0,1@10"}, 25) == ""
    assert "keyframe at step 30 is beyond the render's 25 steps" in _schedule_problem("wc", {"keyframes": "0@0,1@30"},
                                                                                      25.0)
    form = json.dumps({"wc": {"keyframes": "1@0.5,0@0"}, "ok": {"start": "0.5"}, "px": {"end": "2"}})
    lines = schedule_problems(form, 25).split("  \n")
    assert len(lines) == 2 and lines[0].startswith("schedule of LoRA 'wc': keyframes out of order")
    assert lines[1].startswith("schedule of LoRA 'px': end 2 must be a fraction")
    assert schedule_problems("{}", 25) == "" and schedule_problems("not json", None) == ""


def test_recipe_schedules_round_trip_through_the_boxes():
    for text in ("unet=0@0,1@0.5:start=0.25:stop=0.75", "unet=0@0.3,1@0.6:te=1", "start=0.3", "unet=0@0,1@10:start=5",
                 "te=0.5:stop=0.5", "unet=0@0,1@0.5:interp=cosine"):
        form = schedule_form(text)
        assert form_schedule("wc", form) == text, (text, form)
    assert schedule_form("unet=0@0,1@0.5:start=0.25") == {"start": 0.25, "end": None, "keyframes": "0@0,1@0.5"}
    assert json.loads(schedules_form_json({"a": "start=0.5", "b": "stop=0.5"}, names={"a": 1})) == \
        {"a": {"start": 0.5, "end": None, "keyframes": ""}}
    assert read_schedules(json.dumps({"a": {"start": None, "end": None, "keyframes": ""}, "b": "start=0.5"})) == \
        {"b": "start=0.5"}
    with pytest.raises(ValueError, match="must be a JSON object"):
        read_schedules("[1]")


def test_compose_recipe_takes_schedules_and_mode_and_old_callers_get_the_defaults():
    r = recipe({"wc": 0.5, "px": 0.4}, {"wc": {"start": None, "end": None, "keyframes": "0@0,1@0.5"}}, "switch", 2)
    assert r.schedules == {"wc": "unet=0@0,1@0.5"} and r.loras == {"wc": 1.0, "px": 0.4}  # keyframes' peak
    assert r.mode == "switch" and r.switch_every == 2
    # switch every counts only in switch mode: its hidden box, cleared, does not block a merge
    assert recipe({"wc": 0.5}, mode="merge", every=None).switch_every == 5
    with pytest.raises(ValueError, match="switch_every"):
        recipe({"wc": 0.5}, mode="switch", every=None)
    old = compose_recipe("a cat", "", json.dumps({"wc": 0.5}), 1, 5, "64x64", "Euler", 7.5, 0, True, "")
    assert old.schedules == {} and old.mode == "merge"
    with pytest.raises(ValueError, match="schedule of LoRA 'wc': keyframes out of order"):
        recipe({"wc": 0.5}, {"wc": {"keyframes": "1@0.5,0@0"}})
    with pytest.raises(ValueError, match="mode 'blend' is not known"):
        recipe({"wc": 0.5}, mode="blend")


def test_the_mix_keeps_its_order_and_drops_a_removed_lora():
    weights = add_to_mix("{}", "zeta")
    weights = add_to_mix(weights, "alpha")
    weights = add_to_mix(weights, "7")
    assert list(json.loads(weights)) == ["zeta", "alpha", "7"] and json.loads(weights)["alpha"] == 1.0
    assert add_to_mix(weights, "alpha") is None  # in the mix already
    schedules = json.dumps({"alpha": {"keyframes": "0@0,1@1"}, "zeta": {"start": 0.5}})
    weights, schedules = remove_from_mix(weights, schedules, "alpha")
    assert list(json.loads(weights)) == ["zeta", "7"] and list(json.loads(schedules)) == ["zeta"]
    # the page's add and remove buttons, as one action each
    weights, schedules = change_mix('{"op": "add", "name": "alpha", "at": "1"}', weights, schedules)
    assert list(json.loads(weights)) == ["zeta", "7", "alpha"]
    assert change_mix('{"op": "add", "name": "alpha", "at": "2"}', weights, schedules) is None
    assert list(json.loads(change_mix('{"op": "remove", "name": "zeta"}', weights, schedules)[0])) == ["7", "alpha"]
    assert change_mix("", weights, schedules) is None and change_mix('{"op": "x", "name": "a"}', "{}", "{}") is None
    # the browser writes the JSON key by key: a JS object would put "7" first
    assert "join(',')" in collect_weights_js(["zeta", "7"]) and "Object.fromEntries" not in collect_weights_js(["a"])
    assert json.dumps(["zeta", "7"]) in collect_schedules_js(["zeta", "7"])


def test_a_preset_fills_the_mixs_schedules_and_block_weights():
    weights = json.dumps({"subject": 0.8, "wc": 0.6, "off": 0})
    form, blocks = preset_for_mix("content early, style late", weights, "other:up=0.5")
    form = json.loads(form)
    assert form == {"subject": {"start": None, "end": None, "keyframes": "0.8@0,0.8@0.4,0@0.7:te=0.8"},
                    "wc": {"start": None, "end": None, "keyframes": "0@0.3,0.6@0.6:te=0.6"}}
    assert blocks == "other:up=0.5"
    form, blocks = preset_for_mix("style on the decoder", weights, "wc:up=0.5, other:down=0")
    assert json.loads(form) == {} and blocks == "other:down=0, subject:lbw=OUTALL, wc:lbw=OUTALL"
    r = recipe(json.loads(weights), blocks=blocks)  # what the preset wrote is a valid per-block text
    assert set(r.block_weights) == {"other", "subject", "wc"}
    with pytest.raises(ValueError, match="Unknown preset"):
        preset_for_mix("nope", weights, "")


def test_plot_data_follows_schedules_mode_and_steps():
    plain = plot_frame(recipe({"wc": 0.5, "px": 0.4}))
    assert list(plain.columns) == ["step", "weight", "lora"] and len(plain) == 10
    assert set(plain[plain.lora == "wc"].weight) == {0.5}
    ramp = plot_frame(recipe({"wc": 0.5, "px": 0.4}, {"wc": {"keyframes": "0@0,1@0.5"}}))
    assert list(ramp[ramp.lora == "wc"].weight) == [0.0, 0.5, 1.0, 1.0, 1.0]
    gated = plot_frame(recipe({"wc": 0.5}, {"wc": {"start": 0.5}}, steps=9))
    assert list(gated.weight) == [0.0] * 4 + [0.5] * 5
    switch = plot_frame(recipe({"wc": 0.5, "px": 0.4}, mode="switch", every=2))
    assert list(switch[switch.lora == "wc"].weight) == [0.5, 0.5, 0.0, 0.0, 0.5]
    assert list(switch[switch.lora == "px"].weight) == [0.0, 0.0, 0.4, 0.4, 0.0]
    off = plot_frame(recipe({"wc": 0.5, "px": 0}))  # in the mix but off: drawn at 0
    assert set(off[off.lora == "px"].weight) == {0.0}
    assert plot_frame(Recipe("")).empty


def test_mode_notes_say_what_composite_costs():
    assert mode_note(recipe({"wc": 0.5})) == ""
    assert "3× the time of a merge render" in mode_note(recipe({"a": 0.5, "b": 0.4, "c": 0.1, "d": 0},
                                                               mode="composite"))
    assert "each for 3 steps" in mode_note(recipe({"a": 0.5, "b": 0.4}, mode="switch", every=3))
    assert mode_used_text(recipe({"a": 0.5}, mode="composite"), 1) == "Mode: composite (1 U-Net passes per step)"
    assert mode_used_text(recipe({"a": 0.5}), 1) == ""


def test_weights_used_names_the_schedules():
    text = weights_used_text({"wc": 1.0, "px": 0.4}, {"px": {"up": 0.5}}, {"wc": "unet=0@0,1@0.5:start=0.25"})
    assert text == "wc 1 [0@0,1@0.5:start=0.25], px 0.4 (up=0.5)"
    assert weights_used_text({"wc": 0.6}, {}) == "wc 0.6"


def test_cards_are_searched_by_name_trigger_kind_and_base_model():
    card = {"name": "watercolor", "trigger_word": "wcstyle", "kind": "LoCon", "made_for": "sd15"}
    assert all(card_matches(card, q) for q in ("", None, "water", "WCSTYLE", "locon", "sd15", "water locon"))
    assert not card_matches(card, "pixel") and not card_matches(card, "water pixel")
    assert card_text(card) == "**watercolor**  \nLoCon  \ntrigger: wcstyle  \nbase: sd15"
    assert card_text({"name": "<b>", "kind": None}) == "**&lt;b&gt;**  \nLoRA"


# --------------------------------------------------------------------------- through the app's API


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The app on the tiny model with two library LoRAs (no style centroids: scores are not the point)."""
    pytest.importorskip("gradio_client")
    import app
    from helpers import make_library_lora
    from stylemix.paths import Workspace
    from stylemix.service import StyleMixService

    ws = Workspace.at(tmp_path_factory.mktemp("ws"))
    for i, name in enumerate(["watercolor", "pixelart"]):
        make_library_lora(ws.loras, name, seed=30 + i)
    demo = app.build_demo(StyleMixService.start("tiny", ws))
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
                        allowed_paths=[str(ws.outputs)])
    yield demo.local_url
    demo.close()


def test_compose_api_takes_schedules_and_mode_after_the_owner(app_url):
    """/compose's three new inputs come after the owner (callers from before them keep working, see
    tests/test_app.py); the render, its "Weights used" and its PNG carry them; /load_recipe gives them back."""
    import gradio_client

    from stylemix.recipe import read_recipe

    client = gradio_client.Client(app_url, verbose=False)
    owner = "u" + "5" * 24

    def compose(schedules, mode="merge", every=5, prompt="a cat"):
        return client.predict(prompt, "", json.dumps({"watercolor": 0.6, "pixelart": 0.4}), 3, True, 4, "64x64",
                              "Euler", 7.5, 0, True, "", owner, json.dumps(schedules), mode, every,
                              api_name="/compose")

    out = compose({"watercolor": {"start": "0.5", "end": None, "keyframes": ""}, "pixelart": "unet=0@0,1@0.5"},
                  "composite")
    assert "watercolor 0.6 [start=0.5], pixelart 1 [0@0,1@0.5]" in out[6] and "Mode: composite (2 U-Net" in out[6]
    recipe = read_recipe(out[4])
    assert recipe.schedules == {"watercolor": "start=0.5", "pixelart": "unet=0@0,1@0.5"} and recipe.mode == "composite"
    loaded = client.predict(gradio_client.handle_file(out[4]), api_name="/load_recipe")
    schedules, mode, every = loaded[-3:]
    assert json.loads(schedules) == {"watercolor": {"start": 0.5, "end": None, "keyframes": ""},
                                     "pixelart": {"start": None, "end": None, "keyframes": "0@0,1@0.5"}}
    assert mode == "composite" and every == 5
    # a prompt tag's schedule moves into the mix's boxes, as its weight moves to the slider
    tagged = compose({}, "switch", 2, prompt="a cat <lora:pixelart:0@0,1@0.5>")
    assert "Mode: switch every 2 steps" in tagged[6]
    assert json.loads(tagged[-1]) == {"pixelart": {"start": None, "end": None, "keyframes": "0@0,1@0.5"}}
    with pytest.raises(Exception, match="schedule of LoRA 'pixelart': keyframes out of order"):
        compose({"pixelart": {"keyframes": "1@0.5,0@0"}})


def test_the_page_names_the_judge_of_the_style_numbers():
    """Issue 19: beside each score, which judge made it (CLIP's embedding or CSD's)."""
    from ui.compose_tab import format_scores

    image = {"clip_score": 0.3, "clip_score_100": 30.0, "clip_model": "ViT-B-32/openai", "similarity": {"wc": 0.5},
             "calibrated": {"wc": 0.4}, "shares": {"wc": 1.0}, "style_judge": "CSD-ViT-L/14"}
    md, shares = format_scores({"images": [image], "clip_model": "ViT-B-32/openai", "style_judge": "CSD-ViT-L/14"})
    assert "with `ViT-B-32/openai`" in md and "Style similarity judged by `CSD-ViT-L/14`" in md
    assert shares == {"wc": 1.0}
    clip_only = {**image, "style_judge": None}
    md, _ = format_scores({"images": [clip_only], "clip_model": "ViT-B-32/openai"})
    assert "Style similarity judged by `ViT-B-32/openai`" in md


def test_composite_says_its_expected_time_in_seconds_from_the_last_render():
    """Issue 20: composite's cost is said before it starts; after a render, in seconds scaled to the settings."""
    from ui.compose_tab import expected_seconds

    mix = recipe({"a": 0.5, "b": 0.4}, mode="composite", steps=10)  # 64x64, 2 LoRAs: 2 passes per step
    last = {"seconds": 2.0, "steps": 5, "pixels": 64 * 64, "unet_passes": 1}  # a merge render: 0.4 s per step
    assert expected_seconds(mix, 2, last) == pytest.approx(8.0)  # 10 steps x 2 passes x 0.4 s
    assert "about **8.0 s** at these settings" in mode_note(mix, last)
    bigger = mix.with_(width=128, height=128)
    assert expected_seconds(bigger, 2, last) == pytest.approx(32.0)  # 4x the pixels
    assert mode_note(mix).endswith("merge render**.")  # no render yet: the factor alone
    assert expected_seconds(mix, 2, {"seconds": 0}) is None and expected_seconds(mix, 2, None) is None
