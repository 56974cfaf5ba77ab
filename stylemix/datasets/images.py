"""Image files from disk: the one list of image extensions and the one safe way to open an untrusted image."""

from __future__ import annotations

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
