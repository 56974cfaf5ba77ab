"""Training code: `trainers.lora` (style LoRA on accelerate) and `trainers.data` (dataset + latent cache)."""
