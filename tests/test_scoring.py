"""Scores: the definitions on hand-made embeddings, then the whole path with a tiny random open_clip CLIP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from stylemix.scores.clip_models import (TINY_CLIP_NAME, Scorer, ScorerUnavailable, clear_scorer_cache, load_scorer,
                                  load_scorer_or_reason, tiny_scorer)
from stylemix.errors import StyleMixError
from stylemix.scores.scoring import (CENTROID_FILE, StyleCentroid, calibrate, centroid_models, clip_score_100, clip_scores,
                              NOISE_FLOOR, compute_centroid, leave_one_out_similarity, load_centroid, mix_shares, open_image,
                              save_centroid, score_images, strip_trigger_words)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- two visually distinct styles


def stripes(i: int, size: int = 64) -> Image.Image:
    """Blue/white diagonal stripes of varying width and phase."""
    r = np.random.default_rng(100 + i)
    im = Image.new("RGB", (size, size), (240, 240, 250))
    d = ImageDraw.Draw(im)
    w, off = int(r.integers(3, 7)), int(r.integers(0, 12))
    for x in range(-size, 2 * size, 2 * w):
        d.polygon([(x + off, 0), (x + off + w, 0), (x + off + w + size // 2, size), (x + off + size // 2, size)],
                  fill=(20, 40, 200))
    return im


def blobs(i: int, size: int = 64) -> Image.Image:
    """Warm round blobs on a sand background."""
    r = np.random.default_rng(200 + i)
    im = Image.new("RGB", (size, size), (250, 200, 120))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x, y = (int(v) for v in r.integers(0, size, 2))
        rad = int(r.integers(6, 16))
        d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=tuple(int(v) for v in r.integers([180, 30, 0], [255, 90, 60])))
    return im


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return tiny_scorer()


# --------------------------------------------------------------------------- definitions, hand-made embeddings


class FixedScorer(Scorer):
    """A scorer whose "images" and texts are names of hand-made unit vectors: exact known cosines."""

    def __init__(self, vectors: dict[str, list[float]]):
        super().__init__(model=None, preprocess=None, tokenizer=None, name="hand-made", device=torch.device("cpu"))
        self.vectors = {k: torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float32), dim=0)
                        for k, v in vectors.items()}

    @property
    def embed_dim(self) -> int:
        return 3

    def embed_images(self, images):
        return torch.stack([self.vectors[k] for k in images]) if images else torch.zeros(0, 3)

    def embed_texts(self, texts):
        return torch.stack([self.vectors[t] for t in texts])


def test_strip_trigger_words_and_clip_scale():
    assert strip_trigger_words("wcstyle, a cat by a window", ["wcstyle"]) == "a cat by a window"
    assert strip_trigger_words("a cat, WCSTYLE, pixstyle, at night", ["wcstyle", "pixstyle"]) == "a cat, at night"
    assert strip_trigger_words("wcstyles are not wcstyle", ["wcstyle"]) == "wcstyles are not"  # whole words only
    assert strip_trigger_words("wcstyle", ["wcstyle"]) == ""
    assert clip_score_100(0.31) == pytest.approx(31.0)
    assert clip_score_100(-0.2) == 0.0


def test_calibration_ends():
    assert calibrate(0.6, base_similarity=0.6, self_similarity=0.8) == pytest.approx(0.0)
    assert calibrate(0.8, base_similarity=0.6, self_similarity=0.8) == pytest.approx(1.0)
    assert calibrate(0.7, base_similarity=0.6, self_similarity=0.8) == pytest.approx(0.5)
    assert calibrate(0.5, base_similarity=0.6, self_similarity=0.8) == pytest.approx(-0.5)  # not clipped
    assert calibrate(0.9, base_similarity=0.6, self_similarity=0.8) == pytest.approx(1.5)
    assert calibrate(0.7, base_similarity=0.8, self_similarity=0.8) is None  # no scale: None, never NaN/inf


def test_mix_shares():
    s = mix_shares({"watercolor": 0.62, "pixel": 0.38})
    assert s == pytest.approx({"watercolor": 0.62, "pixel": 0.38}) and sum(s.values()) == pytest.approx(1)
    s = mix_shares({"watercolor": 0.9, "pixel": 0.3, "absent": -0.4})  # a negative one gets no share
    assert s["absent"] == 0.0 and s["watercolor"] == pytest.approx(0.75) and sum(s.values()) == pytest.approx(1)
    assert mix_shares({"a": -0.1, "b": 0.0, "c": None, "d": math.nan}) == {}  # nothing to share: none, never NaN
    assert mix_shares({}) == {}
    # a floor: values at or below it are noise, not style
    assert mix_shares({"a": 0.05}, floor=0.1) == {}
    assert mix_shares({"a": 0.5, "b": 0.08}, floor=0.1) == {"a": 1.0, "b": 0.0}
    assert mix_shares({"a": 0.1, "b": 0.3}, floor=0.1) == {"a": 0.0, "b": 1.0}


def test_shares_only_where_there_is_style():
    """A style at or below the noise floor is not shown as 100%; a LoRA at weight 0 never gets a share."""
    s = FixedScorer({"a1": [1, 0, 0], "a2": [1, 0.2, 0], "b1": [0, 1, 0], "b2": [0.2, 1, 0],
                     "base": [0, 0, 1], "faint": [0.05, 0.05, 1], "img": [1, 0.3, 0.2]})
    ca = compute_centroid(s, ["a1", "a2"], base_images=["base"])
    cb = compute_centroid(s, ["b1", "b2"], base_images=["base"])
    # one style barely above the base model: measured, but not "100% a"
    (faint,) = score_images(s, ["faint"], None, {"a": ca}, base_images=["base"])
    assert 0 < faint.calibrated["a"] <= NOISE_FLOOR
    assert faint.shares == {} and faint.shares_basis == "calibrated" and faint.style_detected is False
    assert "no style detected" in faint.summary() and "%" not in faint.summary()
    # a clear style a, with b in the mix at weight 0: b is measured but gets no share
    (img,) = score_images(s, ["img"], None, {"a": ca, "b": cb}, base_images=["base"], weights={"a": 1.0, "b": 0.0})
    assert img.calibrated["a"] > NOISE_FLOOR and img.calibrated["b"] is not None
    assert img.shares == {"a": 1.0} and img.style_detected is True
    # both at weight 0 (a sweep's corner): no mix, no shares
    (none,) = score_images(s, ["img"], None, {"a": ca, "b": cb}, base_images=["base"], weights={"a": 0, "b": 0})
    assert none.shares == {} and none.shares_basis is None and none.style_detected is None
    # raw similarities of one style: no base to tell style from noise, and its share would be 100% whatever
    (raw,) = score_images(s, ["img"], None, {"a": StyleCentroid(ca.vector, "hand-made", 2, ca.self_similarity)})
    assert raw.shares == {} and raw.shares_basis == "raw"


def test_leave_one_out_similarity_known_cosines():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert leave_one_out_similarity(e) == pytest.approx(0.0)  # each is orthogonal to the other
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), dim=1)
    # image 0 against the mean of (1,1)/sqrt2 and (0,1): direction of (0.707, 1.707)
    c0 = torch.nn.functional.normalize(e[1] + e[2], dim=0)
    c1 = torch.nn.functional.normalize(e[0] + e[2], dim=0)  # = e[1] exactly
    expected = (float(e[0] @ c0) + float(e[1] @ c1) + float(e[2] @ c0.flip(0))) / 3
    assert leave_one_out_similarity(e) == pytest.approx(expected)
    with pytest.raises(StyleMixError, match="at least 2"):
        leave_one_out_similarity(e[:1])


def test_score_images_definitions_on_handmade_embeddings():
    s = FixedScorer({"a1": [1, 0, 0], "a2": [1, 0.2, 0], "b1": [0, 1, 0], "b2": [0.2, 1, 0],
                     "img": [1, 0, 0], "neg": [-1, 0, 0], "base": [0.5, 0.5, 1], "a cat": [0.6, 0.8, 0]})
    ca = compute_centroid(s, ["a1", "a2"], base_images=["base"])
    cb = compute_centroid(s, ["b1", "b2"])
    assert ca.vector.norm() == pytest.approx(1.0) and ca.n_images == 2
    assert ca.self_similarity == pytest.approx(float(s.vectors["a1"] @ s.vectors["a2"]))  # 2 images: their cosine
    assert ca.base_similarity == pytest.approx(float(s.vectors["base"] @ ca.vector))
    assert cb.base_similarity is None

    (img, neg) = score_images(s, ["img", "neg"], "wcstyle, a cat", {"a": ca, "b": cb}, trigger_words=["wcstyle"],
                              base_similarities={"b": 0.2})
    assert img.prompt_scored == "a cat"
    assert img.clip_score == pytest.approx(0.6) and img.clip_score_100 == pytest.approx(60.0)
    assert img.similarity["a"] == pytest.approx(float(s.vectors["img"] @ ca.vector))
    assert neg.similarity["a"] == pytest.approx(-img.similarity["a"])  # a negative similarity
    assert neg.clip_score == pytest.approx(-0.6) and neg.clip_score_100 == 0.0
    # a: stored base anchor; b: the caller's anchor
    assert img.base_similarity == pytest.approx({"a": ca.base_similarity, "b": 0.2})
    assert img.calibrated["a"] == pytest.approx(calibrate(img.similarity["a"], ca.base_similarity, ca.self_similarity))
    assert img.calibrated["b"] == pytest.approx(calibrate(img.similarity["b"], 0.2, cb.self_similarity))
    # img is style a, not b: b is "absent from the mix" and gets no share
    assert img.shares_basis == "calibrated" and img.shares["b"] == 0.0 and img.shares["a"] == pytest.approx(1.0)
    assert sum(neg.shares.values()) in (0.0, pytest.approx(1.0))
    assert all(not math.isnan(v) for v in neg.shares.values())

    # no low anchor for b: calibrated None, shares from raw similarity, and said so
    (img2,) = score_images(s, ["img"], None, {"a": ca, "b": cb})
    assert img2.clip_score is None and img2.calibrated["b"] is None and img2.shares_basis == "raw"
    assert sum(img2.shares.values()) == pytest.approx(1.0)
    # paired base images: the image identical to its base pair is calibrated to 0 exactly
    (same,) = score_images(s, ["base"], None, {"a": ca, "b": cb}, base_images=["base"])
    assert same.calibrated == pytest.approx({"a": 0.0, "b": 0.0}) and same.shares == {}
    assert same.style_detected is False  # the base model's own image shows no style
    with pytest.raises(StyleMixError, match="pair one to one"):
        score_images(s, ["img", "neg"], None, {"a": ca}, base_images=["base"])
    other = StyleCentroid(vector=ca.vector, clip_model="ViT-L-14/openai", n_images=2, self_similarity=0.9)
    with pytest.raises(StyleMixError, match="ViT-L-14/openai"):
        score_images(s, ["img"], None, {"x": other})


# --------------------------------------------------------------------------- tiny random open_clip, real images


def test_own_style_images_score_higher_for_own_style(scorer):
    assert scorer.is_demo and "demo" in scorer.name
    train_s, train_b = [stripes(i) for i in range(5)], [blobs(i) for i in range(5)]
    cs, cb = compute_centroid(scorer, train_s), compute_centroid(scorer, train_b)
    # each style's own (held-out) images are closer to it than to the other style
    held = score_images(scorer, [stripes(10), stripes(11), blobs(10), blobs(11)], None, {"stripes": cs, "blobs": cb})
    for r in held[:2]:
        assert r.similarity["stripes"] > r.similarity["blobs"]
    for r in held[2:]:
        assert r.similarity["blobs"] > r.similarity["stripes"]
    # and the training images themselves: LOO similarity to their own style above the other's
    own = scorer.embed_images(train_s) @ cs.vector
    assert float(own.mean()) > float((scorer.embed_images(train_s) @ cb.vector).mean())
    assert -1.0 <= cs.self_similarity <= 1.0


def test_whole_path_with_tiny_clip_on_pipeline_images(scorer, tiny_pipe):
    # images out of the (tiny) SD1.5 pipeline, scored on its device, with base-model pairs for calibration
    cs = compute_centroid(scorer, [stripes(i) for i in range(4)])
    cb = compute_centroid(scorer, [blobs(i) for i in range(4)])
    gen = tiny_pipe(["wcstyle, a cat", "wcstyle, a cat"], num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0)).images
    results = score_images(scorer, gen + [stripes(20)], "wcstyle, a cat", {"stripes": cs, "blobs": cb},
                           trigger_words=["wcstyle"], base_images=gen + [blobs(20)])
    for r in results:
        assert r.clip_model == TINY_CLIP_NAME and r.is_demo and r.prompt_scored == "a cat"
        assert -1.0 <= r.clip_score <= 1.0 and r.clip_score_100 == pytest.approx(100 * max(r.clip_score, 0))
        d = json.loads(json.dumps(r.to_dict()))
        assert "demo values" in d["label"] and set(d["shares"]) in ({"stripes", "blobs"}, set())
        assert "DEMO" in r.summary()
    # a generated image paired with itself as base: calibrated 0 for every style, so no style detected
    assert results[0].calibrated == pytest.approx({"stripes": 0.0, "blobs": 0.0}, abs=1e-5)
    assert results[0].shares == {} and results[0].style_detected is False
    # a stripes image calibrated against a blobs base: stripes gets the larger share
    last = results[-1]
    assert last.shares["stripes"] > last.shares["blobs"] and sum(last.shares.values()) == pytest.approx(1.0)
    # the same image scored twice, alone or in a batch, gives the same numbers
    assert clip_scores(scorer, [gen[0]], "a cat")[0] == pytest.approx(results[0].clip_score, abs=1e-5)
    fresh = tiny_scorer()
    assert fresh.embed_images(gen).allclose(scorer.embed_images(gen), atol=1e-5)  # deterministic weights
    texts = scorer.embed_texts(["a cat", "a dog", "a cat"])  # cached prompts give the same embeddings
    assert texts[0].allclose(texts[2]) and not texts[0].allclose(texts[1])
    assert texts.allclose(fresh.embed_texts(["a cat", "a dog", "a cat"]), atol=1e-5)


def test_centroid_saved_with_lora_and_reloaded(scorer, workspace):
    lora = workspace.loras / "stripes"
    lora.mkdir()
    c = compute_centroid(scorer, [stripes(i) for i in range(3)], base_images=[blobs(0)])
    path = save_centroid(lora, c)
    assert path == lora / CENTROID_FILE and sorted(p.name for p in lora.iterdir()) == [CENTROID_FILE]
    back = load_centroid(lora, scorer.name)
    assert back.vector.allclose(c.vector) and back.n_images == 3
    assert back.self_similarity == pytest.approx(c.self_similarity)
    assert back.base_similarity == pytest.approx(c.base_similarity)
    assert load_centroid(lora, "ViT-B-32/openai") is None  # computed with another CLIP model
    assert load_centroid(workspace.loras, scorer.name) is None  # no file
    # a second CLIP model's centroid goes beside the first, not over it
    other = StyleCentroid(vector=torch.ones(8) / 8 ** 0.5, clip_model="ViT-B-32/openai", n_images=2, self_similarity=0.8)
    save_centroid(lora, other)
    assert centroid_models(lora) == sorted([scorer.name, "ViT-B-32/openai"])
    assert load_centroid(lora, scorer.name).vector.allclose(c.vector)
    assert load_centroid(lora, "ViT-B-32/openai").base_similarity is None
    with pytest.raises(StyleMixError, match="does not exist"):
        save_centroid(workspace.loras / "missing", c)
    # a pickle or garbage in place of the file: clear error naming it, never unpickled
    torch.save({"x": torch.zeros(2)}, lora / CENTROID_FILE)
    with pytest.raises(StyleMixError, match="pickle"):
        load_centroid(lora, scorer.name)
    (lora / CENTROID_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    with pytest.raises(StyleMixError, match=CENTROID_FILE):
        load_centroid(lora, scorer.name)


def test_unavailable_clip_fails_fast_with_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never a 600 MB download, whatever the caller's environment
    clear_scorer_cache()
    t0 = time.monotonic()
    with pytest.raises(ScorerUnavailable, match="not in the local cache") as e:
        load_scorer("ViT-B-32", "openai", device="cpu", cache_dir=tmp_path)
    assert "ViT-B-32/openai" in str(e.value) and time.monotonic() - t0 < 30  # no hub retry loop
    scorer, reason = load_scorer_or_reason("ViT-B-32", "openai", device="cpu", cache_dir=tmp_path)
    assert scorer is None and "HF_HUB_OFFLINE" in reason
    with pytest.raises(StyleMixError, match="Unknown CLIP model 'ViT-Q-99'"):
        load_scorer("ViT-Q-99", device="cpu")
    with pytest.raises(StyleMixError, match="nope.safetensors"):
        load_scorer("ViT-B-32", str(tmp_path / "nope.safetensors"), device="cpu")
    pickle = tmp_path / "w.safetensors"
    torch.save({"x": torch.zeros(2)}, pickle)
    with pytest.raises(StyleMixError, match="pickle"):
        load_scorer("ViT-B-32", str(pickle), device="cpu")
    assert load_scorer("tiny", device="cpu") is load_scorer(device="cpu", tiny=True)  # cached


def test_open_image_refuses_non_images(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(StyleMixError, match="notes.png"):
        open_image(tmp_path / "notes.png")
    with pytest.raises(StyleMixError, match="not found"):
        open_image(tmp_path / "missing.png")
    rgba = Image.new("RGBA", (8, 8), (1, 2, 3, 4))
    rgba.save(tmp_path / "a.png")
    assert open_image(tmp_path / "a.png").mode == "RGB"


# --------------------------------------------------------------------------- CLI


def test_cli_score(workspace, tmp_path, capsys):
    from stylemix.cli import main

    def save(name, maker, n=4):
        files = []
        for i in range(n):
            files.append(tmp_path / f"{name}{i}.png")
            maker(i).save(files[-1])
        return [str(f) for f in files]

    for name in ("stripes", "blobs"):
        (workspace.loras / name).mkdir()
        (workspace.loras / name / "stylemix.json").write_text(json.dumps({"trigger_word": f"{name}style"}))
    (workspace.loras / "nocentroid").mkdir()
    g = ["--loras-dir", str(workspace.loras), "--model", "tiny"]
    assert main(g + ["score", *save("s", stripes), "--save-centroid", "stripes", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["clip_model"] == TINY_CLIP_NAME and info["n_images"] == 4 and info["is_demo"]
    assert main(g + ["score", *save("b", blobs), "--save-centroid", "blobs"]) == 0
    assert "Saved the style centroid of blobs" in capsys.readouterr().out

    test = [str(tmp_path / "t_s.png"), str(tmp_path / "t_b.png")]
    stripes(30).save(test[0])
    blobs(30).save(test[1])
    assert main(g + ["score", *test, "--prompt", "stripesstyle, a cat", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["is_demo"] and out["skipped_loras"] == []
    r_s, r_b = out["results"]
    assert r_s["image"] == test[0] and r_s["prompt_scored"] == "a cat"  # the LoRA's trigger word removed
    assert r_s["similarity"]["stripes"] > r_s["similarity"]["blobs"]
    assert r_b["similarity"]["blobs"] > r_b["similarity"]["stripes"]
    assert r_s["shares_basis"] == "raw" and sum(r_s["shares"].values()) == pytest.approx(1.0)

    # plain text, one LoRA, calibrated with a base image per image
    assert main(g + ["score", test[0], "--lora", "stripes", "--base-image", test[1]]) == 0
    text = capsys.readouterr().out
    assert "DEMO VALUES" in text and "calibrated" in text and "shares stripes 100%" in text

    # user mistakes: one line each, exit 1, nothing written
    before = sorted(p.name for p in (workspace.loras / "nocentroid").iterdir())
    assert main(g + ["score", test[0], "--lora", "nocentroid"]) == 1
    assert "no style centroid" in capsys.readouterr().err
    assert main(g + ["score", test[0], "--lora", "../x"]) == 1
    assert "Invalid LoRA name '../x'" in capsys.readouterr().err
    assert main(g + ["score", test[0], "--save-centroid", "ghost"]) == 1
    assert "No LoRA named 'ghost'" in capsys.readouterr().err
    assert main(g + ["score", test[0], "--save-centroid", "nocentroid"]) == 1  # one image: cannot calibrate
    assert "at least 2" in capsys.readouterr().err
    assert sorted(p.name for p in (workspace.loras / "nocentroid").iterdir()) == before
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    assert main(g + ["score", str(tmp_path / "bad.jpg")]) == 1
    assert "bad.jpg" in capsys.readouterr().err


def test_cli_scores_unavailable_offline_exit_code(tmp_path):
    img = tmp_path / "x.png"
    stripes(0).save(img)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "STYLEMIX_MODEL": "tiny"}
    # `-c` rather than `-m stylemix.cli`: the package has no __main__.py (yet)
    cli = "import sys; from stylemix.cli import main; sys.exit(main())"
    p = subprocess.run([sys.executable, "-c", cli, "--loras-dir", str(tmp_path / "loras"), "score",
                        str(img), "--clip-model", "ViT-B-32", "--prompt", "a cat"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert "Scores unavailable" in p.stderr and "ViT-B-32/openai" in p.stderr and "Traceback" not in p.stderr


# --------------------------------------------------------------------------- scores of a mixer's result


def test_score_result_of_a_mix(tmp_path, monkeypatch, scorer):
    from helpers import make_library_lora
    from stylemix.lora.library import LoraLibrary
    from stylemix.mixer import Mixer
    from stylemix.models import LoadedModel, tiny_pipeline
    from stylemix.recipe import Recipe
    from stylemix.compose import score_result

    root = tmp_path / "loras"
    for i, name in enumerate(["stripes", "blobs", "plain"]):
        make_library_lora(root, name, seed=300 + i, trigger=f"{name}style")
    save_centroid(root / "stripes", compute_centroid(scorer, [stripes(i) for i in range(3)], base_images=[blobs(9)]))
    save_centroid(root / "blobs", compute_centroid(scorer, [blobs(i) for i in range(3)], base_images=[stripes(9)]))
    loaded = LoadedModel(pipe=tiny_pipeline(), model_id="tiny", device=torch.device("cpu"), dtype=torch.float32)
    mixer = Mixer(loaded, LoraLibrary(root))
    recipe = Recipe(prompt="a cat", loras={"stripes": 0.6, "blobs": 0.4, "plain": 0.5}, steps=2, width=64,
                    height=64, batch_size=2, sampler="Euler")
    result = mixer.generate(recipe)
    cache: dict = {}
    scores = score_result(mixer, result, cache=cache)
    assert scores["is_demo"] and "demo values" in scores["label"] and len(scores["images"]) == 2
    assert scores["missing_centroids"] == ["plain"] and scores["problems"] == []
    s = scores["images"][0]
    assert s["prompt_scored"] == "a cat"  # the mixer put trigger words in front; they are not scored
    assert set(s["similarity"]) == {"stripes", "blobs"} and s["shares_basis"] == "calibrated"
    assert sum(s["shares"].values()) in (0.0, pytest.approx(1.0))
    assert len(cache) == 2  # centroids read once, then from the cache

    # a LoRA at weight 0 is not in the mix
    result.weights_used["blobs"] = 0.0
    assert set(score_result(mixer, result, cache=cache)["images"][0]["similarity"]) == {"stripes"}

    # a real base model offline: scores unavailable with the reason, no exception
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clear_scorer_cache()
    real = Mixer(LoadedModel(pipe=loaded.pipe, model_id="some/real-model", device=torch.device("cpu"),
                             dtype=torch.float32), LoraLibrary(root))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))  # surely not cached
    out = score_result(real, result, clip_model="ViT-B-32")
    assert set(out) == {"unavailable"} and "ViT-B-32/openai" in out["unavailable"]


def test_cli_generate_says_no_style_detected():
    from stylemix.cli.generate import format_scores

    none = {"clip_score": 0.3, "shares": {}, "shares_basis": "calibrated", "style_detected": False, "is_demo": True}
    assert format_scores(none) == "CLIP 0.3000, no style detected, (demo values: tiny random CLIP)"
    some = {**none, "shares": {"a": 1.0}, "style_detected": True, "is_demo": False}
    assert format_scores(some) == "CLIP 0.3000, a 100%"
