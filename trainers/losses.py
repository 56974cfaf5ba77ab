"""The diffusion loss of one micro-batch, as pure functions: noise, target, per-sample weights.

Kept out of the loop so each can be checked against a hand computation
(tests/test_training_effects.py): an option that silently does nothing is the failure these
functions exist to rule out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise, plus `offset` x one Gaussian per (sample, channel) when offset > 0.

    The offset shifts a whole channel of an image at once ("offset noise"), which lets the model learn
    to change the mean brightness/colour of an image.  Draw order is part of the contract: the noise,
    then (only with an offset) the shift, both from `generator`, so a run replays exactly.
    """
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(tuple(shape[:2]) + (1,) * (len(shape) - 2), generator=generator)
    return noise


def sample_draws(generators: list[torch.Generator], latent_shape: tuple[int, ...], n_timesteps: int,
                 random_flip: bool, noise_offset: float = 0.0):
    """(flip, eps, noise, timesteps) of a micro-batch, each sample's from its own generator
    (trainers.batches.sample_generator): a sample draws the same values whatever batch it is in.

    Per sample, in this order: the flip (only with random_flip), the latent draw `eps` (mean + std x eps is
    the VAE sample), the noise (with its offset), the timestep.
    """
    flips, eps, noise, timesteps = [], [], [], []
    for g in generators:
        flips.append(bool(torch.rand((), generator=g) < 0.5) if random_flip else False)
        eps.append(torch.randn(latent_shape, generator=g))
        noise.append(draw_noise((1, *latent_shape), g, noise_offset)[0])
        timesteps.append(torch.randint(0, n_timesteps, (1,), generator=g))
    return torch.tensor(flips, dtype=torch.bool), torch.stack(eps), torch.stack(noise), torch.cat(timesteps)


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict from noisy latents: the noise (epsilon) or the velocity."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unsupported prediction_type {kind!r} (epsilon or v_prediction).")


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    a = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon prediction,
    min(SNR, gamma) / (SNR + 1) for v-prediction.  Down-weights the easy, low-noise timesteps."""
    s = snr(noise_scheduler, timesteps)
    denominator = s if noise_scheduler.config.prediction_type == "epsilon" else s + 1
    return torch.clamp(s, max=gamma) / denominator


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32; with per-sample `weights`, each sample's mean error is weighted."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    return (per_sample * weights.to(per_sample.device)).mean()
