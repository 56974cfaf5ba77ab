"""Safe intake of an untrusted upload: zip archives, folders and lists of files.

Everything that is accepted is *copied* into a private staging folder under names this module
chooses (`000017.png`), so no name taken from an archive or a folder is ever used as a path:
`../../etc/passwd`, `/abs/path` and `C:\\x` are reported and skipped, never written.

Limits (all in `UploadLimits`, documented in docs/datasets.md) are enforced while streaming:
a zip header's `file_size` can lie, so the bytes actually produced by decompression are
counted, and an entry is abandoned the moment it passes the per-file, total or ratio limit.
Nested archives and symlinks (on disk or stored inside a zip) are refused.  One bad entry
never stops the others; only an upload with nothing usable in it is an error.
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from stylemix.errors import StyleMixError
from stylemix.datasets.images import IMAGE_EXTENSIONS

CAPTION_EXTENSION = ".txt"  # kohya's sidecar convention: cat.png + cat.txt
ARCHIVE_EXTENSIONS = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst", ".lz", ".lzma", ".cab"}
# Files an OS drops next to pictures: not the user's images, reported as ignored.
SYSTEM_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
SYSTEM_DIRS = {"__macosx", ".git", "__pycache__"}
# Magic numbers of archives: a nested archive renamed to .png is still an archive.
_ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"7z\xbc\xaf\x27\x1c", b"Rar!")

_CHUNK = 1 << 16


@dataclass
class UploadLimits:
    """How much an upload may contain.  Defaults suit a style set of a few hundred images."""

    max_files: int = 2000  # entries in one archive / files under one folder / files in total
    max_file_bytes: int = 50 * 2**20  # one file, as really decompressed (50 MiB)
    max_total_bytes: int = 1 * 2**30  # the whole upload, uncompressed (1 GiB)
    max_ratio: float = 100.0  # uncompressed / compressed bytes of one zip entry
    max_caption_bytes: int = 16 * 2**10  # one sidecar .txt caption (16 KiB)

    def __post_init__(self) -> None:
        for name in ("max_files", "max_file_bytes", "max_total_bytes", "max_ratio", "max_caption_bytes"):
            if not getattr(self, name) > 0:
                raise StyleMixError(f"Upload limit {name} must be positive, got {getattr(self, name)!r}.")


@dataclass
class IntakeItem:
    """One input of the upload: an image file staged at `path`, or a rejection with its reason."""

    name: str  # as the user knows it: "set.zip:cats/a.png" or "/home/me/a.png"
    path: Path | None = None  # the staged copy (None when rejected)
    reason: str | None = None  # short code: unsafe_path, symlink, nested_archive, ...
    detail: str = ""  # one sentence for people
    caption_key: str = ""  # name without extension, to pair the image with its sidecar .txt

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass
class Intake:
    """Everything taken from an upload: staged images, rejections, and sidecar captions."""

    items: list[IntakeItem] = field(default_factory=list)
    captions: dict[str, str] = field(default_factory=dict)  # caption_key -> sidecar text

    @property
    def images(self) -> list[IntakeItem]:
        return [i for i in self.items if i.ok]


class _Budget:
    """Counts files and bytes across the whole upload."""

    def __init__(self, limits: UploadLimits):
        self.limits = limits
        self.files = 0
        self.bytes = 0


class _LimitExceeded(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _kind(name: str) -> str:
    """'image', 'caption', 'archive', 'system' or 'other', from the name alone."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.name.lower() in SYSTEM_NAMES or any(part.lower() in SYSTEM_DIRS for part in p.parts[:-1]) \
            or p.name.startswith("._"):
        return "system"
    suffixes = [s.lower() for s in p.suffixes]
    ext = suffixes[-1] if suffixes else ""
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext == CAPTION_EXTENSION:
        return "caption"
    if ext in ARCHIVE_EXTENSIONS:
        return "archive"
    return "other"


def _unsafe_member_name(name: str) -> str | None:
    """Why an archive member name cannot be trusted, or None."""
    if "\x00" in name:
        return "its name contains a NUL byte"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return "it has an absolute path"
    if any(part == ".." for part in norm.split("/")):
        return "its path contains '..'"
    return None


def _copy_counted(src, dst: Path, budget: _Budget, compressed: int | None = None) -> int:
    """Stream `src` (a binary file object) into `dst`, enforcing every byte limit as it goes."""
    lim = budget.limits
    written = 0
    try:
        with open(dst, "wb") as out:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                written += len(chunk)
                if written > lim.max_file_bytes:
                    raise _LimitExceeded("too_large", f"it is larger than max_file_bytes={lim.max_file_bytes}")
                if budget.bytes + written > lim.max_total_bytes:
                    raise _LimitExceeded("upload_too_large",
                                         f"the upload passed max_total_bytes={lim.max_total_bytes} here")
                # The ratio is checked on real bytes (headers can lie); the slack lets tiny
                # entries such as a 1 KiB blank PNG compress well without being flagged.
                if compressed is not None and written > lim.max_ratio * max(compressed, 1) + _CHUNK:
                    raise _LimitExceeded("compression_ratio",
                                         f"it decompresses more than max_ratio={lim.max_ratio:g} times its "
                                         "compressed size (a zip bomb?)")
                out.write(chunk)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    budget.bytes += written
    return written


def _looks_like_archive(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return any(head.startswith(m) for m in _ARCHIVE_MAGIC)


class _Stager:
    def __init__(self, staging: Path, limits: UploadLimits):
        self.staging = Path(staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.budget = _Budget(limits)
        self.intake = Intake()
        self._n = 0
        self.source_id = ""

    def reject(self, name: str, reason: str, detail: str) -> None:
        self.intake.items.append(IntakeItem(name=name, reason=reason, detail=detail))

    def _count_file(self, name: str) -> bool:
        self.budget.files += 1
        if self.budget.files > self.budget.limits.max_files:
            self.reject(name, "too_many_files",
                        f"the upload has more than max_files={self.budget.limits.max_files} files")
            return False
        return True

    def add_stream(self, name: str, rel: str, opener, compressed: int | None = None) -> None:
        """Stage one member (opener() -> binary file object; `rel` its name inside the source)."""
        kind = _kind(rel)
        # Keys carry their source so that a.png in one folder never takes a.txt of another.
        caption_key = f"{self.source_id}\x00{_caption_key(rel)}"
        if kind == "system":
            self.reject(name, "ignored", "an operating-system file, not an image")
            return
        if kind == "archive":
            self.reject(name, "nested_archive", "archives inside an upload are not opened")
            return
        if kind == "other":
            ext = PurePosixPath(rel).suffix or "(none)"
            self.reject(name, "not_an_image", f"extension {ext} is not one of {sorted(IMAGE_EXTENSIONS)}")
            return
        if not self._count_file(name):
            return
        if kind == "caption":
            self._add_caption(name, caption_key, opener)
            return
        self._n += 1
        dst = self.staging / f"{self._n:06d}{PurePosixPath(rel).suffix.lower()}"
        try:
            with opener() as src:
                _copy_counted(src, dst, self.budget, compressed)
        except _LimitExceeded as e:
            self.reject(name, e.reason, e.detail)
            return
        except (OSError, zipfile.BadZipFile, EOFError, RuntimeError) as e:  # CRC errors, encrypted entries
            self.reject(name, "unreadable", f"could not be read ({type(e).__name__}: {e})")
            return
        if _looks_like_archive(dst):
            dst.unlink()
            self.reject(name, "nested_archive", "this file is an archive despite its image extension")
            return
        self.intake.items.append(IntakeItem(name=name, path=dst, caption_key=caption_key))

    def _add_caption(self, name: str, key: str, opener) -> None:
        limit = self.budget.limits.max_caption_bytes
        try:
            with opener() as src:
                data = src.read(limit + 1)
        except (OSError, zipfile.BadZipFile, EOFError, RuntimeError) as e:
            self.reject(name, "unreadable", f"caption file could not be read ({e})")
            return
        if len(data) > limit:
            self.reject(name, "too_large", f"caption file is larger than max_caption_bytes={limit}")
            return
        self.budget.bytes += len(data)
        text = " ".join(data.decode("utf-8", errors="replace").split())
        if text:
            self.intake.captions[key] = text


def _caption_key(rel: str) -> str:
    p = PurePosixPath(rel.replace("\\", "/"))
    return str(p.with_suffix("")).lower()


def _stage_zip(stager: _Stager, path: Path, label: str) -> None:
    lim = stager.budget.limits
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        stager.reject(label, "unreadable", f"not a readable zip archive ({e})")
        return
    with zf:
        infos = zf.infolist()
        entries = [i for i in infos if not i.is_dir()]
        if len(entries) > lim.max_files:
            # Refuse the archive as a whole: its central directory is read before any
            # extraction, so this costs nothing and no partial set is made from it.
            stager.reject(label, "too_many_files",
                          f"the archive has {len(entries)} entries, more than max_files={lim.max_files}")
            return
        for info in entries:
            name = f"{label}:{info.filename}"
            why = _unsafe_member_name(info.filename)
            if why:
                stager.reject(name, "unsafe_path", f"refused because {why}")
                continue
            mode = (info.external_attr >> 16) & 0xFFFF
            if stat.S_ISLNK(mode):
                stager.reject(name, "symlink", "symbolic links inside archives are not followed")
                continue
            stager.add_stream(name, info.filename, lambda i=info: zf.open(i),
                              compressed=info.compress_size)


def _walk_folder(root: Path) -> Iterator[tuple[Path, str]]:
    """(path, relative name) of everything under root, symlinks reported, never followed."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                dirnames.remove(d)
                yield Path(dirpath, d), os.path.relpath(os.path.join(dirpath, d), root)
        for f in sorted(filenames):
            p = Path(dirpath, f)
            yield p, os.path.relpath(p, root)


def _stage_file(stager: _Stager, path: Path, label: str, rel: str) -> None:
    if path.is_symlink():
        stager.reject(label, "symlink", "symbolic links are not followed")
        return
    if not path.is_file():
        stager.reject(label, "unreadable", "not a regular file")
        return
    stager.add_stream(label, rel, lambda: open(path, "rb"))


def collect_upload(sources: Iterable[str | os.PathLike], staging: Path,
                   limits: UploadLimits | None = None) -> Intake:
    """Stage every usable file of `sources` (zips, folders, files) into `staging`.

    Returns an Intake listing each input with its outcome.  Raises StyleMixError only when
    the upload as a whole is unusable: nothing given, or a source that does not exist.
    """
    limits = limits or UploadLimits()
    sources = [Path(s) for s in sources]
    if not sources:
        raise StyleMixError("The upload is empty: give at least one image, folder or zip archive.")
    for s in sources:
        if not s.exists() and not s.is_symlink():
            raise StyleMixError(f"Upload source {str(s)!r} does not exist.")
    stager = _Stager(staging, limits)
    for src in sources:
        label = str(src)
        # loose files pair with sidecars given beside them, so their source is their folder
        stager.source_id = str(src.resolve().parent if src.is_file() and not zipfile.is_zipfile(src) else src)
        if src.is_symlink():
            stager.reject(label, "symlink", "symbolic links are not followed")
        elif src.is_dir():
            for p, rel in _walk_folder(src):
                name = f"{label}/{rel}"
                if p.is_symlink():
                    stager.reject(name, "symlink", "symbolic links are not followed")
                elif p.is_file():
                    if _kind(rel) == "archive":
                        stager.reject(name, "nested_archive", "archives inside a folder upload are not opened")
                    else:
                        _stage_file(stager, p, name, rel)
        elif src.suffix.lower() == ".zip" or (src.is_file() and zipfile.is_zipfile(src)):
            _stage_zip(stager, src, label)
        elif _kind(src.name) == "archive":
            stager.reject(label, "unsupported_archive", "only .zip archives can be uploaded")
        else:
            _stage_file(stager, src, label, src.name)
    if not stager.intake.items and not stager.intake.captions:
        raise StyleMixError("The upload is empty: the given folders and archives contain no files.")
    return stager.intake


def remove_tree(path: Path) -> None:
    """Delete a staging folder; never follows symlinks out of it."""
    shutil.rmtree(path, ignore_errors=True)
