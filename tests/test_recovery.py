"""Proof that the trainer learns: a known-answer test (bench/bench_recovery.py has the design and the
longer version).

The teacher is the base model with a style planted exactly; its renders go through the real
dataset path (PNG files, filters, captions, the latent cache) into `trainers.lora.train`; on held-out
prompts, noise and timesteps the trained LoRA must close a good part of the gap between the base
model and the teacher, in the denoising loss and in sampled images.  The same run with a wrong noise
target (the trainer regressing v while the model predicts eps) must close clearly less: the test has
teeth.  (The bench also runs a wrong latent scale and dropped text conditioning; see bench/RESULTS.md.)
"""

from __future__ import annotations

import pytest
import torch

from bench.bench_recovery import base_components, run_recovery

DENOISER_STEPS = 120  # the tiny UNet made a denoiser of plain latents first (about 1.4-1.6x the ideal loss)
STEPS = 80


@pytest.fixture(scope="module")
def base():
    # one thread: these are many small ops, and two OpenMP threads on a loaded 2-core box spin-wait for
    # each other (several times slower); restored for the other tests
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        comps, ratio = base_components(64, DENOISER_STEPS)
        assert ratio < 2.0, f"the base model did not become a denoiser (loss {ratio:.2f}x the ideal)"
        yield comps
    finally:
        torch.set_num_threads(threads)


def test_trained_lora_recovers_the_planted_style_and_a_broken_trainer_does_not(base, tmp_path):
    good = run_recovery(base, tmp_path / "good", "attention", None, STEPS)
    print(good.line())
    assert good.teacher_loss < good.base_loss - 0.005, "no gap between base and teacher: nothing is measured"
    assert good.fraction >= 0.35, good.line()  # about 0.6 here (80 steps), 0.67 in the bench (200)
    assert good.image_fraction >= 0.5, good.line()  # sampled images moved toward the teacher's

    broken = run_recovery(base, tmp_path / "broken", "attention", "noise_target", STEPS)
    print(broken.line())
    assert broken.fraction < good.fraction / 2, (
        f"a trainer with a wrong noise target closed {broken.fraction:.2f} of the gap against "
        f"{good.fraction:.2f} for the correct one: the known-answer test cannot tell them apart")
