"""Several processes (issue 18): training and experiments on 2 CPU processes (gloo), started from StyleMix's
own commands under the launcher (torchrun on the CPU), against one process; a killed process; the launcher's
command lines.  Every process runs one torch thread (the CI machine has 2 cores)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_library_lora
from stylemix.errors import StyleMixError
from stylemix.launch import Launch, LaunchFailed, describe_failure
from stylemix.lora.files import WEIGHTS_NAME
from stylemix.paths import Workspace
from stylemix.training import jobs
from test_experiments import SMALL
from test_trainer import make_dataset, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """This process computes as each launched process does: CPU kernels split their sums by thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def env(tmp_path: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "STYLEMIX_THREADS": "1", "STYLEMIX_HOME": str(tmp_path / "home"),
            "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "STYLEMIX_MODEL": "tiny"}


def stylemix(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "stylemix.cli", "--model", "tiny", "--device", "cpu", *args],
                       capture_output=True, text=True, env=env(tmp_path), cwd=tmp_path, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


# --------------------------------------------------------------------------- experiments


def test_evaluate_on_two_processes_gives_the_one_process_images_scores_and_summary_bit_for_bit(tmp_path, one_thread):
    """`stylemix evaluate --num-processes 2`: the images are split over two processes (run.json records
    both), and every PNG, results.csv and the summary are byte for byte those of one process.  Before the
    fix both processes believed they were the only one (accelerate's default backend on a CPU machine)."""
    from stylemix.experiments.protocol import ProtocolConfig, run_protocol
    from stylemix.lora.library import LoraLibrary
    from stylemix.mixer import Mixer
    from stylemix.models import load_model
    from stylemix.recipe import Recipe
    from stylemix.scores.clip_models import load_scorer
    from stylemix.scores.scoring import compute_centroid, save_centroid

    loras = tmp_path / "loras"
    make_library_lora(loras, "my_anime", seed=1, trigger="anistyle")
    make_library_lora(loras, "watercolor", seed=2, trigger="wcstyle")
    make_library_lora(loras, "px_v2", seed=3, trigger="pixstyle")
    mixer = Mixer(load_model("tiny", "cpu", None), LoraLibrary(loras))  # as the command loads it
    scorer = load_scorer(tiny=True)
    r = Recipe(prompt="a house", steps=2, width=64, height=64, batch_size=2, sampler="Euler")
    for name in ("my_anime", "watercolor", "px_v2"):  # centroids: calibrated scores and shares are measured
        save_centroid(loras / name, compute_centroid(scorer, mixer.generate(r.with_(loras={name: 1.0})).images))
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL.replace('prompts = ["a cat by a window", "a city at night"]', 'prompts = ["a city at night"]'))
    one = run_protocol(mixer, ProtocolConfig.load(cfg), tmp_path / "one")
    t0 = time.perf_counter()
    out = stylemix(tmp_path, "--loras-dir", str(loras), "evaluate", "--config", str(cfg), "--out",
                   str(tmp_path / "two"), "--num-processes", "2", "--json").stdout
    wall = time.perf_counter() - t0
    res = json.loads(out[out.index("{"):])
    assert res["processes"] == 2 and res["generated"] == res["total"] == one.total == 5
    two = tmp_path / "two"
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    assert not list(two.glob("results.part*.csv"))  # gathered and written once
    pngs = sorted(p.relative_to(one.out_dir) for p in one.out_dir.glob("images/**/*.png"))
    assert len(pngs) == 5 and pngs == sorted(p.relative_to(two) for p in two.glob("images/**/*.png"))
    for rel in pngs:
        assert (one.out_dir / rel).read_bytes() == (two / rel).read_bytes(), rel
    for f in ("results.csv", "summary.csv", "summary.md"):
        assert (one.out_dir / f).read_bytes() == (two / f).read_bytes(), f
    rows = (two / "results.csv").read_text().splitlines()
    assert len(rows) == 6 and any(c not in ("", "\r") for c in rows[-1].split(",")[-3:])  # shares measured
    print(f"evaluate on 2 processes: {wall:.1f}s")


# --------------------------------------------------------------------------- training


def _lora(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS_NAME))


def test_training_on_two_processes_reaches_the_one_process_lora(tmp_path, one_thread):
    """`stylemix train --num-processes 2 --batch-size 1` (a job: launcher, two trainer processes) against one
    process with batch 2: every sample draws its noise, timestep and flip from its own seed, so the split
    changes nothing but the order of fp32 sums.  Against one process that accumulates two batches of 1 (the
    same sums per process) the LoRA is identical bit for bit."""
    from trainers.lora import train

    make_dataset(tmp_path / "data")
    # adam_epsilon 1: Adam's first step is lr x sign(gradient) with a tiny epsilon, so a gradient that is
    # zero up to rounding would move its weight by +-lr either way; this keeps each step proportional to it.
    opts = dict(max_steps=3, learning_rate=1e-3, lr_scheduler="constant", adam_epsilon=1.0, tensorboard=False)
    t0 = time.perf_counter()
    stylemix(tmp_path, "--loras-dir", str(tmp_path / "loras"), "train", str(tmp_path / "data"), "--name", "two",
             "--num-processes", "2", "--batch-size", "1", "--resolution", "64", "--rank", "4", "--alpha", "4",
             "--max-steps", "3", "--sample-every", "0", "--sample-prompts", "a house", "--sample-steps", "1",
             "--checkpoint-every", "1000",
             "--learning-rate", "1e-3", "--lr-scheduler", "constant", "--adam-epsilon", "1", "--no-tensorboard")
    wall = time.perf_counter() - t0
    two = tmp_path / "loras" / "two"
    meta = json.loads((two / "stylemix.json").read_text())
    assert meta["training"]["processes"] == 2 and meta["training"]["effective_batch"] == 2
    [job] = jobs.list_jobs(Workspace.at(tmp_path / "home"))
    assert job.state == jobs.COMPLETED and job.status["processes"] == 2 and job.config["launch"]["num_processes"] == 2

    one = train(tiny_config(tmp_path, "one", batch_size=2, **opts), tmp_path / "job-one")
    acc = train(tiny_config(tmp_path, "acc", batch_size=1, grad_accumulation=2, **opts), tmp_path / "job-acc")
    w2, w1, wa = _lora(two), _lora(one.lora_dir), _lora(acc.lora_dir)
    assert all(torch.equal(w2[k], wa[k]) for k in wa)  # the split itself changes nothing
    assert [s for s, _ in meta["loss_curve"]] == [1, 2, 3]
    for (_, a), (_, b) in zip(meta["loss_curve"], one.loss_curve):
        assert a == pytest.approx(b, rel=1e-4)
    moved = max(w1[k].abs().max().item() for k in w1 if "lora_B" in k)  # B starts at zero: what training did
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert moved > 1e-4 and diff < 2e-2 * moved, (diff, moved)  # batched kernels round differently, no more
    print(f"train on 2 processes: {wall:.1f}s; max |LoRA(2 x 1) - LoRA(1 x 2)| = {diff:.2e} of {moved:.2e}")


def test_a_killed_process_fails_the_job_naming_it_without_a_lora_and_resume_finishes(workspace, tmp_path,
                                                                                      monkeypatch):
    """kill -9 one of the two training processes mid-run: the launcher stops the other, the job ends failed
    naming rank 1, no LoRA is written; a one-process resume is refused, the job's resume (two processes)
    completes it from the last checkpoint."""
    import psutil

    from trainers.lora import train

    monkeypatch.setenv("STYLEMIX_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    make_dataset(workspace.data / "set")
    cfg = tiny_config(tmp_path, "killed", data_dir=str(workspace.data / "set"), loras_dir=str(workspace.loras),
                      max_steps=12, batch_size=1, checkpoint_every=2, sample_prompts=[], tensorboard=False)
    job = jobs.submit(cfg, workspace, launch=Launch(num_processes=2, device="cpu"))
    end, victim = time.time() + 120, None
    while time.time() < end:
        status = jobs.get_job(workspace, job.id).status
        if victim is None and (status.get("step") or 0) >= 3:  # past the checkpoint at step 2
            assert status["step"] < 12, "the run ended before a process could be killed"
            ranks = {p.environ().get("RANK"): p for p in psutil.Process(status["pid"]).children(recursive=True)
                     if p.environ().get("RANK") is not None}
            assert set(ranks) == {"0", "1"}  # two trainer processes under the launcher
            victim = ranks["1"].pid
            os.kill(victim, signal.SIGKILL)
        if status.get("state") in jobs.TERMINAL:
            break
        time.sleep(0.1)
    status = jobs.get_job(workspace, job.id).status
    assert status["state"] == jobs.FAILED, status
    assert f"rank 1 of 2 (pid {victim}) was killed by SIGKILL" in status["error"] and status["failed_rank"] == 1
    assert not (workspace.loras / "killed").exists() and status.get("pid") is None

    with pytest.raises(StyleMixError, match="trained on 2 process"):  # another split is another run
        train(cfg, job.dir, resume=True)

    jobs.resume(workspace, job.id)
    end = time.time() + 150
    while jobs.get_job(workspace, job.id).state not in jobs.TERMINAL and time.time() < end:
        jobs.ensure_queue_running(workspace)
        time.sleep(0.3)
    done = jobs.get_job(workspace, job.id)
    assert done.state == jobs.COMPLETED, (done.status, done.log_tail(30))
    meta = json.loads((workspace.loras / "killed" / "stylemix.json").read_text())
    assert meta["training"]["steps"] == 12 and meta["training"]["processes"] == 2 and done.status["resumes"] == 1


# --------------------------------------------------------------------------- the pieces, without processes


def test_each_sample_draws_the_same_values_in_any_batch():
    from trainers.batches import batch_slots, epoch_batches, sample_generator
    from trainers.losses import sample_draws

    def draws(slots):
        return sample_draws([sample_generator(7, 2, k) for k in slots], (4, 8, 8), 1000, True, 0.1)

    whole = draws(range(4))
    halves = [draws(range(0, 2)), draws(range(2, 4))]
    for a, b in zip(whole, [torch.cat(x) for x in zip(*halves)]):
        assert torch.equal(a, b)
    # 2 processes x batch 1 take, at each step, the images of one process's batch of 2
    one = epoch_batches([list(range(8))], 2, 42, 0, 1)
    two = epoch_batches([list(range(8))], 1, 42, 0, 2)
    assert [b for pair in one for b in pair] == [i for b in two for i in b]
    assert batch_slots(two) == list(range(8)) and batch_slots(one) == [0, 2, 4, 6]


def test_launcher_command_lines_and_refusals(monkeypatch):
    cpu = Launch(num_processes=2, device="cpu")
    assert cpu.command_line("trainers.lora", ["--job-dir", "J"])[1:] == [
        "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "--module", "trainers.lora",
        "--job-dir", "J"]
    many = Launch(num_processes=4, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1",
                  main_process_port=29555, device="cpu")
    assert many.launcher_argv("stylemix.cli", ["evaluate"]) == ("torchrun", [
        "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
        "--master-port", "29555", "--module", "stylemix.cli", "evaluate"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpus = Launch(num_processes=16, num_machines=2, machine_rank=0, main_process_ip="10.0.0.1", main_process_port=29555)
    kind, argv = gpus.validate().launcher_argv("trainers.lora", ["--job-dir", "J"])
    assert kind == "accelerate" and argv[:4] == ["--multi_gpu", "--num_processes", "16", "--num_machines"]
    assert argv[-4:] == ["-m", "trainers.lora", "--job-dir", "J"] and "--main_process_ip" in argv
    from accelerate.commands.launch import launch_command_parser

    parsed = launch_command_parser().parse_args(argv)  # accelerate's own parser takes it
    assert parsed.num_processes == 16 and parsed.module and parsed.training_script == "trainers.lora"
    for bad, match in ((dict(num_processes=3, num_machines=2), "multiple of"),
                       (dict(num_processes=2, num_machines=2), "main-process-ip"),
                       (dict(num_processes=9), "need 9 GPUs"), (dict(num_processes=0), "at least 1"),
                       (dict(num_processes=2, device="mps"), "CUDA GPUs or the CPU")):
        with pytest.raises(StyleMixError, match=match):
            Launch(**bad).validate()
    monkeypatch.setenv("STYLEMIX_TRAIN_PROCESSES", "two")
    with pytest.raises(StyleMixError, match="STYLEMIX_TRAIN_PROCESSES"):
        Launch.from_env()


def test_the_first_failure_named_is_the_killed_process_not_the_ones_stopped_after_it(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    none = str(tmp_path / "none")
    failures = {0: ProcessFailure(0, 100, -signal.SIGTERM, none), 1: ProcessFailure(1, 101, -signal.SIGKILL, none),
                2: ProcessFailure(2, 102, 1, none)}
    e = describe_failure(failures, 4)
    assert isinstance(e, LaunchFailed) and (e.rank, e.pid, e.signal) == (1, 101, "SIGKILL")
    assert str(e).startswith("Process rank 1 of 4 (pid 101) was killed by SIGKILL")
    e = describe_failure({0: failures[0], 2: failures[2]}, 4)
    assert e.rank == 2 and "exited with code 1" in str(e)


def test_the_app_queue_takes_its_process_count_from_the_setting(workspace, tmp_path, monkeypatch):
    make_dataset(workspace.data / "set")
    cfg = tiny_config(tmp_path, "queued", data_dir=str(workspace.data / "set"))
    monkeypatch.setenv("STYLEMIX_TRAIN_PROCESSES", "2")
    job = jobs.submit(cfg, workspace, start=False)
    assert job.config["launch"]["num_processes"] == 2  # kept for its resumes
    monkeypatch.setenv("STYLEMIX_TRAIN_PROCESSES", "1")
    job = jobs.submit(tiny_config(tmp_path, "single", data_dir=str(workspace.data / "set")), workspace,
                      start=False)
    assert "launch" not in job.config
