"""Image files from disk: the one list of image extensions and the one safe way to open an untrusted image."""

from __future__ import annotations

import warnings
from pathlib import Path

from stylemix.errors import StyleMixError

# Every image kind StyleMix reads (uploads, dataset folders, scoring folders); GIFs count by their first frame.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8192^2: far above any SD image; larger files are refused, not decoded


def is_image_name(path: str | Path) -> bool:
    """Whether the file name has one of IMAGE_EXTENSIONS (case-insensitive); the content is not checked."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def open_image(path: str | Path):
    """Open an untrusted image file as RGB, fully decoded, or raise StyleMixError naming it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise StyleMixError(f"Image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise StyleMixError(f"{path}: {im.width}x{im.height} is too large to score "
                                        f"(limit {MAX_IMAGE_PIXELS} pixels).")
                im.load()  # first frame of an animation; decoding errors surface here, not later
                return im.convert("RGB")
    except StyleMixError:
        raise
    except UnidentifiedImageError:
        raise StyleMixError(f"{path}: not an image file PIL can read.") from None
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise StyleMixError(f"{path}: unreadable image ({type(e).__name__}: {e}).") from None
