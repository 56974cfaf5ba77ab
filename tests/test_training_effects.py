"""Training options checked for their effect, not only for a finite loss: each test fails if its option
silently does nothing (or does something else).

  * min-SNR weights and offset noise: the pure functions in trainers/losses.py against a hand computation,
    then train() shown to use them;
  * gradient accumulation 2 x batch 1 gives the same LoRA as batch 2 after one optimizer step;
  * gradient checkpointing recomputes the forward in the backward and leaves the loss curve unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from stylemix.lora.files import WEIGHTS_NAME
from test_trainer import make_dataset, tiny_config
from trainers import losses
from trainers.lora import load_training_components, train


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data")


def tiny_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler.from_config(load_training_components("tiny")["noise_scheduler"].config,
                                     prediction_type=prediction_type)


# --------------------------------------------------------------------------- min-SNR


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_a_hand_computation(prediction_type):
    sched = tiny_scheduler(prediction_type)
    t = torch.tensor([0, 1, 50, 200, 500, 999])
    ac = sched.alphas_cumprod.double()
    gamma = 5.0
    expected = []
    for step in t.tolist():
        snr = float(ac[step] / (1 - ac[step]))  # alpha_bar / (1 - alpha_bar)
        expected.append(min(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1))
    got = losses.min_snr_weights(sched, t, gamma)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    # low noise (huge SNR) is down-weighted; for epsilon, high noise keeps weight 1 (SNR < gamma)
    assert got[0] < 0.01 and (prediction_type != "epsilon" or got[-1] == 1)


def test_weighted_loss_is_each_samples_mean_error_times_its_weight():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    w = torch.tensor([0.5, 1.0, 0.0])
    per_sample = [float(((pred[i] - target[i]) ** 2).mean()) for i in range(3)]
    assert float(losses.diffusion_loss(pred, target, w)) == pytest.approx(np.mean(np.multiply(per_sample, w.tolist())), rel=1e-6)
    assert float(losses.diffusion_loss(pred, target)) == pytest.approx(np.mean(per_sample), rel=1e-6)


def test_training_target_is_noise_or_velocity():
    sched = tiny_scheduler("epsilon")
    g = torch.Generator().manual_seed(1)
    x0, n, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    assert losses.training_target(sched, x0, n, t) is n
    v_sched = tiny_scheduler("v_prediction")
    a = v_sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(losses.training_target(v_sched, x0, n, t), a.sqrt() * n - (1 - a).sqrt() * x0)
    with pytest.raises(ValueError, match="prediction_type"):
        losses.training_target(tiny_scheduler("sample"), x0, n, t)


def test_train_weights_its_loss_with_min_snr(tmp_path, data):
    # min-SNR draws nothing, so step 1 sees the same batch, noise and timesteps in all three runs: only the
    # weights differ.  gamma=0.01 weights a sample by 0.01/SNR, far below 1 except at the last few timesteps
    # (SNR < 0.01 only above t=990); gamma=1000 is 1 everywhere except t=0 (SNR about 1175), so it must
    # match the unweighted loss.
    first = {}
    for name, gamma in (("off", None), ("low", 0.01), ("g1000", 1000.0)):
        r = train(tiny_config(tmp_path, name, max_steps=1, batch_size=4, min_snr_gamma=gamma), tmp_path / name)
        first[name] = r.loss_curve[0][1]
    assert first["low"] < 0.5 * first["off"], first
    assert first["g1000"] == pytest.approx(first["off"], rel=1e-3), first


# --------------------------------------------------------------------------- offset noise


def test_offset_noise_is_one_gaussian_shift_per_sample_and_channel():
    shape = (64, 4, 16, 16)
    plain = losses.draw_noise(shape, torch.Generator().manual_seed(3), 0.0)
    shifted = losses.draw_noise(shape, torch.Generator().manual_seed(3), 0.1)
    # the documented formula, drawn in the documented order: randn(shape), then randn(b, c, 1, 1)
    g = torch.Generator().manual_seed(3)
    by_hand = torch.randn(shape, generator=g)
    by_hand = by_hand + 0.1 * torch.randn(shape[:2] + (1, 1), generator=g)
    torch.testing.assert_close(shifted, by_hand, rtol=0, atol=0)
    torch.testing.assert_close(plain, torch.randn(shape, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0)
    shift = shifted - plain  # same base draw: what is left is the offset alone
    assert float(shift.std(dim=(2, 3)).max()) < 1e-6  # constant over each image's pixels ...
    per_channel = shift[:, :, 0, 0] / 0.1  # ... and one N(0, 1) per (sample, channel)
    assert abs(float(per_channel.mean())) < 0.2 and 0.8 < float(per_channel.std()) < 1.2
    # what the model sees: per-channel means spread by sqrt(1/(h*w) + offset^2), not 1/sqrt(h*w)
    assert float(plain.mean(dim=(2, 3)).std()) == pytest.approx(1 / 16, rel=0.15)
    assert float(shifted.mean(dim=(2, 3)).std()) == pytest.approx((1 / 16 ** 2 + 0.1 ** 2) ** 0.5, rel=0.15)


# --------------------------------------------------------------------------- gradient accumulation


def deterministic_components() -> dict:
    """The tiny model with every per-sample random draw of a step made irrelevant, so that how the samples
    are grouped into micro-batches is the only difference left between two runs:
      * the VAE posterior's std is ~0 (its log-variance rows of quant_conv zeroed, bias -30): the cached
        latent is the mean whatever eps is drawn;
      * a scheduler with one training timestep, at half noise (alpha_bar = 0.5): every draw of t is 0;
      * the noise is patched (below) to one fixed pattern for every sample.
    Half noise, not the usual t=0 (alpha_bar 0.999): there the UNet's input is the tiny random VAE's small latents
    alone, its GroupNorms divide by almost nothing, and the rounding of the VAE encode at batch 1 vs 2 (4e-7)
    grows into 10% of the gradient: a comparison of rounding, not of accumulation."""
    comps = load_training_components("tiny")
    c = comps["vae"].config.latent_channels
    with torch.no_grad():
        comps["vae"].quant_conv.weight[c:] = 0
        comps["vae"].quant_conv.bias[c:] = -30.0
    comps["noise_scheduler"] = DDPMScheduler.from_config(comps["noise_scheduler"].config, num_train_timesteps=1,
                                                         beta_schedule="linear", beta_start=0.5, beta_end=0.5)
    return comps


def test_accumulating_two_batches_of_one_is_one_batch_of_two(tmp_path, monkeypatch):
    make_dataset(tmp_path / "data", n=2)
    fixed = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    drawn = []

    def same_noise_for_every_sample(shape, generator, offset=0.0):
        drawn.append(shape[0])
        return fixed.expand(shape).clone()

    monkeypatch.setattr(losses, "draw_noise", same_noise_for_every_sample)
    # AdamW's first step is lr * g / (|g| + eps): with the default eps 1e-8 that is lr * sign(g), blind to the
    # gradient's scale (an accumulation that summed instead of averaging would pass) and flipped by rounding
    # wherever g is tiny.  With eps = 1, no clipping and no weight decay it is lr * g / (|g| + 1): the LoRA B
    # weights (zero before the step) then show the gradient itself.
    common = dict(max_steps=1, learning_rate=0.1, adam_epsilon=1.0, max_grad_norm=1e6, weight_decay=0.0,
                  random_flip=False, rank=4, alpha=4)
    big = train(tiny_config(tmp_path, "b2", batch_size=2, **common), tmp_path / "b2",
                components=deterministic_components())
    acc = train(tiny_config(tmp_path, "a2", batch_size=1, grad_accumulation=2, **common), tmp_path / "a2",
                components=deterministic_components())
    # every sample draws its own noise from its own seed (issue 18): the batch of two draws twice, then each
    # micro-batch of one once; one optimizer step each
    assert drawn == [1, 1, 1, 1]
    assert big.loss_curve[0][1] == pytest.approx(acc.loss_curve[0][1], rel=1e-4)
    a, b = load_file(str(big.lora_dir / WEIGHTS_NAME)), load_file(str(acc.lora_dir / WEIGHTS_NAME))
    assert set(a) == set(b)
    base = train(tiny_config(tmp_path, "one", batch_size=1, **common), tmp_path / "one",
                 components=deterministic_components())  # a step on one image: a different update
    c = load_file(str(base.lora_dir / WEIGHTS_NAME))
    moved = [k for k in a if "lora_B" in k]  # B starts at zero: what the step wrote
    # every B moved, but q and k of the mid block's self-attention: at 64 px its latent is 1x1, one token, whose
    # softmax is 1 whatever q and k are, so they get no gradient at all
    still = [k for k in moved if float(a[k].abs().max()) == 0]
    assert moved and all("mid_block" in k and ("attn1.to_q" in k or "attn1.to_k" in k) for k in still), still
    scale = max(float(a[k].abs().max()) for k in moved)  # some layers get ~1e-10: compare on the common scale
    # Equal up to the rounding of batched kernels, amplified by the tiny random model: measured 0.3% (U-Net) and
    # 1.3% (text encoder) of the largest update with transformers 5.23 / diffusers 0.42 (0.1% with the versions
    # of issue 17).  The grouping itself changes nothing: 2 processes x 1 equal 1 process accumulating 2 x 1 bit
    # for bit (tests/test_distributed.py).  A summed accumulation would be 100% off, one image alone > 10%.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=2e-2, atol=2e-2 * scale, msg=k)
    # the other image's half of the gradient matters: one image alone is another step
    assert max(float((c[k] - a[k]).abs().max()) for k in moved) > 0.1 * scale


# --------------------------------------------------------------------------- gradient checkpointing


def count_calls(module: torch.nn.Module) -> list[int]:
    """How often `module` starts a forward.  A pre-hook: torch's checkpoint stops a recomputed forward as soon as
    it has the tensors the backward needs, so a (post-)forward hook would miss the recomputation."""
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_recomputes_the_forward_and_keeps_the_loss_curve(tmp_path, data):
    curves, weights, calls = {}, {}, {}
    for on in (False, True):
        comps = load_training_components("tiny")
        unet_calls = count_calls(comps["unet"].down_blocks[1].resnets[0])
        text_calls = count_calls(getattr(comps["text_encoder"], "text_model", comps["text_encoder"]).encoder.layers[0].mlp)
        r = train(tiny_config(tmp_path, f"gc{on}", max_steps=3, gradient_checkpointing=on), tmp_path / f"gc{on}",
                  components=comps)
        curves[on], calls[on] = r.loss_curve, (unet_calls[0], text_calls[0])
        weights[on] = load_file(str(r.lora_dir / WEIGHTS_NAME))
    # 3 steps of one micro-batch: one forward each without checkpointing; the backward runs it again with it
    assert calls[False] == (3, 3), calls
    assert calls[True] == (6, 6), calls
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-5)
    for k in weights[False]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-4, atol=1e-6)
