"""Training speed, side by side: each comparison is a few variants of one run (TrainConfig overrides
and a dataset layout), each variant in its own subprocess so that its peak memory is its own.

--compare cache       latent caching vs the VAE on every step (what diffusers' example script does)
--compare buckets     aspect-ratio buckets vs square crops of about the same area (issue 17's goal:
                      buckets cost no more than 5% in latent pixels per second)
--compare networks    attention vs kohya vs LoCon networks (steps/s and peak memory)
--compare optimizers  AdamW vs Prodigy (steps/s; the optimizer's own step time and state memory
                      are measured by `--compare optimizer-step`)

Reported per variant: steady-state steps/s (after 2 warm-up steps), latent pixels per second, wall
time including the one-off latent encoding, peak memory (CUDA allocator peak on GPU, max RSS on CPU)
and the loss curve.

    python -m bench.bench_training                                  # CPU: tiny SD1.5 at 256px, cache
    python -m bench.bench_training --compare buckets
    python -m bench.bench_training --compare networks --full-size --steps 5 --threads 2
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


# Each comparison: variant name -> (TrainConfig overrides, dataset layout).  "square" stores every
# image at R x R; "buckets" stores them at kohya buckets of R (two portrait and landscape shapes
# beside the square), as `stylemix preprocess` does by default.
COMPARISONS = {
    "cache": {"uncached": ({"cache_latents": False}, "square"), "cached": ({"cache_latents": True}, "square")},
    "buckets": {"square": ({}, "square"), "buckets": ({}, "buckets")},
    "networks": {"attention": ({"network": "attention"}, "square"), "kohya": ({"network": "kohya"}, "square"),
                 "locon": ({"network": "locon"}, "square")},
    "optimizers": {"adamw": ({"optimizer": "adamw"}, "square"),
                   "prodigy": ({"optimizer": "prodigy", "learning_rate": 1.0}, "square")},
}


def bucket_shapes(size: int) -> list[tuple[int, int]]:
    """Three shapes of about size x size pixels, sides multiples of 64: a portrait, the square, a landscape."""
    side = max(64, size - 64 if size > 128 else size)
    long = (size * size // side) // 64 * 64
    return [(side, long), (size, size), (long, side)]


def make_images(folder: Path, n: int, size: int, layout: str = "square") -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = bucket_shapes(size) if layout == "buckets" else [(size, size)]
    rows = []
    for i in range(n):
        w, h = shapes[i % len(shapes)]
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.BICUBIC).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"benchstyle, an image number {i}",
                                "original_size": [w, h], "bucket": [w, h]}))
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
    overrides, layout = COMPARISONS[args.compare][args.variant]
    base = dict(model="tiny", device=args.device, resolution=args.resolution, max_steps=args.steps,
                batch_size=args.batch_size, sample_prompts=[], checkpoint_every=100_000, train_text_encoder=True,
                overwrite=True)
    missing = sorted(set(overrides) - set(TrainConfig.__dataclass_fields__))
    if missing:
        return {"variant": args.variant, "skipped": f"TrainConfig has no {', '.join(missing)} yet"}
    cfg = TrainConfig(data_dir=str(work / f"data-{layout}"), name=f"bench-{args.variant}",
                      loras_dir=str(work / "loras"), **{**base, **overrides})
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
    pixels = args.batch_size * float(np.mean([w * h for w, h in (bucket_shapes(args.resolution)
                                                                   if layout == "buckets" else
                                                                   [(args.resolution, args.resolution)])]))
    return {"variant": args.variant, "steps_per_sec": steady, "pixels_per_sec": steady * pixels / 64,
            "wall_s": wall, "peak_mib": peak, "loss_curve": result.loss_curve}


def run_comparison(args) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for layout in {layout for _, layout in COMPARISONS[args.compare].values()}:
            make_images(Path(work) / f"data-{layout}", args.images, args.resolution, layout)
        for variant in COMPARISONS[args.compare]:
            cmd = [sys.executable, "-m", "bench.bench_training", "--variant", variant, "--work", work,
                   "--compare", args.compare, "--device", args.device, "--resolution", str(args.resolution),
                   "--steps", str(args.steps), "--images", str(args.images), "--batch-size", str(args.batch_size),
                   "--threads", str(args.threads)]
            cmd += ["--full-size"] if args.full_size else []
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                     filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))})
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
            results[variant] = json.loads(line[0][7:])
    return results


def optimizer_step(args) -> dict:
    """The optimizer alone on the LoRA parameters of the UNet + text encoder (attention network, rank 32):
    seconds per step and bytes of optimizer state, AdamW vs Prodigy, same random gradients."""
    import torch
    from peft import LoraConfig

    from stylemix.lora.files import TEXT_TARGETS, UNET_TARGETS
    from stylemix.models import tiny_components

    torch.set_num_threads(args.threads)
    comps = tiny_components(full_size=args.full_size)
    comps["unet"].add_adapter(LoraConfig(r=32, lora_alpha=16, target_modules=UNET_TARGETS))
    comps["text_encoder"].add_adapter(LoraConfig(r=32, lora_alpha=16, target_modules=TEXT_TARGETS))
    params = [p for m in (comps["unet"], comps["text_encoder"]) for p in m.parameters() if p.requires_grad]
    out = {"trainable_params": sum(p.numel() for p in params)}
    for name in ("adamw", "prodigy"):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        if name == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-4)
        else:
            from prodigyopt import Prodigy

            opt = Prodigy(params, lr=1.0)
        for _ in range(2):  # warm-up: state allocated
            opt.step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            opt.step()
        per_step = (time.perf_counter() - t0) / args.steps
        state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                    if torch.is_tensor(v))
        out[name] = {"step_s": round(per_step, 5), "state_mib": round(state / 2**20, 1)}
    out["prodigy_vs_adamw_time"] = round(out["prodigy"]["step_s"] / out["adamw"]["step_s"], 2)
    out["prodigy_vs_adamw_state"] = round(out["prodigy"]["state_mib"] / out["adamw"]["state_mib"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--compare", default="cache", choices=sorted(COMPARISONS) + ["optimizer-step"])
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
    setup = {k: getattr(args, k) for k in ("compare", "device", "full_size", "resolution", "steps", "images",
                                           "batch_size", "threads")}
    if args.compare == "optimizer-step":
        summary = {"setup": setup, **optimizer_step(args)}
        print(json.dumps(summary, indent=1))
    else:
        results = run_comparison(args)
        ran = {k: r for k, r in results.items() if "skipped" not in r}
        summary = {"setup": setup, "skipped": {k: r["skipped"] for k, r in results.items() if "skipped" in r}}
        for key, digits in (("steps_per_sec", 4), ("pixels_per_sec", 1), ("wall_s", 2), ("peak_mib", 1)):
            summary[key] = {k: round(r[key], digits) for k, r in ran.items()}
        first = next(iter(ran), None)
        if first:  # each variant against the first (the baseline of the comparison)
            summary["vs_" + first] = {k: {"steps_per_sec": round(r["steps_per_sec"] / ran[first]["steps_per_sec"], 3),
                                          "pixels_per_sec": round(r["pixels_per_sec"] / ran[first]["pixels_per_sec"], 3)}
                                      for k, r in ran.items() if k != first}
            curves = [r["loss_curve"] for r in ran.values()]
            summary["loss_curve_max_abs_diff"] = max((abs(a[1] - b[1]) for c in curves[1:]
                                                      for a, b in zip(curves[0], c)), default=0.0)
        print(json.dumps(summary, indent=1))
        summary["loss_curve"] = {k: r["loss_curve"] for k, r in ran.items()}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
