"""Style LoRA training for Stable Diffusion 1.5 on accelerate: one readable loop.

    python -m trainers.lora DATA_DIR --name NAME [--max-steps 400 ...]     # one device
    accelerate launch -m trainers.lora DATA_DIR --name NAME                 # several GPUs
    python -m trainers.lora --job-dir jobs/<id>                             # a background job

The loop is diffusers' `train_text_to_image_lora.py` with four changes that matter:
  * latents (and, with a frozen text encoder and fixed captions, text embeddings) are computed once;
  * every loss and gradient norm is checked: a non-finite step is skipped, several in a row stop
    the run with a clear message, and non-finite weights are never saved;
  * the VAE and the trainable LoRA parameters stay fp32 under bf16/fp16 autocast;
  * all randomness of a sample comes from a generator seeded by (seed, epoch, its place in the epoch),
    and checkpoints hold the optimizer and LR-schedule state, so a resumed run is the same run, not a
    similar one, and N processes with batch b train the LoRA one process trains with batch N x b.

Several processes (data parallel, as diffusers' and kohya's scripts): each trains its share of every
step's batches and DDP averages the gradients, so the effective batch is batch x processes x accumulation.
The latents are encoded once, each process a share, and shared; only the main process writes
checkpoints, samples, status and the LoRA, after `wait_for_everyone`.  `stylemix train --num-processes N`
starts them (stylemix/launch.py: accelerate's launcher; torchrun on the CPU).

Each concern has its own module beside this one (docs/architecture.md):
    batches.py      aspect-ratio buckets, the batch order of an epoch, each step's generator
    data.py         pixels and the latent cache          captions.py   kohya's caption options
    networks.py     --network: the layers trained        optim.py      --optimizer
    losses.py       noise, target, min-SNR, the loss     checkpoints.py  save / resume
    trackers.py     smoothed loss, TensorBoard           output.py     samples, epoch versions, the library LoRA
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Callable

import torch

from stylemix.training import jobs
from stylemix.training import progress as phases
from stylemix.training.progress import Estimator, LossHistory
from stylemix.datasets.prepare import load_dataset_folder, with_trigger
from stylemix.errors import StyleMixError
from stylemix import launch
from stylemix.models import DEFAULT_MODEL, TINY, ModelLoadError, quiet_library_logs, tiny_components
from stylemix.paths import Workspace, check_name
# TrainConfig and its options live in the library (the app and the queue build configs without this module);
# re-exported here, where the training code and its tests have always found them.
from stylemix.training.config import HELP, TrainConfig, add_config_arguments, config_from_args  # noqa: F401
from trainers import batches, captions, losses, networks, optim, trackers
from trainers.batches import epoch_batches, sample_generator  # noqa: F401  (re-exported)
from trainers.checkpoints import (CHECKPOINT_MARKER, DIE_DURING_SAVE_ENV, changed_settings,  # noqa: F401
                                  latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint)
from trainers.data import build_latent_cache, load_pixels, share_latent_cache
from trainers.output import (clear_epoch_versions, finalize_lora, make_samples, sample_texts, save_epoch_version,  # noqa: F401
                             write_library_lora)

logger = logging.getLogger("stylemix.train")

ADAPTER = networks.ADAPTER


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



# --------------------------------------------------------------------------- the loop


def train(config: TrainConfig, work_dir: str | Path, resume: bool = False,
          progress: Callable[[dict], None] | None = None, should_stop: Callable[[int], bool] | None = None,
          components: dict | None = None) -> TrainResult:
    """Train a style LoRA and write it to `<loras_dir>/<name>/`.

    work_dir holds checkpoints/, samples/, epochs/ and logs/ (a job folder).  `progress(info)` is called
    when the phase changes (info["phase"]: stylemix.training.progress.PHASES), as latents are cached,
    after every step and every sample image; info carries the step, loss and smoothed loss, learning
    rate, the smoothed time left (`eta_s`) and the share of the work done (`percent`).  `should_stop(step)`
    returning True saves a checkpoint and returns a cancelled result (what SIGTERM does for a job).
    `components` replaces model loading (benchmarks).
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    config.validate()
    work_dir = Path(work_dir)
    loras_dir = Path(config.loras_dir) if config.loras_dir else _default_loras_dir()
    # Everything about the inputs is checked before a model is loaded.
    data = load_dataset_folder(config.data_dir)
    caption_options = captions.CaptionOptions.of(config)
    texts = [with_trigger(data.trigger_word, c) for c in data.captions]
    captions.check_keep_tokens(caption_options, texts, data.files)
    if (loras_dir / config.name).exists() and not config.overwrite:
        raise StyleMixError(f"A LoRA named {config.name!r} already exists in {loras_dir}; choose another name "
                            "or pass --overwrite.")

    # Several processes on a machine without GPUs must ask accelerate for its CPU backend (gloo), or each
    # would train alone on the whole data set.
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision, _device_hint(config)),
                              gradient_accumulation_steps=config.grad_accumulation,
                              cpu=launch.use_cpu(config.device), **trackers.accelerator_options(config, work_dir))
    launch.check_world(accelerator.num_processes)
    launch.exit_with_parent()
    main = accelerator.is_main_process
    procs, rank = accelerator.num_processes, accelerator.process_index
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

    torch.manual_seed(config.seed)  # LoRA init (gaussian A, zero B) is the same in every run and process
    models = networks.add_networks(config, unet, text_encoder)
    # Each process seeded on its own from here on.  The loop draws nothing from the global generator (each
    # sample has its own, below); this keeps anything else that does (a dropout) apart between processes.
    torch.manual_seed(config.seed + 1_000_003 * rank)
    cast_training_params(list(models.values()), dtype=torch.float32)  # trainable LoRA params in fp32
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    for m in models.values():
        m.train()

    # ---- the data, encoded once: each image at its bucket's size
    input_ids = captions.tokenize(tokenizer, texts)
    sizes = batches.training_sizes(data.sizes, batches.dataset_resolution(data.summary, data.sizes), config.resolution)
    buckets = list(batches.bucket_groups(sizes).values())
    t0 = time.perf_counter()
    phase(phases.CACHING, phase_done=0, phase_total=len(data))
    pixels = [load_pixels(p, s) for p, s in zip(data.files, sizes)]
    cache = None
    if config.cache_latents:  # each process encodes its share of the images; then every process has them all
        cache = build_latent_cache(vae, pixels, sizes, device, config.random_flip, config.batch_size, lambda done, total:
                                   phase(phases.CACHING, phase_done=done, phase_total=total), shard=(rank, procs))
        cache = share_latent_cache(cache, accelerator)
    text_cache = None
    if not config.train_text_encoder and not caption_options.varies:  # changing captions are encoded every step
        with torch.no_grad(), accelerator.autocast():
            text_cache = torch.cat([text_encoder(input_ids[i:i + 8].to(device), return_dict=False)[0]
                                    for i in range(0, len(input_ids), 8)])
    if main:
        logger.info("Prepared %d images in %d bucket(s) %s (latent cache: %s, text cache: %s) in %.1fs", len(data),
                    len(buckets), ", ".join(f"{w}x{h}" for w, h in batches.bucket_groups(sizes)),
                    "on" if cache else "off", "on" if text_cache is not None else "off", time.perf_counter() - t0)

    # ---- optimiser and schedule
    params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
    optimizer = optim.make_optimizer(config, params)
    multiple = procs * config.grad_accumulation  # micro-batches per optimizer step, over all processes
    micro_per_epoch = len(epoch_batches(buckets, config.batch_size, config.seed, 0, multiple))
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

    step, loss_curve, lr_curve, samples, skipped = 0, [], [], [], 0
    if resume or procs > 1:  # (every process takes part: the main process decides)
        ckpt = _shared_checkpoint(accelerator, work_dir, resume)
        if ckpt is None and resume:
            logger.warning("No complete checkpoint in %s: starting from step 0.", work_dir)
        elif ckpt is not None:
            st = load_checkpoint(ckpt, unwrapped, optimizer, lr_scheduler)
            changed = changed_settings(st.get("config", {}), asdict(config))
            if changed:
                raise StyleMixError(f"Cannot resume from {ckpt.name}: setting(s) {', '.join(changed)} differ from "
                                    "the checkpoint's run.")
            if st.get("processes", 1) != procs:  # another split is another batch, data order and noise
                raise StyleMixError(f"Cannot resume from {ckpt.name}: it was trained on {st.get('processes', 1)} "
                                    f"process(es), this run has {procs}; resume with the same number.")
            step, loss_curve, samples, skipped = st["step"], st["loss_curve"], st["samples"], st.get("skipped", 0)
            lr_curve = st.get("lr_curve", [])
            logger.info("Resumed from %s (step %d of %d).", ckpt, step, total_steps)
    if step == 0 and main:
        clear_epoch_versions(work_dir)  # an earlier run's epoch saves in the same folder are not this run's
    # what status.json shows: the whole curves, thinned, across resumes
    history, smoothed = LossHistory.of(loss_curve), trackers.SmoothedLoss.of(loss_curve)
    smooth_history = LossHistory.of([[s, smoothed_loss] for s, smoothed_loss in _smoothed_curve(loss_curve)])
    lr_history = trackers.Curve.of(lr_curve)
    prompts = sample_texts(config, data.trigger_word)
    estimate = Estimator(total_steps, step, config.sample_every, len(prompts), config.sample_steps,
                         config.batch_size * config.grad_accumulation, config.sample_guidance > 1)
    trackers.start(accelerator, config)

    def trainer_state() -> dict:
        return {"config": asdict(config), "loss_curve": loss_curve, "lr_curve": lr_curve, "samples": samples,
                "skipped": skipped, "total_steps": total_steps, "processes": procs}

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
                      "loss": loss_curve[-1][1] if loss_curve else None,
                      "loss_ema": None if smoothed.value is None else round(smoothed.value, 6),
                      "lr": optim.effective_lr(optimizer),
                      "skipped_steps": skipped, "eta_s": None if left is None else round(left, 1),
                      "percent": round(100 * estimate.share_done(), 1),
                      "steps_per_sec": round(1 / per_step, 4) if per_step else None,
                      "loss_curve": history.as_list(), "loss_ema_curve": smooth_history.as_list(),
                      "lr_curve": lr_history.as_list(), "sample_prompts": prompts, "processes": procs,
                      "effective_batch": config.batch_size * multiple, **extra})

    def sampling(done: int, total: int, seconds: float | None) -> None:
        if seconds is not None:
            estimate.image_done(seconds)
        report(phases.SAMPLING, phase_done=done, phase_total=total)

    if main:
        logger.info("Training %s: %d images, %d steps (%d/epoch), batch %d x %d process(es) x %d accumulation, "
                    "network %s, optimizer %s, mixed precision %s, device %s", config.name, len(data), total_steps,
                    steps_per_epoch, config.batch_size, procs, config.grad_accumulation, config.network,
                    config.optimizer, accelerator.mixed_precision, device)
    scaling = vae.config.scaling_factor
    n_timesteps = noise_scheduler.config.num_train_timesteps
    bad_in_a_row = 0
    cancelled = False
    train_seconds = 0.0  # the steps alone, this session: speed in the LoRA's metadata
    t_end = time.perf_counter()  # when saving began (reset at the last step)
    report(phase_done=None, phase_total=None)

    while step < total_steps:
        t_step = time.perf_counter()  # the step alone: samples and saves are not training speed
        epoch = step // steps_per_epoch
        order = epoch_batches(buckets, config.batch_size, config.seed, epoch, multiple)
        first_slot = batches.batch_slots(order)
        # this step's micro-batches are order[start : start + multiple]; this process takes its consecutive share
        pos = (step % steps_per_epoch) * multiple + rank * config.grad_accumulation
        step_losses, bad = [], False
        for micro in range(config.grad_accumulation):
            idx = torch.tensor(order[pos + micro])
            slots = range(first_slot[pos + micro], first_slot[pos + micro] + len(idx))
            with accelerator.accumulate(*models.values()):
                # Each sample's flip, noise and timestep from its own generator: the same draws with or without
                # the cache, on any number of processes, at any batch size.
                width, height = sizes[idx[0]]  # one bucket per batch
                lat_shape = (vae.config.latent_channels, height // 8, width // 8)
                flip, eps, noise, timesteps = losses.sample_draws(
                    [sample_generator(config.seed, epoch, k) for k in slots], lat_shape, n_timesteps,
                    config.random_flip, config.noise_offset)
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
                if caption_options.varies:  # this step's captions: dropped, shuffled, tags dropped
                    ids = captions.tokenize(tokenizer, [
                        captions.process_caption(texts[i], caption_options,
                                                 sample_generator(config.seed, epoch, k, stream="captions"))
                        for i, k in zip(idx.tolist(), slots)])
                else:
                    ids = input_ids[idx]
                with accelerator.autocast():
                    if text_cache is not None:
                        hidden = text_cache[idx.to(device)]
                    elif "text_encoder" in models:
                        hidden = models["text_encoder"](ids.to(device), return_dict=False)[0]
                    else:
                        with torch.no_grad():
                            hidden = text_encoder(ids.to(device), return_dict=False)[0]
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
        lr = optim.effective_lr(optimizer)  # the step size this step used (Prodigy: lr x its estimate d)
        lr_scheduler.step()  # a skipped step still counts toward the schedule (like a GradScaler skip)
        step += 1
        lr_curve.append([step, lr])
        lr_history.add(step, lr)
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
            smooth_history.add(step, smoothed.add(mean_loss))
            trackers.log(accelerator, step, {"loss": mean_loss, "loss_ema": smoothed.value, "lr": lr})
        estimate.step_done(step, time.perf_counter() - t_step)
        train_seconds += time.perf_counter() - t_step
        report()
        if main and prompts and (step == total_steps or (config.sample_every and step % config.sample_every == 0)):
            new = make_samples(config, comps, unwrapped, prompts, work_dir, step, device, accelerator, sampling)
            samples.extend(new)
            report(phases.SAMPLING, samples=new, phase_done=len(new), phase_total=len(prompts))
        if (main and config.save_every_epochs and step % steps_per_epoch == 0 and step < total_steps
                and (step // steps_per_epoch) % config.save_every_epochs == 0):
            save_epoch_version(config, unwrapped, work_dir, step // steps_per_epoch, step, smoothed.value)
        if step == total_steps:
            t_end = time.perf_counter()
            report(phases.SAVING)
            checkpoint()
        elif step % config.checkpoint_every == 0:
            report(checkpoint=str(checkpoint()))
        if should_stop and step < total_steps and _stop_together(accelerator, should_stop(step)):
            cancelled = True
            break

    if cancelled:
        report(phases.SAVING)
        ck = checkpoint()
        logger.info("Cancelled at step %d; checkpoint %s kept.", step, ck)
        report(checkpoint=str(ck), cancelled=True)
        accelerator.end_training()
        return TrainResult(None, step, total_steps, loss_curve, samples, skipped, True, accelerator.mixed_precision)

    accelerator.wait_for_everyone()
    lora_dir = None
    if main:
        lora_dir = write_library_lora(config, data, unwrapped, loras_dir, work_dir, loss_curve, samples,
                                      accelerator.mixed_precision, str(device), skipped, step,
                                      {"processes": procs, "effective_batch": config.batch_size * multiple,
                                       "train_seconds": round(train_seconds, 3)})
        estimate.end_progress(time.perf_counter() - t_end)
        report(phases.SCORING)
        finalize_lora(lora_dir, config)
        logger.info("Saved LoRA %s", lora_dir)
    accelerator.end_training()
    return TrainResult(lora_dir, step, total_steps, loss_curve, samples, skipped, False, accelerator.mixed_precision)


def _shared_checkpoint(accelerator, work_dir: Path, resume: bool) -> Path | None:
    """The checkpoint every process resumes from: the main process's latest (or none, when it starts afresh).

    On several machines the other machines' job folders do not hold it (only the main process saves), so its
    files are sent to them and written there first, by the first process of each machine."""
    ckpt = latest_checkpoint(work_dir) if resume else None
    if accelerator.num_processes == 1:
        return ckpt
    from accelerate.utils import broadcast_object_list

    several_machines = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)) < accelerator.num_processes
    files = None
    if accelerator.is_main_process and ckpt is not None and several_machines:
        files = {f.name: f.read_bytes() for f in ckpt.iterdir() if f.is_file()}
    name, files = broadcast_object_list([ckpt.name if ckpt is not None else None, files])
    if name is None:
        return None
    local = work_dir / "checkpoints" / name
    if files and accelerator.is_local_main_process and not (local / CHECKPOINT_MARKER).is_file():
        tmp = local.with_name(f".tmp-{name}-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for f, data in files.items():
            (tmp / f).write_bytes(data)
        os.replace(tmp, local)
    accelerator.wait_for_everyone()
    if not (local / CHECKPOINT_MARKER).is_file():
        raise StyleMixError(f"Process {accelerator.process_index} finds no checkpoint {local} to resume from.")
    return local


def _stop_together(accelerator, mine: bool) -> bool:
    """Stop when any process was asked to (its SIGTERM or the cancel file came first): all stop after the same
    step, or the others would wait forever for it in the next step's all-reduce."""
    if accelerator.num_processes == 1:
        return mine
    flags = accelerator.gather(torch.tensor([float(mine)], device=accelerator.device))
    return bool(flags.max().item() > 0)


def _smoothed_curve(loss_curve: list) -> list[tuple[int, float]]:
    s = trackers.SmoothedLoss()
    return [(step, s.add(loss)) for step, loss in loss_curve]


def _device_hint(config: TrainConfig) -> torch.device:
    from stylemix.models import pick_device

    return pick_device(config.device)


def _default_loras_dir() -> Path:
    return Workspace.default().loras


# --------------------------------------------------------------------------- samples and output


# --------------------------------------------------------------------------- a queued job


def run_job(job_dir: Path, progress: Callable[[dict], None] | None = None, handle_signals: bool = True) -> int:
    """Run the queued job in `job_dir` in this process: status updates, SIGTERM = cancel, then next in queue.

    The queue (stylemix.training.jobs) starts this as `python -m trainers.lora --job-dir DIR`, or, for several
    processes, `python -m stylemix.training.supervisor --job-dir DIR`, which starts it on each process under the launcher.
    Then the first process of each machine keeps status.json (on machine 0 that is the main process, the one
    that reports progress) and leaves its result as `outcome`: the launcher's process, the job's pid, turns
    it into the job's state once every process has ended (so no next job starts on GPUs still in use), and
    starts the next job.
    """
    job_dir = Path(job_dir).resolve()
    job = jobs.load_job(job_dir)
    if job is None:
        raise StyleMixError(f"{job_dir} is not a job folder.")
    workspace = Workspace(**{k: Path(v) for k, v in job.config["workspace"].items()})
    rank, local_rank, world = launch.process_rank()
    launched = world > 1
    writer = jobs.StatusWriter(job_dir) if local_rank == 0 else None
    if writer:
        writer.update(state=jobs.RUNNING, **({} if launched else {"pid": os.getpid(), "host": jobs.HOST}), error=None,
                      phase=phases.STARTING, eta_s=None, processes=world)
    stop = threading.Event()
    if handle_signals:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    beat = None
    if writer:
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

    def finish(state: str, **fields) -> None:
        if launched:  # the launcher's process writes the state when all processes have ended (training/supervisor.py)
            writer.update(outcome=state, **{k: v for k, v in fields.items() if k != "pid"})
        else:
            writer.update(state=state, **fields)

    code = 0
    try:
        config = TrainConfig.from_dict(job.config["train"])
        result = train(config, job_dir, resume=latest_checkpoint(job_dir) is not None,
                       progress=on_progress if writer else None, should_stop=should_stop)
        if not writer:  # a process that is not the first of its machine: nothing to record
            return code
        if result.cancelled:
            finish(jobs.CANCELLED, finished=jobs.utc_now(), pid=None)
        elif result.lora_dir is None:  # the first process of another machine: the main process wrote the LoRA
            finish(jobs.COMPLETED, finished=jobs.utc_now(), pid=None, eta_s=0, percent=100, phase=None,
                   note=f"this machine's processes took part; the LoRA is written on machine 0 (rank {rank} here)")
        else:
            finish(jobs.COMPLETED, finished=jobs.utc_now(), pid=None, lora_dir=str(result.lora_dir),
                   eta_s=0, percent=100, phase=None)
    except BaseException as e:  # noqa: BLE001  (a job must always end with a state, whatever happened)
        code = 1
        if writer is None:  # another process: the launcher reports its error (and names its rank)
            raise
        if isinstance(e, StyleMixError):
            logger.error("%s", e)
            msg = str(e)
        else:
            traceback.print_exc()
            msg = f"{type(e).__name__}: {e}".strip()
            if "out of memory" in str(e).lower() or isinstance(e, MemoryError):
                msg = ("Out of memory: try a smaller batch size, a lower resolution, or --gradient-checkpointing. "
                       f"({msg[:300]})")
        if rank != 0:  # the first process of another machine
            msg = f"Process rank {rank} of {world}: {msg}"
        finish(jobs.FAILED, finished=jobs.utc_now(), pid=None, error=msg[:2000])
    finally:
        if writer:
            writer.stop.set()
            beat.join(timeout=jobs.HEARTBEAT_S + 1)
    if not launched:
        try:
            jobs.ensure_queue_running(workspace)  # hand the GPU to the next queued job
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    return code


# --------------------------------------------------------------------------- command line


def _record(fn):
    """torchrun's error recorder: under the launcher, an uncaught error is written where the launcher reads
    it, so its report names the process and its error (outside the launcher it changes nothing)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)



@_record
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
        if result.lora_dir:  # the main process (the others of a launched run have no LoRA to show)
            print(result.lora_dir)
        return 0
    except StyleMixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
