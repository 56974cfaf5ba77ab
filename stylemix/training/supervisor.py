"""`python -m stylemix.training.supervisor --job-dir DIR`: a training job of several processes.

The job queue (stylemix/training/jobs.py) starts this process for a job whose config.json has a `launch`
(`stylemix train --num-processes N`, STYLEMIX_TRAIN_PROCESSES): it runs the trainer on every process under
accelerate's launcher (stylemix/launch.py) and, once all of them have ended, writes the job's state: the
main process's outcome, or, when a process was killed or crashed, a message naming it.  Only then may the
next queued job start, on GPUs no process of this job holds any more.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from stylemix.errors import StyleMixError
from stylemix.launch import Launch, LaunchFailed, is_consequence
from stylemix.paths import Workspace
from stylemix.training import jobs

logger = logging.getLogger("stylemix.training.jobs")


def supervise(job_dir: str | Path) -> int:
    """The job's trainer on several processes, under the launcher, and then the job's state.

    The main process keeps status.json as a one-process job does, but leaves its result as `outcome`; once
    every process has ended, this process writes the job's state: the outcome, or, when a process was killed
    or crashed (the launcher names it, and stops the rest), a message naming that process.  Only then may
    the next queued job start, on GPUs no process of this job holds any more.
    """
    job_dir = Path(job_dir).resolve()
    job = jobs.load_job(job_dir)
    if job is None:
        raise StyleMixError(f"{job_dir} is not a job folder.")
    workspace = Workspace(**{k: Path(v) for k, v in job.config["workspace"].items()})
    launch = Launch.from_dict(job.config.get("launch"))
    code, failure = 0, None
    try:
        launch.run(jobs.TRAINER_MODULE, ["--job-dir", str(job_dir)])
    except LaunchFailed as e:
        code, failure = 1, e
        logger.error("%s", e)
    except SystemExit as e:  # SIGTERM (cancel) or Ctrl-C: the launcher has stopped the processes
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001  (the launcher's own failure: ports, rendezvous)
        code, failure = 1, e
        logger.exception("The launcher failed")
    # Every process has ended: the job's state, from the main process's outcome and the launcher's report.
    status = jobs.read_json(job_dir / "status.json")
    outcome, error = status.pop("outcome", None), None
    if status.get("state") != jobs.RUNNING:  # cancelled or reconciled meanwhile: keep what it says
        state = status.get("state")
    elif isinstance(failure, LaunchFailed) and outcome not in (jobs.COMPLETED, jobs.CANCELLED):
        state = jobs.FAILED
        # the main process's own message says more, unless another process was the cause: one was killed,
        # or the main process only saw its all-reduce break
        main_error = status.get("error") or ""
        if outcome == jobs.FAILED and main_error and not failure.signal and not is_consequence(main_error):
            error = main_error
        else:
            error = (f"Training failed: {failure} No LoRA was written; the last complete checkpoint is kept: "
                     f"resume with `stylemix jobs resume {job.id}`.")
            status["failed_rank"] = failure.rank
    elif failure is not None and outcome is None:
        state, error = jobs.FAILED, f"The launcher failed: {type(failure).__name__}: {failure}"[:2000]
    elif outcome is not None:
        state, error = outcome, status.get("error") if outcome == jobs.FAILED else None
    elif (job_dir / jobs.CANCEL_FILE).exists():
        state = jobs.CANCELLED
    else:
        state, error = jobs.FAILED, (f"The training processes ended (code {code}) without a result; see train.log. "
                                f"Resume with `stylemix jobs resume {job.id}`.")
    status.update(state=state, finished=status.get("finished") or jobs.utc_now(), pid=None, error=error)
    jobs.write_status(job_dir, status)
    try:
        jobs.ensure_queue_running(workspace)  # hand the GPUs to the next queued job, now that every process ended
    except Exception:  # noqa: BLE001
        logger.exception("Could not start the next queued job")
    return code


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    p = argparse.ArgumentParser(prog="python -m stylemix.training.supervisor")
    p.add_argument("--job-dir", required=True)
    return supervise(p.parse_args(argv).job_dir)


if __name__ == "__main__":
    sys.exit(main())
