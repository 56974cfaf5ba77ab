"""Mixer benchmark at full SD1.5 scale (random weights): weight changes, LoRA overhead, time to image.

Measured side by side in one run, on one pipeline (the full SD1.5 architecture, 860M-param UNet,
random weights) with rank-32 LoRAs (alpha 16) on the UNet attention and the text encoder:

1. a weight change with 4 and with 20 resident LoRAs: `Mixer.set_weights` vs diffusers'
   `pipe.set_adapters(ids, weights)`, interleaved call by call (goals: < 10 ms / < 20 ms);
2. one UNet step (batch 2 = CFG) with 4 active LoRAs vs the base (adapters disabled),
   interleaved A B A B (goal <= 1.05x), plus the LoRA share of the FLOPs, counted analytically;
3. `Mixer.generate` right after a weight change vs the same recipe again (goal <= 1.02x).

    python -m bench.bench_mixer                       # CPU: 256x256 images, 4 steps (~8 min on 2 idle cores)
    python -m bench.bench_mixer --quick --out r.json  # fewer repeats, raw numbers as JSON
    python -m bench.bench_mixer --device cuda --dtype fp16 --size 512 --steps 20

The weights are random: the timings are real-scale, the images are noise.  Results: bench/RESULTS.md.
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
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/bench_mixer.py` works too

import torch  # noqa: E402

from stylemix.lora.files import TEXT_TARGETS, UNET_TARGETS, WEIGHTS_NAME, save_lora_weights  # noqa: E402

logger = logging.getLogger("stylemix.bench")

RANK, ALPHA = 32, 16.0
N_LORAS = 20
N_ACTIVE = 4
B_SCALE = 0.1  # shrinks the random lora_B so a mix stays in the range of a trained LoRA (finite in fp16)


# --------------------------------------------------------------------------- LoRA library


def make_full_size_library(comps: dict, root: Path, n: int) -> list[str]:
    """`n` random rank-32 LoRAs for the full-size components, as library folders under `root`.

    One peft adapter is added once; for each seed its LoRA matrices are re-drawn with the
    nn.Linear initialisation that `LoraConfig(init_lora_weights=False)` leaves them with, and
    saved with StyleMix's saver.  This avoids building a 3.4 GB UNet per LoRA; the adapter is
    removed again afterwards, so the benchmarked model starts clean.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    from stylemix.lora.library import sha256_file

    unet, te = comps["unet"], comps["text_encoder"]
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False, target_modules=UNET_TARGETS),
                     adapter_name="gen")
    te.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False, target_modules=TEXT_TARGETS),
                   adapter_name="gen")
    layers = [m for model in (unet, te) for m in model.modules() if isinstance(m, LoraLayer)]
    names = []
    with torch.no_grad():
        for seed in range(n):
            torch.manual_seed(1000 + seed)
            for layer in layers:
                layer.lora_A["gen"].reset_parameters()
                layer.lora_B["gen"].reset_parameters()
                layer.lora_B["gen"].weight.mul_(B_SCALE)
            name = f"style{seed:02d}"
            folder = root / name
            folder.mkdir(parents=True)
            save_lora_weights(folder / WEIGHTS_NAME, unet, te, adapter_name="gen")
            meta = {"name": name, "trigger_word": f"{name}tok", "base_model": "full-size-random", "rank": RANK,
                    "alpha": ALPHA, "target_modules": {"unet": UNET_TARGETS, "text_encoder": TEXT_TARGETS},
                    "training": {"note": "random benchmark LoRA", "seed": 1000 + seed}, "dataset": {},
                    "loss_curve": [], "samples": [], "sha256": sha256_file(folder / WEIGHTS_NAME),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (folder / "stylemix.json").write_text(json.dumps(meta, indent=2))
            names.append(name)
    # remove the generator adapter and its wrappers: the mixer loads the files like any user LoRA
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet.unload_lora()
    recurse_remove_peft_layers(te)
    for attr in ("peft_config",):
        if hasattr(te, attr):
            delattr(te, attr)
    te._hf_peft_config_loaded = False
    left = [n for model in (unet, te) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if left:
        raise RuntimeError(f"generator adapter not fully removed: {left[:3]}")
    return names


# --------------------------------------------------------------------------- timing helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def med_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3)


def weights_for(names: list[str], i: int) -> list[float]:
    # every weight differs from the previous change's, none is 0 (all stay active)
    return [round(0.2 + 0.6 * ((i * 7 + j * 3) % 11) / 10, 3) for j in range(len(names))]


def lora_scalings(mixer) -> dict:
    """(layer, adapter) -> (active?, scaling) over every LoRA layer: what the forward pass will use."""
    out = {}
    for layer in mixer._layers:
        mod = layer.module
        active = set(mod.active_adapters) if not mod.disable_adapters else set()
        for a in layer.adapters:
            out[(layer.component, layer.name, a)] = (a in active, round(float(mod.scaling[a]), 6))
    return out


# --------------------------------------------------------------------------- 1. weight changes


def bench_weight_changes(mixer, names: list[str], changes: int) -> dict:
    """Mixer.set_weights vs pipe.set_adapters, interleaved call by call, same pipeline."""
    pipe = mixer.pipe
    ids = [mixer._adapters[n][0] for n in names]
    # equivalence first: both paths must leave every layer with the same active set and scales
    w = weights_for(names, 0)
    mixer.set_weights(dict(zip(names, w)))
    ours = lora_scalings(mixer)
    pipe.set_adapters(ids, w)
    theirs = lora_scalings(mixer)
    same = ours == theirs
    t_mixer, t_diffusers = [], []
    for i in range(1, changes + 1):
        w = weights_for(names, i)
        t = time.perf_counter()
        mixer.set_weights(dict(zip(names, w)))
        t_mixer.append(time.perf_counter() - t)
        w2 = weights_for(names, i + 1000)
        t = time.perf_counter()
        pipe.set_adapters(ids, w2)
        t_diffusers.append(time.perf_counter() - t)
    # leave the mixer's view and the layers in agreement again
    mixer.set_weights(dict(zip(names, weights_for(names, 5000))))
    # With merge=True the weighted sums are written into the layers at the next generate
    # (Mixer.apply): part of the time from a weight change to the image, measured here alone.
    t_apply = []
    if mixer.merge:
        mixer.apply()
        for i in range(1, max(3, changes // 4) + 1):
            mixer.set_weights(dict(zip(names, weights_for(names, 7000 + i))))
            sync(mixer.loaded.device)
            t = time.perf_counter()
            mixer.apply()
            sync(mixer.loaded.device)
            t_apply.append(time.perf_counter() - t)
    n_layers = len(mixer._layers)
    n_modules = sum(1 for _ in pipe.unet.modules()) + sum(1 for _ in pipe.text_encoder.modules())
    return {"loras": len(names), "lora_layers": n_layers, "modules_walked_by_set_adapters": n_modules,
            "changes": changes, "mixer_set_weights_ms": med_ms(t_mixer), "diffusers_set_adapters_ms": med_ms(t_diffusers),
            "mixer_apply_merge_ms": med_ms(t_apply) if t_apply else None,
            "speedup": round(statistics.median(t_diffusers) / statistics.median(t_mixer), 1),
            "same_scales_as_set_adapters": same,
            "mixer_ms_all": [round(x * 1e3, 3) for x in t_mixer],
            "diffusers_ms_all": [round(x * 1e3, 3) for x in t_diffusers]}


# --------------------------------------------------------------------------- 2. UNet step


def lora_flops(size: int, active: int) -> dict:
    """FLOPs of one UNet forward (batch 2) and of `active` rank-32 LoRAs on its attention, on `meta`.

    The base is counted by torch's FlopCounterMode on the meta-device UNet (no memory, no compute);
    each targeted Linear's token count is read by a hook, and a LoRA adds 2*tokens*r*(in+out)
    FLOPs per adapter there (plus an elementwise scale-and-add, not counted).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from stylemix.models import full_size_meta_text_encoder, full_size_meta_unet

    unet = full_size_meta_unet()
    lat = size // 8
    tokens: dict[str, tuple[int, int, int]] = {}

    def hook(name):
        def f(mod, inp, out):
            tokens[name] = (inp[0].numel() // mod.in_features, mod.in_features, mod.out_features)
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and (n.endswith(tuple("." + t for t in UNET_TARGETS)))
               and ".attn" in n]
    with torch.device("meta"):
        x = torch.empty(2, 4, lat, lat)
        ehs = torch.empty(2, 77, 768)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        unet(x, torch.tensor([500], device="meta"), encoder_hidden_states=ehs)
    for h in handles:
        h.remove()
    base = fc.get_total_flops()
    attn_linear = sum(2 * n * i * o for n, i, o in tokens.values())
    per_lora = sum(2 * n * RANK * (i + o) for n, i, o in tokens.values())
    te = full_size_meta_text_encoder()
    te_lin = [(m.in_features, m.out_features) for n, m in te.named_modules()
              if isinstance(m, torch.nn.Linear) and n.endswith(tuple(TEXT_TARGETS))]
    return {"unet_gflops": round(base / 1e9, 1), "attention_projection_gflops": round(attn_linear / 1e9, 1),
            "lora_gflops_per_adapter": round(per_lora / 1e9, 2), "lora_layers_unet": len(tokens),
            "lora_layers_text_encoder": len(te_lin),
            f"lora_flop_fraction_{active}_adapters": round(active * per_lora / base, 4),
            "lora_flops_vs_attention_projections_per_adapter": round(per_lora / attn_linear, 3)}


def profile_step(step) -> dict:
    """One profiled step: GPU kernels launched, their summed GPU time, aten ops dispatched from Python."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = step()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"wall_ms": round(wall * 1e3, 1), "gpu_kernels": len(kernels),
            "gpu_kernel_ms": round(sum(e.time_range.elapsed_us() for e in kernels) / 1e3, 1),
            "aten_ops": sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU
                            and e.name.startswith("aten::"))}


def bench_unet_step(mixer, names: list[str], size: int, pairs: int) -> dict:
    """One UNet forward with N_ACTIVE LoRAs vs the base model, interleaved, on both mixer paths:
    'merged' (the default: weighted sums written into the layers by Mixer.apply) and 'unmerged'
    (peft's per-adapter forward, Mixer(merge=False)); 'base' has no LoRA in any layer."""
    pipe, dev, dt = mixer.pipe, mixer.loaded.device, mixer.loaded.dtype
    g = torch.Generator("cpu").manual_seed(0)
    lat = size // 8
    x = torch.randn(2, 4, lat, lat, generator=g).to(dev, dt)
    ehs = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g).to(dev, dt)
    t = torch.tensor([500], device=dev)
    active = dict(zip(names[:N_ACTIVE], [0.8, 0.6, 0.5, 0.4]))
    ids = {mixer._adapters[n][0] for n in active}

    def step():
        sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe.unet(x, t, encoder_hidden_states=ehs)
        sync(dev)
        return time.perf_counter() - t0

    def set_mode(mode: str):
        if mode == "unmerged":
            mixer.restore_base_weights()
            mixer.merge = False
            mixer.set_weights(active)
        else:
            mixer.merge = True
            mixer.set_weights(active if mode == "merged" else {})
            mixer.apply()
        # the mixer's state is what we think it is
        for layer in mixer._layers:
            mod = layer.module
            act = set() if mod.disable_adapters else set(mod.active_adapters) & layer.adapters
            want = ids if mode == "unmerged" else set()
            if act != want:
                raise RuntimeError(f"{layer.name}: peft path active {act}, expected {want} in mode {mode}")
            merged = {a for a, _ in mixer.state.merged.get(layer.key, ())}
            if merged != ((ids & layer.adapters) if mode == "merged" else set()):
                raise RuntimeError(f"{layer.name}: merged {merged} in mode {mode}")

    modes = ("base", "merged", "unmerged")
    times = {m: [] for m in modes}
    for m in modes:  # warm-up
        set_mode(m)
        step()
    for _ in range(pairs):
        for m in modes:
            set_mode(m)
            times[m].append(step())
    prof = {}
    if dev.type == "cuda":  # what the extra time is made of: GPU kernel time vs kernel launches
        for m in modes:
            set_mode(m)
            prof[m] = profile_step(step)
    set_mode("base")
    base = statistics.median(times["base"])
    return {"size": size, "latent": lat, "batch": 2, "pairs": pairs, "resident_loras": len(mixer._adapters),
            "active_loras": N_ACTIVE, **{f"{m}_ms": med_ms(times[m]) for m in modes},
            "ratio_merged": round(statistics.median(times["merged"]) / base, 4),
            "ratio_unmerged": round(statistics.median(times["unmerged"]) / base, 4),
            "profile": prof, **{f"{m}_ms_all": [round(x * 1e3, 1) for x in times[m]] for m in modes}}


# --------------------------------------------------------------------------- 3. time to image


def bench_generate(mixer, names: list[str], size: int, steps: int, pairs: int) -> dict:
    """`generate` right after a weight change (new) vs the same recipe again (repeat), interleaved."""
    import numpy as np

    from stylemix.recipe import Recipe

    base = Recipe(prompt="a lighthouse on a cliff at dusk", negative_prompt="blurry", steps=steps,
                  width=size, height=size, seed=7)
    act = names[:N_ACTIVE]

    def recipe(i):
        return base.with_(loras=dict(zip(act, weights_for(act, i))))

    def timed(r):
        sync(mixer.loaded.device)
        t0 = time.perf_counter()
        res = mixer.generate(r)
        sync(mixer.loaded.device)
        return time.perf_counter() - t0, res

    timed(recipe(100))  # warm-up: scheduler, kernels, allocator
    t_new, t_rep, parts_new, parts_rep, same = [], [], [], [], []
    for i in range(pairs):
        r = recipe(i)
        tn, rn = timed(r)
        tr, rr = timed(r)
        t_new.append(tn)
        t_rep.append(tr)
        parts_new.append(rn.timings)
        parts_rep.append(rr.timings)
        same.append(bool(np.array_equal(np.asarray(rn.images[0]), np.asarray(rr.images[0]))))

    def med_part(parts, key):
        return med_ms([p[key] for p in parts])

    keys = ("set_weights_s", "merge_s", "encode_s", "denoise_decode_s")
    return {"size": size, "steps": steps, "pairs": pairs, "active_loras": N_ACTIVE,
            "resident_loras": len(mixer._adapters), "new_weights_ms": med_ms(t_new), "same_again_ms": med_ms(t_rep),
            "ratio": round(statistics.median(t_new) / statistics.median(t_rep), 4),
            "new_parts_ms": {k.replace("_s", "_ms"): med_part(parts_new, k) for k in keys},
            "repeat_parts_ms": {k.replace("_s", "_ms"): med_part(parts_rep, k) for k in keys},
            "repeat_gives_same_image": all(same),
            "new_ms_all": [round(x * 1e3, 1) for x in t_new], "same_ms_all": [round(x * 1e3, 1) for x in t_rep]}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp32 on cpu, fp16 on cuda)")
    p.add_argument("--size", type=int, default=None, help="image side for 3. (default: 256 on cpu, 512 on cuda)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps for 3. (default: 4 on cpu, 20 on cuda)")
    p.add_argument("--step-size", type=int, default=512, help="image side for the UNet step in 2. (default 512)")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the CI box is shared)")
    p.add_argument("--out", type=Path, default=None, help="write the raw numbers to this JSON file")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    from stylemix.lora.library import LoraLibrary
    from stylemix.mixer import Mixer
    from stylemix.models import LoadedModel, pick_device, pick_dtype, quiet_library_logs, tiny_components

    quiet_library_logs()
    dev = pick_device(args.device)
    dt = pick_dtype(dev, args.dtype)
    gpu = dev.type == "cuda"
    size = args.size or (512 if gpu else 256)
    steps = args.steps or (20 if gpu else 4)
    changes = 10 if args.quick else 20
    pairs_step = (5 if args.quick else 20) if gpu else (2 if args.quick else 3)
    pairs_gen = (3 if args.quick else 12) if gpu else (1 if args.quick else 2)
    if args.out and args.out.suffix != ".json":
        p.error(f"--out {args.out} must end in .json")

    logger.warning("BENCHMARK MODEL: the full-size SD1.5 architecture with RANDOM weights (not a real "
                   "checkpoint): timings are real-scale, images are noise.")
    results: dict = {"model": "full-size SD1.5 architecture, random weights (not a real checkpoint)",
                     "random_weights": True, "device": str(dev), "dtype": str(dt).replace("torch.", ""),
                     "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name() if gpu else None, "cpu": platform.processor() or platform.machine(),
                     "lora": {"rank": RANK, "alpha": ALPHA, "unet_targets": UNET_TARGETS, "text_targets": TEXT_TARGETS}}
    import diffusers
    import peft

    results["versions"] = {"diffusers": diffusers.__version__, "peft": peft.__version__}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stylemix-bench-") as tmp:
        t = time.perf_counter()
        comps = tiny_components(full_size=True)
        logger.info("full-size components built in %.1fs", time.perf_counter() - t)
        t = time.perf_counter()
        root = Path(tmp) / "loras"
        names = make_full_size_library(comps, root, N_LORAS)
        size_mb = (root / names[0] / WEIGHTS_NAME).stat().st_size / 1e6
        results["lora"]["file_mb"] = round(size_mb, 1)
        logger.info("%d rank-%d LoRAs (%.1f MB each) written in %.1fs", len(names), RANK, size_mb,
                    time.perf_counter() - t)
        pipe = StableDiffusionPipeline(**comps, requires_safety_checker=False)
        del comps
        pipe.to(dev, dt)
        pipe.set_progress_bar_config(disable=True)
        loaded = LoadedModel(pipe=pipe, model_id="full-size-random", device=dev, dtype=dt)
        mixer = Mixer(loaded, LoraLibrary(root, base_model="full-size-random"))

        t = time.perf_counter()
        mixer.ensure_loaded(names[:N_ACTIVE])
        results["load_s_per_lora"] = round((time.perf_counter() - t) / N_ACTIVE, 2)
        mixer.set_weights(dict(zip(names[:N_ACTIVE], weights_for(names[:N_ACTIVE], 9999))))  # warm-up
        results["weights_4"] = bench_weight_changes(mixer, names[:N_ACTIVE], changes)
        logger.info("1. weight change, 4 LoRAs: %s", {k: v for k, v in results["weights_4"].items() if "all" not in k})
        mixer.ensure_loaded(names)
        mixer.set_weights(dict(zip(names, weights_for(names, 9999))))
        results["weights_20"] = bench_weight_changes(mixer, names, changes)
        logger.info("1. weight change, 20 LoRAs: %s", {k: v for k, v in results["weights_20"].items() if "all" not in k})

        results["unet_step"] = bench_unet_step(mixer, names, args.step_size, pairs_step)
        results["unet_step"]["flops"] = lora_flops(args.step_size, N_ACTIVE)
        logger.info("2. UNet step: %s", {k: v for k, v in results["unet_step"].items() if "all" not in k})

        results["generate"] = bench_generate(mixer, names, size, steps, pairs_gen)
        logger.info("3. generate: %s", {k: v for k, v in results["generate"].items() if "all" not in k})
    results["total_s"] = round(time.perf_counter() - t_all, 1)

    w4, w20, st, gen = results["weights_4"], results["weights_20"], results["unet_step"], results["generate"]
    goals = {"set_weights_4_under_10ms": w4["mixer_set_weights_ms"] < 10,
             "set_weights_20_under_20ms": w20["mixer_set_weights_ms"] < 20,
             "unet_step_ratio_at_most_1.05": st["ratio_merged"] <= 1.05,
             "generate_ratio_at_most_1.02": gen["ratio"] <= 1.02}
    results["goals_met"] = goals
    print(f"\n== Mixer benchmark: {results['model']}, {results['device']} {results['dtype']}, "
          f"{results['threads']} thread(s) ==")
    for k, w in (("4", w4), ("20", w20)):
        print(f"1. weight change, {k:>2} LoRAs ({w['lora_layers']} LoRA layers): Mixer.set_weights "
              f"{w['mixer_set_weights_ms']:.2f} ms vs pipe.set_adapters {w['diffusers_set_adapters_ms']:.1f} ms "
              f"({w['speedup']}x faster; same scales: {w['same_scales_as_set_adapters']})")
    f = st["flops"]
    print(f"2. UNet step {st['size']}x{st['size']} batch 2, 4 LoRAs: merged {st['merged_ms']:.0f} ms = "
          f"{st['ratio_merged']:.3f}x base {st['base_ms']:.0f} ms; peft unmerged {st['unmerged_ms']:.0f} ms = "
          f"{st['ratio_unmerged']:.3f}x (median of {st['pairs']} interleaved rounds; "
          f"LoRA FLOPs {100 * f[f'lora_flop_fraction_{N_ACTIVE}_adapters']:.1f}% of {f['unet_gflops']} GFLOP)")
    for k, w in (("4", w4), ("20", w20)):
        if w.get("mixer_apply_merge_ms") is not None:
            print(f"   merging the weighted sums ({k} LoRAs) at the next generate: {w['mixer_apply_merge_ms']:.1f} ms")
    if st["profile"]:
        pr = st["profile"]
        print("   profiled step: " + "; ".join(f"{m} {p['gpu_kernels']} kernels, {p['gpu_kernel_ms']} ms GPU "
                                                f"(wall {p['wall_ms']} ms)" for m, p in pr.items()))
    print(f"3. generate {gen['size']}x{gen['size']} {gen['steps']} steps: new weights {gen['new_weights_ms']:.0f} ms vs "
          f"same again {gen['same_again_ms']:.0f} ms = {gen['ratio']:.3f}x (same image on repeat: "
          f"{gen['repeat_gives_same_image']})")
    print("goals:", ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in goals.items()))
    print(f"total {results['total_s']}s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
