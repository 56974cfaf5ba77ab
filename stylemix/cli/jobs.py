"""`stylemix jobs list|show|cancel|resume`: background training jobs."""

from __future__ import annotations

import argparse
import json

from stylemix.paths import Workspace


def register(sub) -> None:
    p = sub.add_parser("jobs", help="list, follow, cancel and resume training jobs")
    jsub = p.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    ls = jsub.add_parser("list", help="all jobs, newest first")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    show = jsub.add_parser("show", help="one job's status (and log tail)")
    show.add_argument("job_id")
    show.add_argument("--follow", action="store_true", help="print progress until the job ends")
    show.add_argument("--log", type=int, default=0, metavar="N", help="also print the last N log lines")
    show.add_argument("--json", action="store_true")
    c = jsub.add_parser("cancel", help="stop a job (its last checkpoint stays resumable)")
    c.add_argument("job_id")
    c.add_argument("--timeout", type=float, default=60.0, help="seconds to wait before killing it")
    r = jsub.add_parser("resume", help="continue a failed or cancelled job from its last checkpoint")
    r.add_argument("job_id")
    p.set_defaults(func=run)


def _line(status: dict) -> str:
    parts = [f"{status.get('state', '?'):<9}", f"step {status.get('step', 0)}/{status.get('total_steps') or '?'}"]
    if status.get("loss") is not None:
        parts.append(f"loss {status['loss']:.4f}")
    if status.get("lr") is not None:
        parts.append(f"lr {status['lr']:.2e}")
    if status.get("steps_per_sec"):
        parts.append(f"{status['steps_per_sec']:.2f} step/s")
    if status.get("eta_s") and status.get("state") == "running":
        parts.append(f"ETA {int(status['eta_s']) // 60}m{int(status['eta_s']) % 60:02d}s")
    if status.get("error"):
        parts.append(f"error: {status['error']}")
    return "  ".join(parts)


def run(args: argparse.Namespace) -> int:
    from stylemix.training import jobs

    ws = Workspace.default(args.loras_dir)
    jobs.ensure_queue_running(ws)
    cmd = args.jobs_command
    if cmd == "list":
        all_jobs = jobs.list_jobs(ws)
        if args.json:
            print(json.dumps([{"id": j.id, **j.status} for j in all_jobs], indent=1))
        elif not all_jobs:
            print("No training jobs.")
        for j in [] if args.json else all_jobs:
            print(f"{j.id}  {j.lora_name:<20} {_line(j.status)}")
        return 0
    if cmd == "show":
        if args.follow:
            for status in jobs.follow(ws, args.job_id):
                print(_line(status), flush=True)
        job = jobs.get_job(ws, args.job_id)
        if args.json:
            print(json.dumps({"id": job.id, "config": job.config, "status": job.status}, indent=1))
        elif not args.follow:
            print(f"{job.id}  LoRA {job.lora_name}\n{_line(job.status)}")
            for s in job.status.get("samples") or []:
                print(f"sample: {job.dir / s}")
        if args.log:
            print(job.log_tail(args.log))
        return 0 if job.state != jobs.FAILED else 1
    if cmd == "cancel":
        job = jobs.cancel(ws, args.job_id, timeout=args.timeout)
        print(f"{job.id}: {job.state} at step {job.status.get('step', 0)}.")
        return 0
    if cmd == "resume":
        job = jobs.resume(ws, args.job_id)
        print(f"{job.id}: {job.state}.")
        return 0
    return 2
