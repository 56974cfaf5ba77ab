"""`stylemix train DATA_DIR --name NAME`: train a style LoRA (foreground with progress, or --background).

`--num-processes N` trains on N processes (one GPU each, or the CPU) under accelerate's launcher; with
`--num-machines M --machine-rank R --main-process-ip IP --main-process-port PORT`, on several machines
(the same command on each, R = 0..M-1).  README "Scaling out".
"""

from __future__ import annotations

import argparse
import os
import sys

from stylemix.errors import StyleMixError
from stylemix.paths import Workspace


def register(sub) -> None:
    from stylemix.training.config import add_config_arguments

    p = sub.add_parser("train", help="train a style LoRA from a dataset folder",
                       description="Train a style LoRA. Runs in this terminal with a progress bar; --background "
                                   "queues it as a job instead (see `stylemix jobs`).")
    p.add_argument("data_dir", metavar="DATA_DIR", help="dataset folder made by `stylemix preprocess`")
    p.add_argument("--name", required=True, help="LoRA name in the library (loras/NAME/)")
    p.add_argument("--background", action="store_true", help="queue as a background job and return at once")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest failed/cancelled job for this LoRA name from its last checkpoint")
    add_config_arguments(p)
    from stylemix.launch import add_launch_arguments

    add_launch_arguments(p, "train")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stylemix.launch import Launch, launch_from_args
    from stylemix.training import jobs
    from stylemix.training.config import config_from_args

    ws = Workspace.default(args.loras_dir)
    launch = launch_from_args(args, env_default=True)
    model = args.model or os.environ.get("STYLEMIX_MODEL")
    base = {"data_dir": args.data_dir, "name": args.name, "device": args.device, "loras_dir": str(ws.loras)}
    if model:
        base["model"] = model
    config = config_from_args(args, **base)
    jobs.ensure_queue_running(ws)
    if args.resume:
        candidates = [j for j in jobs.list_jobs(ws) if j.lora_name == args.name and j.state in (jobs.FAILED, jobs.CANCELLED)]
        if not candidates:
            raise StyleMixError(f"No failed or cancelled job for LoRA {args.name!r} to resume.")
        job_id = candidates[0].id
        stored = Launch.from_dict(candidates[0].config.get("launch"))
        if args.num_processes is not None and args.num_processes != stored.num_processes:
            raise StyleMixError(f"Job {job_id} trained on {stored.num_processes} process(es); a resume runs on the "
                                "same number (leave --num-processes out).")
        if args.background:
            job = jobs.resume(ws, job_id)
            print(f"Resumed job {job.id}: {job.state}. Follow it with `stylemix jobs show {job.id} --follow`.")
            return 0
        return _foreground(config, ws, job_id)
    if args.background:
        job = jobs.submit(config, ws, launch=launch)
        print(f"Job {job.id}: {job.state}. Follow it with `stylemix jobs show {job.id} --follow`.")
        return 0
    return _foreground(config, ws, None, launch)


def _foreground(config, ws: Workspace, job_id: str | None, launch=None) -> int:
    from tqdm import tqdm

    from stylemix.training import jobs

    bar = None
    last_phase = None

    def progress(info: dict) -> None:
        nonlocal bar, last_phase
        phase = info.get("phase")
        if info.get("total_steps") is None:  # before the loop: loading the model, caching latents
            if phase != last_phase:
                print(f"{config.name}: {phase}...", file=sys.stderr)
            last_phase = phase
            return
        if bar is None:
            bar = tqdm(total=info["total_steps"], initial=info["step"], unit="step", desc=config.name)
        bar.update(info["step"] - bar.n)
        if phase != last_phase:
            bar.set_description(config.name if phase == "training" else f"{config.name} ({phase})")
            last_phase = phase
        if info.get("loss") is not None:
            bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{info['lr']:.2e}", refresh=False)
        if info.get("samples"):
            bar.write(f"samples at step {info['step']}: {', '.join(info['samples'])}")

    try:
        job = jobs.run_foreground(config, ws, progress=progress, job_id=job_id, launch=launch)
    finally:
        if bar is not None:
            bar.close()
    if job.state == jobs.COMPLETED:
        print(f"LoRA saved to {job.status.get('lora_dir')} (job {job.id}).")
        return 0
    if job.state == jobs.CANCELLED:
        print(f"Cancelled at step {job.status.get('step')}; resume with `stylemix jobs resume {job.id}`.")
        return 130
    raise StyleMixError(f"Training failed (job {job.id}): {job.status.get('error')}")
