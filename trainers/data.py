"""Training data: pixels from a validated dataset folder, and their VAE latents cached once.

The dataset format (imagefolder layout: images + `metadata.jsonl` + `dataset.json`) is read and
checked by `stylemix.datasets.prepare.load_dataset_folder`, the one reader of that format.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_pixels(path: Path, resolution: int) -> torch.Tensor:
    """An image as a [3, R, R] tensor in [-1, 1]: resized on its short side, then centre-cropped.

    Deterministic (no random crop), so the latent cache is exactly what an uncached loop would
    encode; randomness in training comes from flips, noise and timesteps.
    """
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        if (w, h) != (resolution, resolution):
            im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class LatentCache:
    """Per-image VAE posterior (mean, std), encoded once, for the image and its mirror image.

    Storing the posterior instead of one sample keeps training identical in distribution to
    encoding every step: each step draws `mean + std * eps` with fresh noise, exactly what
    `vae.encode(x).latent_dist.sample()` does.  Flipped images are encoded too (flipping a
    latent is not the same as the latent of a flipped image), so random flip still works.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std  # [N, 2 (orig, flipped), C, h, w]

    @classmethod
    @torch.no_grad()
    def build(cls, vae, pixels: list[torch.Tensor] | torch.Tensor, device, flips: bool, batch_size: int = 4) -> "LatentCache":
        means, stds = [], []
        for i in range(0, len(pixels), batch_size):
            x = torch.stack(list(pixels[i:i + batch_size])).to(device, torch.float32)
            views = [x, x.flip(-1)] if flips else [x]
            m, s = [], []
            for v in views:
                dist = vae.encode(v).latent_dist
                m.append(dist.mean)
                s.append(dist.std)
            means.append(torch.stack(m, 1))
            stds.append(torch.stack(s, 1))
        return cls(torch.cat(means), torch.cat(stds))

    def sample(self, idx: torch.Tensor, flip: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        view = flip.long() if self.mean.shape[1] == 2 else torch.zeros_like(flip, dtype=torch.long)
        idx = idx.to(self.mean.device)
        view = view.to(self.mean.device)
        return self.mean[idx, view] + self.std[idx, view] * eps.to(self.mean.device)
