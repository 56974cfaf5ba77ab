"""Live sliders benchmark (issue 12): full render, preview frame, weight change, drag, recompiles.

Side by side in one run, on one pipeline with 2 active LoRAs (random rank-32 LoRAs on the UNet
attention and text encoder, as bench/bench_mixer.py makes them), a random few-step LoRA stand-in on
LCM-LoRA's targets (LCMScheduler, no CFG) and a random TAESD (diffusers AutoencoderTiny) for previews:

1. full render: the recipe (CFG 7.5, batch 1), eager; with --compile also compiled (torch.compile,
   channels_last, CUDA graphs), and the largest pixel difference between the two;
2. preview frame: `Previewer.preview` of a new weight, from the call (the slider event) to the PIL image,
   during a drag (previews in a row) and as the first of a drag (right after a full render);
3. a weight change then the full image vs the same recipe again, interleaved;
4. with --compile: dynamo graphs compiled and CUDA graphs recorded over 100 weight changes (each
   followed by a UNet step at the render's shape): the goal is 0 and 0;
5. CUDA: synchronizing calls inside the denoising loop, counted by torch.cuda.set_sync_debug_mode
   (goal 0);
6. a simulated drag: events every 50 ms for 2 s, each a preview in its own thread (the worst case: every
   event reaches the server), then the release's exact render; previews running at once (goal: at most 1)
   and the time from release to the exact image vs one full render (goal <= 1.1x);
7. with --fuse-qkv, last: fused q/k/v projections vs the same pipeline unfused (full render, preview,
   pixels, recompiles over 100 changes): whether they pay.

    python -m bench.bench_live --out bench/results-live-cpu-tiny.json                   # CPU, tiny model
    python -m bench.bench_live --full-size --size 256 --steps 8 --out bench/results-live-cpu-full.json
    python -m bench.bench_live --device cuda --full-size --compile --out results-live-h200.json   # ~5 min

The weights are random: timings are real-scale, images are noise.  Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.bench_mixer import make_full_size_library, med_ms, sync  # noqa: E402

logger = logging.getLogger("stylemix.bench")


def timed(device, fn):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def mix(names, i: int) -> dict:
    # a new weight each call, both LoRAs active: what a moving slider sends
    return {names[0]: round(0.2 + 0.8 * ((i * 7) % 13) / 12, 3), names[1]: 0.5}


def bench_full(mixer, recipe, names, repeats: int) -> dict:
    dev = mixer.loaded.device
    timed(dev, lambda: mixer.generate(recipe))  # warm-up (and, compiled, the compile)
    times = [timed(dev, lambda: mixer.generate(recipe))[0] for _ in range(repeats)]
    return {"median_s": round(statistics.median(times), 4), "all_s": [round(t, 4) for t in times]}


def bench_preview(previewer, recipe, names, repeats: int) -> dict:
    dev = previewer.mixer.loaded.device
    previewer.preview(recipe.with_(loras=mix(names, 999)), "bench")  # warm-up
    times, label = [], None
    for i in range(repeats):
        t, out = timed(dev, lambda: previewer.preview(recipe.with_(loras=mix(names, i)), "bench"))
        times.append(t)
        label = out.label
    return {"median_s": round(statistics.median(times), 4), "all_s": [round(t, 4) for t in times], "label": label}


def bench_preview_after_full(previewer, recipe, names, repeats: int) -> dict:
    """The first preview of a drag: it follows the exact render of the last release."""
    dev = previewer.mixer.loaded.device
    times = []
    for i in range(repeats):
        previewer.mixer.generate(recipe.with_(loras=mix(names, 300 + i)))
        times.append(timed(dev, lambda: previewer.preview(recipe.with_(loras=mix(names, 310 + i)), "bench"))[0])
    return {"median_s": round(statistics.median(times), 4), "all_s": [round(t, 4) for t in times]}


def bench_change_vs_repeat(mixer, recipe, names, pairs: int) -> dict:
    dev = mixer.loaded.device
    new, rep, same = [], [], []
    for i in range(pairs):
        r = recipe.with_(loras=mix(names, 100 + i))
        tn, a = timed(dev, lambda: mixer.generate(r))
        tr, b = timed(dev, lambda: mixer.generate(r))
        new.append(tn)
        rep.append(tr)
        same.append(bool(np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))))
    return {"new_weights_ms": med_ms(new), "repeat_ms": med_ms(rep),
            "ratio": round(statistics.median(new) / statistics.median(rep), 4), "repeat_same_image": all(same)}


def bench_recompiles(mixer, recipe, names, changes: int) -> dict:
    """`changes` weight changes, each merged and followed by one UNet step at the render's shape."""
    from stylemix.accel import compile_counters

    pipe, dev, dt = mixer.pipe, mixer.loaded.device, mixer.loaded.dtype
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(2, 4, recipe.height // 8, recipe.width // 8, generator=g).to(dev, dt)
    ehs = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g).to(dev, dt)
    t = pipe.scheduler.timesteps[0].to(dev) if len(pipe.scheduler.timesteps) else torch.tensor(500, device=dev)
    on_model_thread = mixer.loaded.model_thread.run  # where generate runs the UNet (CUDA graphs are per thread)

    def step():
        with torch.no_grad():
            pipe.unet(x, t, encoder_hidden_states=ehs)

    on_model_thread(step)  # this exact call shape, compiled once before counting
    before = compile_counters()
    ptr = mixer._layers[0].module.get_base_layer().weight.data_ptr()
    for i in range(changes):
        mixer.set_weights(mix(names, 2000 + i))
        mixer.apply()
        on_model_thread(step)
    sync(dev)
    after = compile_counters()
    return {"changes": changes, **{f"{k}_during": after[k] - before[k] for k in after},
            "same_weight_storage": mixer._layers[0].module.get_base_layer().weight.data_ptr() == ptr,
            "counters_after": after}


def bench_host_syncs(previewer, recipe, names) -> dict:
    """CUDA only: synchronizing calls inside the denoising loop (after the first step, up to the last),
    counted by torch's own sync debug mode, for a full render and for a preview."""
    import warnings

    mixer = previewer.mixer
    out = {}
    for label in ("full_render", "preview"):
        r = recipe.with_(loras=mix(names, 700))
        options = None
        if label == "preview":
            r, options, _ = previewer.preview_recipe(r)
        mixer.generate(r, options=options)  # merged and compiled for this shape already: nothing new below

        def progress(step, total):  # after each step: watch from the end of step 1 to the end of the last
            torch.cuda.set_sync_debug_mode("warn" if step < total else 0)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                mixer.generate(r, progress=progress, options=options)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        msgs = [str(w.message).split("\n")[0] for w in caught if "synchroniz" in str(w.message).lower()]
        out[label] = {"steps_watched": r.steps - 1, "syncs": len(msgs), "examples": sorted(set(msgs))[:3]}
    return out


def bench_fused(previewer, recipe, names, repeats: int, full_s: float, preview: dict) -> dict:
    """Fuse the UNet's q/k/v projections (stylemix.accel.fuse_qkv) and measure again, against the
    same pipeline unfused just before: full render, preview, pixels, recompiles over 100 changes."""
    from stylemix.accel import fuse_qkv

    mixer, dev = previewer.mixer, previewer.mixer.loaded.device
    before = np.asarray(mixer.generate(recipe).images[0], dtype=np.int16)
    modules = fuse_qkv(mixer)
    t, _ = timed(dev, lambda: (mixer.generate(recipe), previewer.preview(recipe.with_(seed=9), "warm")))
    full = bench_full(mixer, recipe, names, repeats)
    prev = bench_preview(previewer, recipe, names, repeats * 2)
    out = {"attention_modules_fused": modules, "warm_up_s": round(t, 1), "full_render": full, "preview": prev,
           "full_fused_over_unfused": round(full["median_s"] / full_s, 4),
           "preview_fused_over_unfused": round(prev["median_s"] / preview["median_s"], 4),
           "max_pixel_diff_vs_unfused": int(np.abs(
               np.asarray(mixer.generate(recipe).images[0], dtype=np.int16) - before).max())}
    if getattr(mixer.pipe, "_stylemix_compiled", None):
        out["recompiles_100_changes"] = bench_recompiles(mixer, recipe, names, 100)
    return out


def bench_drag(previewer, recipe, names, client: str, seconds: float = 2.0, rate: int = 20) -> dict:
    """Slider events every 1/rate s for `seconds`, then the release's exact render.

    client "flood": every event is a preview request in its own thread (the worst case);
    "always_last": what the page does (Gradio's trigger_mode="always_last"): one request in flight,
    and when it returns the newest value is sent.  The release-to-image time is compared with a full
    render of the same recipe measured just before and just after (the CPU box is shared: interleaved).
    """
    dev = previewer.mixer.loaded.device
    final = recipe.with_(loras=mix(names, 500 + int(seconds * rate)))
    ref = [timed(dev, lambda: previewer.mixer.generate(final.with_(seed=recipe.seed + 1)))[0]]
    threads, shown, newest, released = [], [], [None], threading.Event()
    before = dict(previewer.stats)
    previewer.stats["max_running"] = 0

    def send(i):
        shown.append(previewer.preview(recipe.with_(loras=mix(names, 500 + i)), "drag"))

    def always_last():
        sent = None
        while not released.is_set():
            if newest[0] is None or newest[0] == sent:
                time.sleep(0.002)
                continue
            sent = newest[0]
            send(sent)

    if client == "always_last":
        threads.append(threading.Thread(target=always_last))
        threads[0].start()
    t_start = time.perf_counter()
    for i in range(int(seconds * rate)):
        if client == "flood":
            threads.append(threading.Thread(target=send, args=(i,)))
            threads[-1].start()
        newest[0] = i
        time.sleep(max(0.0, t_start + (i + 1) / rate - time.perf_counter()))
    released.set()
    t_release, out = timed(dev, lambda: previewer.render_exact(final, "drag"))
    for th in threads:
        th.join()
    ref.append(timed(dev, lambda: previewer.mixer.generate(final.with_(seed=recipe.seed + 1)))[0])
    full_s = statistics.mean(ref)
    stats = {k: previewer.stats[k] - before.get(k, 0) for k in ("started", "done", "interrupted", "superseded")}
    return {"client": client, "events": int(seconds * rate), "previews_shown": sum(1 for s in shown if s is not None),
            **stats, "max_previews_at_once": previewer.stats["max_running"],
            "release_to_image_s": round(t_release, 3), "full_render_before_after_s": [round(x, 3) for x in ref],
            "release_ratio": round(t_release / full_s, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: fp32 on cpu, fp16 on cuda")
    p.add_argument("--full-size", action="store_true", help="the full SD1.5 architecture (default: the tiny model)")
    p.add_argument("--size", type=int, default=None, help="image side (default 512 on cuda, 128 on cpu)")
    p.add_argument("--steps", type=int, default=None, help="steps of the full render (default 20)")
    p.add_argument("--compile", action="store_true", help="also measure the compiled pipeline (CUDA)")
    p.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode (default reduce-overhead)")
    p.add_argument("--repeats", type=int, default=None, help="default: 5 on cuda, 2 on cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fuse-qkv", action="store_true",
                   help="finally, fuse the UNet's q/k/v projections and measure again (does it pay?)")
    p.add_argument("--drag-trials", type=int, default=3, help="simulated drags per client (the median is kept)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    from stylemix.accel import compile_pipeline
    from stylemix.lora.library import LoraLibrary
    from stylemix.mixer import Mixer
    from stylemix.models import LoadedModel, pick_device, pick_dtype, quiet_library_logs, tiny_components
    from stylemix.preview import PreviewConfig, Previewer, random_fewstep_lora, tiny_taesd
    from stylemix.recipe import Recipe

    quiet_library_logs()
    dev = pick_device(args.device)
    dt = pick_dtype(dev, args.dtype)
    gpu = dev.type == "cuda"
    size = args.size or (512 if gpu else 128)
    steps = args.steps or 20
    repeats = args.repeats or (5 if gpu else 2)
    model = "full-size SD1.5 architecture" if args.full_size else "tiny SD1.5"
    res = {"model": f"{model}, random weights", "device": str(dev), "dtype": str(dt).replace("torch.", ""),
           "gpu": torch.cuda.get_device_name() if gpu else None, "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "size": size, "steps": steps,
           "guidance": 7.5, "batch": 1}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stylemix-live-") as tmp:
        comps = tiny_components(full_size=args.full_size)
        names = make_full_size_library(comps, Path(tmp) / "loras", 2)
        fewstep = random_fewstep_lora(Path(tmp) / "fewstep" / "lcm_standin.safetensors", comps["unet"],
                                      rank=64 if args.full_size else 4)  # LCM-LoRA SD1.5 is rank 64
        taesd_dir = Path(tmp) / "taesd"
        tiny_taesd(full_size=args.full_size).save_pretrained(taesd_dir)
        pipe = StableDiffusionPipeline(**comps, requires_safety_checker=False)
        del comps
        pipe.to(dev, dt)
        pipe.set_progress_bar_config(disable=True)
        mixer = Mixer(LoadedModel(pipe=pipe, model_id="bench", device=dev, dtype=dt),
                      LoraLibrary(Path(tmp) / "loras", base_model="bench"))
        previewer = Previewer(mixer, PreviewConfig(fewstep_lora=str(fewstep), fewstep_kind="lcm",
                                                   taesd=str(taesd_dir))).setup()
        mixer.ensure_loaded(names)
        recipe = Recipe("a lighthouse on a cliff at dusk", negative_prompt="blurry", loras=mix(names, 0), seed=7,
                        steps=steps, width=size, height=size, guidance=7.5)

        eager = bench_full(mixer, recipe, names, repeats)
        res["full_render_eager"] = eager
        logger.info("full render (eager): %s", eager)
        res["preview_eager"] = bench_preview(previewer, recipe, names, repeats * 2)
        logger.info("preview (eager): %s", res["preview_eager"])
        res["preview_after_full_eager"] = bench_preview_after_full(previewer, recipe, names, repeats)
        logger.info("first preview after a full render (eager): %s", res["preview_after_full_eager"])
        full_s, phase = eager["median_s"], "eager"
        if args.compile:
            eager_img = np.asarray(mixer.generate(recipe).images[0], dtype=np.int16)
            compile_pipeline(pipe, mode=args.compile_mode)
            t, _ = timed(dev, lambda: (mixer.generate(recipe), previewer.preview(recipe.with_(seed=8), "warm")))
            res["compile_warm_up_s"] = round(t, 1)
            logger.info("compiled and warmed up in %.1fs", t)
            res["full_render_compiled"] = bench_full(mixer, recipe, names, repeats)
            res["preview_compiled"] = bench_preview(previewer, recipe, names, repeats * 2)
            res["preview_after_full_compiled"] = bench_preview_after_full(previewer, recipe, names, repeats)
            res["compiled_vs_eager_max_pixel_diff"] = int(np.abs(
                np.asarray(mixer.generate(recipe).images[0], dtype=np.int16) - eager_img).max())
            res["recompiles_100_changes"] = bench_recompiles(mixer, recipe, names, 100)
            full_s, phase = res["full_render_compiled"]["median_s"], "compiled"
            logger.info("compiled: %s", {k: res[k] for k in ("full_render_compiled", "preview_compiled",
                                                           "recompiles_100_changes")})
        res["change_vs_repeat"] = bench_change_vs_repeat(mixer, recipe, names, max(2, repeats))
        res["change_vs_repeat"]["pipeline"] = phase
        if gpu:
            res["host_syncs_in_loop"] = bench_host_syncs(previewer, recipe, names)
            logger.info("host syncs inside the loop: %s", res["host_syncs_in_loop"])
        res["preview_over_full"] = round(res[f"preview_{phase}"]["median_s"] / full_s, 4)
        res["first_preview_over_full"] = round(res[f"preview_after_full_{phase}"]["median_s"] / full_s, 4)
        for client in ("always_last", "flood"):
            # a full render varies by several per cent run to run on a shared CPU: the median of a few drags
            trials = [bench_drag(previewer, recipe.with_(seed=recipe.seed + 10 * k), names, client)
                      for k in range(args.drag_trials)]
            median = sorted(trials, key=lambda d: d["release_ratio"])[len(trials) // 2]
            res[f"drag_{client}"] = {**median, "pipeline": phase,
                                     "max_previews_at_once": max(d["max_previews_at_once"] for d in trials),
                                     "release_ratio_trials": [d["release_ratio"] for d in trials]}
        if args.fuse_qkv:  # last, on the same compiled pipeline: do fused projections pay?
            res["fused_qkv"] = bench_fused(previewer, recipe, names, repeats, full_s, res[f"preview_{phase}"])
            logger.info("fused QKV: %s", res["fused_qkv"])
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    rc = res.get("recompiles_100_changes", {})
    res["goals"] = {
        "preview_at_most_one_fifth_of_full": res["preview_over_full"] <= 0.2,
        "first_preview_of_a_drag_at_most_one_fifth_of_full": res["first_preview_over_full"] <= 0.2,
        "drag_at_most_one_preview_at_a_time": all(res[f"drag_{c}"]["max_previews_at_once"] <= 1
                                                  for c in ("always_last", "flood")),
        "release_to_image_at_most_1.1x_full": all(res[f"drag_{c}"]["release_ratio"] <= 1.1
                                                  for c in ("always_last", "flood")),
    }
    if gpu:  # the GPU goals (on a CPU the numbers are recorded, not judged)
        res["goals"].update({"change_then_image_at_most_1.02x_repeat": res["change_vs_repeat"]["ratio"] <= 1.02,
                             "full_render_at_most_0.30s": full_s <= 0.30,
                             "preview_frame_at_most_0.12s": res[f"preview_{phase}"]["median_s"] <= 0.12})
    if gpu:
        res["goals"]["no_host_sync_inside_the_loop"] = all(
            v["syncs"] == 0 for v in res["host_syncs_in_loop"].values())
    if rc:
        res["goals"]["no_recompile_or_rerecord_in_100_changes"] = (
            rc["graphs_compiled_during"] == 0 and rc["cudagraph_recordings_during"] == 0)
    print(f"\n== Live sliders: {res['model']}, {res['device']} {res['dtype']} {res['gpu'] or res['cpu']}, "
          f"{size}px {steps} steps CFG 7.5 batch 1 ==")
    print(f"full render eager {eager['median_s']:.3f} s" + (
        f"; compiled {res['full_render_compiled']['median_s']:.3f} s (warm-up {res['compile_warm_up_s']} s, "
        f"max pixel diff vs eager {res['compiled_vs_eager_max_pixel_diff']})" if args.compile else ""))
    print(f"preview frame ({res[f'preview_{phase}']['label']}): {res[f'preview_{phase}']['median_s']:.3f} s = "
          f"{res['preview_over_full']:.3f} of a full render; the first of a drag (after a full render) "
          f"{res[f'preview_after_full_{phase}']['median_s']:.3f} s = {res['first_preview_over_full']:.3f}")
    print(f"weight change then image vs repeat: {res['change_vs_repeat']['ratio']:.3f}x")
    if rc:
        print(f"100 weight changes: {rc['graphs_compiled_during']} graphs compiled, "
              f"{rc['cudagraph_recordings_during']} CUDA graphs recorded")
    for c in ("always_last", "flood"):
        d = res[f"drag_{c}"]
        print(f"drag ({c}): {d['events']} events, {d['started']} previews started, {d['done']} shown, "
              f"{d['interrupted']} interrupted, {d['superseded']} skipped, at most {d['max_previews_at_once']} at "
              f"once; release -> exact image {d['release_to_image_s']:.3f} s = {d['release_ratio']:.3f}x a full render "
              f"(median of {d['release_ratio_trials']})")
    print("goals:", ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in res["goals"].items()))
    if "fused_qkv" in res:
        f = res["fused_qkv"]
        print(f"fused QKV ({f['attention_modules_fused']} modules): full render {f['full_render']['median_s']:.3f} s = "
              f"{f['full_fused_over_unfused']:.3f}x unfused, preview {f['preview_fused_over_unfused']:.3f}x, max pixel "
              f"diff {f['max_pixel_diff_vs_unfused']}" + (
                  f", {f['recompiles_100_changes']['graphs_compiled_during']} graphs / "
                  f"{f['recompiles_100_changes']['cudagraph_recordings_during']} CUDA graphs over 100 changes"
                  if "recompiles_100_changes" in f else ""))
    print(f"total {res['total_s']} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
