"""Mixing over time at full SD1.5 scale (random weights): what schedules, switch and composite cost, and
whether the mixer's memory stays flat over many mixes.

Side by side in one run, on one pipeline, the same 4 rank-32 kohya LoRAs, prompt and seed:

1. renders, interleaved: the static mix; a schedule that changes every LoRA's weight at every step
   (goal <= 1.05x the static mix on the CPU at 256 px / 8 steps / 2 threads, <= 1.10x on a GPU at
   512 px / 20 steps); switch (every 2 steps, goal <= 1.02x); composite (4 U-Net passes a step,
   reported against 4x);
2. one weight rewrite (set_weights + the exact merge) for 4 attention-only and 4 LoCon LoRAs;
3. (--memory) process RSS (and CUDA memory on a GPU) after 1, 100 and 1000 random mixes of 3 out of
   20 LoRAs (goal: flat within 5% after the first hundred).

    .venv/bin/python -m bench.bench_schedules --out bench/results-schedules-cpu.json          # ~6 min, 2 cores
    .venv/bin/python -m bench.bench_schedules --memory-only --out bench/results-mixer-memory-cpu.json
    python -m bench.bench_schedules --device cuda --size 512 --steps 20 --memory --out r.json

The weights are random: timings and memory are real-scale, the images are noise.  Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_lora_formats import kohya_file  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; else the peak from getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_renders(mixer, names: list[str], size: int, steps: int, repeats: int, device) -> dict:
    """Static mix vs every-step schedule vs switch vs composite, interleaved, medians of `repeats`."""
    from stylemix.recipe import Recipe

    base = Recipe(prompt="a lighthouse on a cliff at dusk", steps=steps, width=size, height=size, seed=11,
                  sampler="Euler", add_trigger_words=False)
    weights = {n: 0.3 + 0.1 * i for i, n in enumerate(names)}
    # each LoRA ramps over the whole render: every step has a new row of weights
    ramps = {n: f"{0.1 * (i + 1):g}@0,{w:g}@1" for i, (n, w) in enumerate(weights.items())}
    kinds = {
        "static": base.with_(loras=weights),
        "schedule_every_step": base.with_(loras=weights, schedules=ramps),
        "switch_every_2": base.with_(loras=weights, mode="switch", switch_every=2),
        "composite": base.with_(loras=weights, mode="composite"),
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    rewrites: dict[str, int] = {}
    for rep in range(repeats + 1):  # the first round warms up (loads, allocations)
        for kind, recipe in kinds.items():
            if kind == "composite" and rep > 1:
                continue  # 4x as long: two timed renders are enough for a ratio near 4
            sync(device)
            t = time.perf_counter()
            result = mixer.generate(recipe)
            sync(device)
            if rep:
                times[kind].append(time.perf_counter() - t)
            rewrites[kind] = result.timings.get("schedule_rewrites", 0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"size": size, "steps": steps, "repeats": repeats, "seconds": med, "rewrites": rewrites,
            "ratio_schedule_vs_static": med["schedule_every_step"] / med["static"],
            "ratio_switch_vs_static": med["switch_every_2"] / med["static"],
            "ratio_composite_vs_static": med["composite"] / med["static"], "all": times}


def bench_rewrite(mixer, sets: dict[str, list[str]], repeats: int, device) -> dict:
    """One weight rewrite (set_weights + apply) per kind, interleaved; switching kinds is not timed."""
    out: dict[str, list[float]] = {k: [] for k in sets}
    layers = {}
    for rep in range(repeats + 1):
        for kind, names in sets.items():
            mixer.set_weights({n: 0.3 for n in names})
            mixer.apply()
            sync(device)
            t = time.perf_counter()
            mixer.set_weights({n: 0.3 + 0.05 * (j + 1) * (1 + rep % 2) for j, n in enumerate(names)})
            layers[kind] = mixer.apply()
            sync(device)
            if rep:
                out[kind].append(time.perf_counter() - t)
    return {"ms": {k: round(1e3 * statistics.median(v), 1) for k, v in out.items()}, "layers_rewritten": layers}


def bench_memory(mixer, names: list[str], checkpoints=(1, 100, 1000), device=None) -> dict:
    """RSS (and CUDA allocated) after n random 3-of-N mixes, each written into the weights."""
    rng = random.Random(0)
    mixer.ensure_loaded(names)
    rows, done = [], 0
    t0 = time.perf_counter()
    for target in checkpoints:
        while done < target:
            picked = rng.sample(names, 3)
            mixer.set_weights({n: round(rng.uniform(-1, 1), 2) or 0.5 for n in picked})
            mixer.apply()
            done += 1
        row = {"mixes": done, "rss_mb": round(rss_mb(), 1), "seconds": round(time.perf_counter() - t0, 1)}
        if device is not None and device.type == "cuda":
            sync(device)
            row["cuda_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        rows.append(row)
        print("memory:", row, flush=True)
    after = {r["mixes"]: r for r in rows}
    growth = after[checkpoints[-1]]["rss_mb"] / after[checkpoints[1]]["rss_mb"] - 1 if len(rows) > 2 else None
    return {"rows": rows, "rss_growth_after_first_100": growth}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp32 on cpu, fp16 on cuda)")
    p.add_argument("--size", type=int, default=None, help="image side (default 256 on cpu, 512 on cuda)")
    p.add_argument("--steps", type=int, default=None, help="steps (default 8 on cpu, 20 on cuda)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="also the memory rows (3 of 20 LoRAs, 1000 mixes)")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--mixes", type=int, default=1000, help="mixes for the memory rows (default 1000)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import StableDiffusionPipeline

    from stylemix.lora.library import LoraLibrary
    from stylemix.lora.names import pipeline_targets
    from stylemix.mixer import Mixer
    from stylemix.models import LoadedModel, pick_dtype, quiet_library_logs, tiny_components

    quiet_library_logs()
    device = torch.device(args.device)
    dtype = pick_dtype(device, args.dtype)
    gpu = device.type == "cuda"
    size, steps = args.size or (512 if gpu else 256), args.steps or (20 if gpu else 8)
    pipe = StableDiffusionPipeline(**tiny_components(full_size=True), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    results: dict = {"model": "full-size SD1.5 architecture, random weights", "device": str(device),
                     "dtype": str(dtype).replace("torch.", ""), "threads": args.threads, "torch": torch.__version__,
                     "machine": platform.machine(), "gpu": torch.cuda.get_device_name() if gpu else None}
    n_memory = 20 if (args.memory or args.memory_only) else 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lib = LoraLibrary(tmp / "loras", targets=pipeline_targets(pipe))
        kinds = [] if args.memory_only else [("attn", i, False) for i in range(4)] + [("locon", i, True) for i in range(4)]
        kinds += [("mem", i, False) for i in range(n_memory)]
        for kind, i, locon in kinds:
            path, _ = kohya_file(tmp / f"{kind}{i}.safetensors", pipe, seed=100 * len(kind) + i, locon=locon)
            lib.import_file(path, f"{kind}{i}")
            path.unlink()
        pipe.to(device, dtype)
        mixer = Mixer(LoadedModel(pipe, "full-size-random", device, dtype), lib)
        if not args.memory_only:
            attn = [f"attn{i}" for i in range(4)]
            results["renders"] = bench_renders(mixer, attn, size, steps, args.repeats, device)
            print("renders:", {k: v for k, v in results["renders"].items() if k != "all"}, flush=True)
            results["rewrite"] = bench_rewrite(mixer, {"attention": attn, "locon": [f"locon{i}" for i in range(4)]},
                                               5, device)
            print("one weight rewrite, 4 LoRAs:", results["rewrite"], flush=True)
            for name in attn + [f"locon{i}" for i in range(4)]:
                mixer.unload(name)  # the memory rows start from their own 20 LoRAs only
        if n_memory:
            checkpoints = tuple(sorted({1, min(100, args.mixes), args.mixes}))
            results["memory"] = bench_memory(mixer, [f"mem{i}" for i in range(n_memory)], checkpoints, device)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
