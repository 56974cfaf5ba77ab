"""Hostile and broken uploads: every one gets a reason, nothing lands outside the staging folder."""

from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from stylemix.errors import StyleMixError
from stylemix.datasets.uploads import UploadLimits, collect_upload


def png_bytes(size=(32, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def reasons(intake) -> dict[str, str]:
    return {i.name.split(":", 1)[-1]: i.reason for i in intake.items}


def test_zip_path_escapes_symlinks_and_nested_archives(tmp_path):
    z = tmp_path / "up.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("good/cat.png", png_bytes())
        zf.writestr("good/cat.txt", "a red square")
        zf.writestr("../escape.png", png_bytes())
        zf.writestr("/abs/evil.png", png_bytes())
        zf.writestr("dir/../../up.png", png_bytes())
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as iz:
            iz.writestr("x.png", png_bytes())
        zf.writestr("inner.zip", inner.getvalue())
        zf.writestr("disguised.png", inner.getvalue())  # a zip renamed to .png
        zf.writestr("notes.pdf", b"%PDF-1.4")
        zf.writestr("__MACOSX/._cat.png", b"junk")
    before = all_files(tmp_path)
    staging = tmp_path / "work" / "staging"
    intake = collect_upload([z], staging)
    r = reasons(intake)
    assert r["good/cat.png"] is None
    assert r["../escape.png"] == r["/abs/evil.png"] == r["dir/../../up.png"] == "unsafe_path"
    assert r["link.png"] == "symlink"
    assert r["inner.zip"] == r["disguised.png"] == "nested_archive"
    assert r["notes.pdf"] == "not_an_image"
    assert r["__MACOSX/._cat.png"] == "ignored"
    # only the good image was written, under a name the stager chose, inside staging
    assert all_files(tmp_path) - before == {"work", "work/staging", "work/staging/000001.png"}
    assert intake.images[0].path.read_bytes() == png_bytes()
    assert list(intake.captions.values()) == ["a red square"]
    assert intake.images[0].caption_key in intake.captions


def test_zip_with_too_many_entries_is_refused_whole(tmp_path):
    z = tmp_path / "many.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(6):
            zf.writestr(f"{i}.png", png_bytes())
    intake = collect_upload([z], tmp_path / "s", UploadLimits(max_files=5))
    assert [(i.reason, i.ok) for i in intake.items] == [("too_many_files", False)]
    assert "6 entries" in intake.items[0].detail and "max_files=5" in intake.items[0].detail
    assert not list((tmp_path / "s").iterdir())


def test_zip_bomb_ratio_and_lying_header_are_counted_while_streaming(tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb.png", b"\0" * (4 * 2**20))  # ~1000:1
        zf.writestr("ok.png", png_bytes())
    intake = collect_upload([z], tmp_path / "s")
    r = reasons(intake)
    assert r["bomb.png"] == "compression_ratio" and r["ok.png"] is None
    assert all(p.stat().st_size < 2**20 for p in (tmp_path / "s").iterdir())

    # A header that lies about the uncompressed size: patch file_size (local + central) to 100.
    data = bytearray(z.read_bytes())
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = data.find(sig)
        struct.pack_into("<I", data, pos + off, 100)
    liar = tmp_path / "liar.zip"
    liar.write_bytes(bytes(data))
    intake = collect_upload([liar], tmp_path / "s2", UploadLimits(max_ratio=1e9, max_file_bytes=2**20))
    bomb = [i for i in intake.items if i.name.endswith("bomb.png")][0]
    assert not bomb.ok and bomb.reason in {"too_large", "unreadable"}  # never a 4 MiB file on disk
    assert all(p.stat().st_size <= 2**20 for p in (tmp_path / "s2").iterdir())


def test_byte_limits_per_file_and_total(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for n in ("a", "b", "c"):
        (d / f"{n}.bmp").write_bytes(b"BM" + os.urandom(30_000))
    intake = collect_upload([d], tmp_path / "s", UploadLimits(max_total_bytes=70_000, max_file_bytes=40_000))
    assert [i.reason for i in intake.items] == [None, None, "upload_too_large"]
    intake = collect_upload([d], tmp_path / "s2", UploadLimits(max_file_bytes=20_000))
    assert {i.reason for i in intake.items} == {"too_large"}


def test_folder_symlinks_are_never_followed(tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "private.png").write_bytes(png_bytes())
    d = tmp_path / "in"
    d.mkdir()
    (d / "real.png").write_bytes(png_bytes())
    (d / "link.png").symlink_to(secret / "private.png")
    (d / "linkdir").symlink_to(secret, target_is_directory=True)
    (d / "inner.zip").write_bytes(b"PK\x03\x04")
    loose = tmp_path / "loose.png"
    loose.symlink_to(secret / "private.png")
    intake = collect_upload([d, loose], tmp_path / "s")
    r = {Path(i.name).name: i.reason for i in intake.items}
    assert r == {"real.png": None, "link.png": "symlink", "linkdir": "symlink", "inner.zip": "nested_archive",
                 "loose.png": "symlink"}
    assert len(list((tmp_path / "s").iterdir())) == 1


def test_empty_and_missing_uploads_are_clear_errors(tmp_path):
    with pytest.raises(StyleMixError, match="empty"):
        collect_upload([], tmp_path / "s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StyleMixError, match="empty"):
        collect_upload([tmp_path / "empty"], tmp_path / "s")
    empty_zip = tmp_path / "e.zip"
    zipfile.ZipFile(empty_zip, "w").close()
    with pytest.raises(StyleMixError, match="empty"):
        collect_upload([empty_zip], tmp_path / "s")
    with pytest.raises(StyleMixError, match="nope.png"):
        collect_upload([tmp_path / "nope.png"], tmp_path / "s")
    with pytest.raises(StyleMixError, match="max_ratio"):
        UploadLimits(max_ratio=0)


def test_sidecars_pair_only_within_their_source(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, text in ((a, "caption from a"), (b, None)):
        d.mkdir()
        (d / "img.png").write_bytes(png_bytes())
        if text:
            (d / "img.txt").write_text(text + "\n\n")
    intake = collect_upload([a, b], tmp_path / "s")
    got = [intake.captions.get(i.caption_key) for i in intake.images]
    assert got == ["caption from a", None]
