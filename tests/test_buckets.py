"""Aspect-ratio buckets: kohya's rule worked out by hand, the images they store, their metadata and reader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylemix.cli import main
from stylemix.datasets.buckets import (BucketRule, bucket_resolutions, cover, default_bucket_limits, nearest_bucket,
                                       no_upscale_choice)
from stylemix.datasets.prepare import (DatasetConfig, EmptyDatasetError, bucket_counts, load_captions,
                                       load_dataset_folder, prepare_dataset, save_captions)
from stylemix.errors import StyleMixError

# R = 512, kohya's defaults (min 256, max 1024, step 64), max_area = 512*512 = 262144.  For each width w
# from 256 to 1024: height = min(1024, (262144 // w) // 64 * 64), kept when >= 256, added both ways:
#   w=256: 262144//256 = 1024 -> 1024   w=320: 819 -> 768   w=384: 682 -> 640   w=448: 585 -> 576
#   w=512: 512 -> 512                   w=576: 455 -> 448   w=640: 409 -> 384   w=704: 372 -> 320
#   w=768: 341 -> 320                   w=832: 315 -> 256   w=896: 292 -> 256   w=960: 273 -> 256
#   w=1024: 256 -> 256;  plus the square int(sqrt(262144) // 64) * 64 = 512.
BUCKETS_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
               (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
               (1024, 256)]


def test_kohya_buckets_at_512():
    assert default_bucket_limits(512, 64) == (256, 1024)  # kohya's own defaults at SD1.5's size
    assert bucket_resolutions(512, 256, 1024, 64) == BUCKETS_512
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in BUCKETS_512)


@pytest.mark.parametrize("size, bucket, resized", [
    # 300x700: ratio 0.4286. Nearest ratios: 320/768 = 0.4167 (off by 0.0119), 320/704 = 0.4545 (0.0260),
    # 384/640 = 0.6.  -> 320x768.  Image wider than the bucket (0.4286 > 0.4167): fit the height,
    # scale 768/700 = 1.0971 -> int(300*1.0971 + .5) = 329 x 768, then 9 columns cropped.
    ((300, 700), (320, 768), (329, 768)),
    ((700, 300), (768, 320), (768, 329)),  # the same, lying down
    # 1024x1024: ratio 1 -> the square 512; scale 0.5.
    ((1024, 1024), (512, 512), (512, 512)),
    # 512x768: ratio 0.6667. 384/640 = 0.6 (off by 0.0667), 448/576 = 0.7778 (0.1111) -> 384x640.
    # 0.6667 > 0.6: fit the height, scale 640/768 = 0.8333 -> int(426.67 + .5) = 427 x 640.
    ((512, 768), (384, 640), (427, 640)),
    # 2000x1000: ratio 2. 704/320 = 2.2 (0.2), 640/384 = 1.667 (0.333) -> 704x320.
    # 2 < 2.2: fit the width, scale 704/2000 = 0.352 -> 704 x 352.
    ((2000, 1000), (704, 320), (704, 352)),
    # exactly a bucket's size: that bucket, untouched
    ((448, 576), (448, 576), (448, 576)),
])
def test_bucket_assignment_worked_by_hand(size, bucket, resized):
    choice = BucketRule(512, 256, 1024, 64).choose(size)
    assert (choice.bucket, choice.resized) == (bucket, resized)


def test_nearest_is_by_absolute_ratio_difference_first_bucket_on_ties():
    # 3:1: 832/256 = 3.25 is off by 0.25, 768/320 = 2.4 by 0.6, 896/256 = 3.5 by 0.5 -> 832x256
    assert nearest_bucket((3000, 1000), BUCKETS_512) == (832, 256)
    # ratio 1.25 is 0.75 from both 0.5 and 2: the first in sorted order wins, as numpy's argmin in kohya
    assert nearest_bucket((125, 100), [(64, 128), (128, 64)]) == (64, 128)
    assert nearest_bucket((125, 100), [(128, 64), (64, 128)]) == (128, 64)
    # cover: a 100x50 image in a 64x64 bucket is fitted by its height: 128x64, then cropped
    assert cover((100, 50), (64, 64)).resized == (128, 64)


def test_bucket_no_upscale_worked_by_hand():
    # smaller than 512*512 pixels: the image's own size, sides rounded down to 64, never enlarged
    assert no_upscale_choice((300, 700), 512, 64).bucket == (256, 640)
    assert no_upscale_choice((300, 700), 512, 64).resized == (300, 700)
    # 2000x1000 (> 262144 px): shrunk to the area, ratio 2: w = sqrt(262144*2) = 724.1, h = 362.0.
    # Rounding the width: 724 -> 704, height 704/2 = 352 -> 320: ratio 2.2.  Rounding the height:
    # 362 -> 320, width 640: ratio 2.0 (exact) -> resized 640x320, bucket 640x320.
    c = no_upscale_choice((2000, 1000), 512, 64)
    assert (c.bucket, c.resized) == ((640, 320), (640, 320))
    assert no_upscale_choice((40, 100), 512, 64) is None  # 40 rounds down to 0: fits no bucket
    assert no_upscale_choice((8000, 100), 512, 64) is None  # too thin once shrunk to the area (kohya divides by 0)
    rule = BucketRule(512, 256, 1024, 64, no_upscale=True)
    assert rule.choose((1024, 1024)).bucket == (512, 512)


@pytest.mark.parametrize("size, limits, buckets", [
    # R=64: min 64 (R/2 = 32 rounds below one step), max 128.  Only the square: any other shape with
    # 64-multiple sides has more than 64*64 pixels.
    (64, (64, 128), [(64, 64)]),
    # R=128: min 64, max 256, area 16384: w=64 -> min(256, 256) = 256; w=128 -> 128; w=192 -> 85 -> 64;
    # w=256 -> 64.
    (128, (64, 256), [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]),
    # R=256: min 128, max 512, area 65536: w=128 -> 512; 192 -> 341 -> 320; 256 -> 256; 320 -> 204 -> 192;
    # 384 -> 170 -> 128; 448 -> 146 -> 128; 512 -> 128.
    (256, (128, 512), [(128, 384), (128, 448), (128, 512), (192, 320), (256, 256), (320, 192), (384, 128),
                       (448, 128), (512, 128)]),
])
def test_small_sizes_still_have_valid_buckets(size, limits, buckets):
    assert default_bucket_limits(size, 64) == limits
    assert bucket_resolutions(size, *limits, 64) == buckets
    assert DatasetConfig(size=size).bucket_rule().resolutions == buckets
    # kohya's own 256 minimum would leave only the square below R=256
    assert bucket_resolutions(128, 256, 1024, 64) == [(128, 128)]


def gradient(w: int, h: int) -> Image.Image:
    """Red = column, green = row, each from 0 to 255 across the image: the stored image's colour range
    says which part of the picture it kept."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8), "RGB")


def kept_fraction(path: Path) -> float:
    a = np.asarray(Image.open(path), dtype=np.float64)
    return (np.ptp(a[..., 0]) / 255) * (np.ptp(a[..., 1]) / 255)


def test_portrait_keeps_far_more_of_its_picture_than_the_square_crop(tmp_path, workspace):
    src = tmp_path / "portrait.png"
    gradient(300, 700).save(src)
    smooth = dict(size=512, blur_threshold=0, pixel_art="off")  # a gradient is smooth by design
    res = prepare_dataset([src], "tall", "zqxprt", workspace.data, DatasetConfig(**smooth))
    square = prepare_dataset([src], "sq", "zqxprt", workspace.data, DatasetConfig(enable_bucket=False, **smooth))
    with Image.open(res.path / res.kept[0].file) as im:
        assert im.size == (320, 768)
    with Image.open(square.path / square.kept[0].file) as im:
        assert im.size == (512, 512)
    bucketed, cropped = kept_fraction(res.path / res.kept[0].file), kept_fraction(square.path / square.kept[0].file)
    # by hand: the bucket keeps 320 of 329 columns and every row (0.97); the square keeps 300 of 700 rows (0.43)
    assert abs(bucketed - 320 / 329) < 0.01 and abs(cropped - 300 / 700) < 0.01, (bucketed, cropped)


def sprite(w: int, h: int, seed: int = 0) -> Image.Image:
    """Pixel art: w x h random pixels from a 4-colour palette."""
    pal = np.array([[20, 20, 30], [230, 60, 50], [250, 210, 60], [60, 160, 80]], np.uint8)
    return Image.fromarray(pal[np.random.default_rng(seed).integers(0, 4, (h, w))], "RGB")


def test_pixel_art_is_enlarged_by_whole_number_factors(tmp_path, workspace):
    # 24x40 (ratio 0.6) at R=512: bucket 384x640 (ratio 0.6 exactly), a factor of 16 with nothing cropped
    # 20x40 (ratio 0.5) at R=128: buckets 64x192 (0.333, off by 0.167), 64x256 (0.25), 128x128 (1) -> 64x192.
    #   cover scale max(64/20, 192/40) = 4.8 -> whole factor 5: 100x200, centre crop left 18, top 4.
    for name, (w, h), size, k, (bw, bh), (left, top) in [
            ("exact", (24, 40), 512, 16, (384, 640), (0, 0)), ("cropped", (20, 40), 128, 5, (64, 192), (18, 4))]:
        sprite(w, h).save(tmp_path / f"{name}.png")
        res = prepare_dataset([tmp_path / f"{name}.png"], name, "zqxpix", workspace.data, DatasetConfig(size=size))
        assert res.kept[0].pixel_art is True and res.kept[0].bucket == [bw, bh]
        out = np.asarray(Image.open(res.path / res.kept[0].file))
        blocks = np.asarray(sprite(w, h)).repeat(k, 0).repeat(k, 1)
        assert (out == blocks[top : top + bh, left : left + bw]).all()  # every source pixel a k x k block
    # the same sprite as a smooth image is blended (proof that the check above can fail)
    res = prepare_dataset([tmp_path / "cropped.png"], "smooth", "zqxpix", workspace.data,
                          DatasetConfig(size=128, pixel_art="off"))
    out = np.asarray(Image.open(res.path / res.kept[0].file)).reshape(-1, 3)
    assert len({tuple(c) for c in out}) > 20


def shapes(folder: Path) -> list[Path]:
    """Sharp images of several shapes: portrait, landscape, square, a small one."""
    rng = np.random.default_rng(3)
    files = []
    for name, (w, h) in {"tall": (90, 270), "wide": (300, 100), "square": (150, 150), "small": (40, 60)}.items():
        a = rng.integers(0, 255, (h // 10, w // 10, 3), dtype=np.uint8).repeat(10, 0).repeat(10, 1)
        files.append(folder / f"{name}.jpg")
        Image.fromarray(a).save(files[-1], quality=95)
    return files


def test_metadata_records_original_size_and_bucket_and_the_reader_returns_them(tmp_path, workspace):
    files = shapes(tmp_path)
    res = prepare_dataset(files, "shapes", "zqxshape", workspace.data, DatasetConfig(size=128, pixel_art="off"))
    # R=128 buckets (see above): tall 1:3 -> 64x192; wide 3:1 -> 192x64; square -> 128x128;
    # small 40x60 (0.667): |0.333-0.667| = 0.3333333 just beats |1-0.667| = 0.33333334 -> 64x192
    expected = {"tall": ([90, 270], [64, 192]), "wide": ([300, 100], [192, 64]), "square": ([150, 150], [128, 128]),
                "small": ([40, 60], [64, 192])}
    rows = [json.loads(line) for line in (res.path / "metadata.jsonl").read_text().splitlines()]
    assert [set(r) for r in rows] == [{"file_name", "text", "original_size", "bucket"}] * 4
    for row, item in zip(rows, res.kept):
        stem = Path(item.input).stem
        assert (row["original_size"], row["bucket"]) == expected[stem]
        with Image.open(res.path / row["file_name"]) as im:
            assert list(im.size) == row["bucket"]  # the stored image IS its bucket
    info = json.loads((res.path / "dataset.json").read_text())
    assert info["buckets"] == {"64x192": 2, "128x128": 1, "192x64": 1} == res.buckets
    assert (info["config"]["enable_bucket"], info["config"]["min_bucket_reso"], info["config"]["max_bucket_reso"],
            info["config"]["bucket_reso_steps"]) == (True, 64, 256, 64)  # the limits used, not None
    report = json.loads((res.path / "report.json").read_text())
    assert [i["bucket"] for i in report["items"]] == [expected[Path(f).stem][1] for f in files]

    data = load_dataset_folder(res.path)
    assert [list(s) for s in data.sizes] == [expected[Path(f).stem][1] for f in files]
    assert data.buckets() == info["buckets"] == bucket_counts(res.path) == data.summary["buckets"]
    # editing captions keeps the per-image sizes
    save_captions(res.path, {rows[0]["file_name"]: "a tall thing"})
    again = [json.loads(line) for line in (res.path / "metadata.jsonl").read_text().splitlines()]
    assert again[0]["bucket"] == rows[0]["bucket"] and again[0]["text"] == "zqxshape, a tall thing"
    # an image changed after preprocessing no longer matches its bucket: named, before any training
    Image.new("RGB", (64, 64)).save(res.path / rows[0]["file_name"])
    with pytest.raises(StyleMixError, match=re.escape(f"line 1: '{rows[0]['file_name']}' is 64x64 but its bucket "
                                                      "is 64x192")):
        load_dataset_folder(res.path)


def test_no_buckets_gives_todays_square_dataset(tmp_path, workspace):
    res = prepare_dataset(shapes(tmp_path), "sq", "zqxsq", workspace.data,
                          DatasetConfig(size=128, pixel_art="off", enable_bucket=False))
    for item in res.kept:
        with Image.open(res.path / item.file) as im:
            assert im.size == (128, 128) and item.bucket == [128, 128]
    assert res.buckets == {"128x128": 4}
    assert json.loads((res.path / "dataset.json").read_text())["config"]["enable_bucket"] is False


def test_reader_still_reads_a_square_dataset_made_before_buckets(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    rows = []
    for i in range(3):
        sprite(64, 64, i).save(old / f"{i:04d}_x.png")
        rows.append(json.dumps({"file_name": f"{i:04d}_x.png", "text": f"zqxold, picture {i}"}))
    (old / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    (old / "dataset.json").write_text(json.dumps({"style": "old", "trigger_word": "zqxold", "size": 64, "count": 3}))
    data = load_dataset_folder(old)
    assert len(data) == 3 and data.sizes == [(64, 64)] * 3 and data.buckets() == {"64x64": 3}
    assert bucket_counts(old) == {"64x64": 3}  # counted from the files' headers
    save_captions(old, {"0000_x.png": "edited"})
    assert set(json.loads((old / "metadata.jsonl").read_text().splitlines()[0])) == {"file_name", "text"}
    (old / "metadata.jsonl").write_text(json.dumps({"file_name": "0000_x.png", "text": "x", "bucket": [64]}) + "\n")
    with pytest.raises(StyleMixError, match=r"line 1: bucket must be \[width, height\] in pixels, got \[64\]"):
        load_captions(old)


def test_bucket_no_upscale_in_the_pipeline_and_images_that_fit_no_bucket(tmp_path, workspace):
    files = shapes(tmp_path)
    cfg = DatasetConfig(size=128, pixel_art="off", bucket_no_upscale=True)
    res = prepare_dataset(files, "nu", "zqxnu", workspace.data, cfg)
    got = {Path(i.input).stem: (i.status, i.reason, i.bucket) for i in res.items}
    # own sizes, shrunk to 128*128 px first when larger (keeping the ratio: 90x270 -> 74x222, 300x100 ->
    # 222x74, 150x150 -> 128x128), sides rounded down to 64; 40x60 (never enlarged) has sides below one
    # step: it is reported, like any rejected image, and the rest is kept
    assert got == {"tall": ("kept", None, [64, 192]), "wide": ("kept", None, [192, 64]),
                   "square": ("kept", None, [128, 128]), "small": ("rejected", "no_bucket", None)}
    small = [i for i in res.items if i.reason == "no_bucket"][0]
    assert "40x60 fits no bucket" in small.detail and small.original_size == [40, 60]
    with pytest.raises(EmptyDatasetError, match="rejected 1 no bucket"):
        prepare_dataset([files[3]], "none", "zqxnu", workspace.data, cfg)
    assert not (workspace.data / "none").exists() and not list(workspace.data.glob(".none*"))


@pytest.mark.parametrize("options, message", [
    ({"bucket_reso_steps": 32}, "Invalid bucket_reso_steps 32: use a multiple of 64 that divides the size (512)"),
    ({"bucket_reso_steps": 192}, "Invalid bucket_reso_steps 192: use a multiple of 64 that divides the size (512)"),
    ({"bucket_reso_steps": "64"}, "Invalid bucket_reso_steps '64'"),
    ({"min_bucket_reso": 100}, "Invalid min_bucket_reso 100: use a multiple of bucket_reso_steps (64) from 64 to "
                               "the size (512), or leave it out for 256."),
    ({"min_bucket_reso": 576}, "Invalid min_bucket_reso 576"),
    ({"min_bucket_reso": 0}, "Invalid min_bucket_reso 0"),
    ({"max_bucket_reso": 448}, "Invalid max_bucket_reso 448: use a multiple of bucket_reso_steps (64) from the "
                               "size (512) to 4096, or leave it out for 1024."),
    ({"max_bucket_reso": 1000}, "Invalid max_bucket_reso 1000"),
    ({"max_bucket_reso": 8192}, "Invalid max_bucket_reso 8192"),
    ({"enable_bucket": None}, "Invalid enable_bucket None: use true or false."),
    ({"bucket_no_upscale": "yes"}, "Invalid bucket_no_upscale 'yes': use true or false."),
    ({"enable_bucket": False, "bucket_no_upscale": True}, "Invalid bucket_no_upscale True with enable_bucket False"),
])
def test_every_bucket_option_is_checked_with_one_message(options, message):
    with pytest.raises(StyleMixError, match=re.escape(message)):
        DatasetConfig(size=512, **options)


def test_cli_bucket_options(tmp_path, workspace, capsys):
    files = shapes(tmp_path)
    rc = main(["preprocess", *map(str, files), "--style", "cli", "--trigger", "zqxcli", "--size", "128",
               "--captioner", "none", "--pixel-art", "off", "--out-dir", str(workspace.data),
               "--min-bucket-reso", "128", "--max-bucket-reso", "128"])
    out = capsys.readouterr().out
    assert rc == 0 and "images per bucket: 128x128: 4" in out  # min = max = R leaves only the square
    rc = main(["preprocess", *map(str, files), "--style", "cli2", "--trigger", "zqxcli", "--size", "128",
               "--captioner", "none", "--out-dir", str(workspace.data), "--no-buckets"])
    assert rc == 0 and "images per bucket: 128x128: 4" in capsys.readouterr().out
    rc = main(["preprocess", *map(str, files), "--style", "bad", "--trigger", "zqxcli", "--size", "128",
               "--out-dir", str(workspace.data), "--max-bucket-reso", "96"])
    assert rc == 1 and "Invalid max_bucket_reso 96" in capsys.readouterr().err
    assert not list(workspace.data.glob("*bad*"))  # refused before any work


def test_service_view_and_dataset_tab_report_bucket_counts(tmp_path, workspace):
    from stylemix.service import StyleMixService
    from ui.dataset_tab import bucket_line

    service = StyleMixService.start("tiny", workspace, examples=False)
    owner = "u" + "5" * 24
    files = [str(f) for f in shapes(tmp_path)]
    service.prepare_dataset(owner, files, "shapes", "zqxshape", 128, "off", 0.0)
    view = service.dataset_view(owner, "shapes")
    assert view["buckets"] == {"64x192": 2, "128x128": 1, "192x64": 1}
    assert bucket_line(view["buckets"]) == "Images per bucket: 64x192: 2, 128x128: 1, 192x64: 1."
    service.prepare_dataset(owner, files, "square", "zqxshape", 128, "off", 0.0, enable_bucket=False)
    assert service.dataset_view(owner, "square")["buckets"] == {"128x128": 4}
    with pytest.raises(StyleMixError, match="Invalid enable_bucket None"):
        service.prepare_dataset(owner, files, "x", "zqxshape", 128, "off", 0.0, enable_bucket=None)


def test_a_rotated_photo_is_bucketed_as_displayed(tmp_path, workspace):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 300x100, shown rotated 90 degrees: 100x300
    a = np.random.default_rng(0).integers(0, 255, (10, 30, 3), dtype=np.uint8).repeat(10, 0).repeat(10, 1)
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    res = prepare_dataset([tmp_path / "rot.jpg"], "rot", "zqxrot", workspace.data, DatasetConfig(size=128))
    assert (res.kept[0].original_size, res.kept[0].bucket) == ([100, 300], [64, 192])
