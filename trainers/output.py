"""What a run leaves behind: sample images, epoch versions, the library LoRA and its style centroid.

    <job>/samples/step-XXXXXX-<i>.png       images for the fixed prompts and seed
    <job>/epochs/eNN/                        the LoRA of epoch NN (--save-every-epochs), kept with the job
    loras/<name>/                            the LoRA (LoraLibrary.add: written whole, then renamed in),
    loras/<name>/versions/eNN/               with its epoch versions, listed as <name>@eNN
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from stylemix.datasets.prepare import DatasetInfo
from stylemix.errors import StyleMixError
from stylemix.lora.files import WEIGHTS_NAME, adapter_state, write_safetensors
from stylemix.lora.library import META_NAME, LoraLibrary
from stylemix.paths import VERSIONS_DIR, version_name
from stylemix.models import TINY
from stylemix.paths import atomic_write_text
from stylemix.training.config import TrainConfig
from trainers import networks

logger = logging.getLogger("stylemix.train")

EPOCHS_DIR = "epochs"


def sample_texts(config: TrainConfig, trigger: str) -> list[str]:
    """The sample prompts as rendered: `{trigger}` replaced by the dataset's trigger word."""
    return [prompt.replace("{trigger}", trigger or "").strip(", ") for prompt in config.sample_prompts]


@torch.no_grad()
def make_samples(config: TrainConfig, comps: dict, models: dict, prompts: list[str], work_dir: Path, step: int,
                 device, accelerator, on_image: Callable[[int, int, float | None], None] | None = None) -> list[str]:
    """Images for the fixed prompts and seed: the same noise every time, so only the LoRA changes.

    `on_image(done, total, seconds)` before the first image (seconds None) and after each one."""
    from diffusers import StableDiffusionPipeline

    unet, te = models["unet"], models.get("text_encoder", comps["text_encoder"])
    was_training = unet.training
    pipe = StableDiffusionPipeline(vae=comps["vae"], text_encoder=te, tokenizer=comps["tokenizer"], unet=unet,
                                   scheduler=comps["sample_scheduler"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out_dir = work_dir / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for m in models.values():
        m.eval()
    if on_image:
        on_image(0, len(prompts), None)
    try:
        for i, text in enumerate(prompts):
            t0 = time.perf_counter()
            gen = torch.Generator(device="cpu").manual_seed(config.sample_seed + i)
            with accelerator.autocast():
                image = pipe(text, num_inference_steps=config.sample_steps, guidance_scale=config.sample_guidance,
                             height=config.resolution, width=config.resolution, generator=gen).images[0]
            rel = f"samples/step-{step:06d}-{i}.png"
            tmp = work_dir / f"samples/.tmp-{os.getpid()}.png"
            image.save(tmp)
            os.replace(tmp, work_dir / rel)
            paths.append(rel)
            if on_image:
                on_image(i + 1, len(prompts), time.perf_counter() - t0)
    finally:
        if was_training:
            for m in models.values():
                m.train()
    return paths


def _read_meta_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_library_lora(config: TrainConfig, data: DatasetInfo, models: dict, loras_dir: Path, work_dir: Path,
                       loss_curve: list, samples: list[str], mixed_precision: str, device: str, skipped: int,
                       steps: int, run: dict | None = None) -> Path:
    """loras/<name>/: weights + stylemix.json + samples/, written by the library (`LoraLibrary.add`:
    a temp folder renamed in, so a failure never leaves half a LoRA or loses the old one).  `run`: how it ran
    (processes, effective batch, seconds of training steps), kept in stylemix.json's `training`."""
    final = loras_dir / config.name
    if final.exists() and not config.overwrite:
        raise StyleMixError(f"A LoRA named {config.name!r} appeared in {loras_dir} while training; the trained "
                            "weights are in the last checkpoint: resume with --overwrite or another name.")
    state, header = adapter_state(models["unet"], models.get("text_encoder"), networks.ADAPTER)
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("data_dir", "name", "loras_dir", "overwrite", "debug_nan_at_steps", "owner")}
    meta = {
        "name": config.name,
        "trigger_word": data.trigger_word,
        "base_model": config.model,
        "rank": config.rank,
        "alpha": config.alpha,
        **networks.library_meta(config),  # network, kind, covers, ranks, target_modules
        "training": {**settings, "steps": steps, "skipped_steps": skipped, "mixed_precision_used": mixed_precision,
                     "device": device, "tiny_model": config.model == TINY, **(run or {})},
        "dataset": data.summary,
        "loss_curve": loss_curve,
        "samples": [f"samples/{Path(r).name}" for r in samples],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if config.owner:
        # a new LoRA starts private; retraining one's own LoRA keeps the visibility it had
        old = _read_meta_file(final / "stylemix.json")
        meta["owner"] = config.owner
        meta["visibility"] = old.get("visibility", "private") if old.get("owner") == config.owner else "private"
    extra = {f"samples/{Path(rel).name}": work_dir / rel for rel in samples if (work_dir / rel).is_file()}
    versions = epoch_versions(work_dir)
    if versions:
        meta["versions"] = [version_name(config.name, e) for e in versions]
        for e, folder in versions.items():
            for f in (WEIGHTS_NAME, META_NAME):
                extra[f"{VERSIONS_DIR}/{folder.name}/{f}"] = folder / f
    LoraLibrary(loras_dir).add(config.name, state, header, meta, overwrite=True, extra_files=extra)
    return final


def save_epoch_version(config: TrainConfig, models: dict, work_dir: Path, epoch: int, step: int,
                       smoothed_loss: float | None) -> Path:
    """<work_dir>/epochs/eNN/: the LoRA as it is after epoch `epoch` (kohya's --save_every_n_epochs), with a
    stylemix.json; write_library_lora moves every one into the final LoRA's folder as version NAME@eNN."""
    state, header = adapter_state(models["unet"], models.get("text_encoder"), networks.ADAPTER)
    folder = Path(work_dir) / EPOCHS_DIR / version_name(config.name, epoch).rsplit("@", 1)[1]
    write_safetensors(folder / WEIGHTS_NAME, state, header)
    meta = {"epoch": epoch, "step": step, "loss_ema": smoothed_loss, "base_model": config.model,
            "rank": config.rank, "alpha": config.alpha, **networks.library_meta(config),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(folder / META_NAME, json.dumps(meta, indent=1))
    logger.info("Saved epoch %d (step %d) as %s", epoch, step, version_name(config.name, epoch))
    return folder


def epoch_versions(work_dir: Path) -> dict[int, Path]:
    """{epoch: folder} of the complete epoch saves in a work folder, by epoch."""
    root = Path(work_dir) / EPOCHS_DIR
    found = {}
    if root.is_dir():
        for d in root.iterdir():
            if d.name[:1] == "e" and d.name[1:].isdigit() and (d / WEIGHTS_NAME).is_file() and (d / META_NAME).is_file():
                found[int(d.name[1:])] = d
    return dict(sorted(found.items()))


def clear_epoch_versions(work_dir: Path) -> None:
    """A fresh run (not a resume) starts without the epoch saves of an earlier run in the same folder."""
    shutil.rmtree(Path(work_dir) / EPOCHS_DIR, ignore_errors=True)


def finalize_lora(lora_dir: Path, config: TrainConfig) -> None:
    """Give a finished library LoRA its style centroids (docs/scores.md), from the training images.

    One centroid per style judge that can be loaded here (CLIP, and CSD where its weights are installed;
    the tiny random ones for `tiny`), all in one file: switching judges later never needs the training
    images again.  When no judge can be loaded the LoRA is still complete: stylemix.json records why there
    is no centroid, and one can be added later with `stylemix score --save-centroid NAME IMAGES...`.
    """
    from stylemix.scores.judge import pick_scorer_or_reason
    from stylemix.scores.scoring import CENTROID_FILE, compute_centroid, images_in_folder, save_centroid
    from stylemix.scores.selection import available_style_scorers

    from stylemix.models import pick_device

    device = pick_device(config.device)
    scorers = available_style_scorers(config.model == TINY, device)
    style: dict
    if not scorers:
        _, why = pick_scorer_or_reason(config.model == TINY, device)
        logger.warning("No style centroid for %s: %s", config.name, why)
        style = {"status": "unavailable", "reason": why}
    else:
        style, judges = {}, {}
        images = images_in_folder(config.data_dir)
        for scorer in scorers:
            try:
                centroid = compute_centroid(scorer, images)
                save_centroid(lora_dir, centroid)
                judges[scorer.name] = centroid.info()
            except StyleMixError as e:
                logger.warning("No %s style centroid for %s: %s", scorer.name, config.name, e)
                style.setdefault("problems", {})[scorer.name] = str(e)
        if judges:
            # the first judge's (CLIP's) fields stay at the top, where earlier versions read them
            style = {"status": "ok", "file": CENTROID_FILE, **next(iter(judges.values())), "judges": judges, **style}
        else:
            style = {"status": "unavailable", "reason": "; ".join(style["problems"].values())}
    meta_path = lora_dir / "stylemix.json"
    meta = json.loads(meta_path.read_text())
    meta["style"] = style
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
