"""Where StyleMix keeps its files, and the one name check every user-chosen name goes through.

Every folder can be moved with an environment variable; on a Hugging Face Space with
persistent storage (`/data` exists and is writable) everything defaults to `/data/stylemix`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from stylemix.errors import StyleMixError

# Letters, digits, '_', '-', '.', not starting with '.', at most 64 characters: such a name can
# never be a path ('/', '..'), a hidden file, or carry control characters.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a safe single path component, else raise StyleMixError."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise StyleMixError(
            f"Invalid {what} {name!r}: use 1-64 letters, digits, '_', '-' or '.', not starting with '.' "
            "and without '..'.")
    return name


# Epoch versions of a trained LoRA (`--save-every-epochs`): NAME@eNN, stored in loras/NAME/versions/eNN/.
# '@' is valid in a LoRA name only there: names chosen by users (training, import, rename) never have it.
VERSIONS_DIR = "versions"
_VERSION = re.compile(r"e\d{2,5}")


def version_name(name: str, epoch: int) -> str:
    """'watercolor@e05': how the library lists the LoRA `name` of epoch `epoch`."""
    return f"{name}@e{epoch:02d}"


def split_version(name: str) -> tuple[str, str | None]:
    """('watercolor', 'e05') for 'watercolor@e05', (name, None) for a name without a version."""
    base, at, version = name.partition("@") if isinstance(name, str) else (name, "", "")
    return (base, version) if at else (name, None)


def check_lora_name(name: str, what: str = "LoRA name") -> str:
    """A LoRA the library may hold: a safe name (`check_name`), or NAME@eNN, an epoch version of one."""
    base, version = split_version(name)
    if version is not None and not _VERSION.fullmatch(version):
        raise StyleMixError(f"Invalid {what} {name!r}: '@' only names an epoch version, as in {base or 'name'}@e05.")
    try:
        check_name(base, what)
    except StyleMixError:
        raise StyleMixError(f"Invalid {what} {name!r}: use 1-64 letters, digits, '_', '-' or '.', not starting "
                            "with '.' and without '..' (and NAME@eNN for an epoch version).") from None
    return name


def _default_root() -> Path:
    persistent = Path("/data")
    if os.environ.get("SPACE_ID") and persistent.is_dir() and os.access(persistent, os.W_OK):
        return persistent / "stylemix"
    return Path.cwd()


@dataclass(frozen=True)
class Workspace:
    """The folders one StyleMix installation works in."""

    loras: Path
    data: Path
    jobs: Path
    outputs: Path

    @classmethod
    def default(cls, loras_dir: str | os.PathLike | None = None) -> "Workspace":
        root = Path(os.environ.get("STYLEMIX_HOME", _default_root()))
        return cls(
            loras=Path(loras_dir or os.environ.get("STYLEMIX_LORAS", root / "loras")),
            data=Path(os.environ.get("STYLEMIX_DATA", root / "data")),
            jobs=Path(os.environ.get("STYLEMIX_JOBS", root / "jobs")),
            outputs=Path(os.environ.get("STYLEMIX_OUTPUTS", root / "outputs")),
        )

    @classmethod
    def at(cls, root: str | os.PathLike) -> "Workspace":
        root = Path(root)
        return cls(loras=root / "loras", data=root / "data", jobs=root / "jobs", outputs=root / "outputs")


def inside(base: Path, *parts: str) -> Path:
    """base/parts..., refusing any result that resolves outside `base` (symlinks included)."""
    base_resolved = Path(base).resolve()
    target = base_resolved.joinpath(*parts).resolve()
    if target != base_resolved and base_resolved not in target.parents:
        raise StyleMixError(f"Refusing path {'/'.join(parts)!r}: it leads outside {base}.")
    return target


def read_json_object(path: Path, max_bytes: int = 16 * 1024**2) -> dict:
    """A JSON object from a file we did not write ourselves: size-limited, with a readable error."""
    import json

    path = Path(path)
    if path.stat().st_size > max_bytes:
        raise StyleMixError(f"{path}: the file is too large ({path.stat().st_size} bytes).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StyleMixError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise StyleMixError(f"{path}: expected a JSON object.")
    return data


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (a LoRA or a judge's weights: never all in memory)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unique_suffix() -> str:
    """A suffix for temporary names that no other thread or process picks, on this machine or another
    one sharing the folder (replicas: process ids repeat across machines)."""
    import secrets
    import threading

    return f"{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"


# The lock file in a shared folder (the LoRA library): every write to the folder is taken under it.
LOCK_NAME = ".stylemix.lock"
LOCK_TIMEOUT_S = 300.0  # a write waits at most this long for another process's (then a readable error)


def folder_lock(folder: Path):
    """The write lock of a folder that several app processes may share: a file lock (`filelock`),
    re-entrant within a thread, exclusive between threads and processes.

    One lock object per folder and process (`is_singleton`), so nested writes through different
    `LoraLibrary` objects on one folder re-enter instead of waiting for themselves.  On shared
    storage the lock needs a file system with working locks (a local disk, NFSv4, EFS)."""
    from filelock import FileLock

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str((folder / LOCK_NAME).resolve()), timeout=LOCK_TIMEOUT_S, is_singleton=True)


def replace_folder(new: Path, final: Path) -> None:
    """Move a finished temporary folder to `final`, replacing what is there without a moment where
    neither exists: the old folder is moved aside first and removed only after the swap."""
    import shutil

    if final.exists():
        old = final.with_name(f".old-{final.name}-{unique_suffix()}")
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{unique_suffix()}")  # never another writer's temporary file
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
