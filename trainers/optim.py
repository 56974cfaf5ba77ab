"""The optimiser (`--optimizer`): AdamW, bitsandbytes' AdamW8bit, or Prodigy.

    adamw      torch.optim.AdamW (the seed report's)
    adamw8bit  bitsandbytes.optim.AdamW8bit: AdamW with 8-bit state (about a quarter of the optimizer
               memory); CUDA only, optional (`pip install bitsandbytes`), imported only when chosen.
               TrainConfig.validate refuses it before any work where it cannot run.
    prodigy    prodigyopt.Prodigy: estimates its own step size d (the learning rate multiplies it, so
               1.0 is the convention, as kohya's docs say); --prodigy-d-coef scales the estimate,
               --prodigy-safeguard-warmup and --prodigy-use-bias-correction are its own options.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("stylemix.train")

PRODIGY_SMALL_LR = 0.1  # below this a Prodigy run is almost surely an AdamW learning rate left in place


def make_optimizer(config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, betas=betas, weight_decay=config.weight_decay,
                                 eps=config.adam_epsilon)
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # optional; TrainConfig.validate checked it is there and CUDA is

        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, betas=betas, weight_decay=config.weight_decay,
                                   eps=config.adam_epsilon)
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        if config.learning_rate < PRODIGY_SMALL_LR:
            logger.warning("Prodigy finds its own step size and the learning rate multiplies it: the convention is "
                           "--learning-rate 1.0; %g makes every step that much smaller (use --prodigy-d-coef to "
                           "scale it instead).", config.learning_rate)
        return Prodigy(params, lr=config.learning_rate, betas=betas, weight_decay=config.weight_decay,
                       eps=config.adam_epsilon, d_coef=config.prodigy_d_coef,
                       safeguard_warmup=config.prodigy_safeguard_warmup,
                       use_bias_correction=config.prodigy_use_bias_correction)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")  # TrainConfig.validate names it first


def effective_lr(optimizer: torch.optim.Optimizer) -> float:
    """The step size actually taken: the scheduled lr, times Prodigy's estimate d."""
    group = optimizer.param_groups[0]
    return float(group["lr"]) * float(group.get("d", 1.0))
