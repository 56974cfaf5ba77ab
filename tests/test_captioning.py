"""Captioning: the real BLIP generate path on a tiny random BLIP, and the loud fallback."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from stylemix.datasets.captioning import (FALLBACK_CAPTION, BlipCaptioner, FallbackCaptioner, _TINY_WORDS, load_captioner,
                                 tiny_blip_captioner)
from stylemix.datasets.prepare import DatasetConfig, load_captions, prepare_dataset
from stylemix.errors import StyleMixError


def noise(seed: int, side: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8))


def test_tiny_blip_captions_in_batches():
    cap = tiny_blip_captioner(batch_size=2)
    assert isinstance(cap, BlipCaptioner) and not cap.is_fallback
    texts = cap.caption([noise(i) for i in range(5)])  # 3 batches: 2 + 2 + 1
    assert len(texts) == 5
    for t in texts:
        words = t.split()
        assert len(words) >= 3 and set(words) <= set(_TINY_WORDS)  # decoded from the real tokenizer


def test_dataset_with_blip_captions_puts_trigger_first(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        noise(i, 64).save(src / f"n{i}.png")
    (src / "n1.txt").write_text("a hand written caption")
    res = prepare_dataset([src], "cap", "zqxcap", tmp_path / "data", DatasetConfig(size=64),
                          captioner=tiny_blip_captioner())
    caps = list(load_captions(res.path).values())
    assert all(c.startswith("zqxcap, ") for c in caps)
    assert caps[1] == "zqxcap, a hand written caption"
    assert [i.caption_source for i in res.kept] == ["captioner", "sidecar", "captioner"]
    meta = json.loads((res.path / "dataset.json").read_text())
    assert meta["captioner"] == "tiny" and meta["captioner_is_fallback"] is False


def test_unloadable_captioner_falls_back_loudly(tmp_path, caplog):
    missing = str(tmp_path / "no-such-blip")
    with caplog.at_level(logging.WARNING, logger="stylemix"):
        cap = load_captioner(missing)
    assert isinstance(cap, FallbackCaptioner) and cap.is_fallback
    assert missing in cap.reason and any(missing in r.getMessage() for r in caplog.records)
    assert cap.caption([noise(0), noise(1)]) == [FALLBACK_CAPTION] * 2
    with pytest.raises(StyleMixError, match="no-such-blip"):
        load_captioner(missing, fallback=False)
    assert load_captioner("none").is_fallback


def test_captioner_crash_keeps_the_set(tmp_path, caplog):
    class Broken:
        name, is_fallback, batch_size = "broken", False, 4

        def caption(self, images):
            raise RuntimeError("CUDA out of memory")

    noise(3, 64).save(tmp_path / "a.png")
    with caplog.at_level(logging.WARNING, logger="stylemix"):
        res = prepare_dataset([tmp_path / "a.png"], "crash", "zqxcrash", tmp_path / "data", DatasetConfig(size=64),
                              captioner=Broken())
    assert res.kept[0].caption == f"zqxcrash, {FALLBACK_CAPTION}" and res.kept[0].caption_source == "fallback"
    assert any("CUDA out of memory" in r.getMessage() for r in caplog.records)
