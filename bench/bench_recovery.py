"""Known-answer test of the trainer: a style whose ideal denoiser is known in closed form, rendered into
a small image set that goes through the normal dataset and training path; how much of the gap between
the base model and that ideal the trained LoRA closes, on prompts and seeds it never saw.

Why this design (the tiny model has random weights):
- A random UNet is no denoiser, so "the tiny model plus a planted LoRA" renders noise that no model
  fits better than another: there would be no gap to recover.  So the base model is first made a
  denoiser, in a few seconds: the tiny UNet is fine-tuned (all weights) on "plain" latents
  x0 ~ N(0, sigma^2), for prompts without the trigger word.
- The style is a shift of that distribution: x0 ~ N(mu, sigma^2), mu one value per latent channel.
  Its ideal denoiser (the teacher) is exact: for x_t = a x0 + b eps, E[eps | x_t] =
  b (x_t - a mu) / (a^2 sigma^2 + b^2).  The base model predicts as if mu were 0; the gap is the mu
  term, which the LoRA must learn to add when the trigger word is in the prompt.
- The tiny model's random VAE does not give back the latent of an image it decoded, so the style
  set is rendered and encoded by a block VAE: each 8x8 pixel block holds one latent position, its
  four 4x4 quadrants the four channels as grey levels.  It is exact (up to 8-bit rounding), so the
  trainer sees the teacher's latents through real PNG files, the dataset filter, buckets and the
  latent cache, with the scaling factor taken from the VAE's config as for any model.
Measured, on held-out prompts, noise and timesteps: the denoising loss of base, trained and teacher,
and the fraction of the gap closed; on images sampled (DDIM) from held-out seeds, how far the mean of
each channel moved from the base model's toward mu.  A deliberately broken trainer (a wrong noise
target, a wrong latent scale, the text conditioning dropped) must close clearly less.

    python -m bench.bench_recovery            # every row; the last line: recovered <f> of the gap ...
    python -m bench.bench_recovery --rows attention --steps 150
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

TRIGGER = "zqxstyle"
MU = (0.8, -0.8, 0.6, -0.6)  # the style: each latent channel's mean (scaled latents)
SIGMA = 0.3  # spread of every latent, plain and styled
SCALING = 2.0  # the block VAE's scaling factor: latents the UNet sees = SCALING * grey-level latents
TRAIN_PROMPTS = ["a cat", "a house", "a tree", "a boat", "a bird", "a road", "a hill", "a cup"]
HELD_OUT_PROMPTS = ["a dog", "a castle", "a flower", "a car"]
# each row: TrainConfig overrides (the rows other than the first are skipped with a reason where the
# trainer lacks the option); "buckets" also renders the set in non-square images
# (learning rates: the highest of 1e-3, 3e-3, 1e-2 that trained stably for each network; LoCon's conv
# layers diverge at 1e-2; bench/RESULTS.md has the runs)
ROWS = {
    "attention": {"network": "attention", "learning_rate": 3e-3},
    "kohya": {"network": "kohya", "learning_rate": 3e-3},
    "locon": {"network": "locon", "conv_rank": 8, "conv_alpha": 8, "learning_rate": 1e-3},
    "buckets": {"network": "attention", "learning_rate": 3e-3, "_buckets": True},
    # Prodigy's default d_coef 1 overshoots on this small problem (the loss ends above the base's, though
    # the images move the right way); a smaller d_coef is Prodigy's own knob to damp the step size it
    # estimates: 0.5 / 0.2 / 0.1 closed 0.52 / 0.65 / 0.70 of the gap (bench/RESULTS.md)
    "prodigy": {"network": "attention", "optimizer": "prodigy", "learning_rate": 1.0, "prodigy_d_coef": 0.2},
}
MUTATIONS = ("noise_target", "latent_scale", "no_text")


class BlockVAE(torch.nn.Module):
    """An exact, deterministic stand-in for the tiny model's random VAE (see the module docstring)."""

    def __init__(self, scaling_factor: float = SCALING):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=scaling_factor, latent_channels=4, block_out_channels=[4] * 4)

    def encode(self, x: torch.Tensor):
        grey = x.float().mean(1, keepdim=True)  # [B, 1, H, W] in [-1, 1]
        mean = F.pixel_unshuffle(F.avg_pool2d(grey, 4), 2)  # [B, 4, H/8, W/8]: one quadrant per channel
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.full_like(mean, 1e-4)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        grey = F.interpolate(F.pixel_shuffle(z.float(), 2), scale_factor=4, mode="nearest")
        return grey.clamp(-1, 1).repeat(1, 3, 1, 1)


def to_image(latent: torch.Tensor):
    """A [4, h, w] scaled latent as the PNG image the block VAE encodes back to it."""
    from PIL import Image

    pixels = BlockVAE().decode(latent[None] / SCALING)[0]
    arr = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def ideal_eps(x_t: torch.Tensor, alphas: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] for x0 ~ N(mu, SIGMA^2) per element; alphas: alpha_bar per sample."""
    a2 = alphas.view(-1, 1, 1, 1)
    a, b = a2.sqrt(), (1 - a2).sqrt()
    return b * (x_t - a * mu.view(1, -1, 1, 1)) / (a2 * SIGMA ** 2 + (1 - a2))


def draw_latents(n: int, side: int | tuple[int, int], styled: bool, gen: torch.Generator) -> torch.Tensor:
    w, h = (side, side) if isinstance(side, int) else side
    x0 = SIGMA * torch.randn(n, 4, h // 8, w // 8, generator=gen)
    if styled:
        x0 += torch.tensor(MU).view(1, 4, 1, 1)
    return x0.clamp(-SCALING * 0.99, SCALING * 0.99)  # within the grey levels an image can hold


def text_states(comps: dict, prompts: list[str]) -> torch.Tensor:
    tok = comps["tokenizer"](prompts, padding="max_length", max_length=comps["tokenizer"].model_max_length,
                             truncation=True, return_tensors="pt")
    with torch.no_grad():
        return comps["text_encoder"](tok.input_ids, return_dict=False)[0]


def make_denoiser(comps: dict, steps: int, side: int, seed: int = 0) -> float:
    """Fine-tune the whole tiny UNet on plain latents (no trigger word) so that it is a denoiser;
    returns its last loss over the ideal loss (1.0 would be perfect)."""
    unet, sched = comps["unet"], comps["noise_scheduler"]
    gen = torch.Generator().manual_seed(seed)
    states = text_states(comps, TRAIN_PROMPTS + HELD_OUT_PROMPTS)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
    unet.train()
    zero = torch.zeros(4)
    ratios = []
    for i in range(steps):
        x0 = draw_latents(16, side, False, gen)
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (16,), generator=gen)
        x_t = sched.add_noise(x0, eps, t)
        hidden = states[torch.randint(0, len(states), (16,), generator=gen)]
        pred = unet(x_t, t, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:  # cosine decay: the last steps settle
            g["lr"] = 1e-3 * (1 + math.cos(math.pi * (i + 1) / steps))
        if i >= steps - 10:
            ideal = F.mse_loss(ideal_eps(x_t, sched.alphas_cumprod[t], zero), eps).item()
            ratios.append(loss.item() / ideal)
    unet.eval()
    unet.requires_grad_(False)
    return float(np.mean(ratios))


class Teacher(torch.nn.Module):
    """The base model with the style planted exactly: it denoises x_t as the base model denoises the same
    noisy latent without the style's shift, base(x_t - sqrt(alpha_bar) mu).  For an ideal base this is
    the ideal denoiser of the styled latents (ideal_eps); for the real, imperfect base its loss on styled
    latents equals the base's own loss on plain ones, so the gap base -> teacher is the style alone, not
    the base model's imperfection, which no LoRA is asked to fix."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.unet, self.alphas_cumprod = unet, alphas_cumprod

    def forward(self, x_t, t, states, return_dict=False):
        t_ = torch.as_tensor(t).reshape(-1).expand(len(x_t))
        a = self.alphas_cumprod[t_].sqrt().view(-1, 1, 1, 1)
        return self.unet(x_t - a * torch.tensor(MU).view(1, -1, 1, 1), t, states, return_dict=return_dict)


@dataclass
class Probe:
    """The held-out measurement: fixed styled latents, noise, timesteps and held-out prompts."""

    x_t: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor
    states: torch.Tensor
    ideal_loss: float  # the closed-form ideal denoiser's, for reference

    @classmethod
    def make(cls, comps: dict, side: int, n: int = 64, seed: int = 99) -> "Probe":
        gen = torch.Generator().manual_seed(seed)
        sched = comps["noise_scheduler"]
        x0 = draw_latents(n, side, True, gen)
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.linspace(20, sched.config.num_train_timesteps - 20, n).long()
        x_t = sched.add_noise(x0, eps, t)
        prompts = [f"{TRIGGER}, {HELD_OUT_PROMPTS[i % len(HELD_OUT_PROMPTS)]}" for i in range(n)]
        ideal = F.mse_loss(ideal_eps(x_t, sched.alphas_cumprod[t], torch.tensor(MU)), eps).item()
        return cls(x_t, eps, t, text_states(comps, prompts), ideal)

    @torch.no_grad()
    def loss(self, unet) -> float:
        return F.mse_loss(unet(self.x_t, self.t, self.states, return_dict=False)[0], self.eps).item()


@torch.no_grad()
def sample_means(unet, comps: dict, side: int, seeds: list[int], steps: int = 20) -> torch.Tensor:
    """Each latent channel's mean over images sampled (DDIM, no guidance) for held-out prompts and seeds."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(comps["noise_scheduler"].config)
    sched.set_timesteps(steps)
    prompts = [f"{TRIGGER}, {HELD_OUT_PROMPTS[i % len(HELD_OUT_PROMPTS)]}" for i in range(len(seeds))]
    states = text_states(comps, prompts)
    x = torch.stack([torch.randn(4, side // 8, side // 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    for t in sched.timesteps:
        eps = unet(x, t, states, return_dict=False)[0]
        x = sched.step(eps, t, x).prev_sample
    # the rendered images, read back: decode to PNG pixels and encode (exact for the block VAE)
    images = BlockVAE().decode(x / SCALING)
    return (BlockVAE().encode(images).latent_dist.mean * SCALING).mean(dim=(0, 2, 3))


def write_style_set(folder: Path, n: int, side: int, buckets: bool, seed: int = 1) -> list[Path]:
    """The teacher's renders: n styled latents as PNG images (non-square ones too with `buckets`)."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    # with buckets: a landscape and a portrait bucket beside the square (all buckets of size `side`,
    # so the dataset path stores them as rendered: the block grid stays aligned)
    shapes = [(side, side)] + ([(side + side // 2, side // 2), (side // 2, side + side // 2)] if buckets else [])
    files = []
    for i in range(n):
        w, h = shapes[i % len(shapes)]
        path = folder / f"style_{i:03d}.png"
        to_image(draw_latents(1, (w, h), True, gen)[0]).save(path)
        files.append(path)
    return files


@dataclass
class Captions:
    """A captioner for the dataset path: each image gets one of the training prompts (never a held-out one)."""

    name: str = "known-answer"
    is_fallback: bool = False
    count: int = 0

    def caption(self, images):
        out = [TRAIN_PROMPTS[(self.count + i) % len(TRAIN_PROMPTS)] for i in range(len(images))]
        self.count += len(images)
        return out


@dataclass
class RecoveryResult:
    row: str
    mutation: str | None
    steps: int
    base_loss: float
    trained_loss: float
    teacher_loss: float
    fraction: float  # of the denoising-loss gap closed
    image_fraction: float  # of the channel-mean shift toward mu, in sampled images
    seconds: float
    denoiser_ratio: float = float("nan")
    skipped: str | None = None
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        what = self.row + (f" with a {self.mutation.replace('_', ' ')} bug" if self.mutation else "")
        if self.skipped:
            return f"{what}: skipped ({self.skipped})"
        return (f"{what}: recovered {self.fraction:.2f} of the gap (base -> teacher) in {self.steps} steps; "
                f"sampled images {self.image_fraction:.2f} of the way; loss base {self.base_loss:.4f} -> trained "
                f"{self.trained_loss:.4f} (teacher {self.teacher_loss:.4f}); {self.seconds:.0f}s")


def base_components(side: int, denoiser_steps: int) -> tuple[dict, float]:
    """The tiny model with the block VAE, its UNet made a denoiser of plain latents."""
    from diffusers import DDPMScheduler

    from stylemix.models import tiny_components

    torch.manual_seed(0)
    c = tiny_components()
    comps = {**c, "vae": BlockVAE(), "noise_scheduler": DDPMScheduler.from_config(c["scheduler"].config),
             "sample_scheduler": c["scheduler"]}
    comps["text_encoder"].requires_grad_(False)
    ratio = make_denoiser(comps, denoiser_steps, side)
    return comps, ratio


def mutate(comps: dict, mutation: str | None) -> dict:
    """A deliberately broken trainer, from the outside: what it is given, not its code."""
    from diffusers import DDPMScheduler

    comps = dict(comps)
    if mutation == "noise_target":  # trains to predict v while the model predicts eps
        comps["noise_scheduler"] = DDPMScheduler.from_config(comps["noise_scheduler"].config,
                                                             prediction_type="v_prediction")
    elif mutation == "latent_scale":  # the latents a quarter of their size (a forgotten scaling factor)
        comps["vae"] = BlockVAE(scaling_factor=SCALING / 4)
    elif mutation == "no_text":  # the text conditioning dropped: every caption encodes to zeros
        te = copy.deepcopy(comps["text_encoder"])
        te.register_forward_hook(lambda m, i, out: (torch.zeros_like(out[0]),) + tuple(out[1:])
                                 if isinstance(out, tuple) else out)
        comps["text_encoder"] = te
    elif mutation is not None:
        raise ValueError(f"unknown mutation {mutation!r}: use one of {', '.join(MUTATIONS)}")
    return comps


def run_recovery(base: dict, work: Path, row: str = "attention", mutation: str | None = None, steps: int = 120,
                 side: int = 64, images: int = 24, rank: int = 8, learning_rate: float = 3e-3,
                 seeds: tuple[int, ...] = tuple(range(8)), denoiser_ratio: float = float("nan")) -> RecoveryResult:
    """Train one LoRA on the teacher's style set through the dataset path and measure the recovery.
    `base` (from base_components) is not changed: the LoRA is trained on a copy."""
    from stylemix.datasets.prepare import DatasetConfig, prepare_dataset
    from stylemix.training.config import TrainConfig
    from trainers.lora import train

    overrides = dict(ROWS[row])
    buckets = overrides.pop("_buckets", False)
    side = max(side, 128) if buckets else side  # at 64 px the square is the only bucket
    missing = sorted(set(overrides) - set(TrainConfig.__dataclass_fields__))
    nan = float("nan")
    if missing:
        return RecoveryResult(row, mutation, steps, nan, nan, nan, nan, nan, 0.0,
                              skipped=f"TrainConfig has no {', '.join(missing)}")
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    files = write_style_set(work / "renders", images, side, buckets)
    result = prepare_dataset([str(f) for f in files], "style", TRIGGER, work / "data",
                             DatasetConfig(size=side, blur_threshold=0, pixel_art="off", enable_bucket=buckets),
                             captioner=Captions(), overwrite=True)
    assert len(result.kept) == images, f"the dataset path dropped teacher renders: {result.summary}"
    comps = mutate({**base, "unet": copy.deepcopy(base["unet"])}, mutation)
    lr = overrides.pop("learning_rate", learning_rate)
    config = TrainConfig(data_dir=str(work / "data" / "style"), name=f"ka-{row}-{mutation or 'ok'}",
                         loras_dir=str(work / "loras"), model="tiny", device="cpu", resolution=side, max_steps=steps,
                         batch_size=4, rank=rank, alpha=rank, learning_rate=lr, lr_scheduler="constant",
                         train_text_encoder=False, random_flip=False, sample_prompts=[], checkpoint_every=100_000,
                         mixed_precision="no", seed=3, overwrite=True, **overrides)
    trained = train(config, work / "job", components=comps)
    probe = Probe.make(base, side)
    base_unet = base["unet"]
    teacher = Teacher(base_unet, base["noise_scheduler"].alphas_cumprod)
    student = comps["unet"]  # the trained LoRA sits on this copy (peft adapter, active)
    student.eval()
    base_loss, trained_loss, teacher_loss = probe.loss(base_unet), probe.loss(student), probe.loss(teacher)
    fraction = (base_loss - trained_loss) / (base_loss - teacher_loss)
    seeds = list(seeds)
    m_base, m_teacher, m_student = (sample_means(u, base, side, seeds) for u in (base_unet, teacher, student))
    image_fraction = float(torch.dot(m_student - m_base, m_teacher - m_base) /
                           torch.dot(m_teacher - m_base, m_teacher - m_base))
    return RecoveryResult(row, mutation, trained.steps, base_loss, trained_loss, teacher_loss, fraction,
                          image_fraction, time.perf_counter() - t0, denoiser_ratio,
                          extra={"ideal_loss": probe.ideal_loss, "channel_means_base": m_base.tolist(),
                                 "channel_means_teacher": m_teacher.tolist(),
                                 "channel_means_trained": m_student.tolist()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    p.add_argument("--mutations", default=",".join(MUTATIONS), help="run the attention row with each bug too")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--denoiser-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from stylemix.models import quiet_library_logs

    quiet_library_logs()
    side = 64
    t0 = time.perf_counter()
    base, ratio = base_components(side, args.denoiser_steps)
    print(f"base denoiser: loss {ratio:.2f}x the ideal after {args.denoiser_steps} steps ({time.perf_counter() - t0:.0f}s)",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(r, None) for r in args.rows.split(",") if r] + \
               [("attention", m) for m in args.mutations.split(",") if m]
        for row, mutation in runs:
            res = run_recovery(base, Path(tmp) / f"{row}-{mutation}", row, mutation, args.steps,
                               denoiser_ratio=ratio)
            results.append(res)
            print(res.line(), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps([r.__dict__ for r in results], indent=1, default=str))
    good = [r for r in results if r.mutation is None and not r.skipped]
    if not good:
        sys.exit("no row ran")
    worst = min(good, key=lambda r: r.fraction)
    print(f"recovered {worst.fraction:.2f} of the gap (base -> teacher) in {worst.steps} steps "
          f"(the least of {len(good)} rows: {worst.row})")


if __name__ == "__main__":
    main()
