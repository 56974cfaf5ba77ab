"""The fair GPU queue: how long a compose request waits while another user runs the seed protocol.

On the tiny model (real SD1.5 architecture, random weights), side by side in one run:
1. one protocol image and one compose request alone (medians), the units of the ratios;
2. **fair** (what the app does now): the protocol runs in `gpu_queue.background()` and takes the
   pipeline's lock per image; meanwhile a second user sends compose requests at random moments.
   Wait = compose latency - its latency alone;
3. **whole run** (what the app did before: the experiment and compose shared one Gradio
   concurrency slot, so a compose started after the whole experiment): the same protocol holding
   the lock for its whole run, the same compose requests.

Reported: compose wait / one protocol image (median and max).  Goal (issue 11): max about 1.

    .venv/bin/python -m bench.bench_queue [--prompts 3 --seeds 3 --steps 8 --size 64 --composes 8] [--out FILE.json]
Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def _service(root: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import make_library_lora  # a real random LoRA in the library's layout

    from stylemix.paths import Workspace
    from stylemix.service import StyleMixService

    ws = Workspace.at(root)
    for p in (ws.loras, ws.data, ws.jobs, ws.outputs):
        p.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("style_a", "style_b")):
        make_library_lora(ws.loras, name, seed=10 + i)
    return StyleMixService.start("tiny", ws, examples=False)


def run(prompts: int, seeds: int, steps: int, size: int, composes: int, seed: int = 0) -> dict:
    from stylemix import gpu_queue
    from stylemix.recipe import Recipe
    from stylemix.service import experiment_images, new_owner_token

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        service = _service(Path(tmp))
        mixer, lock = service.mixer, service.mixer.lock
        ann, bob = new_owner_token(), new_owner_token()
        image = Recipe("a cat", loras={"style_a": 0.5, "style_b": 0.5}, steps=steps, width=size, height=size,
                       sampler="Euler")
        slider = Recipe("a dog", loras={"style_a": 0.3}, steps=4, width=64, height=64, sampler="Euler")
        for _ in range(2):  # warm-up: LoRAs loaded, schedulers built
            mixer.generate(image)
            service.compose(bob, slider, score=False)

        def timed(fn, n=5):
            out = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
            return statistics.median(out)

        image_s = timed(lambda: mixer.generate(image))
        compose_s = timed(lambda: service.compose(bob, slider.with_(seed=rng.randrange(10**6)), score=False))
        n_images = experiment_images("protocol", 2, prompts, seeds)
        plist = [f"a cat number {i}" for i in range(prompts)]

        def protocol():
            return service.run_experiment(ann, "protocol", ["style_a", "style_b"], plist, list(range(seeds)),
                                          steps, size)

        def whole_run():  # the old behaviour: nothing else gets the GPU until the experiment ends
            with lock:
                with gpu_queue.background():
                    return service._run_experiment(ann, "protocol", ["style_a", "style_b"], plist,
                                                   list(range(seeds)), steps, size, None, None)

        results = {}
        for mode, target in (("fair", protocol), ("whole_run", whole_run)):
            t0 = time.perf_counter()
            worker = threading.Thread(target=target, name=f"protocol-{mode}")
            worker.start()
            time.sleep(2 * image_s)  # the protocol is under way
            waits = []
            for _ in range(composes):
                if not worker.is_alive():
                    break
                t = time.perf_counter()
                service.compose(bob, slider.with_(seed=rng.randrange(10**6)), score=False)
                waits.append(max(0.0, time.perf_counter() - t - compose_s))
                time.sleep(rng.uniform(0.2, 1.5) * image_s)
            worker.join()
            total = time.perf_counter() - t0
            results[mode] = {"composes": len(waits), "wait_s": waits, "protocol_s": total,
                             "wait_over_image_median": statistics.median(waits) / image_s if waits else None,
                             "wait_over_image_max": max(waits) / image_s if waits else None}
        return {"device": str(mixer.loaded.device), "threads": torch.get_num_threads(), "protocol_images": n_images,
                "image_s": image_s, "compose_alone_s": compose_s, "steps": steps, "size": size, **results}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--composes", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = run(a.prompts, a.seeds, a.steps, a.size, a.composes)
    for mode in ("fair", "whole_run"):
        r = res[mode]
        print(f"{mode:9s}: {r['composes']} composes during a {res['protocol_images']}-image protocol; compose wait / "
              f"one protocol image ({res['image_s'] * 1000:.0f} ms): median {r['wait_over_image_median']:.2f}, "
              f"max {r['wait_over_image_max']:.2f}; protocol took {r['protocol_s']:.1f} s")
    print(f"compose alone: {res['compose_alone_s'] * 1000:.0f} ms")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
