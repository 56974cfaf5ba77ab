"""Automatic balancing against the naive choice (weights = target shares), measured side by side.

1. Synthetic share functions (deterministic, many trials): LoRAs of unequal strength,
   share_i proportional to (k_i w_i)^p with k_i log-uniform in [1/3, 3] and p in [0.7, 2], for 2-, 3-
   and 4-way mixes and random target shares.  Reports the largest |share - target| of the naive
   weights and of the balanced ones, how often each is within 0.03, and the generations used.
2. The tiny model (random SD1.5 + tiny random CLIP, demo values): `balance_mix` end to end on
   preview images, same comparison on real generated images and real CLIP embeddings, plus the
   cost of one preview generation beside one full-size generation (the reason for previews).

    .venv/bin/python -m bench.bench_balance [--trials 200] [--tiny-targets 3] [--out FILE.json]
Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def synthetic(trials: int, seed: int = 0) -> dict:
    from stylemix.experiments.balance import BalanceConfig, balance

    rng = random.Random(seed)
    out = {}
    for n in (2, 3, 4):
        naive_err, best_err, evals, naive_ok, best_ok = [], [], [], 0, 0
        for _ in range(trials):
            names = [f"s{i}" for i in range(n)]
            k = {s: math.exp(rng.uniform(math.log(1 / 3), math.log(3))) for s in names}
            p = rng.uniform(0.7, 2.0)
            raw = [rng.uniform(0.15, 1.0) for _ in names]
            target = {s: r / sum(raw) for s, r in zip(names, raw)}

            def evaluate(w):
                v = {s: (k[s] * max(w[s], 0.0)) ** p for s in names}
                t = sum(v.values())
                return {s: x / t for s, x in v.items()}, 0.3

            best, naive, path, reached = balance(evaluate, target, config=BalanceConfig(max_evaluations=10))
            naive_err.append(naive.error)
            best_err.append(best.error)
            evals.append(len(path))
            naive_ok += naive.error <= 0.03
            best_ok += best.error <= 0.03
        out[f"{n}-way"] = {"trials": trials, "naive_error_median": statistics.median(naive_err),
                           "naive_error_max": max(naive_err), "balanced_error_median": statistics.median(best_err),
                           "balanced_error_max": max(best_err), "naive_within_0.03": naive_ok / trials,
                           "balanced_within_0.03": best_ok / trials, "generations_median": statistics.median(evals),
                           "generations_max": max(evals)}
    return out


def tiny(targets: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import make_library_lora

    from stylemix.experiments.balance import BalanceConfig, balance_mix
    from stylemix.scores.clip_models import load_scorer
    from stylemix.lora.library import LoraLibrary
    from stylemix.mixer import Mixer
    from stylemix.models import LoadedModel, tiny_pipeline
    from stylemix.recipe import Recipe
    from stylemix.scores.scoring import compute_centroid, save_centroid

    root = Path(tempfile.mkdtemp()) / "loras"
    names = ["watercolor", "pixelart", "anime"]
    for i, (n, s) in enumerate(zip(names, (1.0, 3.0, 2.0))):  # unequal strengths
        make_library_lora(root, n, seed=40 + i, scale=s)
    m = Mixer(LoadedModel(tiny_pipeline(), "tiny", torch.device("cpu"), torch.float32), LoraLibrary(root))
    scorer = load_scorer(tiny=True)
    ref = Recipe(prompt="a house", steps=4, width=128, height=128, batch_size=4, sampler="Euler", seed=100)
    base = m.generate(ref).images
    for n in names:
        save_centroid(root / n, compute_centroid(scorer, m.generate(ref.with_(loras={n: 1.0})).images, base))
    recipe = Recipe(prompt="a cat sitting by a window", sampler="Euler")
    cfg = BalanceConfig(max_evaluations=8, preview_steps=4, preview_size=128, preview_seeds=(0, 1),
                        clip_tolerance=1.0)
    rng = random.Random(1)
    runs = []
    for t in range(targets):
        k = 2 if t % 2 == 0 else 3
        raw = [rng.uniform(0.2, 1.0) for _ in range(k)]
        target = {n: round(r / sum(raw), 3) for n, r in zip(names[:k], raw)}
        target[names[0]] = round(1 - sum(v for n, v in target.items() if n != names[0]), 3)
        t0 = time.perf_counter()
        res = balance_mix(m, recipe, target, cfg)
        runs.append({"target": target, "naive_error": res.naive.error, "balanced_error": res.best.error,
                     "balanced_weights": res.best.weights, "search_generations": res.evaluations,
                     "all_generations": res.generations, "seconds": time.perf_counter() - t0})
    # preview vs full-size generation, interleaved, medians
    prev, full = [], []
    for i in range(3):
        for r, acc in ((recipe.with_(steps=8, width=256, height=256), prev), (recipe.with_(steps=25), full)):
            t0 = time.perf_counter()
            m.generate(r.with_(seed=i, loras={"watercolor": 0.5, "pixelart": 0.5}))
            acc.append(time.perf_counter() - t0)
    return {"runs": runs, "preview_256px_8steps_s": statistics.median(prev),
            "full_512px_25steps_s": statistics.median(full),
            "preview_cost_ratio": statistics.median(prev) / statistics.median(full)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--tiny-targets", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"synthetic": synthetic(args.trials)}
    print(json.dumps(res, indent=2), flush=True)
    if args.tiny_targets:
        res["tiny"] = tiny(args.tiny_targets)
        print(json.dumps(res["tiny"], indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
