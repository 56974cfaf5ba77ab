"""CSD, the style judge: its architecture against the published layout, the one-time conversion of
released weights (and every way it refuses them), the choice of judge, and the whole scoring path
with the tiny random CSD.  The real CSD and CLIP judges are at the end (`-m slow`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from stylemix.errors import StyleMixError
from stylemix.scores.clip_models import ScorerUnavailable, tiny_scorer
from stylemix.scores.csd import (CSD_VIT_L, TINY_CSD, TINY_CSD_NAME, CsdModel, expected_shapes, random_csd,
                                 tiny_csd_scorer)
from stylemix.scores.csd_install import (clear_csd_cache, install_csd, is_installed, load_csd_scorer, read_record,
                                         record_path, weights_path)
from stylemix.scores.scoring import (check_one_judge, compute_centroid, load_centroid, save_centroid,
                                     score_images)
from stylemix.scores.selection import STYLE_JUDGE_ENV, check_judge_name, resolve_style_judge


class NotATensor:
    """A custom object in a checkpoint: weights_only refuses to even build it."""


def published_layout(cfg) -> dict[str, tuple[int, ...]]:
    """CSD_CLIP's state dict keys and shapes, written from the published code, not from ours.

    CSD/model.py: `self.backbone = clipmodel.visual` (OpenAI CLIP's VisionTransformer, clip/model.py)
    with `proj` set to None, `last_layer_style` and `last_layer_content` deep copies of that proj.
    """
    w, grid = cfg.width, cfg.image_size // cfg.patch_size
    keys = {"backbone.class_embedding": (w,), "backbone.positional_embedding": (grid * grid + 1, w),
            "backbone.conv1.weight": (w, 3, cfg.patch_size, cfg.patch_size),
            "backbone.ln_pre.weight": (w,), "backbone.ln_pre.bias": (w,)}
    for i in range(cfg.layers):
        b = f"backbone.transformer.resblocks.{i}"
        keys.update({f"{b}.attn.in_proj_weight": (3 * w, w), f"{b}.attn.in_proj_bias": (3 * w,),
                     f"{b}.attn.out_proj.weight": (w, w), f"{b}.attn.out_proj.bias": (w,),
                     f"{b}.ln_1.weight": (w,), f"{b}.ln_1.bias": (w,),
                     f"{b}.mlp.c_fc.weight": (4 * w, w), f"{b}.mlp.c_fc.bias": (4 * w,),
                     f"{b}.mlp.c_proj.weight": (w, 4 * w), f"{b}.mlp.c_proj.bias": (w,),
                     f"{b}.ln_2.weight": (w,), f"{b}.ln_2.bias": (w,)})
    keys.update({"backbone.ln_post.weight": (w,), "backbone.ln_post.bias": (w,),
                 "last_layer_style": (w, cfg.output_dim), "last_layer_content": (w, cfg.output_dim)})
    return keys


def fake_release(seed: int = 0, prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Random tensors in the released layout at the tiny size (LayerNorm weights near 1, as trained ones)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in published_layout(TINY_CSD).items():
        t = torch.randn(shape, generator=g) * 0.05
        out[prefix + k] = t + 1 if k.endswith(("ln_pre.weight", "ln_1.weight", "ln_2.weight", "ln_post.weight")) else t
    return out


def picture(i: int, size: int = 96) -> Image.Image:
    r = np.random.default_rng(i)
    im = Image.new("RGB", (size, size), tuple(int(v) for v in r.integers(0, 255, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(8):
        x, y = (int(v) for v in r.integers(0, size, 2))
        d.rectangle([x, y, x + 20, y + 12], fill=tuple(int(v) for v in r.integers(0, 255, 3)))
    return im


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_csd_cache()
    yield
    clear_csd_cache()


# --------------------------------------------------------------------------- architecture


def test_architecture_is_clip_vit_l14_without_proj_plus_two_heads():
    import open_clip

    vision = open_clip.get_model_config("ViT-L-14")["vision_cfg"]
    assert (vision["image_size"], vision["layers"], vision["width"], vision["patch_size"]) == \
        (CSD_VIT_L.image_size, CSD_VIT_L.layers, CSD_VIT_L.width, CSD_VIT_L.patch_size)
    assert open_clip.get_model_config("ViT-L-14")["embed_dim"] == CSD_VIT_L.output_dim
    for cfg in (CSD_VIT_L, TINY_CSD):
        assert expected_shapes(cfg) == published_layout(cfg)
    assert expected_shapes()["last_layer_style"] == (1024, 768) and "backbone.proj" not in expected_shapes()
    from open_clip.transformer import QuickGELU

    model = random_csd(TINY_CSD)
    assert isinstance(model.backbone.transformer.resblocks[0].mlp.gelu, QuickGELU)  # OpenAI's activation


def test_style_descriptor_is_the_feature_times_the_style_head():
    """CSD's forward: normalize(backbone(x) @ last_layer_style), with CLIP's visual tower as backbone."""
    from open_clip.model import _build_vision_tower

    model = random_csd(TINY_CSD, seed=1)
    clip_visual = _build_vision_tower(TINY_CSD.output_dim, TINY_CSD.vision_cfg(), quick_gelu=True).eval()
    state = {k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    clip_visual.load_state_dict({**state, "proj": model.last_layer_style.detach()})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), torch.nn.functional.normalize(clip_visual(x), dim=-1), atol=1e-6)


# --------------------------------------------------------------------------- install: conversion and strict loading


@pytest.mark.parametrize("layout", ["google_drive", "hub"])
def test_release_converts_once_and_loads_strictly_with_the_same_embeddings(tmp_path, layout):
    tensors = fake_release(seed=2)
    if layout == "google_drive":  # {'model_state_dict': {'module.backbone...': ...}} plus training state
        obj = {"model_state_dict": tensors, "epoch": 7, "args": {"lr": 0.1}}
    else:  # the Hub's pytorch_model.bin: the bare state dict
        obj = {k.removeprefix("module."): v for k, v in tensors.items()}
    src = tmp_path / "release.bin"
    torch.save(obj, src)
    folder = tmp_path / "judges"
    record = install_csd(src, folder, cfg=TINY_CSD)

    assert sorted(p.name for p in folder.iterdir()) == ["tiny-random-csd.json", "tiny-random-csd.safetensors"]
    assert record == json.loads(record_path(folder, TINY_CSD).read_text())
    assert record["source"] == str(src) and record["source_size"] == src.stat().st_size
    assert record["layout"] == ("model_state_dict" if layout == "google_drive" else "state_dict")
    import hashlib

    assert record["sha256"] == hashlib.sha256(weights_path(folder, TINY_CSD).read_bytes()).hexdigest()
    with open(weights_path(folder, TINY_CSD), "rb") as f:
        assert f.read(8) != b"PK\x03\x04\x00\x00\x00\x00" and b"stylemix-csd" in f.read(4096)  # safetensors, not zip

    before = CsdModel(TINY_CSD).eval()
    before.load_state_dict({k.removeprefix("module."): v for k, v in tensors.items()}, strict=True)
    scorer = load_csd_scorer("cpu", judge_dir=folder, cfg=TINY_CSD)
    assert scorer.name == f"tiny-random-csd/{record['sha256'][:12]}" and not scorer.is_demo
    images = [picture(1), picture(2)]
    x = torch.stack([scorer.preprocess(im) for im in images])
    with torch.no_grad():
        assert torch.allclose(scorer.embed_images(images), before(x), atol=1e-6)
    # the same source installs to the same bytes: the judge's name (and centroids keyed by it) survive
    assert install_csd(src, folder, cfg=TINY_CSD)["sha256"] == record["sha256"]


def _renamed(t):
    t["module.backbone.ln_post.weight_renamed"] = t.pop("module.backbone.ln_post.weight")


def _missing(t):
    del t["module.last_layer_content"]


def _wrong_shape(t):
    t["module.last_layer_style"] = torch.zeros(TINY_CSD.width, TINY_CSD.output_dim + 1)


def _string(t):
    t["module.note"] = "trained on a Tuesday"


def _custom_object(t):
    t["module.hook"] = NotATensor()


BAD_RELEASES = {
    "renamed key": (_renamed, r"missing backbone\.ln_post\.weight; unexpected backbone\.ln_post\.weight_renamed"),
    "missing key": (_missing, r"missing last_layer_content\."),
    "wrong shape": (_wrong_shape, r"last_layer_style has shape \[64, 33\], expected \[64, 32\]"),
    "non-tensor entry": (_string, r"refused: entry 'module\.note' is a str, not a tensor"),
    "custom object": (_custom_object, r"refused: it holds something other than tensors \(it names "
                                      r"test_csd_judge\.NotATensor\)"),
}


@pytest.mark.parametrize("case", list(BAD_RELEASES) + ["truncated file", "not a checkpoint"])
def test_bad_release_is_one_message_and_installs_nothing(tmp_path, case):
    src = tmp_path / "release.bin"
    tensors = fake_release()
    if case in BAD_RELEASES:
        spoil, message = BAD_RELEASES[case]
        spoil(tensors)
        torch.save({"model_state_dict": tensors}, src)
    else:
        torch.save({"model_state_dict": tensors}, src)
        data = src.read_bytes()
        src.write_bytes(data[: len(data) // 2] if case == "truncated file" else b"hello, not torch")
        message = r"release\.bin: not a complete PyTorch checkpoint"
    folder = tmp_path / "judges"
    # a previous good install is left exactly as it was
    good = tmp_path / "good.bin"
    torch.save(fake_release(seed=9), good)
    before = install_csd(good, folder, cfg=TINY_CSD)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}

    with pytest.raises(StyleMixError, match=message) as err:
        install_csd(src, folder, cfg=TINY_CSD)
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files  # no temporary file left either
    assert read_record(folder, TINY_CSD)["sha256"] == before["sha256"]

    fresh = tmp_path / "fresh"
    with pytest.raises(StyleMixError, match=message):
        install_csd(src, fresh, cfg=TINY_CSD)
    assert not fresh.exists() or not any(fresh.iterdir())
    assert not is_installed(fresh, TINY_CSD)


def test_a_custom_object_is_never_constructed(tmp_path):
    """weights_only refuses the class by name: its code never runs (this one would raise if it did)."""
    import pickle

    class Trap:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle code ran')",))

    src = tmp_path / "trap.pt"
    with open(src, "wb") as f:
        pickle.dump({"last_layer_style": Trap()}, f, protocol=2)
    with pytest.raises(StyleMixError, match="refused: it holds something other than tensors"):
        install_csd(src, tmp_path / "judges", cfg=TINY_CSD)
    assert not is_installed(tmp_path / "judges", TINY_CSD)


def test_tampered_or_broken_install_is_refused_at_load(tmp_path):
    src = tmp_path / "release.bin"
    torch.save(fake_release(), src)
    folder = tmp_path / "judges"
    install_csd(src, folder, cfg=TINY_CSD)
    path = weights_path(folder, TINY_CSD)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one weight changed, header intact
    path.write_bytes(bytes(data))
    with pytest.raises(ScorerUnavailable, match=r"sha256 does not match .*reinstall with `stylemix judge install csd`"):
        load_csd_scorer("cpu", judge_dir=folder, cfg=TINY_CSD)
    install_csd(src, folder, cfg=TINY_CSD)  # reinstalling repairs it
    assert load_csd_scorer("cpu", judge_dir=folder, cfg=TINY_CSD).embed_images([picture(0)]).shape == (1, 32)

    record_path(folder, TINY_CSD).write_text("{not json")
    clear_csd_cache()
    with pytest.raises(ScorerUnavailable, match="unreadable install record.*reinstall"):
        load_csd_scorer("cpu", judge_dir=folder, cfg=TINY_CSD)
    record_path(folder, TINY_CSD).unlink()
    with pytest.raises(ScorerUnavailable, match="CSD is not installed.*stylemix judge install csd"):
        load_csd_scorer("cpu", judge_dir=folder, cfg=TINY_CSD)


def test_offline_install_without_a_source_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StyleMixError, match="not in the local cache and HF_HUB_OFFLINE is set.*--from FILE"):
        install_csd(None, tmp_path / "judges", cache_dir=tmp_path / "hub")
    assert not (tmp_path / "judges").exists()


# --------------------------------------------------------------------------- which judge


def test_judge_choice_order_and_names(tmp_path, monkeypatch):
    monkeypatch.delenv(STYLE_JUDGE_ENV, raising=False)
    folder = tmp_path / "judges"
    assert resolve_style_judge(None, folder)[0] == "clip"  # not installed
    weights_path(folder).parent.mkdir(parents=True)  # "installed" is both files there; loading checks them
    weights_path(folder).write_bytes(b"x")
    record_path(folder).write_text("{}")
    assert resolve_style_judge(None, folder) == ("csd", "default: CSD weights installed")
    monkeypatch.setenv(STYLE_JUDGE_ENV, "CLIP")
    assert resolve_style_judge(None, folder) == ("clip", f"${STYLE_JUDGE_ENV}")
    assert resolve_style_judge("csd", folder) == ("csd", "chosen")
    monkeypatch.setenv(STYLE_JUDGE_ENV, "dino")
    with pytest.raises(StyleMixError, match="Unknown style judge 'dino': choose clip or csd"):
        resolve_style_judge(None, folder)
    with pytest.raises(StyleMixError, match="Unknown style judge"):
        check_judge_name("gram")


def test_banner_names_the_judge(monkeypatch, tmp_path):
    from stylemix.models import load_model
    from stylemix.service import model_banner

    tiny = load_model("tiny", "cpu", "fp32")
    monkeypatch.setenv(STYLE_JUDGE_ENV, "csd")
    line, details = model_banner(tiny, None, examples=False, on_zero_gpu=False)
    assert "\n" not in line and line.endswith("Style judge: CSD.")
    assert any(d.startswith("**Style judge:** CSD (tiny random, demo values)") for d in details)
    monkeypatch.delenv(STYLE_JUDGE_ENV)
    monkeypatch.setenv("STYLEMIX_JUDGE_DIR", str(tmp_path / "none"))
    line, details = model_banner(tiny, None, examples=False, on_zero_gpu=False)
    assert line.endswith("Style judge: CLIP.") and any("CSD not installed" in d for d in details)


# --------------------------------------------------------------------------- scoring with the tiny CSD


def test_scores_record_their_judge_and_judges_never_mix(tmp_path):
    clip, csd = tiny_scorer(), tiny_csd_scorer()
    refs = {"warm": [picture(i) for i in range(4)], "cool": [picture(10 + i) for i in range(4)]}
    lora = tmp_path / "warm"
    lora.mkdir()
    for judge in (clip, csd):  # one file, one centroid per judge
        save_centroid(lora, compute_centroid(judge, refs["warm"]))
    by_csd = {"warm": load_centroid(lora, csd.name)}
    assert by_csd["warm"].vector.numel() == 32 and load_centroid(lora, clip.name).vector.numel() == 64

    from dataclasses import replace

    anchored = {"warm": replace(by_csd["warm"], self_similarity=1.0, base_similarity=-1.0)}  # a scale for shares
    rows = score_images(clip, [picture(1)], "a house", anchored, style_scorer=csd)
    s = rows[0]
    assert s.style_judge == TINY_CSD_NAME and s.clip_model == clip.name and s.is_demo
    assert s.clip_score is not None and set(s.similarity) == {"warm"}
    assert s.to_dict()["style_judge"] == TINY_CSD_NAME
    assert s.shares == {"warm": 1.0} and s.summary().endswith(f"warm 100% (judge {TINY_CSD_NAME}) [DEMO VALUES]")
    same = score_images(clip, [picture(1)], "a house", anchored, style_scorer=csd)[0]
    assert same.similarity == s.similarity  # deterministic

    with pytest.raises(StyleMixError, match="computed with the judge 'tiny-random-clip.*not comparable"):
        score_images(clip, [picture(1)], "a house", {"warm": load_centroid(lora, clip.name)}, style_scorer=csd)
    clip_rows = score_images(clip, [picture(1)], "a house", {"warm": load_centroid(lora, clip.name)})
    assert clip_rows[0].style_judge == clip.name
    assert check_one_judge(rows + [same]) == TINY_CSD_NAME
    with pytest.raises(StyleMixError, match=r"different style judges: .*rescore them all with one judge"):
        check_one_judge([r.to_dict() for r in rows + clip_rows])
    old_row = {"clip_model": clip.name, "similarity": {"warm": 0.3}}  # written before CSD: CLIP judged it
    assert check_one_judge([old_row, clip_rows[0]]) == clip.name
    assert check_one_judge([]) is None


def test_compose_scores_with_the_chosen_judge(workspace, monkeypatch):
    from helpers import make_library_lora

    from stylemix.compose import score_result
    from stylemix.lora.library import LoraLibrary
    from stylemix.mixer import Mixer
    from stylemix.models import load_model
    from stylemix.recipe import Recipe

    make_library_lora(workspace.loras, "warm", seed=1)
    mixer = Mixer(load_model("tiny", "cpu", "fp32"), LoraLibrary(workspace.loras))
    result = mixer.generate(Recipe("a house", loras={"warm": 0.8}, steps=2, width=64, height=64))
    folder = mixer.library.get("warm").folder
    save_centroid(folder, compute_centroid(tiny_csd_scorer(), [picture(i) for i in range(3)]))

    out = score_result(mixer, result, style_judge="csd")
    assert out["style_judge"] == TINY_CSD_NAME and out["clip_model"] == "tiny-random-clip (demo values)"
    assert out["is_demo"] and out["missing_centroids"] == []
    assert out["images"][0]["style_judge"] == TINY_CSD_NAME and "warm" in out["images"][0]["similarity"]
    out = score_result(mixer, result, style_judge="clip")  # no CLIP centroid: CLIP score only, named
    assert out["style_judge"] == "tiny-random-clip (demo values)" and out["missing_centroids"] == ["warm"]
    monkeypatch.setenv(STYLE_JUDGE_ENV, "csd")
    assert score_result(mixer, result)["style_judge"] == TINY_CSD_NAME
    monkeypatch.setenv(STYLE_JUDGE_ENV, "nope")
    assert "Unknown style judge 'nope'" in score_result(mixer, result)["unavailable"]


def test_real_model_with_csd_not_installed_says_how_to_install(tmp_path, monkeypatch):
    from stylemix.scores.selection import pick_style_scorer_or_reason

    scorer, why = pick_style_scorer_or_reason(False, "cpu", "csd", clip_scorer=tiny_scorer(), judge_dir=tmp_path)
    assert scorer is None and "stylemix judge install csd" in why


def test_cli_judge_and_score_with_csd(workspace, tmp_path, capsys, monkeypatch):
    from stylemix.cli import main

    monkeypatch.setenv("STYLEMIX_JUDGE_DIR", str(tmp_path / "judges"))
    bad = tmp_path / "bad.bin"
    torch.save({"model_state_dict": {"module.x": "y"}}, bad)
    assert main(["judge", "install", "csd", "--from", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused: entry 'module.x' is a str, not a tensor" in err
    assert not (tmp_path / "judges").exists()
    torch.save({"model_state_dict": fake_release()}, bad)  # tiny sizes: not the ViT-L/14 CSD
    assert main(["judge", "install", "csd", "--from", str(bad)]) == 1
    assert "do not fit CSD-ViT-L (297 tensors expected): missing" in capsys.readouterr().err
    assert main(["judge", "install", "clip"]) == 1 and "needs no install" in capsys.readouterr().err
    assert main(["judge", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["style_judge"] == "clip" and status["csd"]["installed"] is False

    for i in range(3):
        picture(i).save(tmp_path / f"ref{i}.png")
    (workspace.loras / "warm").mkdir()
    refs = [str(tmp_path / f"ref{i}.png") for i in range(3)]
    base = ["--model", "tiny", "--loras-dir", str(workspace.loras)]
    assert main(["score", *refs, "--save-centroid", "warm", "--style-judge", "csd", "--json", *base]) == 0
    assert json.loads(capsys.readouterr().out)["style_judge"] == TINY_CSD_NAME
    assert main(["score", refs[0], "--prompt", "a house", "--lora", "warm", "--style-judge", "csd", "--json", *base]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["style_judge"] == TINY_CSD_NAME and res["clip_model"] == "tiny-random-clip (demo values)"
    assert res["results"][0]["clip_score"] is not None and "warm" in res["results"][0]["similarity"]
    assert main(["score", refs[0], "--lora", "warm", "--style-judge", "clip", *base]) == 1
    assert "no style centroid for the judge tiny-random-clip" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["score", refs[0], "--style-judge", "gram", *base])
    assert e.value.code == 2 and "Unknown style judge 'gram'" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real judges (-m slow)


def _judge_relations(scorer) -> None:
    """The same image twice gives the same value; a resized copy is closer than a different image."""
    a, b = picture(1, 512), picture(2, 512)
    small = a.resize((300, 300), Image.BICUBIC)
    emb = scorer.embed_images([a, a, small, b])
    assert torch.allclose(emb[0], emb[1], atol=1e-5)
    same, resized, other = float(emb[0] @ emb[1]), float(emb[0] @ emb[2]), float(emb[0] @ emb[3])
    assert same == pytest.approx(1.0, abs=1e-4)
    assert resized > other, (resized, other)


@pytest.mark.slow
def test_real_csd_judge(tmp_path_factory):
    import conftest

    if is_installed():
        scorer = load_csd_scorer()
    else:  # convert from the Hugging Face cache, or download it when the hub answers, into a scratch folder
        folder = tmp_path_factory.mktemp("judges")
        try:
            install_csd(None, folder)
        except StyleMixError as e:
            pytest.skip(f"CSD weights unavailable: {e} ({conftest.HUB_UNREACHABLE or 'hub reachable'})")
        scorer = load_csd_scorer(judge_dir=folder)
    assert scorer.name.startswith("CSD-ViT-L/") and scorer.embed_dim == 768
    _judge_relations(scorer)


@pytest.mark.slow
def test_real_clip_judge():
    import conftest
    from stylemix.scores.clip_models import load_scorer_or_reason

    scorer, why = load_scorer_or_reason()
    if scorer is None:
        pytest.skip(f"{why} ({conftest.HUB_UNREACHABLE or 'hub reachable'})")
    assert scorer.name == "ViT-B-32/openai"
    _judge_relations(scorer)


def test_both_judges_side_by_side_and_for_new_centroids(workspace, tmp_path):
    from helpers import make_library_lora

    from stylemix.lora.library import LoraLibrary
    from stylemix.mixer import Mixer
    from stylemix.models import load_model
    from stylemix.recipe import Recipe
    from stylemix.scores.judge import judges_side_by_side
    from stylemix.scores.selection import available_style_scorers

    scorers = available_style_scorers(True, "cpu")  # the tiny model: both tiny judges
    assert [s.kind for s in scorers] == ["clip", "csd"] and all(s.is_demo for s in scorers)
    assert [s.kind for s in available_style_scorers(False, "cpu", judge_dir=tmp_path / "none")] in ([], ["clip"])
    make_library_lora(workspace.loras, "warm", seed=1)
    mixer = Mixer(load_model("tiny", "cpu", "fp32"), LoraLibrary(workspace.loras))
    folder = mixer.library.get("warm").folder
    for scorer in scorers:
        save_centroid(folder, compute_centroid(scorer, [picture(i) for i in range(3)]))
    judges, unavailable = judges_side_by_side(mixer, ["warm"])
    assert set(judges) == {"clip", "csd"} and unavailable == {}
    image = mixer.generate(Recipe("a house", loras={"warm": 1.0}, steps=2, width=64, height=64)).images
    rows = {kind: j.score(image, "a house")[0] for kind, j in judges.items()}
    assert rows["clip"].style_judge != rows["csd"].style_judge
    assert rows["clip"].clip_score == rows["csd"].clip_score  # the CLIP score is CLIP's under either judge
    assert judges["csd"].style_judge == TINY_CSD_NAME and judges["csd"].is_demo
