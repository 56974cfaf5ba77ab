"""The LoRA trainer on the tiny model: it learns, it resumes exactly, it survives bad steps and bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stylemix.errors import StyleMixError
from stylemix.lora.files import WEIGHTS_NAME
from stylemix.models import tiny_pipeline
from trainers.lora import TrainConfig, latest_checkpoint, train


def make_dataset(folder: Path, n: int = 4, size: int = 64, trigger: str = "sksstyle") -> Path:
    """n small striped images in the layout `stylemix preprocess` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        x = np.zeros((size, size, 3), np.uint8)
        x[:, :, i % 3] = 200
        x[:: 8 + i] = 255
        Image.fromarray(x).save(folder / f"img{i}.png")
        rows.append(json.dumps({"file_name": f"img{i}.png", "text": f"{trigger}, a striped picture number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "dataset.json").write_text(json.dumps({"style": "stripes", "trigger_word": trigger, "size": size,
                                                     "count": n}))
    return folder


def tiny_config(tmp_path: Path, name: str, **kw) -> TrainConfig:
    base = dict(data_dir=str(tmp_path / "data"), name=name, loras_dir=str(tmp_path / "loras"), model="tiny",
                device="cpu", resolution=64, rank=4, alpha=4, max_steps=4, sample_every=0, sample_prompts=[],
                sample_steps=2, checkpoint_every=1000)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data")


def test_overfit_lora_in_library_loads_in_plain_diffusers_and_mixer(tmp_path, data):
    cfg = tiny_config(tmp_path, "stripes", max_steps=60, learning_rate=1e-2, rank=8, alpha=8, lr_scheduler="constant",
                      sample_every=30, sample_prompts=["{trigger}, a house"])
    result = train(cfg, tmp_path / "job")
    losses = [loss for _, loss in result.loss_curve]
    assert len(losses) == 60 and result.skipped_steps == 0
    first, last = np.mean(losses[:15]), np.mean(losses[-15:])
    assert last < 0.85 * first, (first, last)  # the loss falls clearly on 4 images

    folder = tmp_path / "loras" / "stripes"
    assert result.lora_dir == folder
    meta = json.loads((folder / "stylemix.json").read_text())
    assert meta["trigger_word"] == "sksstyle" and meta["rank"] == 8 and meta["alpha"] == 8
    assert meta["target_modules"]["text_encoder"] == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert meta["training"]["learning_rate"] == 1e-2 and meta["training"]["tiny_model"] is True
    assert meta["dataset"]["count"] == 4 and len(meta["loss_curve"]) == 60
    assert meta["samples"] == ["samples/step-000030-0.png", "samples/step-000060-0.png"]
    assert all((folder / s).is_file() for s in meta["samples"])
    import hashlib
    assert meta["sha256"] == hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert latest_checkpoint(tmp_path / "job").name == "step-000060"
    # its style centroid, from the training images, with the CLIP the tiny model's scores use
    from stylemix.scores.clip_models import tiny_scorer
    from stylemix.scores.scoring import load_centroid

    assert meta["style"]["status"] == "ok" and meta["style"]["n_images"] == 4
    centroid = load_centroid(folder, tiny_scorer().name)
    assert centroid is not None and abs(float(centroid.vector.norm()) - 1) < 1e-5
    # and one per style judge (the tiny CSD too, issue 19), so switching judges never needs the images again
    from stylemix.scores.csd_install import load_csd_scorer
    from stylemix.scores.scoring import centroid_models

    csd = load_csd_scorer("cpu", tiny=True).name
    assert centroid_models(folder) == sorted([tiny_scorer().name, csd])
    assert set(meta["style"]["judges"]) == {tiny_scorer().name, csd}
    assert abs(float(load_centroid(folder, csd).vector.norm()) - 1) < 1e-5

    # Plain diffusers, no StyleMix code: a fresh pipeline loads it and its image changes.
    def render(pipe):
        g = torch.Generator().manual_seed(0)
        return np.asarray(pipe("sksstyle, a house", num_inference_steps=2, height=64, width=64, generator=g,
                               output_type="np").images[0])
    pipe = tiny_pipeline()
    before = render(pipe)
    pipe.load_lora_weights(str(folder), weight_name=WEIGHTS_NAME, adapter_name="stripes")
    assert len(pipe.get_list_adapters()["unet"]) == 1 and "text_encoder" in pipe.get_list_adapters()
    assert np.abs(render(pipe) - before).max() > 1e-3

    # The mixer picks it up from the library and its weight changes the image.
    from stylemix.lora.library import LoraLibrary
    from stylemix.mixer import Mixer
    from stylemix.models import LoadedModel
    from stylemix.recipe import Recipe

    mixer = Mixer(LoadedModel(tiny_pipeline(), "tiny", torch.device("cpu"), torch.float32), LoraLibrary(tmp_path / "loras"))
    recipe = Recipe(prompt="a house", steps=2, width=64, height=64, seed=3, sampler="Euler")
    off = np.asarray(mixer.generate(recipe.with_(loras={"stripes": 0.0})).images[0], dtype=np.int16)
    on = np.asarray(mixer.generate(recipe.with_(loras={"stripes": 1.0})).images[0], dtype=np.int16)
    assert np.abs(on - off).max() > 0


def test_resume_continues_step_count_schedule_and_optimizer_exactly(tmp_path, data):
    common = dict(max_steps=6, checkpoint_every=3, learning_rate=1e-3, train_text_encoder=False)
    full = train(tiny_config(tmp_path, "full", **common), tmp_path / "job-full")

    cut = train(tiny_config(tmp_path, "cut", **common), tmp_path / "job-cut", should_stop=lambda step: step == 4)
    assert cut.cancelled and cut.lora_dir is None and cut.steps == 4
    assert latest_checkpoint(tmp_path / "job-cut").name == "step-000004"  # saved on cancel
    resumed = train(tiny_config(tmp_path, "cut", **common), tmp_path / "job-cut", resume=True)
    assert resumed.steps == 6 and [s for s, _ in resumed.loss_curve] == [1, 2, 3, 4, 5, 6]
    assert np.allclose(resumed.loss_curve, full.loss_curve, atol=1e-5)
    a = load_file(str(full.lora_dir / WEIGHTS_NAME))
    b = load_file(str(resumed.lora_dir / WEIGHTS_NAME))
    assert set(a) == set(b) and not any(k.startswith("text_encoder") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    # A changed setting is refused rather than silently mixed into one run.
    with pytest.raises(StyleMixError, match="learning_rate"):
        train(tiny_config(tmp_path, "cut2", **{**common, "learning_rate": 5e-4}), tmp_path / "job-cut", resume=True)


def test_latent_cache_gives_the_same_loss_curve_as_encoding_every_step(tmp_path, data):
    cached = train(tiny_config(tmp_path, "c1", max_steps=3), tmp_path / "j1")
    uncached = train(tiny_config(tmp_path, "c2", max_steps=3, cache_latents=False), tmp_path / "j2")
    assert np.allclose(uncached.loss_curve, cached.loss_curve, atol=1e-4)


def test_stabilisers_accumulation_and_checkpointing_run(tmp_path, data):
    r = train(tiny_config(tmp_path, "stab", max_steps=2, min_snr_gamma=5.0, noise_offset=0.1, grad_accumulation=2,
                          gradient_checkpointing=True), tmp_path / "job")
    assert r.steps == 2 and len(r.loss_curve) == 2 and all(np.isfinite(loss) for _, loss in r.loss_curve)


def test_nan_batch_is_skipped_and_repeated_nans_stop_the_run(tmp_path, data):
    r = train(tiny_config(tmp_path, "nan1", max_steps=4, debug_nan_at_steps=[2]), tmp_path / "j1")
    assert r.skipped_steps == 1 and [s for s, _ in r.loss_curve] == [1, 3, 4]
    w = load_file(str(r.lora_dir / WEIGHTS_NAME))
    assert all(torch.isfinite(t).all() for t in w.values())

    cfg = tiny_config(tmp_path, "nan2", max_steps=8, checkpoint_every=1, debug_nan_at_steps=[2, 3, 4], max_bad_steps=3)
    with pytest.raises(StyleMixError, match="3 steps in a row had NaN"):
        train(cfg, tmp_path / "j2")
    assert not (tmp_path / "loras" / "nan2").exists()
    ckpt = latest_checkpoint(tmp_path / "j2")
    assert ckpt is not None
    assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "lora.safetensors")).values())


@pytest.mark.parametrize("breakage, message", [
    ("empty", "it is empty"),
    ("no_metadata", "has 2 images but no captions"),
    ("bad_json", "line 3: not valid JSON"),
    ("missing_image", "'gone.png' is missing"),
    ("escape", "leads outside"),
    ("corrupt_image", "not a readable image"),
    ("no_rows", "no images listed"),
    ("not_a_folder", "does not exist"),
])
def test_bad_dataset_fails_clearly_before_any_model_loads(tmp_path, breakage, message):
    d = tmp_path / "data"
    if breakage != "not_a_folder":
        d.mkdir()
    if breakage in ("no_metadata", "bad_json", "missing_image", "escape", "corrupt_image"):
        make_dataset(d, n=2)
    meta = d / "metadata.jsonl"
    if breakage == "no_metadata":
        meta.unlink()
    elif breakage == "bad_json":
        meta.write_text(meta.read_text() + "{not json\n")
    elif breakage == "missing_image":
        meta.write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    elif breakage == "escape":
        meta.write_text(json.dumps({"file_name": "../outside.png", "text": "x"}) + "\n")
    elif breakage == "corrupt_image":
        (d / "img0.png").write_bytes(b"\x89PNG not really")
    elif breakage == "no_rows":
        meta.write_text("\n")
    # A base model that cannot load: the dataset error must come first.
    cfg = tiny_config(tmp_path, "bad", model=str(tmp_path / "no-such-model"))
    with pytest.raises(StyleMixError, match=message):
        train(cfg, tmp_path / "job")
    assert not (tmp_path / "job").exists() and not (tmp_path / "loras").exists()


def test_bad_settings_and_taken_names_are_refused(tmp_path, data):
    with pytest.raises(StyleMixError, match="rank"):
        train(tiny_config(tmp_path, "x", rank=0), tmp_path / "job")
    with pytest.raises(StyleMixError, match="Invalid LoRA name"):
        train(tiny_config(tmp_path, "../evil"), tmp_path / "job")
    (tmp_path / "loras" / "taken").mkdir(parents=True)
    with pytest.raises(StyleMixError, match="already exists"):
        train(tiny_config(tmp_path, "taken"), tmp_path / "job")


# --------------------------------------------------------------------------- progress, time left, loss history


def test_time_left_is_smoothed_counts_samples_and_the_end_and_never_claims_zero():
    from stylemix.training.progress import END_GUESS_S, MIN_LEFT_S, Estimator

    # 100 steps of ~1 s with noise, one 12 s hiccup (a checkpoint, a GC) and 3 sample images at steps 50 and 100
    est = Estimator(total_steps=100, sample_every=50, images_per_round=3, sample_steps=4, batch_size=2)
    assert est.seconds_left() is None and est.share_done() == 0  # nothing measured: no made-up number
    rng = np.random.default_rng(0)
    lefts, shares, steps = [], [], []
    for step in range(1, 101):
        est.step_done(step, 12.0 if step == 30 else 1.0 + rng.uniform(-0.3, 0.3))
        lefts.append(est.seconds_left())
        shares.append(est.share_done())
        steps.append(step)
        if step in (50, 100):
            for _ in range(3):
                est.image_done(2.0)
                lefts.append(est.seconds_left())
                shares.append(est.share_done())
                steps.append(step)
    # step 10: 90 steps + 6 sample images (guessed from the step time) + the end are left
    guess_image = 1.0 * 4 * 2 / (3 * 2)
    assert lefts[9] == pytest.approx(90 * 1.0 + 6 * guess_image + END_GUESS_S, rel=0.2)
    # No wild jumps: after the first 5 steps each update moves the time left by at most 10% plus the work
    # just done, the 12 s step at 30 included (the old average of rates, 0.8 v + 0.2 / dt, added 16 s there).
    for i in range(5, len(lefts)):
        assert abs(lefts[i] - lefts[i - 1]) <= 0.1 * lefts[i - 1] + 2.5, (steps[i], lefts[i - 1], lefts[i])
    assert lefts[30] == pytest.approx(70 + 3 * 2 + END_GUESS_S, rel=0.2)  # the step after the hiccup
    # after the last step and its samples only the end (saving, scoring) is left, never 0
    assert lefts[-1] == pytest.approx(END_GUESS_S)
    assert shares == sorted(shares) and 0.95 < shares[-1] < 0.99  # never back while estimates settle
    est.end_progress(END_GUESS_S + 5)  # the end running over its guess: still not 0 left, not 100% done
    assert est.seconds_left() == MIN_LEFT_S and est.share_done() == 0.99
    assert 0.3 < shares[49] < 0.7  # half the steps done is about half the work here


def test_sample_rounds_and_loss_history_bounded():
    from stylemix.training.progress import LossHistory, sample_rounds

    assert sample_rounds(10, 4) == [4, 8, 10] and sample_rounds(10, 0) == [10] and sample_rounds(10, 4, after=4) == [8, 10]
    h = LossHistory(max_points=50)
    curve = [[s, 1.0 / s] for s in range(1, 10_001)]
    for s, v in curve:
        h.add(s, v)
    pts = h.as_list()
    assert len(pts) <= 50 and pts[-1][0] == 10_000 and pts[0][0] >= 1
    assert [p[0] for p in pts] == sorted(p[0] for p in pts)
    # each point is the mean loss of its run of steps: the total is preserved
    steps = [0] + [p[0] for p in pts]
    total = sum(p[1] * (b - a) for p, a, b in zip(pts, steps, steps[1:]))
    assert total == pytest.approx(sum(v for _, v in curve), rel=1e-4)
    assert LossHistory.of(curve[:30], max_points=50).as_list() == [[s, round(v, 6)] for s, v in curve[:30]]


def test_training_reports_named_phases_with_their_own_progress(tmp_path, data):
    seen = []
    cfg = tiny_config(tmp_path, "phases", max_steps=4, sample_every=2, sample_prompts=["{trigger}, a", "{trigger}, b"],
                      sample_steps=1, batch_size=3)
    train(cfg, tmp_path / "job", progress=seen.append)
    phases = [i["phase"] for i in seen]
    order = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert order == ["loading", "caching", "training", "sampling", "training", "sampling", "saving", "scoring"], order
    caching = [(i["phase_done"], i["phase_total"]) for i in seen if i["phase"] == "caching"]
    assert caching == [(0, 4), (3, 4), (4, 4)]  # images encoded so far, per batch of 3
    sampling = [(i["step"], i["phase_done"]) for i in seen if i["phase"] == "sampling"]
    assert sampling[:3] == [(2, 0), (2, 1), (2, 2)] and sampling[-1] == (4, 2)
    assert seen[-1]["sample_prompts"] == ["sksstyle, a", "sksstyle, b"]
    training = [i for i in seen if i["phase"] == "training" and i["step"]]
    assert [i["step"] for i in training] == [1, 2, 3, 4]
    assert all(i["eta_s"] > 0 for i in seen if i["step"])  # time left known once a step ran; never 0 while running
    percents = [i["percent"] for i in seen if i.get("percent") is not None]
    assert percents == sorted(percents) and percents[-1] < 100
    assert [s for s, _ in seen[-1]["loss_curve"]] == [1, 2, 3, 4]
