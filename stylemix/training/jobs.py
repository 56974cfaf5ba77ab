"""Background training jobs: one folder per job, one process per job, one job on the GPU at a time.

    jobs/<job_id>/config.json    what to train (TrainConfig), owner, library folder    (written once)
    jobs/<job_id>/status.json    state, phase, step, loss, lr, speed, time left, percent, loss curve (thinned),
                                 newest samples, error, pid, heartbeat
    jobs/<job_id>/train.log      the training process's stdout + stderr
    jobs/<job_id>/checkpoints/   complete checkpoints (see trainers/lora.py), samples/ sample images

The training process is started with `start_new_session=True`, so a crash or an out-of-memory
kill ends that process only, and cancelling it (SIGTERM to its process group) frees the GPU.
Nothing lives in memory: the queue is the set of folders whose state is `queued`, a job is
running if its pid is alive and its heartbeat recent, and `ensure_queue_running` (called by the
app and CLI on start, and by each job as it ends) starts the oldest queued job when no job is
running.  So jobs survive an app restart, and a job killed with its machine is marked failed
(and can be resumed from its last checkpoint) the next time anyone looks.

A job of several processes (`stylemix train --num-processes N`, or STYLEMIX_TRAIN_PROCESSES=N for the
app's jobs; config.json's `launch`) is started as `python -m stylemix.training.supervisor --job-dir DIR`,
which runs the trainer under accelerate's launcher: the job's pid is that process, the main training
process keeps status.json, and when a process dies the launcher stops the others and the supervisor
records which one failed.  A resumed job runs on the same number of processes.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from stylemix.errors import StyleMixError
from stylemix.paths import Workspace, atomic_write_text, check_name, inside
from stylemix.training.progress import STARTING

if TYPE_CHECKING:
    from stylemix.launch import Launch
    from stylemix.training.config import TrainConfig

logger = logging.getLogger("stylemix.training.jobs")

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = "queued", "running", "completed", "failed", "cancelled"
TERMINAL = (COMPLETED, FAILED, CANCELLED)
HEARTBEAT_S = 5.0  # the job process refreshes its heartbeat this often, even inside a long step
STALE_S = 120.0  # no heartbeat for this long: the process is gone (or hung, or its pid was reused)
CANCEL_FILE = "cancel.request"
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # so `-m trainers.lora` imports without installation
TRAINER_MODULE = "trainers.lora"  # the job process: `python -m trainers.lora --job-dir DIR` runs `run_job(DIR)`
LAUNCH_MODULE = "stylemix.training.supervisor"  # a job of several processes (supervisor.supervise)

# This machine's name, recorded with a job's pid: replicas on several machines share the jobs folder, and a
# pid means nothing on another machine (checking or signalling it there would hit an unrelated process).
HOST = socket.gethostname()

_children: dict[int, subprocess.Popen] = {}  # processes this process started: polled so they never linger as zombies


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class TrainingJob:
    id: str
    dir: Path
    config: dict  # config.json: {"train": TrainConfig fields, "owner", "loras_dir", "created"}
    status: dict  # status.json

    @property
    def state(self) -> str:
        return self.status.get("state", QUEUED)

    @property
    def lora_name(self) -> str:
        return self.config["train"]["name"]

    @property
    def owner(self) -> str | None:
        return self.config.get("owner")

    def log_tail(self, lines: int = 40) -> str:
        log = self.dir / "train.log"
        if not log.is_file():
            return ""
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 64 * 1024))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- files


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_status(job_dir: Path, status: dict) -> None:
    atomic_write_text(job_dir / "status.json", json.dumps(status, indent=1))


def load_job(job_dir: Path) -> TrainingJob | None:
    config = read_json(job_dir / "config.json")
    if not config.get("train"):
        return None  # not a job folder (or one still being created)
    return TrainingJob(job_dir.name, job_dir, config, read_json(job_dir / "status.json"))


@contextmanager
def _queue_lock(workspace: Workspace):
    """Serialises queue decisions between the app, CLI calls and ending jobs (advisory file lock)."""
    workspace.jobs.mkdir(parents=True, exist_ok=True)
    with open(workspace.jobs / ".queue.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- liveness


def reap_children() -> int:
    """Collect the exit status of every job process this process started that has ended.

    Until its parent waits for it, an ended child stays in the process table as a zombie
    ("defunct"); the app starts one process per job and lives for weeks, so each look at the queue
    (`list_jobs`, which every poll reaches) waits for the finished ones.  Returns how many are still running.
    """
    for pid, child in list(_children.items()):
        if child.poll() is not None:  # waitpid(pid, WNOHANG): reaps it if it has ended
            _children.pop(pid, None)
    return len(_children)


def _pid_alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        _children.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie answers kill(0) but is dead
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_alive(job: TrainingJob) -> bool:
    """The job's process exists and has sent a heartbeat recently."""
    pid, beat = job.status.get("pid"), job.status.get("heartbeat")
    if job.state == RUNNING and job.status.get("host") not in (None, HOST):  # on another machine: the heartbeat
        return isinstance(beat, (int, float)) and time.time() - beat < STALE_S
    if job.state != RUNNING or not isinstance(pid, int) or not _pid_alive(pid):
        return False
    return isinstance(beat, (int, float)) and time.time() - beat < STALE_S


def _reconcile(job: TrainingJob) -> TrainingJob:
    """A `running` job whose process is gone ended without saying so: mark it failed (resumable)."""
    if job.state == RUNNING and not is_alive(job):
        fresh = read_json(job.dir / "status.json")  # it may have just finished properly
        if fresh.get("state") == RUNNING:
            fresh.update(state=FAILED, finished=utc_now(), pid=None,
                         error="The training process ended unexpectedly (killed, crashed or the machine restarted); "
                               f"see train.log. Resume with `stylemix jobs resume {job.id}`.")
            write_status(job.dir, fresh)
        job.status = fresh
    return job


# --------------------------------------------------------------------------- public API


def list_jobs(workspace: Workspace, owner: str | None = None) -> list[TrainingJob]:
    """All jobs (of `owner`, when given), newest first; dead `running` jobs are marked failed."""
    reap_children()
    if not workspace.jobs.is_dir():
        return []
    jobs = [j for d in workspace.jobs.iterdir() if d.is_dir() and not d.name.startswith(".")
            if (j := load_job(d)) is not None and (owner is None or j.owner == owner)]
    return sorted((_reconcile(j) for j in jobs), key=lambda j: j.config.get("created", ""), reverse=True)


def get_job(workspace: Workspace, job_id: str, owner: str | None = None) -> TrainingJob:
    """One job; another owner's job is reported as not found, exactly like a missing one."""
    check_name(job_id, "job id")
    d = inside(workspace.jobs, job_id)
    job = load_job(d) if d.is_dir() else None
    if job is None or (owner is not None and job.owner != owner):
        raise StyleMixError(f"No training job {job_id!r}.")
    return _reconcile(job)


def poll(workspace: Workspace, job_id: str, owner: str | None = None) -> dict:
    return get_job(workspace, job_id, owner).status


def follow(workspace: Workspace, job_id: str, owner: str | None = None, interval: float = 1.0,
           timeout: float | None = None) -> Iterator[dict]:
    """Yield the job's status each time it changes, until it reaches a final state (or timeout)."""
    start, last = time.time(), None
    while True:
        ensure_queue_running(workspace)
        status = get_job(workspace, job_id, owner).status
        key = json.dumps({k: v for k, v in status.items() if k != "heartbeat"}, sort_keys=True)
        if key != last:
            last = key
            yield status
        if status.get("state") in TERMINAL or (timeout is not None and time.time() - start > timeout):
            return
        time.sleep(interval)


def submit(config: "TrainConfig", workspace: Workspace, owner: str | None = None, start: bool = True,
           launch: "Launch | None" = None) -> TrainingJob:
    """Queue a training job and start it if the GPU is free.

    The dataset and the LoRA name are checked now, so a bad request fails here, not in the job.
    `launch`: its processes (default: STYLEMIX_TRAIN_PROCESSES, else one), kept for its resumes.
    """
    from stylemix.datasets.prepare import load_dataset_folder
    from stylemix.launch import Launch

    config.loras_dir = str(Path(config.loras_dir or workspace.loras).resolve())
    config.data_dir = str(Path(config.data_dir).expanduser().resolve())
    config.validate()
    if owner is not None:
        check_name(owner, "owner")
    load_dataset_folder(config.data_dir)
    launch = (launch or Launch.from_env(config.device)).validate()
    if (Path(config.loras_dir) / config.name).exists() and not config.overwrite:
        raise StyleMixError(f"A LoRA named {config.name!r} already exists; choose another name or overwrite it.")
    with _queue_lock(workspace):
        for other in list_jobs(workspace):
            if other.lora_name == config.name and other.state in (QUEUED, RUNNING):
                raise StyleMixError(f"Job {other.id} is already training a LoRA named {config.name!r}.")
        job_id = f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        d = workspace.jobs / job_id
        d.mkdir(parents=True)
        write_status(d, {"state": QUEUED, "step": 0, "total_steps": None, "lora_name": config.name,
                          "owner": owner, "queued": utc_now(), "error": None, "samples": []})
        atomic_write_text(d / "config.json", json.dumps(
            {"train": asdict(config), "owner": owner, "created": utc_now(),
             "workspace": {k: str(Path(v).resolve()) for k, v in asdict(workspace).items()},
             **({"launch": launch.as_dict()} if launch.distributed else {})}, indent=1))
    if start:
        ensure_queue_running(workspace)
    return get_job(workspace, job_id)


def ensure_queue_running(workspace: Workspace) -> TrainingJob | None:
    """Start the oldest queued job if no job is running.  Safe to call any time, from anywhere."""
    with _queue_lock(workspace):
        jobs = list_jobs(workspace)  # also marks dead `running` jobs failed
        if any(j.state == RUNNING for j in jobs):
            return None
        queued = sorted((j for j in jobs if j.state == QUEUED), key=lambda j: j.status.get("queued", ""))
        if not queued:
            return None
        return _launch(queued[0])


def _launch(job: TrainingJob) -> TrainingJob:
    log = open(job.dir / "train.log", "ab")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    # several processes: the launcher's process is the job's (its pid is what cancel signals)
    module = LAUNCH_MODULE if job.config.get("launch") else TRAINER_MODULE
    try:
        proc = subprocess.Popen([sys.executable, "-m", module, "--job-dir", str(job.dir)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(PROJECT_ROOT), start_new_session=True)
    finally:
        log.close()
    _children[proc.pid] = proc
    job.status.update(state=RUNNING, pid=proc.pid, host=HOST, own_session=True, heartbeat=time.time(), started=utc_now(),
                      error=None, phase=STARTING, eta_s=None)
    write_status(job.dir, job.status)
    logger.info("Started job %s (pid %d).", job.id, proc.pid)
    return job


def cancel(workspace: Workspace, job_id: str, owner: str | None = None, timeout: float = 60.0) -> TrainingJob:
    """Stop a job: a queued one never starts; a running one saves a checkpoint and ends.

    SIGTERM first (the trainer finishes its step, checkpoints, exits); after `timeout` seconds
    the whole process group is killed, which frees the GPU; earlier checkpoints stay usable.
    """
    with _queue_lock(workspace):
        job = get_job(workspace, job_id, owner)
        if job.state in TERMINAL:
            raise StyleMixError(f"Job {job_id} is already {job.state}.")
        if job.state == QUEUED:
            job.status.update(state=CANCELLED, finished=utc_now(), error=None)
            write_status(job.dir, job.status)
            return job
        (job.dir / CANCEL_FILE).write_text(utc_now())
        pid = job.status["pid"]
        remote = job.status.get("host") not in (None, HOST)
        if not remote:
            _signal(pid, signal.SIGTERM, job.status.get("own_session", False))
    if remote:  # running on another replica's machine: its trainer sees the cancel file at its next step
        deadline = time.time() + timeout
        while get_job(workspace, job_id, owner).state == RUNNING and time.time() < deadline:
            time.sleep(0.5)
        return get_job(workspace, job_id, owner)
    deadline = time.time() + timeout
    while _pid_alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    if _pid_alive(pid):
        logger.warning("Job %s did not stop within %.0fs: killing it.", job_id, timeout)
        _signal(pid, signal.SIGKILL, job.status.get("own_session", False))
        while _pid_alive(pid) and time.time() < deadline + 10:
            time.sleep(0.2)
    with _queue_lock(workspace):
        status = read_json(job.dir / "status.json")
        if status.get("state") not in TERMINAL:
            status.update(state=CANCELLED, finished=utc_now(), pid=None, error=None)
            write_status(job.dir, status)
    ensure_queue_running(workspace)
    return get_job(workspace, job_id, owner)


def _signal(pid: int, sig: int, own_session: bool) -> None:
    try:
        if own_session:  # the job's process group: the trainer and anything it started
            os.killpg(pid, sig)
        else:  # a foreground `stylemix train`: only that process, never the user's shell group
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def resume(workspace: Workspace, job_id: str, owner: str | None = None, start: bool = True) -> TrainingJob:
    """Queue a failed or cancelled job again; it continues from its latest complete checkpoint."""
    with _queue_lock(workspace):
        job = get_job(workspace, job_id, owner)
        if job.state not in (FAILED, CANCELLED):
            raise StyleMixError(f"Job {job_id} is {job.state}; only failed or cancelled jobs can be resumed.")
        (job.dir / CANCEL_FILE).unlink(missing_ok=True)
        # the step, percent and loss curve stay: the page keeps showing how far it got until it runs again
        job.status.update(state=QUEUED, queued=utc_now(), error=None, pid=None, finished=None, phase=None,
                          eta_s=None, resumes=job.status.get("resumes", 0) + 1)
        write_status(job.dir, job.status)
    if start:
        ensure_queue_running(workspace)
    return get_job(workspace, job_id, owner)


def run_foreground(config: "TrainConfig", workspace: Workspace, owner: str | None = None,
                   progress: Callable[[dict], None] | None = None, job_id: str | None = None,
                   launch: "Launch | None" = None) -> TrainingJob:
    """Run a job in this process (CLI without --background), still recorded, cancellable and resumable.

    With several processes (`launch`, or the stored launch of the job resumed) the job is started as the
    queue starts it, at once, and followed here: Ctrl-C cancels it (a checkpoint is kept)."""
    with _queue_lock(workspace):
        running = [j for j in list_jobs(workspace) if j.state == RUNNING]
        if running:
            raise StyleMixError(f"Job {running[0].id} is training now (one job at a time); "
                                "wait for it, or use --background to queue this one.")
    if job_id is None:
        job = submit(config, workspace, owner, start=False, launch=launch)
    else:
        job = resume(workspace, job_id, owner, start=False)
    if job.config.get("launch"):
        return _follow_launched(workspace, job, progress)
    with _queue_lock(workspace):
        job.status.update(state=RUNNING, pid=os.getpid(), host=HOST, own_session=False, heartbeat=time.time(), started=utc_now(),
                      phase=STARTING, eta_s=None)
        write_status(job.dir, job.status)
    # By module name, as the queue starts `python -m trainers.lora`: trainers/ imports stylemix, never the
    # reverse, and this in-process run keeps the progress callback a subprocess could not call.
    trainer = importlib.import_module(TRAINER_MODULE)
    trainer.run_job(job.dir, progress=progress, handle_signals=False)
    return get_job(workspace, job.id)


def _follow_launched(workspace: Workspace, job: TrainingJob, progress: Callable[[dict], None] | None) -> TrainingJob:
    """Start a job of several processes now and pass its status to `progress` until it ends."""
    with _queue_lock(workspace):
        if any(j.state == RUNNING for j in list_jobs(workspace)):
            raise StyleMixError("Another job started training meanwhile (one job at a time); "
                                f"job {job.id} stays queued.")
        _launch(job)
    shown: list = []
    try:
        for status in follow(workspace, job.id, interval=0.5):
            if progress and status.get("phase"):
                info = dict(status)
                new = [s for s in status.get("samples") or [] if s not in shown]
                shown += new
                info["samples"] = new  # each sample announced once, not at every step
                progress(info)
    except KeyboardInterrupt:
        print(f"Stopping job {job.id} (a checkpoint is kept)...", file=sys.stderr)
        cancel(workspace, job.id)
    return get_job(workspace, job.id)


# --------------------------------------------------------------------------- inside the job process (trainers.lora.run_job)


class StatusWriter:
    """The job process's view of status.json: updated by the loop, refreshed by a heartbeat thread."""

    def __init__(self, job_dir: Path) -> None:
        self.dir, self.lock = job_dir, threading.Lock()
        self.status = read_json(job_dir / "status.json")
        self.stop = threading.Event()

    def update(self, **fields) -> None:
        with self.lock:
            self.status.update(fields, heartbeat=time.time())
            write_status(self.dir, self.status)

    def beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            self.update()
