"""Every training setting (TrainConfig) and its command-line options.

It lives in the library, not in trainers/, because the app, the CLI and the job queue build and
check configs without importing the training code: trainers/ imports stylemix, never the reverse.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from stylemix.errors import StyleMixError
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

    # --- LoRA (which layers: trainers/networks.py)
    network: str = "attention"  # attention (to_q/k/v/out), kohya (kohya's SD1.5 default), locon (kohya + convs)
    rank: int = 32  # LoRA rank r (kohya: --network_dim)
    alpha: float = 16.0  # lora_alpha; the update is scaled by alpha / rank = 0.5 (kohya: --network_alpha)
    conv_rank: int | None = None  # locon: rank of the 3x3 convolutions (kohya: conv_dim); None = rank
    conv_alpha: float | None = None  # locon: their alpha (kohya: conv_alpha); None = alpha
    unet_targets: list[str] = field(default_factory=list)  # empty: the network's; names replace its UNet layers
    text_targets: list[str] = field(default_factory=list)  # empty: the network's text-encoder layers
    train_text_encoder: bool = True  # off: text embeddings are cached once and only the UNet learns

    # --- optimisation
    learning_rate: float = 1e-4  # lr for UNet and text-encoder LoRA (Prodigy: 1.0, it finds its own step size)
    epochs: int = 20  # passes over the data (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 2  # images per step per device
    grad_accumulation: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes, CUDA only) | prodigy (prodigyopt); trainers/optim.py
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    prodigy_d_coef: float = 1.0  # Prodigy: multiplies the step size it estimates (kohya: --optimizer_args d_coef=)
    prodigy_safeguard_warmup: bool = False  # Prodigy: safer estimate during lr warm-up (safeguard_warmup=True)
    prodigy_use_bias_correction: bool = False  # Prodigy: Adam's bias correction (use_bias_correction=True)
    lr_scheduler: str = "cosine"  # any diffusers get_scheduler name: cosine, constant, linear, ...
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0  # gradient clipping (a stabiliser, always on)
    min_snr_gamma: float | None = None  # min-SNR loss weighting (5.0 is usual); off by default
    noise_offset: float = 0.0  # offset noise (0.05-0.1 is usual); off by default
    seed: int = 42

    # --- captions (kohya's options and meaning; trainers/captions.py).  Any of them on: captions change every
    # step, so they are encoded every step even with the text encoder frozen.
    shuffle_caption: bool = False  # shuffle the comma-separated tags after the first keep_tokens
    keep_tokens: int = 1  # the first N tags never move or drop (1: the trigger word; kohya's default is 0)
    caption_dropout_rate: float = 0.0  # share of captions replaced by "" (unconditional training)
    caption_tag_dropout_rate: float = 0.0  # each tag after the first keep_tokens is dropped with this chance

    # --- data and speed
    resolution: int = 512  # training size R; a bucketed set's buckets are scaled by R / its size (trainers/batches.py)
    random_flip: bool = True  # mirror images at random (both views are latent-cached)
    cache_latents: bool = True  # encode each image once; off = VAE every step (as diffusers' script)
    gradient_checkpointing: bool = False  # less memory, ~30% slower
    mixed_precision: str = "auto"  # auto: bf16 where supported, else fp16 on GPU, fp32 (no) on CPU

    # --- robustness, checkpoints, samples
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end and on cancel
    save_every_epochs: int | None = None  # keep the LoRA of every Nth epoch as version NAME@eNN (kohya's name)
    tensorboard: bool = True  # TensorBoard event files in <job>/logs when tensorboard is installed
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
        """Check every setting (numbers against `LIMITS`, names against `CHOICES`: the tables the app and the
        CLI share) and normalise numbers to their field's type ("3" or 3.0 becomes 3).  Raises StyleMixError
        naming the first bad value and what is accepted.  Nothing here loads a model or reads the dataset."""
        check_name(self.name, "LoRA name")
        for name in LIMITS:
            setattr(self, name, check_setting(name, getattr(self, name)))
        for name in CHOICES:
            check_choice(name, getattr(self, name))
        for name in ("unet_targets", "text_targets"):
            targets = getattr(self, name)
            if not isinstance(targets, list) or not all(isinstance(t, str) and t.strip() for t in targets):
                raise StyleMixError(f"Invalid {name} {targets!r}: use a list of module names such as to_q to_k, "
                                    "or none for the network's layers.")
        if self.optimizer == "adamw8bit":
            why = eight_bit_unavailable(self.device)
            if why:
                raise StyleMixError(f"Invalid optimizer 'adamw8bit': {why}. Use adamw or prodigy.")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise StyleMixError(f"Unknown training setting(s): {', '.join(unknown)}.")
        return cls(**d)


# --------------------------------------------------------------------------- limits (app and CLI alike)


@dataclass(frozen=True)
class Limit:
    """The allowed values of one numeric setting.  `lo_open`/`hi_open`: the bound itself is not allowed."""

    label: str  # how messages name the setting ("learning rate")
    kind: type  # int or float
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    multiple: int = 1  # ints only: the value must be a multiple of this
    optional: bool = False  # None is allowed (the setting is off / derived)

    def describe(self) -> str:
        """The allowed values in words: "a whole number from 1 to 1024"."""
        what = f"a multiple of {self.multiple}" if self.multiple > 1 else (
            "a whole number" if self.kind is int else "a number")
        if not (self.lo_open or self.hi_open):
            return f"{what} from {_fmt(self.lo)} to {_fmt(self.hi)}"
        lo = f"greater than {_fmt(self.lo)}" if self.lo_open else f"at least {_fmt(self.lo)}"
        hi = f"below {_fmt(self.hi)}" if self.hi_open else f"at most {_fmt(self.hi)}"
        return f"{what} {lo} and {hi}"


def _fmt(x: float) -> str:
    """A number as a user typed it: 4294967295, 0.0001, 1e+30 (never 4.29497e+09)."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


# Upper bounds are what a single-GPU SD1.5 style LoRA can sensibly use; they also keep a typo (1e9 steps,
# batch 100000) from becoming a job that runs for a year or dies out of memory.  The app's Train tab and
# every command-line option check values here, and TrainConfig.validate checks them all again.
SEED_MAX = 2**32 - 1
LIMITS: dict[str, Limit] = {
    "rank": Limit("rank", int, 1, 1024),
    "alpha": Limit("alpha", float, 0, 4096, lo_open=True),
    "conv_rank": Limit("conv rank", int, 1, 1024, optional=True),
    "conv_alpha": Limit("conv alpha", float, 0, 4096, lo_open=True, optional=True),
    "learning_rate": Limit("learning rate", float, 0, 1, lo_open=True),  # 1: Prodigy's convention
    "epochs": Limit("epochs", int, 1, 10_000),
    "max_steps": Limit("max steps", int, 1, 100_000, optional=True),
    "batch_size": Limit("batch size", int, 1, 256),
    "grad_accumulation": Limit("gradient accumulation", int, 1, 1024),
    "adam_beta1": Limit("Adam beta1", float, 0, 1, hi_open=True),
    "adam_beta2": Limit("Adam beta2", float, 0, 1, hi_open=True),
    "weight_decay": Limit("weight decay", float, 0, 1),
    "adam_epsilon": Limit("Adam epsilon", float, 0, 1, lo_open=True),
    "prodigy_d_coef": Limit("Prodigy d_coef", float, 0, 1000, lo_open=True),
    "keep_tokens": Limit("keep tokens", int, 0, 255),
    "caption_dropout_rate": Limit("caption dropout rate", float, 0, 1, hi_open=True),
    "caption_tag_dropout_rate": Limit("caption tag dropout rate", float, 0, 1, hi_open=True),
    "lr_warmup_steps": Limit("warm-up steps", int, 0, 100_000),
    "max_grad_norm": Limit("max grad norm", float, 0, 1e6, lo_open=True),
    "min_snr_gamma": Limit("min-SNR gamma", float, 0, 1000, lo_open=True, optional=True),
    "noise_offset": Limit("noise offset", float, 0, 1, hi_open=True),
    "seed": Limit("seed", int, 0, SEED_MAX),
    "resolution": Limit("resolution", int, 64, 2048, multiple=8),
    "max_bad_steps": Limit("max bad steps", int, 1, 100_000),
    "checkpoint_every": Limit("checkpoint every", int, 1, 100_000),
    "save_every_epochs": Limit("save every epochs", int, 1, 10_000, optional=True),
    "keep_checkpoints": Limit("checkpoints kept", int, 1, 100),
    "sample_every": Limit("sample every", int, 0, 100_000),
    "sample_seed": Limit("sample seed", int, 0, SEED_MAX),
    "sample_steps": Limit("sample steps", int, 1, 1000),
    "sample_guidance": Limit("sample guidance", float, 0, 100),
}


def parse_number(name: str, raw) -> int | float | None:
    """A value typed by a user (text, a number from a form box, None for an empty box) as a number.

    Raises StyleMixError for an empty box, text that is not a number, inf/NaN, and a fraction where
    the setting counts something.  Range checks are `check_setting`'s."""
    limit = LIMITS[name]
    shown = str(raw)[:40]
    if isinstance(raw, str):
        raw = raw.strip()
        if raw == "":
            raw = None
        else:
            try:
                raw = int(raw) if limit.kind is int and raw.lstrip("+-").isdigit() else float(raw)
            except ValueError:
                raise StyleMixError(f"Invalid {limit.label} {shown!r}: not a number; use "
                                    f"{limit.describe()}.") from None
    if raw is None:
        raise StyleMixError(f"No {limit.label} given: use {limit.describe()}.")
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise StyleMixError(f"Invalid {limit.label} {shown!r}: not a number; use {limit.describe()}.")
    if isinstance(raw, float) and not math.isfinite(raw):
        raise StyleMixError(f"Invalid {limit.label} {shown}: use {limit.describe()}.")
    if limit.kind is int:
        if isinstance(raw, float) and not raw.is_integer():
            raise StyleMixError(f"Invalid {limit.label} {_fmt(raw)}: use {limit.describe()}.")
        return int(raw)
    return float(raw)


def check_setting(name: str, value):
    """`value` as setting `name` takes it (parsed, right type), or StyleMixError naming it and the allowed range.

    Never clamps: a value out of range is refused, not moved into range."""
    limit = LIMITS[name]
    if value is None and limit.optional:
        return None
    number = parse_number(name, value)
    ok = (number > limit.lo if limit.lo_open else number >= limit.lo) and \
         (number < limit.hi if limit.hi_open else number <= limit.hi) and \
         (limit.kind is not int or number % limit.multiple == 0)
    if not ok:
        raise StyleMixError(f"Invalid {limit.label} {_fmt(number)}: use {limit.describe()}.")
    return number


# Settings that name one of a few things: the same check (and words) for the CLI, the app and validate.
NETWORKS = ("attention", "kohya", "locon")  # the layers of each: trainers/networks.py
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")  # trainers/optim.py
CHOICES: dict[str, tuple[str, ...]] = {
    "network": NETWORKS,
    "optimizer": OPTIMIZERS,
    "mixed_precision": ("auto", "no", "fp16", "bf16"),
}


def check_choice(name: str, value) -> str:
    """`value` if it is one of CHOICES[name], else StyleMixError naming the setting and the accepted values."""
    accepted = CHOICES[name]
    if value not in accepted:
        label = name.replace("_", " ")
        raise StyleMixError(f"Invalid {label} {str(value)[:40]!r}: use {', '.join(accepted[:-1])} or {accepted[-1]}.")
    return value


def eight_bit_unavailable(device: str | None) -> str | None:
    """Why bitsandbytes' AdamW8bit cannot run here (None: it can).  Checked before any work: its 8-bit
    optimizer state is CUDA code, and the package is optional (`pip install bitsandbytes`)."""
    import importlib.util

    import torch

    if device in ("cpu", "mps") or not torch.cuda.is_available():
        return "bitsandbytes' 8-bit AdamW needs a CUDA GPU and " + (
            f"the device is {device}" if device in ("cpu", "mps") else "this machine has none")
    if importlib.util.find_spec("bitsandbytes") is None:
        return "it needs the optional bitsandbytes package (pip install bitsandbytes)"
    return None


def _checked_type(check, name: str, label: str):
    """argparse `type=` that runs `check(name, text)`: the same parsing, limits and words as the app's form."""
    def parse(text: str):
        try:
            return check(name, text)
        except StyleMixError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = label  # argparse names the type in some messages
    return parse


def _choice_type(name: str):
    return _checked_type(check_choice, name, name)


def _argument_type(name: str):
    """argparse `type=` for a LIMITS setting."""
    return _checked_type(check_setting, name, LIMITS[name].label)


# --------------------------------------------------------------------------- command line

HELP = {  # shared with `python -m trainers.lora`
    "data_dir": "dataset folder (made by `stylemix preprocess`)",
    "name": "LoRA name in the library",
    "max_steps": "optimizer steps (overrides --epochs)",
    "train_text_encoder": "train text-encoder LoRA too (--no-train-text-encoder: UNet only, embeddings cached)",
    "cache_latents": "encode each image once (--no-cache-latents: VAE every step, as diffusers' script)",
    "mixed_precision": "auto, no, fp16 or bf16",
    "network": "layers: attention (to_q/k/v/out), kohya (+ ff, proj_in/out, text MLP) or locon (kohya + convs)",
    "optimizer": "adamw, adamw8bit (bitsandbytes, CUDA) or prodigy (use --learning-rate 1)",
    "unet_targets": "UNet module names replacing the network's (default: the network's)",
    "text_targets": "text-encoder module names replacing the network's (default: the network's)",
    "keep_tokens": "the first N comma-separated tags never move or drop (kohya's --keep_tokens)",
    "save_every_epochs": "keep the LoRA of every Nth epoch as NAME@eNN (kohya's --save_every_n_epochs)",
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
        elif f.name in LIMITS:
            parser.add_argument(flag, dest=f.name, type=_argument_type(f.name), default=None, help=help_)
        elif f.name in CHOICES:
            parser.add_argument(flag, dest=f.name, type=_choice_type(f.name), default=None, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=None, help=help_)


def config_from_args(args: argparse.Namespace, **base) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return TrainConfig(**{**base, **given})
