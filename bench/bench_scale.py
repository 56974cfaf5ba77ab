"""Scaling out (issue 18), side by side in one run: training steps/s and experiment images/s on 1 and on N
processes, each started as a user starts it (StyleMix's own launcher: torchrun on the CPU, accelerate's
launcher on GPUs), on the tiny model.

Training: `python -m trainers.lora` with the same batch per process, so N processes train N x the images of
a step; reported: steps/s and images/s of the training steps alone (stylemix.json's `train_seconds`: no
start-up, caching, samples or saving).  Experiments: `stylemix evaluate --num-processes N` on one protocol;
images/s over the making and scoring of the images (`--json`'s `seconds`: no start-up or model loading).
Renders: two users' renders sent at the same moment to the app's service with one pipeline and with two
(STYLEMIX_DEVICES=cpu,cpu; stylemix/pipelines.py); reported: each user's latency and the mean.
Each process runs `--threads` torch threads, so N processes use N x as many cores: the speed-up needs the
cores (or GPUs) for it, and a machine busy with other work shows less.

    .venv/bin/python -m bench.bench_scale [--processes 2] [--steps 20] [--out bench/results-scale-cpu.json]
    python -m bench.bench_scale --device cuda --processes 4 --full-size ...   (one GPU per process)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_workspace(root: Path, images: int, size: int) -> None:
    """A striped dataset and three library LoRAs (tiny model) under `root`."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_library_lora

    data = root / "data"
    data.mkdir(parents=True)
    rows = []
    for i in range(images):
        x = np.zeros((size, size, 3), np.uint8)
        x[:, :, i % 3] = 200
        x[:: 4 + i % 7] = 255
        Image.fromarray(x).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"sksstyle, picture {i}"}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    (data / "dataset.json").write_text(json.dumps({"style": "s", "trigger_word": "sksstyle", "size": size,
                                                   "count": images}))
    for i, name in enumerate(("anime", "watercolor", "pixelart")):
        make_library_lora(root / "loras", name, seed=i)


PROTOCOL = """name = "scale"
[styles]
anime = "anime"
watercolor = "watercolor"
pixelart = "pixelart"
[protocol]
singles = ["anime", "watercolor"]
prompts = {prompts}
seeds = {seeds}
[[mixes]]
weights = {{ watercolor = 0.6, pixelart = 0.4 }}
[generation]
steps = {steps}
width = {size}
height = {size}
sampler = "Euler"
"""


def run(cmd: list[str], env: dict, cwd: Path) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def launched(n: int, device: str, module: str, args: list[str]) -> list[str]:
    if n == 1:
        return [sys.executable, "-m", module, *args]
    from stylemix.launch import Launch

    return Launch(num_processes=n, device=device).validate().command_line(module, args)


def bench_training(root: Path, n: int, a, env: dict) -> dict:
    name = f"train{n}"
    args = [str(root / "data"), "--name", name, "--model", a.model, "--device", a.device, "--loras-dir",
            str(root / "trained"), "--work-dir", str(root / "runs" / name), "--resolution", str(a.size),
            "--batch-size", str(a.batch), "--max-steps", str(a.steps), "--rank", "8", "--alpha", "8",
            "--sample-every", "0", "--sample-prompts", "x", "--sample-steps", "1", "--checkpoint-every", "100000",
            "--no-tensorboard", "--lr-scheduler", "constant"]
    t0 = time.perf_counter()
    run(launched(n, a.device, "trainers.lora", args), env, root)
    wall = time.perf_counter() - t0
    meta = json.loads((root / "trained" / name / "stylemix.json").read_text())["training"]
    s = meta["train_seconds"]
    return {"processes": meta["processes"], "effective_batch": meta["effective_batch"], "steps": meta["steps"],
            "train_seconds": s, "steps_per_s": round(meta["steps"] / s, 3),
            "images_per_s": round(meta["steps"] * meta["effective_batch"] / s, 3), "wall_s": round(wall, 1)}


def bench_experiment(root: Path, n: int, a, env: dict) -> dict:
    out = root / f"eval{n}"
    cmd = [sys.executable, "-m", "stylemix.cli", "--model", a.model, "--device", a.device, "--loras-dir",
           str(root / "loras"), "evaluate", "--config", str(root / "scale.toml"), "--out", str(out), "--json",
           "--num-processes", str(n)]
    t0 = time.perf_counter()
    text = run(cmd, env, root)
    wall = time.perf_counter() - t0
    res = json.loads(text[text.index("{"):])
    return {"processes": res["processes"], "images": res["generated"], "seconds": res["seconds"],
            "images_per_s": round(res["generated"] / res["seconds"], 3), "wall_s": round(wall, 1)}


def bench_renders(n_pipelines: int, a, rounds: int = 3) -> dict:
    """Two users' renders, sent together to a service with `n_pipelines` pipelines: each user's latency
    (from the send to the image), the best of `rounds` rounds (the first round also warms up)."""
    import threading

    import torch

    from stylemix.paths import Workspace
    from stylemix.recipe import Recipe
    from stylemix.service import StyleMixService, new_owner_token

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench-renders-") as tmp:
        root = Path(tmp)
        make_workspace(root, images=1, size=a.size)
        ws = Workspace.default(root / "loras")
        os.environ["STYLEMIX_DEVICES"] = ",".join([a.device] * n_pipelines)
        try:
            service = StyleMixService.start(a.model, ws, examples=False)
        finally:
            del os.environ["STYLEMIX_DEVICES"]
        users = [new_owner_token(), new_owner_token()]
        recipes = [Recipe("a cat by the sea", loras={"anime": 0.8}, seed=1, steps=a.render_steps,
                          width=a.render_size, height=a.render_size),
                   Recipe("a house by the sea", loras={"watercolor": 0.6, "pixelart": 0.4}, seed=2,
                          steps=a.render_steps, width=a.render_size, height=a.render_size)]
        best: list[float] | None = None
        for _ in range(rounds):
            lat = [0.0, 0.0]

            def one(i: int, t0: float) -> None:
                service.compose(users[i], recipes[i], score=False)
                lat[i] = time.perf_counter() - t0

            t0 = time.perf_counter()
            threads = [threading.Thread(target=one, args=(i, t0)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if best is None or sum(lat) < sum(best):
                best = lat
    return {"pipelines": n_pipelines, "latency_s": [round(x, 3) for x in best], "mean_latency_s": round(sum(best) / 2, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2, help="N, compared with 1 (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="tiny")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    p.add_argument("--batch", type=int, default=2, help="training batch per process (default 2)")
    p.add_argument("--size", type=int, default=64, help="training and image size (default 64)")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--seeds", type=int, default=4, help="protocol seeds: images = 5 configurations x prompts x seeds")
    p.add_argument("--gen-steps", type=int, default=4, help="sampling steps per protocol image (default 4)")
    p.add_argument("--render-steps", type=int, default=8, help="sampling steps of each user's render (default 8)")
    p.add_argument("--render-size", type=int, default=128, help="size of each user's render (default 128)")
    p.add_argument("--skip", choices=["training", "experiments", "renders"], action="append", default=[])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "STYLEMIX_THREADS": str(a.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    result = {"device": a.device, "model": a.model, "threads_per_process": a.threads, "cpus": os.cpu_count(),
              "load_average_before": [round(x, 2) for x in os.getloadavg()], "settings": vars(a)}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        make_workspace(root, images=max(8, a.batch * a.processes * 2), size=a.size)
        prompts = [f"a {w} by the sea" for w in ("house", "cat", "tree", "boat", "city", "bird")][:a.prompts]
        (root / "scale.toml").write_text(PROTOCOL.format(prompts=json.dumps(prompts), seeds=list(range(a.seeds)),
                                                         steps=a.gen_steps, size=a.size))
        # interleaved 1, N, 1, N would be fairer on a busy machine; one of each keeps the run short
        if "training" not in a.skip:
            result["training"] = {str(n): bench_training(root, n, a, env) for n in (1, a.processes)}
            t = result["training"]
            result["training_ratio"] = {
                "steps_per_s": round(t[str(a.processes)]["steps_per_s"] / t["1"]["steps_per_s"], 3),
                "images_per_s": round(t[str(a.processes)]["images_per_s"] / t["1"]["images_per_s"], 3)}
        if "experiments" not in a.skip:
            result["experiments"] = {str(n): bench_experiment(root, n, a, env) for n in (1, a.processes)}
            e = result["experiments"]
            result["experiments_ratio_images_per_s"] = round(
                e[str(a.processes)]["images_per_s"] / e["1"]["images_per_s"], 3)
    if "renders" not in a.skip:
        result["renders"] = {str(n): bench_renders(n, a) for n in (1, 2)}
        r = result["renders"]
        result["renders_ratio_mean_latency"] = round(r["2"]["mean_latency_s"] / r["1"]["mean_latency_s"], 3)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
