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


def zombie(pid: int) -> bool:
    """The process exists only as an unreaped exit status ("defunct")."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_jobs_run_one_at_a_time_and_report_progress(ws):
    first = jobs.submit(config(ws, "first", max_steps=4, sample_every=2, sample_prompts=["{trigger}, a house", "a tree"]),
                        ws, owner="alice")
    second = jobs.submit(config(ws, "second"), ws, owner="bob")
    assert first.state == jobs.RUNNING and second.state == jobs.QUEUED  # one training job at a time
    first_pid = first.status["pid"]
    assert first.status["phase"] == "starting"  # from the moment it is launched, the page has a phase to show
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
    assert a["percent"] == 100 and a["eta_s"] == 0 and a["phase"] is None
    assert [s for s, _ in a["loss_curve"]] == [1, 2, 3, 4]
    assert a["samples"] == ["samples/step-000004-0.png", "samples/step-000004-1.png"]  # the newest round
    assert a["sample_prompts"] == ["jobstyle, a house", "a tree"]
    # the finished process this one started was waited for: no defunct child left behind while we run
    jobs.list_jobs(ws)
    assert not zombie(first_pid), f"job process {first_pid} is a zombie"
    with pytest.raises(ChildProcessError):
        os.waitpid(first_pid, os.WNOHANG)  # already reaped
    assert jobs.reap_children() == 0
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
    # the loss curve so far stays in the job's status: the chart keeps its history after Cancel...
    assert [s for s, _ in cancelled.status["loss_curve"]] == list(range(1, stopped_at + 1))

    queued = jobs.resume(ws, job.id, start=False)
    assert [s for s, _ in queued.status["loss_curve"]] == list(range(1, stopped_at + 1))  # ...and while queued
    jobs.ensure_queue_running(ws)
    done = wait_for(ws, job.id, lambda s: s["state"] in jobs.TERMINAL)
    assert done["state"] == jobs.COMPLETED and done["step"] == 40, done
    assert [s for s, _ in done["loss_curve"]] == list(range(1, 41))  # ...and after Resume, one whole curve
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


@pytest.mark.parametrize("name, raw, message", [
    ("max_steps", "-5", "Invalid max steps -5: use a whole number from 1 to 100000"),
    ("max_steps", "1e9", "Invalid max steps 1000000000: use a whole number from 1 to 100000"),
    ("learning_rate", "0", "Invalid learning rate 0: use a number greater than 0 and at most 1"),
    ("learning_rate", "fast", "Invalid learning rate 'fast': not a number"),
    ("rank", "2.5", "Invalid rank 2.5: use a whole number from 1 to 1024"),
    ("epochs", "0", "Invalid epochs 0: use a whole number from 1 to 10000"),
    ("batch_size", "100000", "Invalid batch size 100000: use a whole number from 1 to 256"),
    ("resolution", "100", "Invalid resolution 100: use a multiple of 8 from 64 to 2048"),
    ("seed", "-1", "Invalid seed -1: use a whole number from 0 to 4294967295"),
    ("seed", "", "No seed given"),
])
def test_bad_settings_get_one_message_from_the_same_limits_in_the_cli_and_the_app(ws, capsys, name, raw, message):
    from stylemix.cli import main
    from ui.train_tab import form_setting

    with pytest.raises(StyleMixError) as form:  # the Train tab's boxes
        form_setting(name, raw)
    assert message in str(form.value)
    with pytest.raises(StyleMixError, match=message.split(":")[0]):  # a config built any other way
        config(ws, "x", **{name: raw}).validate()
    with pytest.raises(SystemExit) as usage:  # `stylemix train --<setting> <raw>`: argparse, before anything runs
        main(["--model", "tiny", "--loras-dir", str(ws.loras), "train", str(ws.data / "set"), "--name", "x",
              "--" + name.replace("_", "-"), raw, "--background"])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not [d for d in ws.jobs.iterdir() if d.is_dir()]  # nothing queued


def test_service_job_views_label_every_sample_keep_the_curve_and_list_only_own_jobs(ws):
    from stylemix.service import StyleMixService

    service = StyleMixService.start("tiny", ws, examples=False)
    ann, bob = "u" + "a" * 24, "u" + "b" * 24
    make_dataset(ws.data / ann / "set")
    for steps, message in [(0, "Invalid max steps 0"), (-3, "Invalid max steps -3"), ("lots", "not a number")]:
        with pytest.raises(StyleMixError, match=message):
            service.start_training(ann, "set", "annlora", steps)
    with pytest.raises(StyleMixError, match="Invalid rank 0"):
        service.start_training(ann, "set", "annlora", 2, {"rank": 0})
    assert service.list_job_views(ann) == [] and not [d for d in ws.jobs.iterdir() if d.is_dir()]

    job = service.start_training(ann, "set", "annlora", 4, {"sample_prompts": ["{trigger}, a house", "a tree"],
                                                            "sample_steps": 1})
    assert service.job_view(ann, job.id)["phase"] == "starting"
    wait_for(ws, job.id, lambda s: s["state"] in jobs.TERMINAL)
    view = service.job_view(ann, job.id)
    assert view["state"] == "completed" and view["percent"] == 100 and view["eta_s"] is None, view
    # every sample of every round (sample_every = steps // 4 = 1), labelled with its step and prompt
    assert [(s["step"], s["prompt"]) for s in view["samples"]] == [
        (step, prompt) for step in (1, 2, 3, 4) for prompt in ("jobstyle, a house", "a tree")]
    assert view["samples_total"] == 8 and all(Path(s["path"]).is_file() for s in view["samples"])
    assert [s for s, _ in view["loss_curve"]] == [1, 2, 3, 4]
    listed = service.list_job_views(ann)
    assert [(j["id"], j["lora_name"], j["state"], j["step"], j["total_steps"]) for j in listed] == [
        (job.id, "annlora", "completed", 4, 4)] and listed[0]["started"]
    assert service.list_job_views(bob) == []
    with pytest.raises(StyleMixError, match="No training job"):
        service.job_view(bob, job.id)


def test_a_job_running_on_another_replicas_machine_is_judged_by_its_heartbeat_and_never_signalled(ws):
    """Replicas on several machines share the jobs folder: a job's pid is its machine's.  Another machine must
    neither mark it failed because no local process has that pid, nor signal a local process with that pid."""
    import subprocess
    import sys

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a local process
    try:
        job = jobs.submit(config(ws, "remote"), ws, start=False)
        status = {**job.status, "state": jobs.RUNNING, "pid": bystander.pid, "host": "another-machine",
                  "heartbeat": time.time(), "own_session": False}
        jobs.write_status(job.dir, status)
        assert jobs.is_alive(jobs.get_job(ws, job.id))
        assert jobs.get_job(ws, job.id).state == jobs.RUNNING  # not reconciled as failed here
        # cancel from this machine: the cancel file for the remote trainer, no signal to the local pid
        jobs.cancel(ws, job.id, timeout=1)
        assert (job.dir / jobs.CANCEL_FILE).is_file() and bystander.poll() is None
        # its machine went silent: stale after STALE_S without a heartbeat, then failed (resumable)
        jobs.write_status(job.dir, {**status, "heartbeat": time.time() - jobs.STALE_S - 1})
        assert not jobs.is_alive(jobs.get_job(ws, job.id))
        assert jobs.get_job(ws, job.id).state == jobs.FAILED
    finally:
        bystander.kill()
        bystander.wait()
