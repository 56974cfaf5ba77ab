"""`stylemix judge install csd`: the released CSD weights, converted once into a checked safetensors file.

CSD's weights are published as a pickle (`pytorch_model.bin` on the Hub repo
tomg-group-umd/CSD-ViT-L; a Google-Drive `.pth` wrapping them as
`{"model_state_dict": {"module.backbone...": ...}}`).  A pickle can run code, so it is read
here exactly once, with `torch.load(weights_only=True)` (which refuses any object but tensors
and plain containers), every entry checked to be a tensor of the shape the architecture expects,
then written as safetensors beside a small JSON record of its sha256 and source.  Serving only
ever reads that safetensors file, after checking its sha256 against the record.

Files (per judge folder: $STYLEMIX_JUDGE_DIR, else <HF_HOME>/stylemix/judges, the Hugging Face
cache root that open_clip's CLIP weights are cached under too):
    csd-vit-l.safetensors   the weights, keys as in CSD's code (`backbone.*`, `last_layer_*`)
    csd-vit-l.json          {"sha256", "size", "source", "source_size", "source_sha256", ...}

Every write goes to a temporary file in that folder and is renamed into place: a failure at any
point (unreadable source, refused pickle, wrong keys or shapes, disk full) installs nothing and
leaves an earlier install as it was.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import torch

from stylemix.errors import StyleMixError
from stylemix.paths import sha256_file
from stylemix.models import pick_device
from stylemix.scores.clip_models import HUB_PROBE_TIMEOUT_S, ScorerUnavailable
from stylemix.scores.csd import (CSD_VIT_L, CsdConfig, CsdScorer, check_state_dict, csd_scorer_from_file,
                                 tiny_csd_scorer)

logger = logging.getLogger("stylemix")

HUB_REPO = "tomg-group-umd/CSD-ViT-L"
HUB_FILE = "pytorch_model.bin"
JUDGE_DIR_ENV = "STYLEMIX_JUDGE_DIR"
RECORD_FORMAT = "stylemix-judge-install"
WEIGHTS_FORMAT = "stylemix-csd"
MAX_SOURCE_BYTES = 4 * 1024**3  # the ViT-L checkpoint is ~1.2 GB in fp32; a bigger file is not CSD
REINSTALL = "reinstall with `stylemix judge install csd`"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def judge_dir(folder: str | os.PathLike | None = None) -> Path:
    """Where installed judges live: `folder`, else $STYLEMIX_JUDGE_DIR, else <HF_HOME>/stylemix/judges."""
    if folder:
        return Path(folder).expanduser()
    if os.environ.get(JUDGE_DIR_ENV):
        return Path(os.environ[JUDGE_DIR_ENV]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "stylemix" / "judges"


def weights_path(folder: str | os.PathLike | None = None, cfg: CsdConfig = CSD_VIT_L) -> Path:
    return judge_dir(folder) / f"{cfg.name.lower()}.safetensors"


def record_path(folder: str | os.PathLike | None = None, cfg: CsdConfig = CSD_VIT_L) -> Path:
    return judge_dir(folder) / f"{cfg.name.lower()}.json"


def is_installed(folder: str | os.PathLike | None = None, cfg: CsdConfig = CSD_VIT_L) -> bool:
    """Both files are there (cheap: the hash is checked when the judge loads)."""
    return weights_path(folder, cfg).is_file() and record_path(folder, cfg).is_file()


def read_record(folder: str | os.PathLike | None = None, cfg: CsdConfig = CSD_VIT_L) -> dict:
    """The install record, checked for form; ScorerUnavailable when CSD is not (properly) installed."""
    path, weights = record_path(folder, cfg), weights_path(folder, cfg)
    if not path.is_file() or not weights.is_file():
        raise ScorerUnavailable(f"CSD is not installed (no {weights}): install it with `stylemix judge install csd`.")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ScorerUnavailable(f"{path}: unreadable install record ({e}); {REINSTALL}.") from None
    ok = (isinstance(record, dict) and record.get("format") == RECORD_FORMAT and record.get("arch") == cfg.name
          and record.get("file") == weights.name and isinstance(record.get("sha256"), str)
          and _SHA256.fullmatch(record["sha256"]) is not None)
    if not ok:
        raise ScorerUnavailable(f"{path}: not a valid install record for {cfg.name}; {REINSTALL}.")
    return record


def load_installed(device: str | torch.device = "cpu", folder: str | os.PathLike | None = None,
                   cfg: CsdConfig = CSD_VIT_L) -> CsdScorer:
    """The installed CSD, its sha256 checked against the record first: no other file is ever read."""
    from stylemix.lora.files import check_safetensors_header

    record = read_record(folder, cfg)
    path = weights_path(folder, cfg)
    if sha256_file(path) != record["sha256"]:
        raise ScorerUnavailable(f"{path}: its sha256 does not match the one recorded at install (the file was "
                                f"changed or damaged); {REINSTALL}.")
    try:
        check_safetensors_header(path, max_bytes=MAX_SOURCE_BYTES)
    except StyleMixError as e:
        raise ScorerUnavailable(f"{e} {REINSTALL[0].upper()}{REINSTALL[1:]}.") from None
    scorer = csd_scorer_from_file(path, record["sha256"], device, cfg)
    logger.info("Loaded the CSD style judge %s from %s.", scorer.name, path)
    return scorer


# --------------------------------------------------------------------------- reading the release


def read_released(path: str | os.PathLike, cfg: CsdConfig = CSD_VIT_L) -> tuple[dict[str, torch.Tensor], str]:
    """(the state dict, its layout) of a released CSD file, checked strictly; StyleMixError otherwise.

    Layouts: a bare state dict (the Hub's pytorch_model.bin), `{"model_state_dict": ...}` or
    `{"state_dict": ...}` (training checkpoints); keys may carry DataParallel's `module.` prefix,
    stripped as CSD's own `convert_state_dict` does.  A `.safetensors` file is read without pickle.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise StyleMixError(f"{path}: no such file.")
    size = path.stat().st_size
    if size > MAX_SOURCE_BYTES:
        raise StyleMixError(f"{path.name}: {size / 1e9:.1f} GB is too large for CSD weights.")
    if path.suffix == ".safetensors":
        obj = _read_safetensors(path)
    else:
        obj = _read_pickle(path)
    if not isinstance(obj, dict):
        raise StyleMixError(f"{path.name}: holds a {type(obj).__name__}, not a state dict.")
    layout = "state_dict"
    for wrapper in ("model_state_dict", "state_dict"):
        if isinstance(obj.get(wrapper), dict):
            obj, layout = obj[wrapper], wrapper
            break
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise StyleMixError(f"{path.name}: refused: key {key!r} is a {type(key).__name__}, not a name.")
        if not isinstance(value, torch.Tensor):
            raise StyleMixError(f"{path.name}: refused: entry {key!r} is a {type(value).__name__}, not a tensor "
                                "(a CSD state dict holds tensors only).")
        tensors[key.removeprefix("module.")] = value
    check_state_dict(tensors, cfg, what=f"{path.name}'s weights")
    return tensors, layout


def _read_pickle(path: Path):
    try:
        # weights_only: the restricted unpickler; any class, function or reduce call is refused unrun.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it names {m.group(1)}" if m else str(e).strip().splitlines()[-1][:200]
        raise StyleMixError(f"{path.name}: refused: it holds something other than tensors ({what}); StyleMix "
                            "never runs code from a pickle.") from None
    except Exception as e:  # truncated zip, EOF, not a checkpoint at all
        raise StyleMixError(f"{path.name}: not a complete PyTorch checkpoint ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:160]}).") from None


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    from stylemix.lora.files import check_safetensors_header

    check_safetensors_header(path, max_bytes=MAX_SOURCE_BYTES)
    try:
        return load_file(str(path))
    except Exception as e:
        raise StyleMixError(f"{path.name}: unreadable safetensors ({type(e).__name__}: {str(e)[:160]}).") from None


# --------------------------------------------------------------------------- installing


def install_csd(source: str | os.PathLike | None = None, folder: str | os.PathLike | None = None,
                cfg: CsdConfig = CSD_VIT_L, cache_dir: str | os.PathLike | None = None) -> dict:
    """Convert the released CSD weights (`source`, else the Hub's) into the judge folder; returns the record.

    Raises StyleMixError with one message, and installs nothing, when the source is unreadable,
    refused (anything but tensors), or does not fit the architecture.
    """
    from safetensors.torch import save_file

    src = Path(source).expanduser() if source else _fetch_release(cache_dir)
    what = str(src) if source else f"hub:{HUB_REPO}/{HUB_FILE}"
    tensors, layout = read_released(src, cfg)
    weights, record = weights_path(folder, cfg), record_path(folder, cfg)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp_w = weights.with_name(f".{weights.name}.tmp-{os.getpid()}")
    tmp_r = record.with_name(f".{record.name}.tmp-{os.getpid()}")
    try:
        # Deterministic bytes: the same source always gives the same sha256, so the judge's name, and the
        # centroids keyed by it, survive a reinstall.  Hence no date, and one metadata entry (safetensors
        # writes its metadata map in hash order: two entries come out in either order).
        save_file(_unshared(tensors), str(tmp_w), metadata={"format": f"{WEIGHTS_FORMAT}/{cfg.name}"})
        _check_written(tmp_w, cfg)
        info = {"format": RECORD_FORMAT, "judge": "csd", "arch": cfg.name, "file": weights.name,
                "sha256": sha256_file(tmp_w), "size": tmp_w.stat().st_size, "source": what,
                "source_size": src.stat().st_size, "source_sha256": sha256_file(src), "layout": layout,
                "tensors": len(tensors),
                "installed": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        tmp_r.write_text(json.dumps(info, indent=1), encoding="utf-8")
        os.replace(tmp_w, weights)  # the weights first: a crash between the two leaves a hash mismatch, never
        os.replace(tmp_r, record)   # a record vouching for a file it did not check
    finally:
        for tmp in (tmp_w, tmp_r):
            tmp.unlink(missing_ok=True)

    clear_csd_cache()
    logger.info("Installed CSD %s/%s from %s into %s.", cfg.name, info["sha256"][:12], what, weights)
    return info


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory: copy only those that do."""
    seen, out = set(), {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.detach().clone().contiguous() if ptr in seen else v.detach().contiguous()
        seen.add(ptr)
    return out


def _check_written(path: Path, cfg: CsdConfig) -> None:
    """Read back what was written (header and shapes) before it is renamed into place."""
    from safetensors import safe_open

    from stylemix.lora.files import check_safetensors_header

    check_safetensors_header(path, max_bytes=MAX_SOURCE_BYTES)
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    check_state_dict(shapes, cfg, what=f"the converted file {path.name}")


def _fetch_release(cache_dir: str | os.PathLike | None) -> Path:
    """The Hub's pytorch_model.bin: from the Hugging Face cache, else downloaded, else a clear reason."""
    from huggingface_hub import constants, hf_hub_download

    kwargs = {"repo_id": HUB_REPO, "filename": HUB_FILE, "cache_dir": str(cache_dir) if cache_dir else None}
    try:
        return Path(hf_hub_download(**kwargs, local_files_only=True))
    except Exception:
        pass  # not cached yet
    what = f"CSD weights ({HUB_REPO}/{HUB_FILE})"
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        raise StyleMixError(f"{what} are not in the local cache and HF_HUB_OFFLINE is set; download the file "
                            "elsewhere and use `stylemix judge install csd --from FILE`.")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise StyleMixError(f"{what} are not cached and {host} cannot be reached ({e}); use "
                            "`stylemix judge install csd --from FILE`.") from None
    try:
        return Path(hf_hub_download(**kwargs))
    except Exception as e:
        raise StyleMixError(f"{what} could not be downloaded ({type(e).__name__}: {str(e).strip()[:200]}).") from None


# --------------------------------------------------------------------------- loading, cached

_cache: dict[tuple, CsdScorer] = {}
_cache_lock = threading.Lock()


def load_csd_scorer(device: str | torch.device | None = None, tiny: bool = False,
                    judge_dir: str | Path | None = None, cfg: CsdConfig = CSD_VIT_L) -> CsdScorer:
    """The CSD scorer, loaded once per (device, install) and cached: the tiny random one for the tiny
    base model, else the installed weights.  Raises ScorerUnavailable (not installed, hash mismatch,
    bad file) with what to do."""
    dev = pick_device(str(device) if device is not None else None)
    if tiny:
        key = ("tiny", str(dev))
    else:
        record = read_record(judge_dir, cfg)  # raises when not installed
        key = (str(weights_path(judge_dir, cfg)), record["sha256"], str(dev))
    with _cache_lock:
        if key not in _cache:
            _cache[key] = tiny_csd_scorer(dev) if tiny else load_installed(dev, judge_dir, cfg)
        return _cache[key]


def clear_csd_cache() -> None:
    with _cache_lock:
        _cache.clear()
