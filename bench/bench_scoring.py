"""Scoring cost beside generation cost, per image, at full scale, measured side by side in one run.

Generation: full-size SD1.5 (860M-parameter UNet, real configs, random weights), 512x512,
classifier-free guidance, PNDM, `--steps` steps.  Scoring: full-size open_clip ViT-B-32 (random
weights, QuickGELU as the OpenAI weights use) through `stylemix.scores.scoring.score_images`: image
preprocessing, image and prompt embeddings, CLIP score and two style centroids.  Random weights
cost exactly what trained ones do.  Goal: scoring under 5% of generation per image.

On CPU, 20 full steps take minutes per image, so by default generation is timed at 1 and 3
steps and extrapolated linearly to `--steps` (t = t1 + (steps - 1) * per_step; the fixed part
t1 holds text encoding and the VAE decode).  `--full` times the real `--steps` run instead.

`--judges clip,csd` times each style judge side by side: `clip` is the above (CLIP ViT-B-32 gives
the CLIP score and the style numbers); `csd` is what scoring costs with CSD as the judge: CLIP
ViT-B-32 for the CLIP score plus CSD (CLIP ViT-L/14 image tower + style head, full size, random
weights) for the style numbers.  The embedding alone of each judge is timed too.  With
`--render-seconds S` no SD1.5 is built: S is the generation time per image the ratios use (e.g.
the one bench/RESULTS.md measured on the same machine), and 512 px noise images are scored.

    python bench/bench_scoring.py                      # CPU, 1 thread
    python bench/bench_scoring.py --device cuda --batch 4 --full
    python bench/bench_scoring.py --judges clip,csd --render-seconds 149 --repeats 3   # CPU, judges only
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

PROMPT = "wcstyle, a cat sitting by a window"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def full_scorer(clip_model: str, device: torch.device):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from stylemix.scores.clip_models import Scorer

    torch.manual_seed(0)
    model = open_clip.create_model(clip_model, pretrained=None, force_quick_gelu=True, device=device).eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return Scorer(model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(clip_model),
                  name=f"{clip_model}/random", device=device)


def full_csd(device: torch.device):
    """CSD at its real size (ViT-L/14 backbone, 1024x768 heads) with random weights."""
    from stylemix.scores.csd import CSD_VIT_L, CsdScorer, csd_preprocess, random_csd

    return CsdScorer(model=random_csd(CSD_VIT_L, seed=0).to(device), preprocess=csd_preprocess(CSD_VIT_L),
                     name="CSD-ViT-L/random", device=device)


def noise_images(n: int, size: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def judges_main(args) -> None:
    """Scoring per image with each style judge, side by side, as a share of one render."""
    from stylemix.scores.scoring import StyleCentroid, score_images

    device = torch.device(args.device)
    t = time.perf_counter()
    clip = full_scorer(args.clip_model, device)
    judges = {"clip": None}
    if "csd" in args.judges:
        judges["csd"] = full_csd(device)
    judges = {k: v for k, v in judges.items() if k in args.judges}
    print(f"built {args.clip_model} + {', '.join(args.judges)} in {time.perf_counter() - t:.0f}s on {device} "
          f"({torch.get_num_threads()} threads)")
    images = noise_images(args.batch, args.size)
    rows = []
    for kind, judge in judges.items():
        scorer = judge or clip
        d = int(scorer.embed_images(images[:1]).shape[-1])  # warm-up
        styles = {n: StyleCentroid(vector=torch.nn.functional.normalize(torch.randn(d), dim=0), clip_model=scorer.name,
                                   n_images=10, self_similarity=0.8, base_similarity=0.6) for n in ("a", "b")}

        def score():
            clip._text_cache.clear()  # a new prompt each time: the text tower runs too
            return score_images(clip, images, PROMPT, styles, trigger_words=["wcstyle"], style_scorer=judge)

        score()
        full_t, embed_t = [], []
        for _ in range(args.repeats):
            full_t.append(timed(score, device))
            embed_t.append(timed(lambda: scorer.embed_images(images), device))
        rows.append((kind, scorer.name, statistics.median(full_t) / args.batch, statistics.median(embed_t) / args.batch,
                     full_t))
    gen = args.render_seconds
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.machine()}, {torch.get_num_threads()} thread(s))")
    print(f"\n| device | style judge | judge's embedding / image | scoring / image (CLIP score + style, new prompt) "
          f"| share of one {args.size} px {args.steps}-step render ({gen:g} s) |")
    print("|---|---|---|---|---|")
    for kind, judge_name, full, embed, _ in rows:
        print(f"| {name} | {kind} ({judge_name}) | {embed * 1000:.0f} ms | {full * 1000:.0f} ms | {100 * full / gen:.2f}% |")
    print("\nraw (s per call of %d images): %s" % (args.batch, {k: [round(x, 3) for x in r] for k, _, _, _, r in rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture to score with (e.g. ViT-L-14)")
    ap.add_argument("--dtype", default=None, help="generation dtype (default: fp32 on cpu, fp16 on cuda)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="images per generation call (and per scoring call)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="time the real --steps run instead of extrapolating")
    ap.add_argument("--judges", default=None, metavar="clip,csd",
                    help="time these style judges side by side (CSD: ViT-L/14 at full size, random weights)")
    ap.add_argument("--render-seconds", type=float, default=None, metavar="S",
                    help="with --judges: generation time per image to compare with, instead of building SD1.5")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.judges:
        args.judges = [j.strip() for j in args.judges.split(",") if j.strip()]
        if not args.render_seconds:
            ap.error("--judges needs --render-seconds (generation per image, e.g. from bench/RESULTS.md)")
        return judges_main(args)

    from diffusers import StableDiffusionPipeline

    from stylemix.models import pick_dtype, quiet_library_logs, tiny_components
    from stylemix.scores.scoring import StyleCentroid, score_images

    quiet_library_logs()
    device = torch.device(args.device)
    dtype = pick_dtype(device, args.dtype)
    t = time.perf_counter()
    pipe = StableDiffusionPipeline(**tiny_components(full_size=True), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device, dtype)
    scorer = full_scorer(args.clip_model, device)
    print(f"built full SD1.5 + {args.clip_model} in {time.perf_counter() - t:.0f}s on {device} "
          f"({torch.get_num_threads()} threads), generation dtype {dtype}")

    d = scorer.embed_dim
    styles = {n: StyleCentroid(vector=torch.nn.functional.normalize(torch.randn(d), dim=0), clip_model=scorer.name,
                               n_images=10, self_similarity=0.8, base_similarity=0.6) for n in ("a", "b")}
    gen_kwargs = dict(height=args.size, width=args.size, guidance_scale=7.5, output_type="pil")

    def generate(steps):
        return pipe([PROMPT] * args.batch, num_inference_steps=steps,
                    generator=torch.Generator(device).manual_seed(0), **gen_kwargs).images

    images = generate(1)  # warm-up, and the images to score
    def score(cached: bool):
        if not cached:
            scorer._text_cache.clear()  # a new prompt: tokenise and run the text tower again
        return score_images(scorer, images, PROMPT, styles, trigger_words=["wcstyle"])

    score(False)  # warm-up

    gen_t, score_t, cached_t = [], [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        if args.full:
            gen_t.append(timed(lambda: generate(args.steps), device))
        else:
            t1 = timed(lambda: generate(1), device)
            t3 = timed(lambda: generate(3), device)
            gen_t.append(t1 + (args.steps - 1) * (t3 - t1) / 2)
        score_t.append(timed(lambda: score(False), device))
        cached_t.append(timed(lambda: score(True), device))
    gen, sc = statistics.median(gen_t) / args.batch, statistics.median(score_t) / args.batch
    sc_cached = statistics.median(cached_t) / args.batch
    how = "measured" if args.full else "extrapolated from 1 and 3 steps"
    print(f"\n| device | batch | generation / image ({args.steps} steps, {args.size}px, {how}) "
          f"| scoring / image ({args.clip_model}), new prompt | ratio | scoring / image, same prompt | ratio |")
    print("|---|---|---|---|---|---|---|")
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.machine()}, {torch.get_num_threads()} thread(s))")
    print(f"| {name} | {args.batch} | {gen:.3f} s | {sc * 1000:.1f} ms | {100 * sc / gen:.2f}% "
          f"| {sc_cached * 1000:.1f} ms | {100 * sc_cached / gen:.2f}% |")
    print(f"\nraw: generation {[round(x, 3) for x in gen_t]} s, scoring {[round(x, 4) for x in score_t]} s, "
          f"cached prompt {[round(x, 4) for x in cached_t]} s (per call of {args.batch} images); "
          f"goal < 5%: {'met' if sc / gen < 0.05 else 'NOT met'}")


if __name__ == "__main__":
    main()
