"""Training data: read and validate a dataset folder, then cache its VAE latents once.

A dataset folder is Hugging Face imagefolder layout (what `stylemix preprocess` writes):
images + `metadata.jsonl` lines `{"file_name": ..., "text": caption}` + `dataset.json`
(`style`, `trigger_word`, `size`, `count`).  `load_dataset_folder` checks all of it before any
model is loaded, so a bad folder fails in a second with a message naming the bad file/line,
not after minutes of model loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stylemix.errors import StyleMixError
from stylemix.paths import inside, read_json_object

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MAX_CAPTION_CHARS = 2000


@dataclass
class DatasetInfo:
    """A validated dataset folder: image paths with their captions, plus the folder's summary."""

    root: Path
    files: list[Path]
    captions: list[str]
    trigger_word: str
    summary: dict = field(default_factory=dict)  # dataset.json content (+ what we counted)

    def __len__(self) -> int:
        return len(self.files)


def load_dataset_folder(data_dir: str | Path) -> DatasetInfo:
    """Validate `data_dir` and return its images and captions, or raise StyleMixError naming the problem."""
    from PIL import Image, UnidentifiedImageError

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise StyleMixError(f"Dataset folder {str(data_dir)!r} does not exist or is not a folder.")
    meta_path = root / "metadata.jsonl"
    if not meta_path.is_file():
        images = [p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTS]
        hint = (f"it has {len(images)} images but no captions; run `stylemix preprocess` on it first"
                if images else "it is empty; run `stylemix preprocess` on a folder of images first")
        raise StyleMixError(f"Dataset folder {str(root)!r} has no metadata.jsonl: {hint}.")
    info: dict = {}
    info_path = root / "dataset.json"
    if info_path.is_file():
        info = read_json_object(info_path)
    files, captions = [], []
    for n, line in enumerate(meta_path.read_text(encoding="utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise StyleMixError(f"{meta_path.name} line {n}: not valid JSON ({e.msg}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"), str):
            raise StyleMixError(f"{meta_path.name} line {n}: expected {{\"file_name\": str, \"text\": str}}, got {line[:120]!r}.")
        if len(row["text"]) > MAX_CAPTION_CHARS:
            raise StyleMixError(f"{meta_path.name} line {n}: caption longer than {MAX_CAPTION_CHARS} characters.")
        path = inside(root, row["file_name"])  # refuses '../x.png' and symlinks out of the folder
        if path.suffix.lower() not in IMAGE_EXTS or not path.is_file():
            raise StyleMixError(f"{meta_path.name} line {n}: image {row['file_name']!r} is missing or not an image file.")
        try:
            with Image.open(path) as im:
                im.verify()  # header + structure; cheap, no full decode
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise StyleMixError(f"{meta_path.name} line {n}: {row['file_name']!r} is not a readable image ({e}).") from None
        files.append(path)
        captions.append(row["text"].strip())
    if not files:
        raise StyleMixError(f"Dataset folder {str(root)!r} has no images listed in metadata.jsonl: nothing to train on.")
    trigger = info.get("trigger_word") or ""
    if not isinstance(trigger, str):
        raise StyleMixError(f"{info_path}: trigger_word must be a string.")
    summary = {**info, "count": len(files), "folder": root.name}
    return DatasetInfo(root=root, files=files, captions=captions, trigger_word=trigger, summary=summary)


def with_trigger(caption: str, trigger: str) -> str:
    """The caption the model trains on: the trigger word leads, once (the style's handle at inference)."""
    if not trigger:
        return caption
    from stylemix.dataset import with_trigger as lead  # the dataset step's own rule, so both agree

    return lead(trigger, caption)


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
