"""Every training setting (TrainConfig) and its command-line options.

It lives in the library, not in trainers/, because the app, the CLI and the job queue build and
check configs without importing the training code: trainers/ imports stylemix, never the reverse.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from stylemix.errors import StyleMixError
from stylemix.lora.files import TEXT_TARGETS, UNET_TARGETS
from stylemix.models import DEFAULT_MODEL
from stylemix.paths import check_name

@dataclass
class TrainConfig:
    """Every training setting.  Defaults are the seed report's settings for SD1.5 style LoRAs."""

    data_dir: str = ""  # dataset folder (imagefolder layout with metadata.jsonl + dataset.json)
    name: str = ""  # the LoRA's name in the library: loras/<name>/
    loras_dir: str | None = None  # library folder; None = $STYLEMIX_LORAS or ./loras
    model: str = DEFAULT_MODEL  # hub id, local diffusers folder, SD1.5 .safetensors file, or "tiny" (offline demo)
    device: str | None = None  # None picks cuda > mps > cpu (accelerate's choice)
    overwrite: bool = False  # replace an existing LoRA of the same name at the end
    owner: str | None = None  # the app user's owner key (stylemix.access.owner_key), recorded in stylemix.json

    # --- LoRA
    rank: int = 32  # LoRA rank r
    alpha: float = 16.0  # lora_alpha; the update is scaled by alpha / rank = 0.5
    unet_targets: list[str] = field(default_factory=lambda: list(UNET_TARGETS))  # attention projections
    text_targets: list[str] = field(default_factory=lambda: list(TEXT_TARGETS))
    train_text_encoder: bool = True  # off: text embeddings are cached once and only the UNet learns

    # --- optimisation
    learning_rate: float = 1e-4  # AdamW lr for UNet and text-encoder LoRA
    epochs: int = 20  # passes over the data (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 2  # images per step per device
    grad_accumulation: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # only AdamW: what the seed report used
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"  # any diffusers get_scheduler name: cosine, constant, linear, ...
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0  # gradient clipping (a stabiliser, always on)
    min_snr_gamma: float | None = None  # min-SNR loss weighting (5.0 is usual); off by default
    noise_offset: float = 0.0  # offset noise (0.05-0.1 is usual); off by default
    seed: int = 42

    # --- data and speed
    resolution: int = 512  # training size; images are resized + centre-cropped to it
    random_flip: bool = True  # mirror images at random (both views are latent-cached)
    cache_latents: bool = True  # encode each image once; off = VAE every step (as diffusers' script)
    gradient_checkpointing: bool = False  # less memory, ~30% slower
    mixed_precision: str = "auto"  # auto: bf16 where supported, else fp16 on GPU, fp32 (no) on CPU

    # --- robustness, checkpoints, samples
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end and on cancel
    keep_checkpoints: int = 2  # older complete checkpoints are deleted
    sample_every: int = 250  # steps between sample images (0: only at the end)
    sample_prompts: list[str] = field(default_factory=lambda: [
        "{trigger}, a portrait of a woman", "{trigger}, a mountain landscape", "{trigger}, a bowl of fruit"])
    sample_seed: int = 1234  # fixed, so samples at different steps are comparable
    sample_steps: int = 25  # inference steps per sample
    sample_guidance: float = 7.5

    # --- test/debug only: inject a NaN into the batch of these steps (1-based)
    debug_nan_at_steps: list[int] = field(default_factory=list)

    def validate(self) -> "TrainConfig":
        check_name(self.name, "LoRA name")
        checks = [("rank", self.rank >= 1), ("alpha", self.alpha > 0), ("learning_rate", 0 < self.learning_rate < 1),
                  ("epochs", self.epochs >= 1), ("max_steps", self.max_steps is None or self.max_steps >= 1),
                  ("batch_size", self.batch_size >= 1), ("grad_accumulation", self.grad_accumulation >= 1),
                  ("resolution", self.resolution >= 8 and self.resolution % 8 == 0),
                  ("max_grad_norm", self.max_grad_norm > 0), ("noise_offset", 0 <= self.noise_offset < 1),
                  ("min_snr_gamma", self.min_snr_gamma is None or self.min_snr_gamma > 0),
                  ("checkpoint_every", self.checkpoint_every >= 1), ("keep_checkpoints", self.keep_checkpoints >= 1),
                  ("sample_every", self.sample_every >= 0), ("max_bad_steps", self.max_bad_steps >= 1),
                  ("optimizer", self.optimizer == "adamw"),
                  ("mixed_precision", self.mixed_precision in ("auto", "no", "fp16", "bf16")),
                  ("unet_targets", bool(self.unet_targets))]
        for name, ok in checks:
            if not ok:
                raise StyleMixError(f"Invalid training setting {name}={getattr(self, name)!r}.")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise StyleMixError(f"Unknown training setting(s): {', '.join(unknown)}.")
        return cls(**d)


# --------------------------------------------------------------------------- command line

HELP = {  # shared with `python -m trainers.lora`
    "data_dir": "dataset folder (made by `stylemix preprocess`)",
    "name": "LoRA name in the library",
    "max_steps": "optimizer steps (overrides --epochs)",
    "train_text_encoder": "train text-encoder LoRA too (--no-train-text-encoder: UNet only, embeddings cached)",
    "cache_latents": "encode each image once (--no-cache-latents: VAE every step, as diffusers' script)",
    "mixed_precision": "auto, no, fp16 or bf16",
    "debug_nan_at_steps": "TEST/DEBUG ONLY: inject NaN into these steps' batches",
}
_SKIP_ARGS = {"data_dir", "name", "loras_dir", "model", "device", "owner"}  # positional, global or app-only


def add_config_arguments(parser: argparse.ArgumentParser, skip: set[str] = _SKIP_ARGS) -> None:
    """One --option per TrainConfig field (defaults left None, so only what the user typed overrides)."""
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{HELP.get(f.name, '')} (default: {default})".strip()
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif isinstance(default, list):
            kind = int if f.name == "debug_nan_at_steps" else str
            parser.add_argument(flag, dest=f.name, nargs="+", type=kind, default=None, help=help_)
        else:
            kind = {"max_steps": int, "min_snr_gamma": float}.get(f.name, type(default))
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_)


def config_from_args(args: argparse.Namespace, **base) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return TrainConfig(**{**base, **given})
