"""The LoRA library: one folder per LoRA under `loras/`, import, export, rename, remove.

    loras/<name>/pytorch_lora_weights.safetensors   canonical diffusers/peft keys (files.py)
    loras/<name>/stylemix.json                      name, trigger word, rank, alpha, training...
    loras/<name>/style_centroid.safetensors         optional: CLIP style centroid (scoring.py)
    loras/<name>/samples/                           optional: training samples

Names go through `paths.check_name`, so no name can reach outside `loras/`.  Every write goes
to a temporary folder or file first and is renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stylemix import access
from stylemix.lora import files as lora_files
from stylemix.errors import StyleMixError
from stylemix.paths import atomic_write_text, check_name, inside, read_json_object, replace_folder

META_NAME = "stylemix.json"
MAX_META_BYTES = 4 * 1024**2
TRIGGER_MAX = 64


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    def owner(self) -> str | None:
        """The owner's key (access.owner_key), None for a built-in LoRA."""
        return access.lora_owner(self.meta)

    @property
    def visibility(self) -> str:
        return access.visibility(self.meta)

    def summary(self) -> dict:
        return {"name": self.name, "trigger_word": self.trigger_word, "rank": self.meta.get("rank"),
                "visibility": self.visibility, "built_in": self.owner is None,
                "alpha": self.meta.get("alpha"), "base_model": self.meta.get("base_model"),
                "compatible": self.compatible, "problem": self.problem, "sha256": self.meta.get("sha256"),
                "has_centroid": (self.folder / "style_centroid.safetensors").is_file(),
                "samples": self.meta.get("samples", []), "created": self.meta.get("created")}


# --------------------------------------------------------------------------- compatibility


def model_linear_shapes(pipe) -> dict[str, tuple[int, int]]:
    """{'unet.<module>' / 'text_encoder.text_model.<module>': (in_features, out_features)} of every Linear
    a LoRA could target, in the canonical (released SD1.5) naming."""
    shapes = {}
    for prefix, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for name, mod in model.named_modules():
            base = getattr(mod, "base_layer", mod)  # a module already wrapped by peft
            if isinstance(base, torch.nn.Linear) and ".base_layer" not in name and ".lora_" not in name:
                key = lora_files.canonical_text_encoder_key(f"{prefix}.{name}")
                shapes[key] = (base.in_features, base.out_features)
    return shapes


def check_compatible(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]]) -> str | None:
    """None if every LoRA module exists in the base model with matching shapes, else the reason."""
    for mod, (a, b) in lora_files.lora_modules(state).items():
        if mod not in shapes:
            return f"module {mod!r} does not exist in the loaded base model"
        fin, fout = shapes[mod]
        if a.shape[1] != fin or b.shape[0] != fout:
            hint = ""
            if a.shape[1] in (1024, 1280) or b.shape[0] in (1024, 1280):
                hint = " (made for SD2.x or another base model?)"
            return (f"module {mod!r} expects {fin}->{fout} features, the LoRA has "
                    f"{a.shape[1]}->{b.shape[0]}{hint}")
    return None


# --------------------------------------------------------------------------- conversion


def to_canonical(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict, dict, float | None]:
    """Any supported SD1.5 LoRA (diffusers/peft, older diffusers, kohya/A1111) -> canonical keys.

    Returns (state, header metadata, alpha).  Kohya files carry a per-module alpha; it is folded
    into lora_B (scale alpha/rank, which is what every loader applies), so the canonical file needs
    no alpha and loads exactly anywhere.  `alpha` is the original alpha when it was uniform, kept
    for a faithful kohya export.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft

    fmt = lora_files.detect_format(state)
    if fmt == "peft" and all(".lora_A." in k or ".lora_B." in k for k in state):
        out = {lora_files.canonical_text_encoder_key(k): v for k, v in state.items()}
        alphas = lora_files.adapter_alphas(metadata)
        alpha = alphas.get("unet", alphas.get("text_encoder", (None, None)))[1]
        keep = {"lora_adapter_metadata": metadata["lora_adapter_metadata"]} if "lora_adapter_metadata" in metadata else {}
        return out, keep, alpha
    # kohya or older diffusers layouts.  Fold each kohya module's alpha/rank into its lora_up first
    # (what every loader applies), so the converted LoRA needs no alpha at all.
    state, alpha = _fold_kohya_alphas(state) if fmt == "kohya" else (state, None)
    try:
        converted, _ = StableDiffusionPipeline.lora_state_dict(dict(state), unet_config=None)
    except Exception as e:
        raise StyleMixError(f"Could not convert this LoRA to diffusers layout ({e}).") from None
    out: dict[str, torch.Tensor] = {}
    for prefix in ("unet", "text_encoder"):
        part = {k[len(prefix) + 1:]: v for k, v in converted.items() if k.startswith(prefix + ".")}
        if not part:
            continue
        part = convert_unet_state_dict_to_peft(part) if prefix == "unet" else convert_state_dict_to_peft(part)
        for k, v in part.items():
            out[lora_files.canonical_text_encoder_key(f"{prefix}.{k}")] = v.float()
    if not out:
        raise StyleMixError("This LoRA holds no UNet or text-encoder weights StyleMix can use.")
    return out, {}, alpha


def _fold_kohya_alphas(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float | None]:
    out = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    seen = set()
    for k, v in state.items():
        if not k.endswith(".alpha"):
            continue
        base = k[: -len(".alpha")]
        down, up = out.get(base + ".lora_down.weight"), out.get(base + ".lora_up.weight")
        if down is None or up is None:
            raise StyleMixError(f"kohya LoRA key {k!r} has no matching lora_down/lora_up weights.")
        alpha = float(v.item())
        if not lora_files.is_finite_number(alpha):
            raise StyleMixError(f"kohya LoRA key {k!r} has a non-finite alpha.")
        seen.add(alpha)
        out[base + ".lora_up.weight"] = up.float() * (alpha / down.shape[0])
    return out, (seen.pop() if len(seen) == 1 else None)


def to_kohya(state: dict[str, torch.Tensor], metadata: dict[str, str], alpha: float | None) -> tuple[dict, dict]:
    """Canonical -> kohya/A1111 keys (`lora_unet_…`, `lora_te_…`, `.lora_down/.lora_up/.alpha`).

    diffusers' `convert_state_dict_to_kohya` names the SD1 text encoder `lora_te1_` (SDXL's name)
    and writes alpha = rank, dropping the trained alpha; both are corrected here: the trained
    alpha is written and lora_up is left as trained, so kohya's alpha/rank scale reproduces it.
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    alphas = lora_files.adapter_alphas(metadata)
    kohya = convert_state_dict_to_kohya({k: v for k, v in state.items()})
    out = {}
    for k, v in kohya.items():
        k = k.replace("lora_te1_", "lora_te_")
        out[k] = v
    ranks = set()
    for mod, (a, _b) in lora_files.lora_modules(state).items():
        rank = a.shape[0]
        ranks.add(rank)
        scale = lora_files.module_scale(alphas, mod, rank)  # alpha/r the canonical file is loaded with
        kk = convert_state_dict_to_kohya({mod + ".lora_A.weight": a})
        down_key = next(iter(kk)).replace("lora_te1_", "lora_te_")
        out[down_key.split(".")[0] + ".alpha"] = torch.tensor(float(scale * rank))
    net_alpha = alpha if alpha is not None else (next(iter(alphas.values()))[1] if alphas else None)
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"}
    if len(ranks) == 1:
        meta["ss_network_dim"] = str(ranks.pop())
        meta["ss_network_alpha"] = str(net_alpha if net_alpha is not None else meta["ss_network_dim"])
    return out, meta


# --------------------------------------------------------------------------- the library


class LoraLibrary:
    """The LoRA folders under `root`; `shapes` (from `model_linear_shapes`) enables compatibility checks."""

    def __init__(self, root: str | os.PathLike, shapes: dict[str, tuple[int, int]] | None = None,
                 base_model: str | None = None):
        self.root = Path(root)
        self.shapes = shapes
        self.base_model = base_model
        self._compat_cache: dict[tuple[str, str], str | None] = {}
        self._sha_cache: dict[tuple, str] = {}

    def file_sha256(self, path: Path) -> str:
        """sha256 of a weights file, hashed once per (size, mtime) rather than on every request."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._sha_cache:
            self._sha_cache[key] = sha256_file(path)
        return self._sha_cache[key]

    def folder(self, name: str) -> Path:
        return inside(self.root, check_name(name, "LoRA name"))

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.is_symlink() and (d / lora_files.WEIGHTS_NAME).is_file():
                try:
                    out.append(check_name(d.name))
                except StyleMixError:
                    continue  # a hand-made folder with an unsafe name is ignored, never opened
        return out

    def list(self) -> list[LoraEntry]:
        return [self.get(n) for n in self.names()]

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
                    st = (self.root / n / f).stat()
                    out.append((n, f, st.st_mtime_ns, st.st_size))
                except OSError:
                    out.append((n, f, None))
        return tuple(out)

    def get(self, name: str) -> LoraEntry:
        folder = self.folder(name)
        if not (folder / lora_files.WEIGHTS_NAME).is_file():
            known = ", ".join(self.names()) or "none"
            raise StyleMixError(f"No LoRA named {name!r} in {self.root} (known: {known}).")
        meta = _read_meta(folder)
        # the file's own hash, not the one stylemix.json claims: weights replaced by hand beside an old
        # stylemix.json must show (and reload) as what they are; hashed once per size and mtime
        meta["sha256"] = self.file_sha256(folder / lora_files.WEIGHTS_NAME)
        entry = LoraEntry(name=name, folder=folder, meta=meta)
        if self.shapes is not None:
            key = (name, meta["sha256"])
            if key not in self._compat_cache:
                try:
                    state, _ = lora_files.read_lora_file(entry.weights)
                    self._compat_cache[key] = check_compatible(state, self.shapes)
                except StyleMixError as e:
                    self._compat_cache[key] = str(e)
            entry.problem = self._compat_cache[key]
            entry.compatible = entry.problem is None
        return entry

    # ---------------------------------------------------------------- writes

    def add(self, name: str, state: dict[str, torch.Tensor], header: dict[str, str], meta: dict,
            overwrite: bool = False, extra_files: dict[str, Path] | None = None) -> LoraEntry:
        """Write a new LoRA folder atomically (temp folder, then rename)."""
        folder = self.folder(name)
        if folder.exists() and not overwrite:
            raise StyleMixError(f"A LoRA named {name!r} already exists; choose another name or remove it first.")
        if self.shapes is not None:
            problem = check_compatible(state, self.shapes)
            if problem:
                raise StyleMixError(f"LoRA {name!r} does not fit the loaded base model: {problem}.")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}"
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
            replace_folder(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self.get(name)

    def import_file(self, src: str | os.PathLike, name: str, trigger_word: str | None = None,
                    overwrite: bool = False, extra_meta: dict | None = None) -> LoraEntry:
        """Import a `.safetensors` LoRA (diffusers/peft or kohya/A1111 layout) under `name`."""
        check_name(name, "LoRA name")
        trigger_word = check_trigger(trigger_word)
        src = Path(src)
        if src.suffix.lower() != ".safetensors":
            raise StyleMixError(f"{src.name}: only .safetensors LoRA files can be imported (pickle files can run code).")
        state, metadata = lora_files.read_lora_file(src)
        fmt = lora_files.detect_format(state)
        canonical, header, alpha = to_canonical(state, metadata)
        meta = {"trigger_word": trigger_word or _trigger_from_kohya(metadata), "base_model": self.base_model,
                "alpha": alpha, "source": {"file": src.name, "format": fmt}, **(extra_meta or {})}
        return self.add(name, canonical, header, meta, overwrite=overwrite)

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
        src, dst = self.get(old).folder, self.folder(new)
        if dst.exists():
            raise StyleMixError(f"A LoRA named {new!r} already exists.")
        meta = _read_meta(src)
        meta["name"] = new
        atomic_write_text(src / META_NAME, json.dumps(meta, indent=2, sort_keys=True))
        os.replace(src, dst)
        return self.get(new)

    def remove(self, name: str) -> None:
        folder = self.get(name).folder
        trash = folder.with_name(f".removed-{name}-{time.monotonic_ns()}")
        os.replace(folder, trash)  # atomic: the LoRA disappears at once, the delete can take its time
        shutil.rmtree(trash, ignore_errors=True)

    def set_access(self, name: str, owner: str | None = None, visibility: str | None = None) -> LoraEntry:
        """Record a LoRA's owner key and/or visibility in its stylemix.json (the service checks who may)."""
        entry = self.get(name)
        meta = _read_meta(entry.folder)
        if owner is not None:
            meta["owner"] = owner
        if visibility is not None:
            meta["visibility"] = access.check_visibility(visibility)
        atomic_write_text(entry.folder / META_NAME, json.dumps(meta, indent=2, sort_keys=True))
        return self.get(name)

    def set_trigger_word(self, name: str, trigger_word: str | None) -> LoraEntry:
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
    # kohya records caption tags with their frequency; the most frequent single word is the trigger
    try:
        freq = json.loads(metadata.get("ss_tag_frequency", "{}"))
        counts: dict[str, int] = {}
        for tags in freq.values():
            for tag, n in tags.items():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
        best = max(counts, key=counts.get) if counts else None
        return check_trigger(best) if best else None
    except (ValueError, TypeError, AttributeError, StyleMixError):
        return None


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
