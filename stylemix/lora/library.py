"""The LoRA library: one folder per LoRA under `loras/`, import, export, rename, remove.

    loras/<name>/pytorch_lora_weights.safetensors   canonical diffusers/peft keys (files.py)
    loras/<name>/stylemix.json                      name, trigger word, rank, alpha, training...
    loras/<name>/style_centroid.safetensors         optional: CLIP style centroid (scoring.py)
    loras/<name>/samples/                           optional: training samples

Names go through `paths.check_name`, so no name can reach outside `loras/`.  Every write goes
to a temporary folder or file first and is renamed into place.

Several app processes (replicas) may share one library folder.  Every write is taken under the
folder's file lock (`LoraLibrary.lock`, held by the service across its checks too: a name taken or
an owner checked stays so until the write is done), and nothing about the folder is kept in memory
except hashes keyed by each file's size, mtime and inode: every listing reads the folder again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from stylemix import access
from stylemix.lora import files as lora_files
from stylemix.lora import layouts
from stylemix.lora.canonical import canonical_state, describe, tag_counts, to_kohya
from stylemix.lora.names import Target, sd15_targets
from stylemix.lora.update import mismatch
from stylemix.errors import StyleMixError
from stylemix.paths import (VERSIONS_DIR, atomic_write_text, check_lora_name, check_name, folder_lock, inside,
                            read_json_object, replace_folder, sha256_file, split_version, unique_suffix,
                            version_name)

META_NAME = "stylemix.json"
MAX_META_BYTES = 4 * 1024**2
TRIGGER_MAX = 64
MAX_SOURCE_NAME = 200


@dataclass
class LoraEntry:
    name: str
    folder: Path
    meta: dict = field(default_factory=dict)
    compatible: bool = True
    problem: str | None = None  # why it is not usable with the loaded base model

    @property
    def weights(self) -> Path:
        return self.folder / lora_files.WEIGHTS_NAME

    @property
    def trigger_word(self) -> str | None:
        t = self.meta.get("trigger_word")
        return t if isinstance(t, str) and t else None

    @property
    def sha256(self) -> str:
        return self.meta["sha256"]  # set by LoraLibrary.get from the file itself

    @property
    def short_hash(self) -> str:
        """The first 12 hex digits of the file's sha256, as A1111's 'Lora hashes' show it."""
        return self.sha256[:12]

    @property
    def kind(self) -> str:
        return self.meta.get("kind") or "LoRA"  # LoRAs trained here are plain LoRAs

    @property
    def covers(self) -> list[str]:
        """'UNet attention' / 'UNet all' and 'text encoder': what the LoRA changes."""
        if isinstance(self.meta.get("covers"), list):
            return self.meta["covers"]
        targets = self.meta.get("target_modules") or {}
        return (["UNet attention"] if "unet" in targets else []) + (["text encoder"] if "text_encoder" in targets else [])

    @property
    def made_for(self) -> str | None:
        """The base model the LoRA was trained on, as its file says (kohya metadata), else as recorded here."""
        kohya = self.meta.get("kohya") or {}
        return kohya.get("ss_sd_model_name") or kohya.get("ss_base_model_version") or self.meta.get("base_model")

    @property
    def owner(self) -> str | None:
        """The owner's key (access.owner_key), None for a built-in LoRA."""
        return access.lora_owner(self.meta)

    @property
    def visibility(self) -> str:
        return access.visibility(self.meta)

    def summary(self) -> dict:
        rank = self.meta.get("rank")
        return {"name": self.name, "trigger_word": self.trigger_word, "rank": rank,
                "ranks": self.meta.get("ranks") or ([rank] if rank is not None else []),
                "kind": self.kind, "covers": self.covers, "made_for": self.made_for,
                "kohya": self.meta.get("kohya") or {},
                "visibility": self.visibility, "built_in": self.owner is None,
                "alpha": self.meta.get("alpha"), "base_model": self.meta.get("base_model"),
                "compatible": self.compatible, "problem": self.problem, "sha256": self.meta.get("sha256"),
                "has_centroid": (self.folder / "style_centroid.safetensors").is_file(),
                "samples": self.meta.get("samples", []), "created": self.meta.get("created")}


# --------------------------------------------------------------------------- compatibility


def check_compatible(state: dict[str, torch.Tensor], targets: dict[str, Target]) -> str | None:
    """None if every layer of a canonical LoRA exists in the base model with matching shapes, else the reason."""
    for mod, (a, b) in lora_files.lora_modules(state).items():
        t = targets.get(mod)
        if t is None:
            return f"module {mod!r} does not exist in the loaded base model"
        kernel = tuple(a.shape[2:]) or (1, 1)
        if (a.shape[1] != t.in_features or b.shape[0] != t.out_features or kernel != t.kernel
                or (a.dim() == 2) != (t.kind == "linear")):
            return mismatch(t, a.shape[1], b.shape[0], kernel)
    return None


# --------------------------------------------------------------------------- the library


class LoraLibrary:
    """The LoRA folders under `root`; `targets` (the loaded model's layers, `names.pipeline_targets`) enables
    compatibility checks and sizes imports."""

    def __init__(self, root: str | os.PathLike, targets: dict[str, Target] | None = None,
                 base_model: str | None = None):
        self.root = Path(root)
        self.targets = targets
        self.base_model = base_model
        self._compat_cache: dict[tuple[str, str], str | None] = {}
        self._sha_cache: dict[tuple, str] = {}

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the library's write lock (all threads and processes on this folder; re-entrant).

        The service takes it around a check and the change it allows (a free name, then the import;
        an owner, then the rename), so another app process sharing the folder cannot slip in between."""
        from filelock import Timeout

        lock = folder_lock(self.root)
        try:
            lock.acquire()
        except Timeout:
            raise StyleMixError("The LoRA library is busy (another app process is changing it); try again "
                                "in a minute.") from None
        try:
            yield
        finally:
            lock.release()

    def file_sha256(self, path: Path) -> str:
        """sha256 of a weights file, hashed once per (size, mtime, inode) rather than on every request
        (the inode: another process may swap in a same-sized file within one timestamp tick)."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in self._sha_cache:
            self._sha_cache[key] = sha256_file(path)
        return self._sha_cache[key]

    def folder(self, name: str) -> Path:
        """loras/<name>/, or loras/<base>/versions/eNN/ for an epoch version <base>@eNN."""
        base, version = split_version(check_lora_name(name))
        if version is None:
            return inside(self.root, name)
        return inside(self.root, base, VERSIONS_DIR, version)

    def names(self) -> list[str]:
        """Every LoRA, each followed by its epoch versions (<name>@eNN, from a --save-every-epochs run)."""
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.is_symlink() and (d / lora_files.WEIGHTS_NAME).is_file():
                try:
                    out.append(check_name(d.name))
                except StyleMixError:
                    continue  # a hand-made folder with an unsafe name is ignored, never opened
                out += self.versions(d.name)
        return out

    def versions(self, name: str) -> list[str]:
        """The epoch versions of LoRA `name` (<name>@e05, ...), oldest first."""
        root = self.root / name / VERSIONS_DIR
        if not root.is_dir() or root.is_symlink():
            return []
        found = []
        for d in root.iterdir():
            if (d.name[:1] == "e" and d.name[1:].isdigit() and d.is_dir() and not d.is_symlink()
                    and (d / lora_files.WEIGHTS_NAME).is_file()):
                found.append(int(d.name[1:]))
        return [version_name(name, e) for e in sorted(found)]

    def list(self) -> list[LoraEntry]:
        out = []
        for n in self.names():
            try:
                out.append(self.get(n))
            except StyleMixError:
                continue  # removed or renamed (by another process) since the folder was listed
        return out

    def visible_to(self, owner: str | None) -> list[LoraEntry]:
        """The LoRAs `owner` may see and use: shared ones and their own private ones."""
        return [e for e in self.list() if access.can_see(e.meta, owner)]

    def version(self) -> tuple:
        """Changes whenever a LoRA is added, removed, renamed, replaced or its stylemix.json rewritten
        (also by a training process): a few stat calls, cheap enough to poll every second."""
        if not self.root.is_dir():
            return ()
        out = [self.root.stat().st_mtime_ns]
        for n in self.names():
            for f in (META_NAME, lora_files.WEIGHTS_NAME):
                try:
                    st = (self.folder(n) / f).stat()
                    out.append((n, f, st.st_mtime_ns, st.st_size))
                except OSError:
                    out.append((n, f, None))
        return tuple(out)

    def get(self, name: str) -> LoraEntry:
        try:
            return self._get(name)
        except FileNotFoundError:  # removed or renamed by another process while being read
            raise StyleMixError(f"No LoRA named {name!r} in {self.root} (it was just removed or renamed).") from None

    def _get(self, name: str) -> LoraEntry:
        folder = self.folder(name)
        if not (folder / lora_files.WEIGHTS_NAME).is_file():
            known = ", ".join(self.names()) or "none"
            raise StyleMixError(f"No LoRA named {name!r} in {self.root} (known: {known}).")
        meta = _read_meta(folder)
        base, version = split_version(name)
        if version is not None:
            # a version belongs to its LoRA: same owner, visibility and trigger word, whatever its file says
            parent = _read_meta(self.folder(base))
            meta.update({k: parent.get(k) for k in ("owner", "visibility", "trigger_word")})
            meta.update(name=name, version_of=base)
        # the file's own hash, not the one stylemix.json claims: weights replaced by hand beside an old
        # stylemix.json must show (and reload) as what they are; hashed once per size and mtime
        meta["sha256"] = self.file_sha256(folder / lora_files.WEIGHTS_NAME)
        entry = LoraEntry(name=name, folder=folder, meta=meta)
        if self.targets is not None:
            key = (name, meta["sha256"])
            if key not in self._compat_cache:
                try:
                    state, _ = lora_files.read_lora_file(entry.weights)
                    self._compat_cache[key] = check_compatible(state, self.targets)
                except StyleMixError as e:
                    self._compat_cache[key] = str(e)
            entry.problem = self._compat_cache[key]
            entry.compatible = entry.problem is None
        return entry

    # ---------------------------------------------------------------- writes

    def add(self, name: str, state: dict[str, torch.Tensor], header: dict[str, str], meta: dict,
            overwrite: bool = False, extra_files: dict[str, Path] | None = None) -> LoraEntry:
        """Write a new LoRA folder atomically (temp folder, then rename, under the library's lock)."""
        folder = self.folder(check_name(name, "LoRA name"))  # never a version: those come with their LoRA
        if folder.exists() and not overwrite:  # checked again under the lock, before the rename
            raise StyleMixError(f"A LoRA named {name!r} already exists; choose another name or remove it first.")
        if self.targets is not None:
            problem = check_compatible(state, self.targets)
            if problem:
                raise StyleMixError(f"LoRA {name!r}: {problem}.")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{name}-{unique_suffix()}"
        tmp.mkdir()
        try:
            lora_files.write_safetensors(tmp / lora_files.WEIGHTS_NAME, state, header or None)
            for rel, src in (extra_files or {}).items():
                dst = inside(tmp, *Path(rel).parts)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            meta = {**meta, "name": name, "sha256": sha256_file(tmp / lora_files.WEIGHTS_NAME)}
            meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            modules = lora_files.lora_modules(state)
            ranks = sorted({a.shape[0] for a, _ in modules.values()})
            meta.setdefault("rank", ranks[0] if len(ranks) == 1 else ranks)
            meta.setdefault("target_modules", _target_summary(modules))
            atomic_write_text(tmp / META_NAME, json.dumps(meta, indent=2, sort_keys=True))
            with self.lock():
                if folder.exists() and not overwrite:  # another process took the name meanwhile
                    raise StyleMixError(f"A LoRA named {name!r} already exists; choose another name or remove "
                                        "it first.")
                replace_folder(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        # what was just checked and hashed need not be read back (a 100 MB LoCon: ~1 s saved)
        weights = folder / lora_files.WEIGHTS_NAME
        st = weights.stat()
        self._sha_cache[(str(weights), st.st_size, st.st_mtime_ns, st.st_ino)] = meta["sha256"]
        if self.targets is not None:
            self._compat_cache[(name, meta["sha256"])] = None
        return self.get(name)

    def import_file(self, src: str | os.PathLike, name: str, trigger_word: str | None = None,
                    overwrite: bool = False, extra_meta: dict | None = None) -> LoraEntry:
        """Import a `.safetensors` LoRA in any supported layout (docs/lora-formats.md) under `name`.

        Every layer is converted to the canonical layout exactly; nothing is written unless the
        whole file converts and fits the model.  `extra_meta` (the owner, visibility) is recorded too.
        """
        check_name(name, "LoRA name")
        trigger_word = check_trigger(trigger_word)
        src = Path(src)
        if src.suffix.lower() != ".safetensors":
            raise StyleMixError(f"{src.name}: only .safetensors LoRA files can be imported (pickle files can run code).")
        state, metadata = lora_files.read_lora_file(src)
        try:
            fmt, updates = layouts.layers(state, metadata, self.import_targets())
        except StyleMixError as e:
            raise StyleMixError(f"{src.name}: {e}") from None
        canonical, header = canonical_state(updates)
        info = describe(updates, fmt, metadata)
        alpha = lora_files.adapter_alpha(metadata) if fmt == "diffusers" else _uniform_alpha(state)
        meta = {"trigger_word": trigger_word or _trigger_from_kohya(metadata), "base_model": self.base_model,
                "alpha": alpha, "source": {"file": src.name[:MAX_SOURCE_NAME], "format": fmt}, **info,
                **(extra_meta or {})}
        meta["rank"] = info["ranks"][0] if len(info["ranks"]) == 1 else info["ranks"]
        return self.add(name, canonical, header, meta, overwrite=overwrite)

    def import_targets(self) -> dict[str, Target]:
        """The loaded model's layers; without a model, SD1.5's names with widths taken on trust from the file."""
        if self.targets is not None:
            return self.targets
        return {k: Target(k, t.kind, 0, 0, t.kernel) for k, t in sd15_targets().items()}

    def import_hub(self, repo_id: str, name: str, filename: str | None = None, trigger_word: str | None = None,
                   overwrite: bool = False) -> LoraEntry:
        """Download a `.safetensors` LoRA from a Hugging Face Hub repo (needs network) and import it."""
        from huggingface_hub import hf_hub_download, list_repo_files

        try:
            if filename is None:
                files = [f for f in list_repo_files(repo_id) if f.endswith(".safetensors")]
                if not files:
                    raise StyleMixError(f"Hub repo {repo_id!r} has no .safetensors file.")
                filename = lora_files.WEIGHTS_NAME if lora_files.WEIGHTS_NAME in files else files[0]
            if not filename.endswith(".safetensors"):
                raise StyleMixError(f"{filename!r}: only .safetensors files are imported.")
            local = hf_hub_download(repo_id, filename)
        except StyleMixError:
            raise
        except Exception as e:
            raise StyleMixError(f"Could not download {repo_id!r} from the Hugging Face Hub "
                                f"({type(e).__name__}); check the repo id and your connection.") from None
        return self.import_file(local, name, trigger_word=trigger_word, overwrite=overwrite)

    def export(self, name: str, dest: str | os.PathLike, fmt: str = "diffusers") -> Path:
        """Write the LoRA's weights to `dest` in 'diffusers' (canonical) or 'kohya' layout."""
        entry = self.get(name)
        state, metadata = lora_files.read_lora_file(entry.weights)
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"{name}.safetensors"
        if dest.suffix != ".safetensors":
            raise StyleMixError(f"Export target {dest.name!r} must end in .safetensors.")
        if fmt == "diffusers":
            lora_files.write_safetensors(dest, state, metadata or None)
        elif fmt == "kohya":
            alpha = entry.meta.get("alpha")
            kohya, kmeta = to_kohya(state, metadata, float(alpha) if lora_files.is_finite_number(alpha) else None)
            if entry.trigger_word:
                kmeta["ss_tag_frequency"] = json.dumps({entry.trigger_word: {entry.trigger_word: 1}})
            kmeta["ss_output_name"] = name
            lora_files.write_safetensors(dest, kohya, kmeta)
        else:
            raise ValueError(f"Unknown export format {fmt!r}; choose 'diffusers' or 'kohya'.")
        return dest

    def rename(self, old: str, new: str) -> LoraEntry:
        """Rename a LoRA; its epoch versions (in its folder) follow it."""
        base, version = split_version(old)
        if version is not None:
            raise StyleMixError(f"{old!r} is an epoch version of {base!r}: rename {base!r} and its versions follow.")
        with self.lock():
            src, dst = self.get(old).folder, self.folder(check_name(new, "LoRA name"))
            if dst.exists():
                raise StyleMixError(f"A LoRA named {new!r} already exists.")
            meta = _read_meta(src)
            meta["name"] = new
            atomic_write_text(src / META_NAME, json.dumps(meta, indent=2, sort_keys=True))
            os.replace(src, dst)
            return self.get(new)

    def remove(self, name: str) -> None:
        """Remove a LoRA with its epoch versions, or one version alone."""
        with self.lock():
            folder = self.get(name).folder
            trash = folder.with_name(f".removed-{name}-{unique_suffix()}")
            os.replace(folder, trash)  # atomic: the LoRA disappears at once, the delete can take its time
        shutil.rmtree(trash, ignore_errors=True)

    def set_access(self, name: str, owner: str | None = None, visibility: str | None = None) -> LoraEntry:
        """Record a LoRA's owner key and/or visibility in its stylemix.json (the service checks who may)."""
        with self.lock():  # read, change, write: another process's change in between would be lost
            entry = self.get(name)
            meta = _read_meta(entry.folder)
            if owner is not None:
                meta["owner"] = owner
            if visibility is not None:
                meta["visibility"] = access.check_visibility(visibility)
            atomic_write_text(entry.folder / META_NAME, json.dumps(meta, indent=2, sort_keys=True))
            return self.get(name)

    def set_trigger_word(self, name: str, trigger_word: str | None) -> LoraEntry:
        with self.lock():
            entry = self.get(name)
            meta = dict(entry.meta)
            meta["trigger_word"] = check_trigger(trigger_word)
            atomic_write_text(entry.folder / META_NAME, json.dumps(meta, indent=2, sort_keys=True))
            return self.get(name)


def check_trigger(word: str | None) -> str | None:
    if word is None or word == "":
        return None
    if not isinstance(word, str) or len(word) > TRIGGER_MAX or not all(c.isalnum() or c in "_-" for c in word):
        raise StyleMixError(f"Invalid trigger word {word!r}: one word of letters, digits, '_' or '-'.")
    return word


def _trigger_from_kohya(metadata: dict[str, str]) -> str | None:
    """kohya records caption tags with their frequency; the most frequent tag that is one word is the trigger."""
    for tag, _n in tag_counts(metadata).most_common():
        try:
            if check_trigger(tag):
                return tag
        except StyleMixError:
            continue
    return None


def _uniform_alpha(state: dict[str, torch.Tensor]) -> float | None:
    """A kohya file's alpha when every layer has the same one (kept for a faithful kohya export)."""
    alphas = {float(v.float().item()) for k, v in state.items() if k.endswith(".alpha") and v.numel() == 1}
    return alphas.pop() if len(alphas) == 1 and lora_files.is_finite_number(next(iter(alphas))) else None


def _read_meta(folder: Path) -> dict:
    path = folder / META_NAME
    if not path.is_file():
        return {"name": folder.name}
    meta = read_json_object(path, MAX_META_BYTES)
    if meta.get("trigger_word") is not None:
        try:
            check_trigger(meta["trigger_word"])
        except StyleMixError:
            meta["trigger_word"] = None  # never let a hostile trigger word into a prompt
    return meta


def _target_summary(modules: dict) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {"unet": set(), "text_encoder": set()}
    for mod in modules:
        comp = "text_encoder" if mod.startswith("text_encoder.") else "unet"
        leaf = mod.rsplit(".", 2)
        out[comp].add(".".join(leaf[-2:]) if leaf[-1].isdigit() else leaf[-1])
    return {k: sorted(v) for k, v in out.items() if v}
