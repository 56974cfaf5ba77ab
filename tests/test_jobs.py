"""Background jobs: real training processes on the tiny model, a one-at-a-time queue, cancel, resume, crashes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylemix.training import jobs
from stylemix.errors import StyleMixError
from trainers.lora import TrainConfig, latest_checkpoint
from trainers.lora import DIE_DURING_SAVE_ENV


def make_dataset(folder: Path, n: int = 3, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        x = np.full((size, size, 3), 40 * i, np.uint8)
        x[:: 6 + i] = 255
        Image.fromarray(x).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"jobstyle, picture {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "dataset.json").write_text(json.dumps({"style": "s", "trigger_word": "jobstyle", "size": size, "count": n}))
    return folder


def config(ws, name: str, **kw) -> TrainConfig:
    base = dict(data_dir=str(ws.data / "set"), name=name, model="tiny", device="cpu", resolution=64, rank=4, alpha=4,
                max_steps=3, sample_every=0, sample_prompts=["{trigger}, a house"], sample_steps=1,
                checkpoint_every=1000)
    return TrainConfig(**{**base, **kw})


def wait_for(ws, job_id, predicate, timeout=240.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        status = jobs.get_job(ws, job_id).status
        if predicate(status):
            return status
        jobs.ensure_queue_running(ws)  # what the app does on each refresh
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} timed out: {jobs.get_job(ws, job_id).status} "
                         f"log: {jobs.get_job(ws, job_id).log_tail(20)}")


@pytest.fixture
def ws(workspace, monkeypatch):
    monkeypatch.setenv("STYLEMIX_THREADS", "1")
    make_dataset(workspace.data / "set")
    return workspace


def test_jobs_run_one_at_a_time_and_report_progress(ws):
    first = jobs.submit(config(ws, "first", max_steps=4), ws, owner="alice")
    second = jobs.submit(config(ws, "second"), ws, owner="bob")
    assert first.state == jobs.RUNNING and second.state == jobs.QUEUED  # one training job at a time
    with pytest.raises(StyleMixError, match="No training job"):
        jobs.get_job(ws, first.id, owner="bob")  # another owner's job does not exist for you
    assert [j.id for j in jobs.list_jobs(ws, owner="bob")] == [second.id]
    with pytest.raises(StyleMixError, match="already training"):
        jobs.submit(config(ws, "second"), ws)

    done = wait_for(ws, second.id, lambda s: s["state"] in jobs.TERMINAL)
    a = jobs.get_job(ws, first.id).status
    assert a["state"] == done["state"] == jobs.COMPLETED, (a, done)
    assert done["started"] >= a["finished"]  # the queue waited for the first job
    assert a["step"] == a["total_steps"] == 4 and a["loss"] > 0 and a["lr"] >= 0 and a["steps_per_sec"] > 0
    assert a["samples"] == ["samples/step-000004-0.png"] and (first.dir / a["samples"][0]).is_file()
    assert (ws.loras / "first" / "stylemix.json").is_file() and (ws.loras / "second" / "stylemix.json").is_file()
    assert "Training first" in jobs.get_job(ws, first.id).log_tail()
    with pytest.raises(StyleMixError, match="already completed"):
        jobs.cancel(ws, first.id)
    with pytest.raises(StyleMixError, match="only failed or cancelled"):
        jobs.resume(ws, first.id)


def test_bad_requests_fail_at_submit_and_leave_nothing(ws):
    (ws.data / "empty").mkdir()
    with pytest.raises(StyleMixError, match="empty"):
        jobs.submit(config(ws, "x", data_dir=str(ws.data / "empty")), ws)
    with pytest.raises(StyleMixError, match="Invalid job id"):
        jobs.get_job(ws, "../etc")
    assert list(ws.jobs.iterdir()) in ([], [ws.jobs / ".queue.lock"])


def test_cancel_keeps_a_usable_checkpoint_and_resume_finishes(ws):
    job = jobs.submit(config(ws, "long", max_steps=40, checkpoint_every=1000), ws)
    wait_for(ws, job.id, lambda s: s.get("step", 0) >= 2)
    pid = jobs.get_job(ws, job.id).status["pid"]
    cancelled = jobs.cancel(ws, job.id, timeout=60)
    assert cancelled.state == jobs.CANCELLED
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the process is gone (its GPU memory with it)
    ckpt = latest_checkpoint(job.dir)
    stopped_at = cancelled.status["step"]
    assert ckpt is not None and ckpt.name == f"step-{stopped_at:06d}" and 2 <= stopped_at < 40
    assert not (ws.loras / "long").exists()

    jobs.resume(ws, job.id)
    done = wait_for(ws, job.id, lambda s: s["state"] in jobs.TERMINAL)
    assert done["state"] == jobs.COMPLETED and done["step"] == 40, done
    meta = json.loads((ws.loras / "long" / "stylemix.json").read_text())
    assert [s for s, _ in meta["loss_curve"]] == list(range(1, 41))  # continued, not restarted


def test_process_killed_while_saving_keeps_previous_checkpoint(ws, monkeypatch):
    monkeypatch.setenv(DIE_DURING_SAVE_ENV, "4")  # the job process os._exit()s half-way through saving step 4
    job = jobs.submit(config(ws, "crash", max_steps=6, checkpoint_every=2), ws)
    failed = wait_for(ws, job.id, lambda s: s["state"] in jobs.TERMINAL)
    assert failed["state"] == jobs.FAILED and "ended unexpectedly" in failed["error"]
    ckpts = job.dir / "checkpoints"
    assert any(p.name.startswith(".tmp-step-000004") for p in ckpts.iterdir())  # the half-written save
    assert latest_checkpoint(job.dir).name == "step-000002"  # ...is never chosen

    monkeypatch.delenv(DIE_DURING_SAVE_ENV)
    jobs.resume(ws, job.id)
    done = wait_for(ws, job.id, lambda s: s["state"] in jobs.TERMINAL)
    assert done["state"] == jobs.COMPLETED and done["step"] == 6
    meta = json.loads((ws.loras / "crash" / "stylemix.json").read_text())
    assert [s for s, _ in meta["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    assert "Resumed from" in jobs.get_job(ws, job.id).log_tail(200)


def test_cli_jobs_commands(ws, monkeypatch, capsys):
    from stylemix.cli import main

    monkeypatch.setenv("STYLEMIX_JOBS", str(ws.jobs))
    monkeypatch.setenv("STYLEMIX_HOME", str(ws.jobs.parent))
    code = main(["--model", "tiny", "--device", "cpu", "--loras-dir", str(ws.loras), "train", str(ws.data / "set"),
                 "--name", "clijob", "--resolution", "64", "--rank", "2", "--alpha", "2", "--max-steps", "2",
                 "--sample-prompts", "x", "--sample-steps", "1", "--background"])
    assert code == 0
    job_id = capsys.readouterr().out.split()[1].rstrip(":")
    assert main(["jobs", "list"]) == 0 and job_id in capsys.readouterr().out
    assert main(["jobs", "show", job_id, "--follow"]) == 0
    assert "completed" in capsys.readouterr().out
    assert main(["jobs", "cancel", job_id]) == 1  # already completed: one clear line, exit 1
    assert "already completed" in capsys.readouterr().err
    assert main(["jobs", "show", "nope"]) == 1
