"""Real-world LoRA files at full SD1.5 scale: import time of a kohya LoCon, merge time of LoCon vs attention-only.

Measured side by side in one run, on the full SD1.5 architecture (860M-param UNet, random weights):

1. importing a rank-32 kohya LoCon file (fp16, as Civitai serves them: every attention/ff Linear,
   the 1x1 proj_in/proj_out, the resnets' 3x3 convs, shortcuts, time-embedding projections and
   samplers, the text encoder's attention and MLP) into the library: read, check, convert, write;
   beside a rank-32 attention-only kohya file (to_q/k/v/out of the UNet and the text encoder);
2. loading each into the pipeline (diffusers `load_lora_weights`, via the mixer);
3. the mixer's exact merge after a weight change with 4 LoCon LoRAs vs 4 attention-only LoRAs,
   interleaved change by change.

    python -m bench.bench_lora_formats                         # CPU (~6 min on 2 idle cores)
    python -m bench.bench_lora_formats --device cuda --out bench/results-lora-formats-cuda.json

Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

RANK, ALPHA, B_SCALE = 32, 16.0, 0.02
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
LOCON_UNET = ATTN + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut",
                     "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
TE_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")


def kohya_file(path: Path, pipe, seed: int, locon: bool) -> tuple[Path, int]:
    """A rank-32 kohya file for `pipe`'s layers; returns (path, number of layers)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    unet_leaves = LOCON_UNET if locon else ATTN
    te_leaves = TE_ATTN + (("fc1", "fc2") if locon else ())
    layers = [("lora_unet_", n, m) for n, m in pipe.unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.endswith(unet_leaves)
              and (".attentions." in n or (locon and (".resnets." in n or "samplers" in n)))]
    layers += [("lora_te_", n if n.startswith("text_model.") else "text_model." + n, m)
               for n, m in pipe.text_encoder.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(te_leaves)]
    for prefix, n, m in layers:
        name = prefix + n.replace(".", "_")
        if isinstance(m, torch.nn.Conv2d):
            down = torch.randn(RANK, m.in_channels, *m.kernel_size, generator=g) / (m.in_channels ** 0.5)
            up = torch.randn(m.out_channels, RANK, 1, 1, generator=g) * B_SCALE
        else:
            down = torch.randn(RANK, m.in_features, generator=g) / (m.in_features ** 0.5)
            up = torch.randn(m.out_features, RANK, generator=g) * B_SCALE
        state[f"{name}.lora_down.weight"] = down.half()
        state[f"{name}.lora_up.weight"] = up.half()
        state[f"{name}.alpha"] = torch.tensor(ALPHA).half()
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA),
            "ss_base_model_version": "sd_v1"}
    if locon:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(RANK), "conv_alpha": str(ALPHA)})
    save_file(state, str(path), metadata=meta)
    return path, len(layers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp32 on cpu, fp16 on cuda)")
    p.add_argument("--repeats", type=int, default=5, help="merges per kind (default 5)")
    p.add_argument("--threads", type=int, default=2)
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
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline(**tiny_components(full_size=True), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    print(f"full-size pipeline built in {time.perf_counter() - t0:.1f}s", flush=True)
    results: dict = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "rank": RANK,
                     "machine": platform.machine(), "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lib = LoraLibrary(tmp / "loras", targets=pipeline_targets(pipe))
        files = {}
        for kind in ("locon", "attn"):
            for i in range(4):
                files[f"{kind}{i}"] = kohya_file(tmp / f"{kind}{i}.safetensors", pipe, seed=i + (10 if kind == "locon" else 20),
                                                 locon=kind == "locon")
        results["layers"] = {"locon": files["locon0"][1], "attention": files["attn0"][1]}
        results["file_mb"] = {"locon": round(files["locon0"][0].stat().st_size / 1e6, 1),
                              "attention": round(files["attn0"][0].stat().st_size / 1e6, 1)}
        # 1. import, interleaved LoCon / attention
        imports: dict[str, list[float]] = {"locon": [], "attention": []}
        for i in range(4):
            for kind, key in (("locon", f"locon{i}"), ("attention", f"attn{i}")):
                t = time.perf_counter()
                lib.import_file(files[key][0], key)
                imports[kind].append(time.perf_counter() - t)
        results["import_s"] = {k: statistics.median(v) for k, v in imports.items()}
        print("import (median of 4):", results["import_s"], flush=True)

        pipe.to(device, dtype)
        mixer = Mixer(LoadedModel(pipe, "full-size-random", device, dtype), lib)
        loads: dict[str, list[float]] = {"locon": [], "attention": []}
        for i in range(4):
            for kind, key in (("locon", f"locon{i}"), ("attention", f"attn{i}")):
                sync(device)
                t = time.perf_counter()
                mixer.ensure_loaded([key])
                sync(device)
                loads[kind].append(time.perf_counter() - t)
        results["load_s"] = {k: statistics.median(v) for k, v in loads.items()}
        print("load into the pipeline (median of 4):", results["load_s"], flush=True)

        # 3. merge after a weight change, 4 LoRAs of each kind, interleaved; switching kinds is not timed
        sets = {"locon": [f"locon{i}" for i in range(4)], "attention": [f"attn{i}" for i in range(4)]}
        merges: dict[str, list[float]] = {"locon": [], "attention": []}
        layers_merged: dict[str, int] = {}
        for rep in range(args.repeats + 1):
            for kind, names in sets.items():
                mixer.set_weights({n: 0.3 for n in names})
                mixer.apply()  # this kind's mix in place (switching from the other kind: not timed)
                sync(device)
                t = time.perf_counter()
                mixer.set_weights({n: 0.3 + 0.05 * (j + 1) * (1 + rep % 2) for j, n in enumerate(names)})
                n = mixer.apply()
                sync(device)
                if rep:  # the first round warms up kernels and stacks
                    merges[kind].append(time.perf_counter() - t)
                layers_merged[kind] = n
        results["merge_s"] = {k: statistics.median(v) for k, v in merges.items()}
        results["layers_merged"] = layers_merged
        results["merge_ratio_locon_vs_attention"] = results["merge_s"]["locon"] / results["merge_s"]["attention"]
        print("merge after a weight change (median):", results["merge_s"], "layers:", layers_merged,
              f"ratio {results['merge_ratio_locon_vs_attention']:.2f}x", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
