"""Style LoRA training for Stable Diffusion 1.5 on accelerate: one readable loop.

    python -m trainers.lora DATA_DIR --name NAME [--max-steps 400 ...]     # one device
    accelerate launch -m trainers.lora DATA_DIR --name NAME                 # several GPUs
    python -m trainers.lora --job-dir jobs/<id>                             # a background job

The loop is diffusers' `train_text_to_image_lora.py` with four changes that matter:
  * latents (and, with a frozen text encoder, text embeddings) are computed once, not per step;
  * every loss and gradient norm is checked: a non-finite step is skipped, several in a row stop
    the run with a clear message, and non-finite weights are never saved;
  * the VAE and the trainable LoRA parameters stay fp32 under bf16/fp16 autocast;
  * all randomness of step `s` comes from a generator seeded by (seed, s), and checkpoints hold
    the optimizer and LR-schedule state, so a resumed run is the same run, not a similar one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from stylemix.training import jobs
from stylemix.training import progress as phases
from stylemix.training.progress import Estimator, LossHistory
from stylemix.datasets.prepare import DatasetInfo, load_dataset_folder, with_trigger
from stylemix.errors import StyleMixError
from stylemix.lora.files import adapter_state, write_safetensors
from stylemix.lora.library import LoraLibrary
from stylemix.models import DEFAULT_MODEL, TINY, ModelLoadError, quiet_library_logs, tiny_components
from stylemix.paths import Workspace, atomic_write_text, check_name
# TrainConfig and its options live in the library (the app and the queue build configs without this module);
# re-exported here, where the training code and its tests have always found them.
from stylemix.training.config import HELP, TrainConfig, add_config_arguments, config_from_args  # noqa: F401
from trainers import losses
from trainers.data import LatentCache, load_pixels

logger = logging.getLogger("stylemix.train")

ADAPTER = "default"
CHECKPOINT_MARKER = "COMPLETE"  # written last, before the rename: a folder without it is never used
DIE_DURING_SAVE_ENV = "STYLEMIX_TEST_DIE_DURING_CHECKPOINT"  # test hook: os._exit mid-save at this step



# Settings that change the optimisation: a checkpoint may only be resumed with the same values.
_RESUME_KEYS = ("model", "rank", "alpha", "unet_targets", "text_targets", "train_text_encoder", "learning_rate",
                "epochs", "max_steps", "batch_size", "grad_accumulation", "lr_scheduler", "lr_warmup_steps", "seed",
                "resolution", "random_flip", "min_snr_gamma", "noise_offset")


@dataclass
class TrainResult:
    lora_dir: Path | None  # None when cancelled before the end
    steps: int
    total_steps: int
    loss_curve: list[list[float]]
    samples: list[str]  # relative to the work dir
    skipped_steps: int
    cancelled: bool = False
    mixed_precision: str = "no"


class TrainingCancelled(Exception):
    pass


# --------------------------------------------------------------------------- set-up helpers


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """auto -> bf16 where the GPU supports it, fp16 on other CUDA GPUs, fp32 ('no') elsewhere.

    mps gets fp32: autocast training on mps has no gradient scaler in accelerate, and an fp16
    run without one is exactly the NaN trap the seed report fell into.  Override if you must.
    """
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def load_training_components(model: str) -> dict:
    """unet, vae, text_encoder, tokenizer, noise_scheduler (DDPM, for training), sample_scheduler."""
    from diffusers import DDPMScheduler

    quiet_library_logs()
    if model == TINY:
        logger.warning("Training on the built-in TINY model (random weights): the LoRA is a demo, not a real style.")
        c = tiny_components()
        return {**c, "noise_scheduler": DDPMScheduler.from_config(c["scheduler"].config), "sample_scheduler": c["scheduler"]}
    from stylemix import checkpoints

    if checkpoints.is_single_file(model):  # an SD1.5 .safetensors checkpoint: same offline loader as inference
        pipe, _ = checkpoints.load_single_file(model, torch.float32)
        return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
                "noise_scheduler": DDPMScheduler.from_config(pipe.scheduler.config), "sample_scheduler": pipe.scheduler}
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers import SchedulerMixin
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(model).expanduser()
    source = str(path) if path.exists() else model
    if (path.exists() or model.startswith((".", "/", "~"))) and not (path / "model_index.json").is_file():
        raise ModelLoadError(f"Cannot load base model {model!r}: no diffusers folder there (model_index.json missing).")
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        sample_cfg = SchedulerMixin.load_config(source, subfolder="scheduler")
    except Exception as e:  # offline, gated, wrong layout: one readable line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"Cannot load base model {model!r} for training ({type(e).__name__}: {first[:200]}). "
                             "Check the name and your connection, or use --model tiny to try offline.") from e
    from diffusers import PNDMScheduler

    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "noise_scheduler": noise_scheduler, "sample_scheduler": PNDMScheduler.from_config(sample_cfg)}


def step_generator(seed: int, step: int, process: int, micro: int) -> torch.Generator:
    """All randomness of one micro-batch comes from here: resume replays a step exactly."""
    h = hashlib.sha256(f"{seed}/{step}/{process}/{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))


def epoch_batches(n: int, batch: int, seed: int, epoch: int, multiple: int) -> list[list[int]]:
    """The micro-batches of one epoch: a seeded shuffle, cut into batches, padded by wrapping to a
    multiple of (processes x accumulation) so every process does the same number of steps."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    batches = [perm[i:i + batch] for i in range(0, n, batch)]
    i = 0
    while len(batches) % multiple:
        batches.append(batches[i])
        i += 1
    return batches


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


# --------------------------------------------------------------------------- the loop


def train(config: TrainConfig, work_dir: str | Path, resume: bool = False,
          progress: Callable[[dict], None] | None = None, should_stop: Callable[[int], bool] | None = None,
          components: dict | None = None) -> TrainResult:
    """Train a style LoRA and write it to `<loras_dir>/<name>/`.

    work_dir holds checkpoints/ and samples/ (a job folder).  `progress(info)` is called when the
    phase changes (info["phase"]: stylemix.training.progress.PHASES), as latents are cached, after
    every step and every sample image; info carries the step, loss, the smoothed time left (`eta_s`)
    and the share of the work done (`percent`).  `should_stop(step)` returning True saves a
    checkpoint and returns a cancelled result (what SIGTERM does for a job).  `components` replaces
    model loading (benchmarks).
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    config.validate()
    work_dir = Path(work_dir)
    loras_dir = Path(config.loras_dir) if config.loras_dir else _default_loras_dir()
    # Everything about the inputs is checked before a model is loaded.
    data = load_dataset_folder(config.data_dir)
    if (loras_dir / config.name).exists() and not config.overwrite:
        raise StyleMixError(f"A LoRA named {config.name!r} already exists in {loras_dir}; choose another name "
                            "or pass --overwrite.")

    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision, _device_hint(config)),
                              gradient_accumulation_steps=config.grad_accumulation,
                              cpu=config.device == "cpu")
    main = accelerator.is_main_process
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if main:
        work_dir.mkdir(parents=True, exist_ok=True)
        for stale in (work_dir / "checkpoints").glob(".tmp-*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)

    def phase(name: str, **fields) -> None:  # before the loop: no step, loss or time left yet
        if progress and accelerator.is_main_process:
            progress({"phase": name, "step": 0, "total_steps": None, "eta_s": None, **fields})

    phase(phases.LOADING)
    comps = components or load_training_components(config.model)
    unet, vae, text_encoder, tokenizer = comps["unet"], comps["vae"], comps["text_encoder"], comps["tokenizer"]
    noise_scheduler = comps["noise_scheduler"]
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    # Frozen base weights in the autocast dtype; the VAE stays fp32 (its fp16 encode overflows to NaN).
    unet.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    vae.to(device, dtype=torch.float32)

    torch.manual_seed(config.seed)  # LoRA init (gaussian A, zero B) is the same in every run
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                target_modules=config.unet_targets), adapter_name=ADAPTER)
    models = {"unet": unet}
    if config.train_text_encoder:
        text_encoder.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                            target_modules=config.text_targets), adapter_name=ADAPTER)
        models["text_encoder"] = text_encoder
    cast_training_params(list(models.values()), dtype=torch.float32)  # trainable LoRA params in fp32
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    for m in models.values():
        m.train()

    # ---- the data, encoded once
    captions = [with_trigger(data.trigger_word, c) for c in data.captions]
    input_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
    t0 = time.perf_counter()
    phase(phases.CACHING, phase_done=0, phase_total=len(data))
    pixels = [load_pixels(p, config.resolution) for p in data.files]
    cache = build_latent_cache(vae, pixels, device, config, lambda done: phase(
        phases.CACHING, phase_done=done, phase_total=len(data))) if config.cache_latents else None
    text_cache = None
    if not config.train_text_encoder:
        with torch.no_grad(), accelerator.autocast():
            text_cache = torch.cat([text_encoder(input_ids[i:i + 8].to(device), return_dict=False)[0]
                                    for i in range(0, len(input_ids), 8)])
    if main:
        logger.info("Prepared %d images at %dpx (latent cache: %s, text cache: %s) in %.1fs", len(data),
                    config.resolution, "on" if cache else "off", "on" if text_cache is not None else "off",
                    time.perf_counter() - t0)

    # ---- optimiser and schedule
    params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay, eps=config.adam_epsilon)
    procs = accelerator.num_processes
    multiple = procs * config.grad_accumulation
    micro_per_epoch = len(epoch_batches(len(data), config.batch_size, config.seed, 0, multiple))
    steps_per_epoch = micro_per_epoch // multiple
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    total_epochs = math.ceil(total_steps / steps_per_epoch)
    # Not passed through accelerator.prepare: we step it exactly once per optimizer step ourselves.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps)
    prepared = accelerator.prepare(*models.values(), optimizer)
    models = dict(zip(models, prepared[:-1]))
    optimizer = prepared[-1]
    unwrapped = {k: accelerator.unwrap_model(m) for k, m in models.items()}

    step, loss_curve, samples, skipped = 0, [], [], 0
    if resume:
        ckpt = latest_checkpoint(work_dir)
        if ckpt is None:
            logger.warning("No complete checkpoint in %s: starting from step 0.", work_dir)
        else:
            st = load_checkpoint(ckpt, unwrapped, optimizer, lr_scheduler)
            saved_cfg = st.get("config", {})
            changed = [k for k in _RESUME_KEYS if k in saved_cfg and saved_cfg[k] != asdict(config)[k]]
            if changed:
                raise StyleMixError(f"Cannot resume from {ckpt.name}: setting(s) {', '.join(changed)} differ from "
                                    "the checkpoint's run.")
            step, loss_curve, samples, skipped = st["step"], st["loss_curve"], st["samples"], st.get("skipped", 0)
            logger.info("Resumed from %s (step %d of %d).", ckpt, step, total_steps)
    history = LossHistory.of(loss_curve)  # what status.json shows: the whole curve, thinned, across resumes
    prompts = sample_texts(config, data.trigger_word)
    estimate = Estimator(total_steps, step, config.sample_every, len(prompts), config.sample_steps,
                         config.batch_size * config.grad_accumulation, config.sample_guidance > 1)

    def trainer_state() -> dict:
        return {"config": asdict(config), "loss_curve": loss_curve, "samples": samples, "skipped": skipped,
                "total_steps": total_steps}

    def checkpoint() -> Path | None:
        accelerator.wait_for_everyone()
        if not main:
            return None
        return save_checkpoint(work_dir, step, unwrapped, optimizer, lr_scheduler, trainer_state(),
                               config.keep_checkpoints)

    def report(phase_name: str = phases.TRAINING, **extra) -> None:
        if progress and main:
            left, per_step = estimate.seconds_left(), estimate.per_step.value
            progress({"phase": phase_name, "step": step, "total_steps": total_steps,
                      "epoch": step // steps_per_epoch + 1, "total_epochs": total_epochs,
                      "loss": loss_curve[-1][1] if loss_curve else None, "lr": lr_scheduler.get_last_lr()[0],
                      "skipped_steps": skipped, "eta_s": None if left is None else round(left, 1),
                      "percent": round(100 * estimate.share_done(), 1),
                      "steps_per_sec": round(1 / per_step, 4) if per_step else None,
                      "loss_curve": history.as_list(), "sample_prompts": prompts, **extra})

    def sampling(done: int, total: int, seconds: float | None) -> None:
        if seconds is not None:
            estimate.image_done(seconds)
        report(phases.SAMPLING, phase_done=done, phase_total=total)

    if main:
        logger.info("Training %s: %d images, %d steps (%d/epoch), batch %d x %d process(es) x %d accumulation, "
                    "mixed precision %s, device %s", config.name, len(data), total_steps, steps_per_epoch,
                    config.batch_size, procs, config.grad_accumulation, accelerator.mixed_precision, device)
    scaling = vae.config.scaling_factor
    n_timesteps = noise_scheduler.config.num_train_timesteps
    bad_in_a_row = 0
    cancelled = False
    t_end = time.perf_counter()  # when saving began (reset at the last step)
    report(phase_done=None, phase_total=None)

    while step < total_steps:
        t_step = time.perf_counter()  # the step alone: samples and saves are not training speed
        epoch = step // steps_per_epoch
        batches = epoch_batches(len(data), config.batch_size, config.seed, epoch, multiple)
        pos = (step % steps_per_epoch) * multiple + accelerator.process_index * config.grad_accumulation
        step_losses, bad = [], False
        for micro in range(config.grad_accumulation):
            idx = torch.tensor(batches[pos + micro])
            g = step_generator(config.seed, step, accelerator.process_index, micro)
            with accelerator.accumulate(*models.values()):
                # The same draws, in the same order, with or without the cache.
                b = len(idx)
                flip = (torch.rand(b, generator=g) < 0.5) if config.random_flip else torch.zeros(b, dtype=torch.bool)
                lat_shape = (b, vae.config.latent_channels, config.resolution // 8, config.resolution // 8)
                eps = torch.randn(lat_shape, generator=g)
                noise = losses.draw_noise(lat_shape, g, config.noise_offset)
                timesteps = torch.randint(0, n_timesteps, (b,), generator=g)
                if cache is not None:
                    latents = cache.sample(idx, flip, eps)
                else:  # what diffusers' example script does every step
                    with torch.no_grad():
                        x = torch.stack([pixels[i].flip(-1) if f else pixels[i] for i, f in zip(idx.tolist(), flip)])
                        dist = vae.encode(x.to(device, torch.float32)).latent_dist
                        latents = dist.mean + dist.std * eps.to(device)
                latents = latents * scaling
                if (step + 1) in config.debug_nan_at_steps:
                    latents = latents.clone()
                    latents[0] = float("nan")  # test hook: a corrupt batch
                noise, timesteps = noise.to(device), timesteps.to(device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                with accelerator.autocast():
                    if text_cache is not None:
                        hidden = text_cache[idx.to(device)]
                    else:
                        hidden = models["text_encoder"](input_ids[idx].to(device), return_dict=False)[0]
                    pred = models["unet"](noisy.to(weight_dtype), timesteps, hidden, return_dict=False)[0]
                target = losses.training_target(noise_scheduler, latents, noise, timesteps)
                weights = (losses.min_snr_weights(noise_scheduler, timesteps, config.min_snr_gamma)
                           if config.min_snr_gamma else None)
                loss = losses.diffusion_loss(pred, target, weights)
                # Every process must agree on skipping, or DDP would wait forever for a missing backward.
                finite = bool(torch.isfinite(accelerator.gather(loss.detach().reshape(1))).all())
                if finite and not bad:
                    accelerator.backward(loss)
                    step_losses.append(loss.detach())
                else:
                    bad = True
        if not bad:
            norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
            if accelerator.scaler is not None:
                optimizer.step()  # fp16: the grad scaler skips overflowing steps itself and lowers its scale
            elif torch.isfinite(norm):
                optimizer.step()
            else:
                bad = True
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()  # a skipped step still counts toward the schedule (like a GradScaler skip)
        step += 1
        if bad:
            skipped += 1
            bad_in_a_row += 1
            logger.warning("Step %d: non-finite loss or gradients, step skipped (%d in a row).", step, bad_in_a_row)
            if bad_in_a_row >= config.max_bad_steps:
                raise StyleMixError(
                    f"Training stopped at step {step}: {bad_in_a_row} steps in a row had NaN/inf losses or gradients. "
                    "Try a lower learning rate, mixed_precision='no', or check the dataset images. "
                    "The last checkpoint is intact and can be resumed.")
        else:
            bad_in_a_row = 0
            mean_loss = accelerator.gather(torch.stack(step_losses).mean().reshape(1)).mean().item()
            loss_curve.append([step, round(mean_loss, 6)])
            history.add(step, mean_loss)
        estimate.step_done(step, time.perf_counter() - t_step)
        report()
        if main and prompts and (step == total_steps or (config.sample_every and step % config.sample_every == 0)):
            new = make_samples(config, comps, unwrapped, prompts, work_dir, step, device, accelerator, sampling)
            samples.extend(new)
            report(phases.SAMPLING, samples=new, phase_done=len(new), phase_total=len(prompts))
        if step == total_steps:
            t_end = time.perf_counter()
            report(phases.SAVING)
            checkpoint()
        elif step % config.checkpoint_every == 0:
            report(checkpoint=str(checkpoint()))
        if should_stop and step < total_steps and should_stop(step):
            cancelled = True
            break

    if cancelled:
        report(phases.SAVING)
        ck = checkpoint()
        logger.info("Cancelled at step %d; checkpoint %s kept.", step, ck)
        report(checkpoint=str(ck), cancelled=True)
        return TrainResult(None, step, total_steps, loss_curve, samples, skipped, True, accelerator.mixed_precision)

    accelerator.wait_for_everyone()
    lora_dir = None
    if main:
        lora_dir = write_library_lora(config, data, unwrapped, loras_dir, work_dir, loss_curve, samples,
                                      accelerator.mixed_precision, str(device), skipped, step)
        estimate.end_progress(time.perf_counter() - t_end)
        report(phases.SCORING)
        finalize_lora(lora_dir, config)
        logger.info("Saved LoRA %s", lora_dir)
    accelerator.end_training()
    return TrainResult(lora_dir, step, total_steps, loss_curve, samples, skipped, False, accelerator.mixed_precision)


def _device_hint(config: TrainConfig) -> torch.device:
    from stylemix.models import pick_device

    return pick_device(config.device)


def _default_loras_dir() -> Path:
    return Workspace.default().loras


# --------------------------------------------------------------------------- samples and output


def sample_texts(config: TrainConfig, trigger: str) -> list[str]:
    """The sample prompts as rendered: `{trigger}` replaced by the dataset's trigger word."""
    return [prompt.replace("{trigger}", trigger or "").strip(", ") for prompt in config.sample_prompts]


def build_latent_cache(vae, pixels: list[torch.Tensor], device, config: TrainConfig,
                       done: Callable[[int], None]) -> LatentCache:
    """The latent cache, encoded in training-sized batches (a bigger batch would raise the peak memory
    above the uncached loop's); `done(n)` after each batch, so a long encode shows its progress."""
    parts = []
    for i in range(0, len(pixels), config.batch_size):
        parts.append(LatentCache.build(vae, pixels[i:i + config.batch_size], device, flips=config.random_flip,
                                       batch_size=config.batch_size))
        done(min(i + config.batch_size, len(pixels)))
    return LatentCache(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]))


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
                       steps: int) -> Path:
    """loras/<name>/: weights + stylemix.json + samples/, written by the library (`LoraLibrary.add`:
    a temp folder renamed in, so a failure never leaves half a LoRA or loses the old one)."""
    final = loras_dir / config.name
    if final.exists() and not config.overwrite:
        raise StyleMixError(f"A LoRA named {config.name!r} appeared in {loras_dir} while training; the trained "
                            "weights are in the last checkpoint: resume with --overwrite or another name.")
    state, header = adapter_state(models["unet"], models.get("text_encoder"), ADAPTER)
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("data_dir", "name", "loras_dir", "overwrite", "debug_nan_at_steps", "owner")}
    meta = {
        "name": config.name,
        "trigger_word": data.trigger_word,
        "base_model": config.model,
        "rank": config.rank,
        "alpha": config.alpha,
        "target_modules": {"unet": list(config.unet_targets),
                           "text_encoder": list(config.text_targets) if config.train_text_encoder else []},
        "training": {**settings, "steps": steps, "skipped_steps": skipped, "mixed_precision_used": mixed_precision,
                     "device": device, "tiny_model": config.model == TINY},
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
    LoraLibrary(loras_dir).add(config.name, state, header, meta, overwrite=True, extra_files=extra)
    return final


def finalize_lora(lora_dir: Path, config: TrainConfig) -> None:
    """Give a finished library LoRA its style centroid (docs/scores.md), from the training images.

    The centroid is computed with the CLIP model the scores use for this base model (the tiny
    random CLIP for `tiny`, ViT-B-32/openai otherwise).  When that CLIP cannot be loaded the LoRA
    is still complete: stylemix.json records why there is no centroid, and one can be added later
    with `stylemix score --save-centroid NAME IMAGES...`.
    """
    from stylemix.scores.judge import pick_scorer_or_reason
    from stylemix.scores.scoring import CENTROID_FILE, compute_centroid, images_in_folder, save_centroid

    scorer, why = pick_scorer_or_reason(config.model == TINY, _device_hint(config))
    style: dict
    if scorer is None:
        logger.warning("No style centroid for %s: %s", config.name, why)
        style = {"status": "unavailable", "reason": why}
    else:
        try:
            centroid = compute_centroid(scorer, images_in_folder(config.data_dir))
            save_centroid(lora_dir, centroid)
            style = {"status": "ok", "file": CENTROID_FILE, **centroid.info()}
        except StyleMixError as e:
            logger.warning("No style centroid for %s: %s", config.name, e)
            style = {"status": "unavailable", "reason": str(e)}
    meta_path = lora_dir / "stylemix.json"
    meta = json.loads(meta_path.read_text())
    meta["style"] = style
    atomic_write_text(meta_path, json.dumps(meta, indent=1))


# --------------------------------------------------------------------------- a queued job


def run_job(job_dir: Path, progress: Callable[[dict], None] | None = None, handle_signals: bool = True) -> int:
    """Run the queued job in `job_dir` in this process: status updates, SIGTERM = cancel, then next in queue.

    The queue (stylemix.training.jobs) starts this as `python -m trainers.lora --job-dir DIR`.
    """
    job_dir = Path(job_dir).resolve()
    job = jobs.load_job(job_dir)
    if job is None:
        raise StyleMixError(f"{job_dir} is not a job folder.")
    workspace = Workspace(**{k: Path(v) for k, v in job.config["workspace"].items()})
    writer = jobs.StatusWriter(job_dir)
    writer.update(state=jobs.RUNNING, pid=os.getpid(), error=None, phase=phases.STARTING, eta_s=None)
    stop = threading.Event()
    if handle_signals:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    beat = threading.Thread(target=writer.beat, daemon=True)
    beat.start()

    def on_progress(info: dict) -> None:
        fields = {k: v for k, v in info.items() if k != "samples"}
        if info.get("samples"):
            fields["samples"] = info["samples"]
        writer.update(**fields)
        if progress:
            progress(info)

    def should_stop(step: int) -> bool:
        return stop.is_set() or (job_dir / jobs.CANCEL_FILE).exists()

    code = 0
    try:
        config = TrainConfig.from_dict(job.config["train"])
        result = train(config, job_dir, resume=latest_checkpoint(job_dir) is not None, progress=on_progress,
                       should_stop=should_stop)
        if result.cancelled:
            writer.update(state=jobs.CANCELLED, finished=jobs.utc_now(), pid=None)
        else:
            writer.update(state=jobs.COMPLETED, finished=jobs.utc_now(), pid=None, lora_dir=str(result.lora_dir),
                          eta_s=0, percent=100, phase=None)
    except StyleMixError as e:
        logger.error("%s", e)
        writer.update(state=jobs.FAILED, finished=jobs.utc_now(), pid=None, error=str(e))
        code = 1
    except BaseException as e:  # noqa: BLE001  (a job must always end with a state, whatever happened)
        traceback.print_exc()
        msg = f"{type(e).__name__}: {e}".strip()
        if "out of memory" in str(e).lower() or isinstance(e, MemoryError):
            msg = ("Out of memory: try a smaller batch size, a lower resolution, or --gradient-checkpointing. "
                   f"({msg[:300]})")
        writer.update(state=jobs.FAILED, finished=jobs.utc_now(), pid=None, error=msg[:2000])
        code = 1
    finally:
        writer.stop.set()
        beat.join(timeout=jobs.HEARTBEAT_S + 1)
    try:
        jobs.ensure_queue_running(workspace)  # hand the GPU to the next queued job
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    return code


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(max(1, int(os.environ.get("STYLEMIX_THREADS", torch.get_num_threads()))))
    p = argparse.ArgumentParser(prog="python -m trainers.lora", description="Train a style LoRA for SD1.5.")
    p.add_argument("data_dir", nargs="?", help=HELP["data_dir"])
    p.add_argument("--name", help=HELP["name"])
    p.add_argument("--model", default=None, help="hub id, diffusers folder, SD1.5 .safetensors file, or 'tiny'")
    p.add_argument("--device", default=None)
    p.add_argument("--loras-dir", dest="loras_dir", default=None)
    p.add_argument("--work-dir", default=None, help="checkpoints and samples (default: ./runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--job-dir", default=None, help="run the background job in this folder (used by stylemix.training.jobs)")
    add_config_arguments(p)
    args = p.parse_args(argv)
    try:
        if args.job_dir:
            return run_job(Path(args.job_dir))
        if not args.data_dir or not args.name:
            p.error("DATA_DIR and --name are required (or --job-dir)")
        config = config_from_args(args, model=args.model or os.environ.get("STYLEMIX_MODEL") or DEFAULT_MODEL)
        work = Path(args.work_dir or Path("runs") / check_name(args.name, "LoRA name"))
        result = train(config, work, resume=args.resume)
        print(result.lora_dir)
        return 0
    except StyleMixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
