"""The per-image pipeline on real images of the seed report's sizes (16, 60, 416, 2000 px)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from stylemix.cli import main
from stylemix.datasets.prepare import (DatasetConfig, EmptyDatasetError, blur_score, check_trigger_word, decode,
                              load_captions, prepare_dataset, save_captions)
from stylemix.errors import StyleMixError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
SMALL = DatasetConfig(size=64)


def pixel_sprite(seed=0, side=16) -> Image.Image:
    """A 16x16 sprite: 5 flat palette colours, hard edges, transparent background."""
    rng = np.random.default_rng(seed)
    pal = np.array([[0, 0, 0, 0], [30, 30, 40, 255], [230, 60, 50, 255], [250, 210, 60, 255], [60, 160, 80, 255]],
                   np.uint8)
    idx = rng.integers(0, len(pal), (side // 2, side // 2)).repeat(2, 0).repeat(2, 1)
    return Image.fromarray(pal[idx], "RGBA")


def smooth_anime(seed=1, side=60) -> Image.Image:
    """60x60 painterly image: gradients and many colours (not pixel art)."""
    y, x = np.mgrid[0:side, 0:side] / side
    rng = np.random.default_rng(seed)
    a = np.stack([np.sin(6 * x + seed) * 100 + 128, np.cos(5 * y) * 100 + 128, (x * y) * 255], -1)
    a += rng.normal(0, 25, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def watercolor(seed=2, side=416) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (side, side), (240, 235, 220))
    d = ImageDraw.Draw(im)
    for _ in range(40):
        x, y, r = rng.integers(0, side, 2).tolist() + [int(rng.integers(10, 60))]
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.integers(40, 220, 3).tolist()))
    return im


def cartoon(seed=3, side=2000) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (side, side), (120, 190, 250))
    d = ImageDraw.Draw(im)
    for _ in range(25):
        x, y = rng.integers(0, side, 2).tolist()
        s = int(rng.integers(100, 500))
        d.rectangle((x, y, x + s, y + s // 2), fill=tuple(rng.integers(0, 255, 3).tolist()), outline="black",
                    width=8)
    return im


def save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    return d


def test_all_seed_sizes_are_kept_and_cropped(src, workspace):
    files = [save(pixel_sprite(), src / "sprite16.png"), save(smooth_anime(), src / "anime60.png"),
             save(watercolor(), src / "water416.jpg", quality=95), save(cartoon(), src / "cartoon2000.webp")]
    res = prepare_dataset(files, "mixed", "zqxstyle", workspace.data, SMALL)
    assert [i.status for i in res.items] == ["kept"] * 4, res.summary
    assert [i.pixel_art for i in res.items] == [True, False, False, False]
    for item in res.kept:
        with Image.open(res.path / item.file) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
        assert item.blur > 100
    assert res.summary == "Kept 4 of 4 inputs."
    assert [i.original_size for i in res.items] == [[16, 16], [60, 60], [416, 416], [2000, 2000]]


def test_pixel_art_stays_crisp_when_enlarged(src, workspace):
    sprite = pixel_sprite(5)
    flat = Image.alpha_composite(Image.new("RGBA", sprite.size, "white"), sprite).convert("RGB")
    res = prepare_dataset([save(sprite, src / "s.png")], "px", "zqxpix", workspace.data, DatasetConfig(size=512))
    out = np.asarray(Image.open(res.path / res.kept[0].file))
    colors_in = {tuple(c) for c in np.asarray(flat).reshape(-1, 3)}
    colors_out = {tuple(c) for c in out.reshape(-1, 3)}
    assert colors_out <= colors_in  # no blended colour anywhere
    blocks = out.reshape(16, 32, 16, 32, 3)  # 16 -> 512 is exactly 32x: every source pixel a uniform block
    assert (blocks == blocks[:, :1, :, :1, :]).all()
    # forcing it off blends colours (LANCZOS), proving the check above can fail
    res2 = prepare_dataset([src / "s.png"], "px2", "zqxpix", workspace.data, DatasetConfig(size=512, pixel_art="off"))
    out2 = np.asarray(Image.open(res2.path / res2.kept[0].file))
    assert len({tuple(c) for c in out2.reshape(-1, 3)}) > 3 * len(colors_in)
    assert res2.kept[0].pixel_art is False


def test_blur_filter_and_its_fair_scale(src, workspace):
    sharp = watercolor(7)
    files = [save(sharp, src / "sharp.png"), save(watercolor(8).filter(ImageFilter.GaussianBlur(4)), src / "soft.png")]
    # size 512: the 416 px images are judged at their own scale (at 64 px the blur would be invisible)
    res = prepare_dataset(files, "b", "zqxblur", workspace.data, DatasetConfig(size=512))
    status = {Path(i.input).name: (i.status, i.reason) for i in res.items}
    assert status == {"sharp.png": ("kept", None), "soft.png": ("rejected", "blurry")}
    soft = [i for i in res.items if i.reason == "blurry"][0]
    assert soft.blur < 100 and "threshold 100" in soft.detail
    # Fair across sizes: a sharp 2000 px cartoon is judged at 512 px, a 16 px sprite at 16 px;
    # measured naively at full size / after enlarging they would fall below the threshold.
    # (a 2000 px image whose edges are soft over ~3 pixels, like most big photos and scans)
    big, tiny = cartoon().filter(ImageFilter.GaussianBlur(3)), pixel_sprite().convert("RGB")
    assert blur_score(big, 512) > 100 and blur_score(tiny, 512) > 100
    assert blur_score(big, 4000) < 100  # at full size it would be rejected
    assert blur_score(tiny.resize((512, 512), Image.Resampling.BILINEAR), 512) < 100
    # threshold is configurable; 0 keeps everything
    res0 = prepare_dataset(files, "b0", "zqxblur", workspace.data, DatasetConfig(size=512, blur_threshold=0))
    assert len(res0.kept) == 2


def test_near_duplicates_are_dropped_but_recolours_are_not(src, workspace):
    base = watercolor(3)
    files = [save(base, src / "a.png"), save(base.resize((300, 300)), src / "a_small.jpg", quality=80),
             save(Image.fromarray(255 - np.asarray(base)), src / "inverted.png")]
    res = prepare_dataset(files, "d", "zqxdup", workspace.data, SMALL)
    assert [(i.status, i.reason) for i in res.items] == [("kept", None), ("rejected", "duplicate"), ("kept", None)]
    assert "a.png" in res.items[1].detail


def test_transparency_background_exif_and_formats(src, workspace):
    sprite = pixel_sprite(2)
    save(sprite, src / "t.png")
    frames = [smooth_anime(s).convert("P") for s in (1, 9)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    save(watercolor(4).resize((120, 80)), src / "w.bmp")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    save(watercolor(5).resize((120, 80)), src / "rot.jpg", exif=exif, quality=95)
    img, size = decode(src / "rot.jpg", DatasetConfig())
    assert size == (120, 80) and img.size == (80, 120)
    res = prepare_dataset(sorted(src.iterdir()), "f", "zqxfmt", workspace.data,
                          DatasetConfig(size=64, background="black"))
    assert len(res.kept) == 4, res.summary
    t = [i for i in res.kept if i.input.endswith("t.png")][0]
    out = np.asarray(Image.open(res.path / t.file))
    transparent = np.asarray(sprite)[..., 3] == 0
    assert (out[np.repeat(np.repeat(transparent, 4, 0), 4, 1)] == 0).all()  # black where it was transparent
    with pytest.raises(StyleMixError, match="'notacolour'"):
        DatasetConfig(background="notacolour")


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRC), with a tiny data stream."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_broken_and_hostile_images(src, workspace):
    (src / "bomb.png").write_bytes(png_with_header(100_000, 100_000))
    (src / "bomb2.png").write_bytes(png_with_header(7_000, 7_000))  # 49 Mpx: over our 40 Mpx limit
    (src / "text.jpg").write_text("I am not a picture")
    good = io.BytesIO()
    watercolor(8).save(good, format="PNG")
    (src / "cut.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    save(pixel_sprite(side=8), src / "tiny.png")
    save(Image.new("RGB", (40, 40)), src / "tiff.png", format="TIFF")
    save(watercolor(9), src / "ok.png")
    res = prepare_dataset(sorted(src.iterdir()), "h", "zqxbad", workspace.data, SMALL)
    r = {Path(i.input).name: i.reason for i in res.items}
    assert r == {"bomb.png": "decompression_bomb", "bomb2.png": "decompression_bomb", "text.jpg": "not_an_image",
                 "cut.png": "truncated", "tiny.png": "too_small", "tiff.png": "not_an_image", "ok.png": None}
    report = json.loads((res.path / "report.json").read_text())
    assert len(report["items"]) == 7 and report["summary"] == res.summary
    assert "7000x7000" in [i for i in report["items"] if i["input"].endswith("bomb2.png")][0]["detail"]
    assert re.fullmatch(r"Kept 1 of 7 inputs: rejected .*", res.summary)
    assert "2 decompression bomb" in res.summary


def test_every_image_rejected_writes_nothing(src, workspace):
    save(Image.new("RGB", (64, 64), "gray"), src / "flat.png")
    (src / "x.png").write_text("nope")
    with pytest.raises(EmptyDatasetError, match="No usable images") as e:
        prepare_dataset([src], "none", "zqxnone", workspace.data, SMALL)
    assert {i.reason for i in e.value.items} == {"blurry", "not_an_image"}
    assert list(workspace.data.iterdir()) == []


def test_existing_dataset_is_refused_then_replaced_with_overwrite(src, workspace):
    save(watercolor(1), src / "a.png")
    first = prepare_dataset([src], "s", "zqxover", workspace.data, SMALL)
    save(watercolor(2), src / "b.png")
    with pytest.raises(StyleMixError, match="already exists"):
        prepare_dataset([src], "s", "zqxover", workspace.data, SMALL)
    assert len(load_captions(first.path)) == 1
    second = prepare_dataset([src], "s", "zqxover", workspace.data, SMALL, overwrite=True)
    assert len(load_captions(second.path)) == 2
    assert sorted(p.name for p in workspace.data.iterdir()) == ["s"]  # no temp or old folders left
    with pytest.raises(StyleMixError, match="'../evil'"):
        prepare_dataset([src], "../evil", "zqxover", workspace.data, SMALL)


def test_outputs_layout_sidecars_and_progress(src, workspace):
    save(watercolor(1), src / "one.png")
    save(watercolor(2), src / "two.png")
    (src / "two.txt").write_text("zqxcap, a bright  painting of circles\n")
    calls = []
    res = prepare_dataset([src], "lay", "zqxcap", workspace.data, SMALL, progress=lambda *a: calls.append(a))
    caps = load_captions(res.path)
    assert list(caps.values()) == ["zqxcap, an image", "zqxcap, a bright painting of circles"]
    assert [i.caption_source for i in res.kept] == ["fallback", "sidecar"]
    meta = json.loads((res.path / "dataset.json").read_text())
    assert meta["style"] == "lay" and meta["trigger_word"] == "zqxcap" and meta["count"] == 2
    assert meta["size"] == 64 and meta["captioner_is_fallback"] is True
    assert sorted(p.name for p in res.path.iterdir()) == sorted(
        ["dataset.json", "metadata.jsonl", "report.json", *caps])
    assert calls[-1][0] == calls[-1][1] and calls[-1][2] == res.summary
    assert all(isinstance(c[0], int) and c[0] <= max(c[1], 1) for c in calls)


def test_caption_editing(src, workspace):
    save(watercolor(1), src / "one.png")
    res = prepare_dataset([src], "ed", "zqxed", workspace.data, SMALL)
    name = res.kept[0].file
    before = (res.path / "metadata.jsonl").read_bytes()
    with pytest.raises(StyleMixError, match="missing.png"):
        save_captions(res.path, {"missing.png": "x"})
    with pytest.raises(StyleMixError, match="one non-empty line"):
        save_captions(res.path, {name: "two\nlines"})
    assert (res.path / "metadata.jsonl").read_bytes() == before  # refused edits lose nothing
    assert save_captions(res.path, {name: "circles in soft paint"}) == {name: "zqxed, circles in soft paint"}
    assert load_captions(res.path) == {name: "zqxed, circles in soft paint"}


def test_trigger_word_check():
    for bad in ("", "two words", "UPPER", "a", "x/../y", "1abc", "émoji"):
        with pytest.raises(StyleMixError, match="Invalid trigger word"):
            check_trigger_word(bad)
    rare = check_trigger_word("sks")
    assert rare.tokens == ["sks</w>"] and rare.warnings == []
    split = check_trigger_word("anistyle")
    assert split.tokens == ["ani", "style</w>"] and split.tokenization == "ani + style"
    assert any("'style'" in w for w in split.warnings)
    assert check_trigger_word("style").warnings  # an ordinary word


def test_cli_preprocess_examples_and_exit_codes(workspace, capsys):
    rc = main(["preprocess", str(EXAMPLES / "pixel_city"), "--style", "city", "--trigger", "pxlcty",
               "--size", "64", "--captioner", "none", "--out-dir", str(workspace.data)])
    out = capsys.readouterr().out
    assert rc == 0 and "tokenizes as: px + lc + ty" in out and "Kept 14 of 15 inputs" in out
    meta = json.loads((workspace.data / "city" / "dataset.json").read_text())
    assert meta["count"] == 14 and meta["pixel_art_images"] >= 10
    proc = subprocess.run([sys.executable, "-c", "import sys; from stylemix.cli import main; sys.exit(main())",
                           "preprocess", str(EXAMPLES / "kenney_flat"), "--style", "bad", "--trigger", "Two Words",
                           "--out-dir", str(workspace.data)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "Invalid trigger word 'Two Words'" in proc.stderr
    assert not (workspace.data / "bad").exists()


def test_example_sets_are_small_licensed_and_traced():
    total = sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file())
    assert total < 3 * 2**20
    for name in ("kenney_flat", "pixel_city"):
        d = EXAMPLES / name
        source = (d / "SOURCE.md").read_text()
        assert (d / "LICENSE.txt").read_text().strip()
        pngs = sorted(d.glob("*.png"))
        assert 12 <= len(pngs) <= 20
        for p in pngs:
            assert f"| {p.name} |" in source and hashlib.sha256(p.read_bytes()).hexdigest() in source
    assert "CC0" in (EXAMPLES / "kenney_flat" / "LICENSE.txt").read_text()


@pytest.mark.parametrize("size, blur, message", [
    (None, 100.0, "Invalid size None"), ("abc", 100.0, "Invalid size 'abc'"), (100, 100.0, "Invalid size 100"),
    (True, 100.0, "Invalid size True"), (128, None, "Invalid blur threshold None"),
    (128, -1.0, "Invalid blur threshold -1.0"), (128, "x", "Invalid blur threshold 'x'"),
    (128, float("nan"), "Invalid blur threshold nan")])
def test_dataset_config_names_every_bad_form_value(size, blur, message):
    """One check for the CLI, the form and API callers: a cleared box or text is named, never int()'s error."""
    from stylemix.datasets.prepare import DatasetConfig

    with pytest.raises(StyleMixError, match=re.escape(message)):
        DatasetConfig(size=size, blur_threshold=blur)
    assert DatasetConfig(size=128, blur_threshold=0).size == 128


# ---------------------------------------------------------------- OpenCV and imagehash against the old code
# The hand-written versions these replaced, kept verbatim as the reference: the thresholds
# (blur_threshold 100, dedup_distance 4) must keep meaning what they meant.


def old_blur_score(image: Image.Image, size: int = 512) -> float:
    gray = image.convert("L")
    short = min(gray.size)
    if short > size:  # shrink to the training resolution, never enlarge
        scale = size / short
        gray = gray.resize((max(3, round(gray.width * scale)), max(3, round(gray.height * scale))),
                           Image.Resampling.LANCZOS)
    a = np.asarray(gray, dtype=np.float64)
    if a.shape[0] < 3 or a.shape[1] < 3:
        return 0.0
    lap = a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4.0 * a[1:-1, 1:-1]
    win = np.lib.stride_tricks.sliding_window_view(a, (3, 3))
    detail = win.max(axis=(-1, -2)) != win.min(axis=(-1, -2))
    if detail.sum() >= max(9, 0.01 * detail.size):
        lap = lap[detail]
    return float(lap.var())


def old_dhash(image: Image.Image) -> int:
    a = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (a[:, 1:] > a[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def test_opencv_blur_score_keeps_the_old_scores_meaning():
    from stylemix.datasets.images import blur_score as cv_score

    water, sprite = watercolor(8), pixel_sprite().convert("RGB")
    # measured at their own size (no shrink): the same number (OpenCV's grey and PIL's differ by rounding)
    own = [sprite, smooth_anime(), water, water.filter(ImageFilter.GaussianBlur(1)),
           water.filter(ImageFilter.GaussianBlur(2)), water.filter(ImageFilter.GaussianBlur(4)),
           sprite.resize((64, 64), Image.Resampling.NEAREST).filter(ImageFilter.GaussianBlur(2)),
           *(Image.open(p).convert("RGB") for p in sorted(EXAMPLES.glob("*/*.png"))[::4])]
    for im in own:
        assert cv_score(im, 512) == pytest.approx(old_blur_score(im, 512), rel=0.005, abs=0.05)
    # shrunk to the training size first: area interpolation (what the stored image gets) instead of
    # LANCZOS.  Near the threshold the score moves by ~10%; sharp images score somewhat higher; no
    # keep/reject decision at 100 changes.
    big = cartoon()
    shrunk = [(big, 512), (big.filter(ImageFilter.GaussianBlur(3)), 512), (big.filter(ImageFilter.GaussianBlur(6)), 512),
              (big.filter(ImageFilter.GaussianBlur(10)), 512), (water, 64), (water.filter(ImageFilter.GaussianBlur(2)), 64),
              (water.filter(ImageFilter.GaussianBlur(8)), 64), (water.filter(ImageFilter.GaussianBlur(12)), 128),
              *((Image.open(p).convert("RGB"), 64) for p in sorted(EXAMPLES.glob("kenney_flat/*.png"))[::4])]
    for im, size in shrunk:
        old, new = old_blur_score(im, size), cv_score(im, size)
        assert (old > 100) == (new > 100), (old, new)
        assert 0.7 < new / old < (1.15 if old < 500 else 2.5), (old, new)


def test_imagehash_dhash_is_the_old_dhash():
    import imagehash

    from stylemix.datasets.dedup import fingerprint

    images = [watercolor(3), watercolor(3).resize((300, 300)), cartoon(side=400), smooth_anime(),
              pixel_sprite().convert("RGB"), Image.fromarray(255 - np.asarray(watercolor(3)))]
    for im in images:
        bits = imagehash.dhash(im).hash.flatten()
        assert int("".join("1" if b else "0" for b in bits), 2) == old_dhash(im)
    for a in images:
        for b in images:  # so every Hamming distance, and dedup_distance, means the same
            assert fingerprint(a).hash - fingerprint(b).hash == bin(old_dhash(a) ^ old_dhash(b)).count("1")
