"""Checkpoints of a run: `<work_dir>/checkpoints/step-XXXXXX/` with the LoRA and optimizer state
(safetensors) and the schedule and progress (JSON).

Each is written to a temp folder, marked COMPLETE, then renamed, so a process killed while saving
never leaves a checkpoint that gets picked; `load_checkpoint` puts a run back exactly where it was.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch

from stylemix.errors import StyleMixError
from stylemix.lora.files import write_safetensors

CHECKPOINT_MARKER = "COMPLETE"  # written last, before the rename: a folder without it is never used
DIE_DURING_SAVE_ENV = "STYLEMIX_TEST_DIE_DURING_CHECKPOINT"  # test hook: os._exit mid-save at this step

# Settings that change the optimisation: a checkpoint may only be resumed with the same values.
RESUME_KEYS = ("model", "network", "rank", "alpha", "conv_rank", "conv_alpha", "unet_targets", "text_targets",
               "train_text_encoder", "learning_rate", "optimizer", "prodigy_d_coef", "prodigy_safeguard_warmup",
               "prodigy_use_bias_correction", "epochs", "max_steps", "batch_size", "grad_accumulation",
               "lr_scheduler", "lr_warmup_steps", "seed", "resolution", "random_flip", "min_snr_gamma",
               "noise_offset", "shuffle_caption", "keep_tokens", "caption_dropout_rate", "caption_tag_dropout_rate")


def changed_settings(saved: dict, config: dict) -> list[str]:
    """The RESUME_KEYS whose value differs between a checkpoint's run and this one (missing keys: defaults)."""
    return [k for k in RESUME_KEYS if k in saved and saved[k] != config[k]]


def trainable_state(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{n}": p.detach().to("cpu", torch.float32).contiguous()
            for prefix, m in models.items() for n, p in m.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- checkpoints


def list_checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first.  Half-written ones (no marker, temp names) are ignored."""
    d = Path(work_dir) / "checkpoints"
    if not d.is_dir():
        return []
    done = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / CHECKPOINT_MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(work_dir: Path) -> Path | None:
    ckpts = list_checkpoints(work_dir)
    return ckpts[-1] if ckpts else None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(float(v))).detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(work_dir: Path, step: int, models: dict[str, torch.nn.Module], optimizer, lr_scheduler,
                    trainer_state: dict, keep: int) -> Path:
    """checkpoints/step-XXXXXX/: LoRA + optimizer state in safetensors, schedule + progress in JSON.

    Written to a temp folder, fsynced, marked complete, then renamed in one step: a process
    killed at any point leaves either the previous checkpoints alone or this one whole.
    """
    root = Path(work_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_safetensors(tmp / "lora.safetensors", trainable_state(models))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    write_safetensors(tmp / "optimizer.safetensors", opt_tensors or {"_empty": torch.zeros(1)},
                      {"state": json.dumps(opt_meta)})
    if os.environ.get(DIE_DURING_SAVE_ENV) == str(step):
        os._exit(17)  # test hook: simulate a process killed half-way through a save
    state = {**trainer_state, "step": step, "lr_scheduler": lr_scheduler.state_dict()}
    (tmp / "trainer.json").write_text(json.dumps(state))
    (tmp / CHECKPOINT_MARKER).write_text(datetime.now(timezone.utc).isoformat())
    if final.exists():  # re-saving the same step (cancel right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(work_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, models: dict[str, torch.nn.Module], optimizer, lr_scheduler) -> dict:
    from safetensors.torch import load_file

    from stylemix.lora.files import check_safetensors_header

    for f in ("lora.safetensors", "optimizer.safetensors"):
        check_safetensors_header(ckpt / f)
    lora = load_file(str(ckpt / "lora.safetensors"))
    params = {f"{prefix}.{n}": p for prefix, m in models.items() for n, p in m.named_parameters() if p.requires_grad}
    if set(lora) != set(params):
        raise StyleMixError(f"Checkpoint {ckpt.name} does not match the model being trained "
                            f"({len(lora)} saved tensors, {len(params)} trainable); was a setting changed?")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(lora[k].to(p.device, p.dtype))
    from safetensors import safe_open

    with safe_open(str(ckpt / "optimizer.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
    opt_tensors = load_file(str(ckpt / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, v in opt_tensors.items():
        if key == "_empty":
            continue
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    trainer_state = json.loads((ckpt / "trainer.json").read_text())
    lr_scheduler.load_state_dict(trainer_state["lr_scheduler"])
    return trainer_state
