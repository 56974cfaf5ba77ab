"""Training data: pixels from a validated dataset folder, and their VAE latents cached once.

The dataset format (imagefolder layout: images + `metadata.jsonl` + `dataset.json`) is read and
checked by `stylemix.datasets.prepare.load_dataset_folder`, the one reader of that format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


def load_pixels(path: Path, size: int | tuple[int, int]) -> torch.Tensor:
    """An image as a [3, H, W] tensor in [-1, 1] for `size` (W, H; an int is the square): resized so that it
    covers the size, then centre-cropped.

    Deterministic (no random crop), so the latent cache is exactly what an uncached loop would
    encode; randomness in training comes from flips, noise and timesteps.
    """
    import numpy as np
    from PIL import Image

    tw, th = (size, size) if isinstance(size, int) else size
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if (w, h) != (tw, th):
            s = max(tw / w, th / h)
            im = im.resize((max(tw, round(w * s)), max(th, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - tw) // 2, (h - th) // 2
            im = im.crop((left, top, left + tw, top + th))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class LatentCache:
    """Per-image VAE posterior (mean, std), encoded once, for the image and its mirror image.

    Storing the posterior instead of one sample keeps training identical in distribution to
    encoding every step: each step draws `mean + std * eps` with fresh noise, exactly what
    `vae.encode(x).latent_dist.sample()` does.  Flipped images are encoded too (flipping a
    latent is not the same as the latent of a flipped image), so random flip still works.
    One tensor [views, C, h, w] per image: images of different buckets have different sizes.
    """

    def __init__(self, mean: list[torch.Tensor], std: list[torch.Tensor]):
        self.mean, self.std = mean, std

    @staticmethod
    @torch.no_grad()
    def encode(vae, pixels: list[torch.Tensor], device, flips: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encode one batch of same-size images: (means, stds), one [views, C, h, w] per image."""
        x = torch.stack(list(pixels)).to(device, torch.float32)
        views = [x, x.flip(-1)] if flips else [x]
        m, s = [], []
        for v in views:
            dist = vae.encode(v).latent_dist
            m.append(dist.mean)
            s.append(dist.std)
        mean, std = torch.stack(m, 1), torch.stack(s, 1)
        return list(mean.unbind(0)), list(std.unbind(0))

    def sample(self, idx: torch.Tensor, flip: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        views = flip.long().tolist() if self.mean[0].shape[0] == 2 else [0] * len(idx)
        mean = torch.stack([self.mean[i][v] for i, v in zip(idx.tolist(), views)])
        std = torch.stack([self.std[i][v] for i, v in zip(idx.tolist(), views)])
        return mean + std * eps.to(mean.device)


def build_latent_cache(vae, pixels: list[torch.Tensor], sizes: list[tuple[int, int]], device, flips: bool,
                       batch_size: int, done: Callable[[int, int], None],
                       shard: tuple[int, int] = (0, 1)) -> LatentCache:
    """The latent cache of every image, encoded bucket by bucket in training-sized batches (a bigger batch
    would raise the peak memory above the uncached loop's); `done(n, total)` after each batch, so a long encode
    shows its progress.  A one-size set is encoded in the same batches, in dataset order, as before buckets.

    `shard=(k, n)`: only every n-th batch from the k-th (one process's share; the others stay None until
    `share_latent_cache` fills them in)."""
    from trainers.batches import bucket_groups

    chunks = [members[i:i + batch_size] for members in bucket_groups(sizes).values()
              for i in range(0, len(members), batch_size)]
    mine = chunks[shard[0]::shard[1]]
    total = sum(len(c) for c in mine)
    mean: list = [None] * len(pixels)
    std: list = [None] * len(pixels)
    n = 0
    for chunk in mine:
        m, s = LatentCache.encode(vae, [pixels[j] for j in chunk], device, flips)
        for j, mj, sj in zip(chunk, m, s):
            mean[j], std[j] = mj, sj
        n += len(chunk)
        done(n, total)
    return LatentCache(mean, std)


def share_latent_cache(cache: LatentCache, accelerator) -> LatentCache:
    """Every process's share of the cache, gathered into each process's cache (a no-op for one process).

    Sent through the CPU: a pickled GPU tensor would come back on the sending process's GPU."""
    if accelerator.num_processes == 1:
        return cache
    from accelerate.utils import gather_object

    mine = [(i, m.cpu(), s.cpu()) for i, (m, s) in enumerate(zip(cache.mean, cache.std)) if m is not None]
    for i, m, s in gather_object(mine):
        cache.mean[i], cache.std[i] = m.to(accelerator.device), s.to(accelerator.device)
    return cache
