"""Aspect-ratio buckets, with the semantics of kohya's sd-scripts (`make_bucket_resolutions` in
library/model_util.py and `BucketManager.select_bucket` in library/train_util.py).

For a training resolution R, the buckets are every width x height whose sides are multiples of
`step` (kohya's `bucket_reso_steps`), between `min_reso` and `max_reso`, with an area of at most
R x R, plus the square.  An image goes to the bucket whose aspect ratio w/h is nearest its own
(absolute difference, ties to the first bucket in sorted order, as numpy's argmin does in kohya),
is resized so that it covers the bucket, and is centre-cropped by the least possible.

With `no_upscale` (kohya's `bucket_no_upscale`) the bucket is made from the image's own size
instead: shrunk to the area R x R when larger, never enlarged, sides rounded down to the step.
Those buckets are not bounded by min_reso / max_reso (kohya does not bound them either); an image
whose side rounds down to 0 fits no bucket.

Pure functions of integers: no image is touched here (the pixels are `images.resize_to_bucket`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

Size = tuple[int, int]  # (width, height), PIL's order

# kohya's defaults, meant for R = 512..1024; `default_bucket_limits` scales them down for small R.
KOHYA_MIN_BUCKET_RESO = 256
KOHYA_MAX_BUCKET_RESO = 1024


def default_bucket_limits(resolution: int, step: int) -> Size:
    """(min_reso, max_reso) when the user gives none: kohya's 256 and 1024 where they make sense.

    kohya's 256 minimum leaves only the square at R = 64-128 (the tiny model's sizes: every
    non-square bucket with a 256 px side has more than R x R pixels), so the minimum is at most
    R/2 (rounded down to the step, at least one step).  The maximum is at most 2R (1024 at R=512,
    kohya's pair) and never below R, since the square must fit (kohya asserts max >= R).
    At R=512 and R=1024 this gives kohya's own 256 / 1024; R=128 gives 64 / 256; R=64 gives
    64 / 128, where the area rule leaves only the 64x64 square (any other shape with 64-multiple
    sides has more than 64 x 64 pixels).
    """
    lo = min(KOHYA_MIN_BUCKET_RESO, max(step, resolution // 2 // step * step))
    hi = max(resolution, min(KOHYA_MAX_BUCKET_RESO, 2 * resolution) // step * step)
    return lo, hi


def bucket_resolutions(resolution: int, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """kohya's make_bucket_resolutions for max_reso=(R, R): sorted (width, height) buckets."""
    max_area = resolution * resolution
    side = int(math.sqrt(max_area) // step) * step
    resos = {(side, side)}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: resize it to `resized` (which covers `bucket`), then centre-crop to `bucket`."""

    bucket: Size
    resized: Size

    @property
    def kept_fraction(self) -> float:
        """Share of the (resized) picture that survives the crop."""
        return (self.bucket[0] * self.bucket[1]) / (self.resized[0] * self.resized[1])


def cover(size: Size, bucket: Size) -> BucketChoice:
    """Resize `size` so that it covers `bucket` (kohya: match the side that is relatively shorter)."""
    w, h = size
    bw, bh = bucket
    # kohya's test: an image wider than the bucket is fitted by its height, else by its width
    scale = bh / h if w / h > bw / bh else bw / w
    # int(x + 0.5) as kohya rounds; max() guards a float result a hair below the bucket side
    return BucketChoice(bucket, (max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))))


def nearest_bucket(size: Size, resolutions: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (kohya: |bucket w/h - image w/h|, argmin).

    An image already exactly a bucket's size keeps that bucket (kohya checks this first, so a
    pre-bucketed dataset is not moved to another bucket of a tied ratio).
    """
    if size in resolutions:
        return size
    ratio = size[0] / size[1]
    return min(resolutions, key=lambda r: abs(r[0] / r[1] - ratio))  # first minimum, as argmin


def _round_to_step(x: float, step: int) -> int:
    x = int(x + 0.5)
    return x - x % step


def no_upscale_choice(size: Size, resolution: int, step: int) -> BucketChoice | None:
    """kohya's bucket_no_upscale: a bucket from the image's own size; None when a side rounds to 0."""
    w, h = size
    max_area = resolution * resolution
    ratio = w / h
    if w * h > max_area:
        # shrink to the area R x R keeping the ratio; round whichever side keeps the ratio best
        rw = math.sqrt(max_area * ratio)
        rh = max_area / rw
        bw_w = _round_to_step(rw, step)
        bh_w = _round_to_step(bw_w / ratio, step)
        bh_h = _round_to_step(rh, step)
        bw_h = _round_to_step(bh_h * ratio, step)
        # kohya divides by these and crashes on 0 (a very long, thin image): count 0 as the worse rounding
        err_w = abs(bw_w / bh_w - ratio) if bh_w else math.inf
        err_h = abs(bw_h / bh_h - ratio) if bh_h else math.inf
        if err_w < err_h:
            resized = (bw_w, int(bw_w / ratio + 0.5))
        else:
            resized = (int(bh_h * ratio + 0.5), bh_h)
    else:
        resized = (w, h)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    if min(bucket) < step:
        return None
    return BucketChoice(bucket, resized)


@dataclass(frozen=True)
class BucketRule:
    """The buckets of one dataset: kohya's options, already checked by DatasetConfig."""

    resolution: int
    min_reso: int
    max_reso: int
    step: int
    no_upscale: bool = False

    @cached_property
    def resolutions(self) -> list[Size]:
        return bucket_resolutions(self.resolution, self.min_reso, self.max_reso, self.step)

    def choose(self, size: Size) -> BucketChoice | None:
        """Where an image of `size` goes; None when it fits no bucket (only possible with no_upscale)."""
        if self.no_upscale:
            return no_upscale_choice(size, self.resolution, self.step)
        return cover(size, nearest_bucket(size, self.resolutions))


def bucket_name(size: Size) -> str:
    """'320x768': how a bucket is named in dataset.json and on the Dataset tab."""
    return f"{size[0]}x{size[1]}"
