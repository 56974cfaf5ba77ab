"""Near-duplicates in an upload: a perceptual hash (imagehash's dHash) *and* a colour check.

Two images are near-duplicates when their 64-bit difference hashes (9x8 grey thumbnail, LANCZOS,
sign of horizontal gradients) are within `max_distance` bits and their 8x8 colour thumbnails
differ by at most `color_tolerance` on average (0-255).  The hash alone ignores colour, so a blue
and a green slime would collide; for a style those are different images, so the colour test keeps
recoloured variants.
"""

from __future__ import annotations

from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Fingerprint:
    hash: imagehash.ImageHash  # dHash, 8x8 bits
    thumb: np.ndarray  # 8x8x3 float32 mean colours


def fingerprint(image: Image.Image) -> Fingerprint:
    thumb = np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    return Fingerprint(imagehash.dhash(image, hash_size=8), thumb)


class NearDuplicates:
    """The fingerprints of the images kept so far, each with the input name it came from."""

    def __init__(self, max_distance: int, color_tolerance: float) -> None:
        self.max_distance, self.color_tolerance = max_distance, color_tolerance
        self._kept: list[tuple[Fingerprint, str]] = []

    def find(self, fp: Fingerprint) -> str | None:
        """The name of a kept image that `fp` is a near-duplicate of, or None."""
        for other, name in self._kept:
            if (fp.hash - other.hash <= self.max_distance
                    and float(np.abs(fp.thumb - other.thumb).mean()) <= self.color_tolerance):
                return name
        return None

    def add(self, fp: Fingerprint, name: str) -> None:
        self._kept.append((fp, name))
