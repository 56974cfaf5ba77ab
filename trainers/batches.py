"""Aspect-ratio buckets in training, the batch order of an epoch, and each step's random generator.

A prepared dataset stores every image at its bucket's size (stylemix.datasets.buckets, kohya's rule),
so images of one stored size form one bucket.  Training at another resolution (the tiny model at
64-128 px from a 512 set) scales every bucket by resolution / the set's size, each side rounded to a
multiple of 8 (the VAE's factor), so the aspect ratio is kept.  A square set (one size) is one bucket.

Each micro-batch holds images of one bucket (same size, so they stack); within a bucket the order is
a seeded shuffle, and with several buckets the batches are shuffled too, so an epoch visits buckets
in a random order (kohya's BucketManager does the same).  Every image is seen once per epoch; the
batch list is padded by wrapping to a multiple of (processes x accumulation).  With one bucket and a
set that divides evenly, N processes with batch b see the batches of one process with batch N x b,
each optimizer step the same N x b images; with several buckets the cut into batches depends on b.
"""

from __future__ import annotations

import hashlib
import math

import torch

Size = tuple[int, int]  # (width, height)


def sample_generator(seed: int, epoch: int, slot: int, stream: str = "") -> torch.Generator:
    """All randomness of one training sample comes from here: its flip, latent draw, noise and timestep
    (and, with `stream="captions"`, its caption's).  Keyed by the sample's place in the epoch, not by the
    process or batch that trains it, so N processes with batch b draw exactly what one process with batch
    N x b does, and a resumed run replays each step.  `stream` gives an independent generator for one
    purpose, so adding it changes no other draw."""
    key = f"{seed}/{epoch}/{slot}" if not stream else f"{stream}/{seed}/{epoch}/{slot}"
    h = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))


def batch_slots(batches: list[list[int]]) -> list[int]:
    """Where each batch of an epoch starts in the epoch's sequence of samples (the first sample's slot)."""
    starts, n = [], 0
    for b in batches:
        starts.append(n)
        n += len(b)
    return starts


def dataset_resolution(summary: dict, sizes: list[Size]) -> int:
    """The resolution R a dataset was prepared at (dataset.json's `size`; else the side of its largest area)."""
    size = summary.get("size")
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    return max(math.isqrt(w * h) for w, h in sizes)


def scale_size(size: Size, factor: float) -> Size:
    """`size` times `factor`, each side rounded to a multiple of 8 (at least 8)."""
    return tuple(max(8, round(side * factor / 8) * 8) for side in size)  # type: ignore[return-value]


def training_sizes(sizes: list[Size], dataset_reso: int, resolution: int) -> list[Size]:
    """The size each image trains at: its stored size (its bucket) scaled by resolution / dataset_reso."""
    if resolution == dataset_reso:
        return list(sizes)
    return [scale_size(s, resolution / dataset_reso) for s in sizes]


def bucket_groups(sizes: list[Size]) -> dict[Size, list[int]]:
    """{size: image indices}, sizes in sorted order, indices in dataset order."""
    groups: dict[Size, list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(s, []).append(i)
    return {s: groups[s] for s in sorted(groups)}


def epoch_batches(buckets: list[list[int]], batch: int, seed: int, epoch: int, multiple: int) -> list[list[int]]:
    """The micro-batches of one epoch: each bucket shuffled and cut into batches, the batches shuffled
    when there are several buckets, then padded by wrapping to a multiple of `multiple`.

    One bucket gives exactly the batches of a plain shuffle of the whole set (same generator, same draws).
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches = []
    for members in buckets:
        perm = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
        batches += [perm[i:i + batch] for i in range(0, len(perm), batch)]
    if len(buckets) > 1:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    i = 0
    while len(batches) % multiple:
        batches.append(batches[i])
        i += 1
    return batches
