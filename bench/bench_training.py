"""Training speed with latent caching vs. the VAE on every step (what diffusers' example LoRA script does).

Both variants run the same trainer (trainers/lora.py) on the same model weights, data, seed and
settings, one after the other in this one invocation, each in its own subprocess so that its peak
memory is its own.  Reported: steady-state steps/s (after 2 warm-up steps), wall time including the
one-off latent encoding, peak memory (CUDA allocator peak on GPU, max RSS on CPU), and how far
apart the two loss curves are (the cache draws the same posterior sample, so they should match).

    python -m bench.bench_training                                  # CPU: tiny SD1.5 at 256px
    python -m bench.bench_training --device cuda --full-size --resolution 512 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.BICUBIC).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"benchstyle, an image number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "dataset.json").write_text(json.dumps({"style": "bench", "trigger_word": "benchstyle", "size": size,
                                                     "count": n}))


def run_variant(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from stylemix.models import quiet_library_logs, tiny_components
    from trainers.lora import TrainConfig, train
    from diffusers import DDPMScheduler

    quiet_library_logs()
    comps = tiny_components(full_size=args.full_size)
    comps = {**comps, "noise_scheduler": DDPMScheduler.from_config(comps["scheduler"].config),
             "sample_scheduler": comps["scheduler"]}
    work = Path(args.work)
    cfg = TrainConfig(data_dir=str(work / "data"), name=f"bench-{args.variant}", loras_dir=str(work / "loras"),
                      model="tiny", device=args.device, resolution=args.resolution, max_steps=args.steps,
                      batch_size=args.batch_size, cache_latents=args.variant == "cached", sample_prompts=[],
                      checkpoint_every=10**9, train_text_encoder=True, overwrite=True)
    times = []
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def progress(info):
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    t0 = time.perf_counter()
    result = train(cfg, work / f"job-{args.variant}", progress=progress, components=comps)
    wall = time.perf_counter() - t0
    steady = (len(times) - 3) / (times[-1] - times[2]) if len(times) > 3 else float("nan")
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": args.variant, "steps_per_sec": steady, "wall_s": wall, "peak_mib": peak,
            "loss_curve": result.loss_curve}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--full-size", action="store_true", help="the real SD1.5 architecture (random weights)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the JSON results here")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)))
        return
    with tempfile.TemporaryDirectory() as work:
        make_images(Path(work) / "data", args.images, args.resolution)
        results = {}
        for variant in ("uncached", "cached"):
            cmd = [sys.executable, "-m", "bench.bench_training", "--variant", variant, "--work", work,
                   "--device", args.device, "--resolution", str(args.resolution), "--steps", str(args.steps),
                   "--images", str(args.images), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            cmd += ["--full-size"] if args.full_size else []
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                     filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))})
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
            results[variant] = json.loads(line[0][7:])
    c, u = results["cached"], results["uncached"]
    diff = max(abs(a[1] - b[1]) for a, b in zip(c["loss_curve"], u["loss_curve"]))
    summary = {
        "setup": {k: getattr(args, k) for k in ("device", "full_size", "resolution", "steps", "images", "batch_size",
                                                 "threads")},
        "steps_per_sec": {"uncached": round(u["steps_per_sec"], 4), "cached": round(c["steps_per_sec"], 4)},
        "speedup": round(c["steps_per_sec"] / u["steps_per_sec"], 3),
        "wall_s": {"uncached": round(u["wall_s"], 2), "cached": round(c["wall_s"], 2)},
        "peak_mib": {"uncached": round(u["peak_mib"], 1), "cached": round(c["peak_mib"], 1)},
        "loss_curve_max_abs_diff": diff,
        "loss_curve": {"uncached": u["loss_curve"], "cached": c["loss_curve"]},
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "loss_curve"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
