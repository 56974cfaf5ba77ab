"""Image files from disk: the one list of image extensions, the one safe way to open an untrusted image, and
the pixel operations of the dataset step (blur score, resizing to a bucket; OpenCV)."""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from pathlib import Path

from stylemix.errors import StyleMixError

# Every image kind StyleMix reads (uploads, dataset folders, scoring folders); GIFs count by their first frame.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8192^2: far above any SD image; larger files are refused, not decoded


def is_image_name(path: str | Path) -> bool:
    """Whether the file name has one of IMAGE_EXTENSIONS (case-insensitive); the content is not checked."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


class ImageRejected(StyleMixError):
    """An untrusted image refused before decoding, with a machine-readable reason."""

    def __init__(self, reason: str, detail: str, size: tuple[int, int] | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.size = reason, detail, size


@contextmanager
def untrusted_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, formats: set[str] | None = None):
    """Open an untrusted image file, its header checked before anything is decoded; yields it undecoded.

    Raises ImageRejected: decompression_bomb (PIL's bomb warnings count as errors, and more than
    `max_pixels`), not_an_image (unidentifiable, or a format outside `formats`), unreadable.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) on images a bit above its own bomb limit: make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageRejected("decompression_bomb", f"its header claims an absurd size ({e})") from e
    except Image.DecompressionBombWarning as e:
        raise ImageRejected("decompression_bomb", f"its header claims a huge size ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageRejected("not_an_image", "the file is not an image PIL can identify") from e
    except OSError as e:
        raise ImageRejected("unreadable", f"could not be opened ({e})") from e
    with im:
        w, h = im.size
        if formats is not None and im.format not in formats:
            raise ImageRejected("not_an_image", f"format {im.format} is not PNG, JPEG, WEBP, BMP or GIF")
        if w * h > max_pixels:
            raise ImageRejected("decompression_bomb", f"its header claims {w}x{h} = {w * h} pixels, more than "
                                f"max_image_pixels={max_pixels}", size=(w, h))
        yield im


def open_image(path: str | Path):
    """Open an untrusted image file as RGB, fully decoded, or raise StyleMixError naming it."""
    path = Path(path)
    if not path.is_file():
        raise StyleMixError(f"Image not found: {path}")
    try:
        with untrusted_image(path) as im:
            im.load()  # first frame of an animation; decoding errors surface here, not later
            return im.convert("RGB")
    except ImageRejected as e:
        raise StyleMixError(f"{path}: {e.detail}.") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise StyleMixError(f"{path}: unreadable image ({type(e).__name__}: {e}).") from None


# --------------------------------------------------------------------------- pixels (OpenCV)
# cv2 is imported inside the functions: this module is imported by every front end (the app's
# service, the CLI), most of which never touch pixels.


def blur_score(image, target: int | tuple[int, int] = 512) -> float:
    """Variance of the 3x3 Laplacian of the luminance, at the scale the image will be trained on.

    `target` is the training size, (width, height) of the image's bucket or one side for a
    square.  An image larger than it is first shrunk (area interpolation) to the size that
    covers it, as the dataset step will shrink it: a sharp 2000 px photo is judged at 512, not
    punished for soft per-pixel detail.  A smaller image is measured at its own size, never
    enlarged: enlarging adds no detail, and interpolation would make every small sprite look
    blurry.  Perfectly flat 3x3 neighbourhoods (a sprite's plain background) are left out when
    at least 1% of pixels have detail: they say nothing about sharpness but dilute the variance.
    Camera images have no exactly flat areas, so for them this is the classic measure.
    """
    import cv2
    import numpy as np

    tw, th = (target, target) if isinstance(target, int) else target
    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    scale = max(tw / w, th / h)  # the cover scale of `resize_to_bucket`
    if scale < 1:
        gray = cv2.resize(gray, (max(3, round(w * scale)), max(3, round(h * scale))), interpolation=cv2.INTER_AREA)
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    # ksize=1 is the 3x3 kernel [[0,1,0],[1,-4,1],[0,1,0]]; the border row/column is left out
    # (it would be made of reflected pixels)
    lap = cv2.Laplacian(gray, cv2.CV_64F, ksize=1)[1:-1, 1:-1]
    box = np.ones((3, 3), np.uint8)
    detail = (cv2.dilate(gray, box) != cv2.erode(gray, box))[1:-1, 1:-1]
    if detail.sum() >= max(9, 0.01 * detail.size):
        lap = lap[detail]
    return float(lap.var())


def resize_to_bucket(image, bucket: tuple[int, int], resized: tuple[int, int], pixel_art: bool):
    """Resize `image` to `resized` (which covers `bucket`), then centre-crop it to `bucket`: an RGB PIL image.

    Shrinking uses area interpolation (OpenCV's INTER_AREA: no aliasing, no ringing), enlarging
    Lanczos.  Pixel art is enlarged by the smallest whole factor that covers the bucket, each
    source pixel becoming an exact k x k block (no blended colour, no uneven pixel widths); it
    may crop a little more than `resized` would.
    """
    import cv2
    import numpy as np
    from PIL import Image

    a = np.asarray(image.convert("RGB"))
    h, w = a.shape[:2]
    bw, bh = bucket
    if pixel_art and (bw > w or bh > h):
        k = math.ceil(max(bw / w, bh / h))
        a = a.repeat(k, axis=0).repeat(k, axis=1)
    elif (w, h) != tuple(resized):
        shrinking = resized[0] < w
        a = cv2.resize(a, tuple(resized), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4)
    h, w = a.shape[:2]
    if w < bw or h < bh:
        raise ValueError(f"resized image {w}x{h} does not cover its bucket {bw}x{bh}")
    left, top = (w - bw) // 2, (h - bh) // 2  # kohya: trim_size // 2
    return Image.fromarray(np.ascontiguousarray(a[top : top + bh, left : left + bw]), "RGB")
