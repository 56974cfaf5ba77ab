"""The CLIP model behind every score: open_clip, loaded once per (model, weights, device) and cached.

Real weights come from the Hugging Face hub copies that open_clip itself points to (for
`ViT-B-32/openai`: `timm/vit_base_patch32_clip_224.openai`), and only as safetensors: the
pickle files beside them are never read.  When the weights cannot be had (offline, no cache)
`load_scorer` raises `ScorerUnavailable` with the reason in one sentence, fast: it never waits
on the hub's retry loop, so the app and CLI can say "scores unavailable: <why>" and go on.

`tiny=True` builds a tiny random open_clip CLIP in code (deterministic seed), the scoring
counterpart of the built-in tiny SD1.5: its numbers are labelled "demo values" wherever shown.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Sequence
from urllib.parse import urlparse

import torch

from stylemix.errors import StyleMixError
from stylemix.models import pick_device

logger = logging.getLogger("stylemix")

DEFAULT_CLIP_MODEL = "ViT-B-32"  # the seed report's scale (raw cosine about 0.31 for SD1.5 images)
DEFAULT_PRETRAINED = "openai"
TINY_CLIP = "tiny"
TINY_CLIP_NAME = "tiny-random-clip (demo values)"
TINY_CLIP_SEED = 0
SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip's safetensors name on the hub
HUB_PROBE_TIMEOUT_S = 3.0  # the hub client retries for ~25 s when offline; one quick probe instead
TEXT_CACHE_SIZE = 256  # prompt embeddings kept per scorer (2 KB each for ViT-B-32)
FAILURE_RETRY_S = 60.0  # a failed load is remembered this long, so each generation doesn't retry it


class ScorerUnavailable(StyleMixError):
    """The CLIP weights cannot be loaded; str(e) says why.  Everything but scores keeps working."""


@dataclass
class Scorer:
    """A CLIP model ready to embed images and texts on one device, in eval mode, without grad."""

    model: torch.nn.Module  # open_clip CLIP
    preprocess: Callable  # PIL image -> normalised [3, H, W] tensor (open_clip's eval transform)
    tokenizer: Callable  # list[str] -> [N, 77] token ids (open_clip's SimpleTokenizer)
    name: str  # named with every score: "ViT-B-32/openai" or "tiny-random-clip (demo values)"
    device: torch.device
    is_demo: bool = False  # random weights: the numbers only demonstrate the pipeline
    batch_size: int = 32  # images per forward pass; ViT-B-32 at 32 x 224^2 is ~1.5 GB activations at most
    kind: ClassVar[str] = "clip"  # as a style judge (selection.py); csd.CsdScorer is "csd"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _text_cache: dict = field(default_factory=dict, repr=False)  # prompt -> embedding, insertion-ordered

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1])

    @torch.no_grad()
    def embed_images(self, images: Sequence) -> torch.Tensor:
        """[N, D] unit-norm image embeddings (float32, on the scorer's device), in batches."""
        return embed_in_batches(self, images, lambda batch: torch.nn.functional.normalize(
            self.model.encode_image(batch).float(), dim=-1))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, D] unit-norm text embeddings.  Texts longer than 77 tokens are cut, as CLIP and SD1.5 do.

        Cached per text: an artist re-rolls seeds on one prompt, and tokenising plus the text
        tower cost as much as embedding a batch of images (measured in bench/bench_scoring.py).
        """
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        with self._lock:
            todo = sorted({t for t in texts if t not in self._text_cache})
            if todo:
                feats = self.model.encode_text(self.tokenizer(todo).to(self.device))
                for t, f in zip(todo, torch.nn.functional.normalize(feats.float(), dim=-1)):
                    if len(self._text_cache) >= TEXT_CACHE_SIZE:
                        self._text_cache.pop(next(iter(self._text_cache)))  # oldest first
                    self._text_cache[t] = f
            return torch.stack([self._text_cache[t] for t in texts])


def embed_in_batches(scorer, images: Sequence, forward) -> torch.Tensor:
    """[N, D] float32 embeddings of `images` on `scorer.device`: each preprocessed as RGB, `forward(batch)` on
    `scorer.batch_size` at a time, under the scorer's lock (one model shared by app threads; forward passes
    are not re-entrant-safe on mps).  Serves every judge (CLIP's Scorer, csd.CsdScorer)."""
    images = list(images)
    if not images:
        return torch.zeros(0, scorer.embed_dim, device=scorer.device)
    out = []
    with scorer._lock:
        for i in range(0, len(images), scorer.batch_size):
            batch = torch.stack([scorer.preprocess(_rgb(im)) for im in images[i : i + scorer.batch_size]])
            out.append(forward(batch.to(scorer.device)).float())
    return torch.cat(out)


def _rgb(image):
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise StyleMixError(f"Expected a PIL image to score, got {type(image).__name__}.")
    return image if image.mode == "RGB" else image.convert("RGB")


# --------------------------------------------------------------------------- loading

_cache: dict[tuple, Scorer] = {}
_failures: dict[tuple, tuple[float, str]] = {}
_cache_lock = threading.Lock()


def load_scorer(clip_model: str = DEFAULT_CLIP_MODEL, pretrained: str = DEFAULT_PRETRAINED,
                device: str | torch.device | None = None, tiny: bool = False,
                cache_dir: str | os.PathLike | None = None) -> Scorer:
    """The CLIP scorer for `clip_model` with weights `pretrained`, loaded once and cached.

    clip_model: an open_clip architecture ("ViT-B-32", "ViT-L-14", ...) or "tiny".
    pretrained: an open_clip tag ("openai", "laion2b_s34b_b79k", ...) or a local .safetensors file.
    device: where to run; pass the generation pipeline's device so images never change device.
    tiny: build the tiny random demo CLIP instead (also selected by clip_model="tiny").
    Raises ScorerUnavailable (a StyleMixError) with the reason when the weights cannot be loaded.
    """
    tiny = tiny or clip_model == TINY_CLIP
    dev = pick_device(str(device) if device is not None else None)
    key = (TINY_CLIP, None, str(dev)) if tiny else (clip_model, str(pretrained), str(dev), str(cache_dir))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        failed = _failures.get(key)
        if failed and time.monotonic() - failed[0] < FAILURE_RETRY_S:
            raise ScorerUnavailable(failed[1])
        try:
            scorer = tiny_scorer(dev) if tiny else _load_real(clip_model, pretrained, dev, cache_dir)
        except ScorerUnavailable as e:
            _failures[key] = (time.monotonic(), str(e))
            raise
        _failures.pop(key, None)
        _cache[key] = scorer
        return scorer


def load_scorer_or_reason(*args, **kwargs) -> tuple[Scorer | None, str | None]:
    """(scorer, None), or (None, "why scores are unavailable"): for callers that go on without scores."""
    try:
        return load_scorer(*args, **kwargs), None
    except ScorerUnavailable as e:
        logger.warning("Scores unavailable: %s", e)
        return None, str(e)


def clear_scorer_cache() -> None:
    with _cache_lock:
        _cache.clear()
        _failures.clear()


def tiny_scorer(device: str | torch.device = "cpu", seed: int = TINY_CLIP_SEED) -> Scorer:
    """A fresh tiny random open_clip CLIP (real CLIP class, 2+2 layers, 64 px input): demo values only."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    logger.warning("Using the tiny random CLIP: scores are DEMO VALUES, not real measurements.")
    vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=64)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
    with torch.random.fork_rng(devices=[]):  # deterministic weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = open_clip.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text)
    model = model.to(device).eval()
    preprocess = open_clip.image_transform(64, is_train=False)
    return Scorer(model=model, preprocess=preprocess, tokenizer=open_clip.SimpleTokenizer(context_length=77),
                  name=TINY_CLIP_NAME, device=torch.device(device), is_demo=True)


def _load_real(clip_model: str, pretrained: str, dev: torch.device, cache_dir) -> Scorer:
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    if clip_model not in open_clip.list_models():
        raise StyleMixError(f"Unknown CLIP model {clip_model!r}; try ViT-B-32 (default), ViT-L-14 or tiny.")
    tag_cfg = get_pretrained_cfg(clip_model, pretrained)
    if tag_cfg:
        checkpoint = _fetch_safetensors(clip_model, pretrained, tag_cfg, cache_dir)
        name = f"{clip_model}/{pretrained}"
    else:
        path = Path(pretrained).expanduser()
        if path.suffix != ".safetensors" or not path.is_file():
            tags = ", ".join(list_pretrained_tags_by_model(clip_model)) or "none"
            raise StyleMixError(f"CLIP weights {pretrained!r} for {clip_model}: not a known tag ({tags}) "
                                "nor an existing .safetensors file.")
        from stylemix.lora.files import check_safetensors_header

        check_safetensors_header(path)  # refuses pickles by their first bytes
        checkpoint, name = str(path), f"{clip_model}/{path.name}"
    # The tag's preprocessing (mean/std, resize) and activation travel with the tag config, not
    # with the file, so they are passed explicitly when loading from a path.
    preprocess_keys = ("mean", "std", "interpolation", "resize_mode")
    try:
        model = open_clip.create_model(
            clip_model, pretrained=checkpoint, device=dev, force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            force_preprocess_cfg={k: tag_cfg[k] for k in preprocess_keys if k in tag_cfg})
    except Exception as e:  # wrong file for this architecture, corrupted download
        raise ScorerUnavailable(f"CLIP {clip_model}/{pretrained} could not be loaded from {checkpoint} "
                                f"({type(e).__name__}: {str(e).strip()[:200]}).") from e
    model.eval()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return Scorer(model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(clip_model),
                  name=name, device=dev)


def _fetch_safetensors(clip_model: str, tag: str, tag_cfg: dict, cache_dir) -> str:
    """Local path of the tag's safetensors weights: from the hub cache, else downloaded, else a clear reason."""
    from huggingface_hub import constants, hf_hub_download

    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        raise ScorerUnavailable(f"CLIP {clip_model}/{tag} is only published as a pickle file; StyleMix loads "
                                "safetensors only. Pick a tag hosted on the Hugging Face hub.")
    # open_clip writes "org/repo/" for the repo's default weights, "org/repo/file.bin" for one file.
    if hub.endswith("/"):
        repo, filename = hub.rstrip("/"), SAFE_WEIGHTS_NAME
    else:
        repo, filename = os.path.split(hub)
        filename = str(Path(filename).with_suffix(".safetensors"))
    what = f"CLIP {clip_model}/{tag} ({repo}/{filename})"
    kwargs = {"repo_id": repo, "filename": filename, "cache_dir": str(cache_dir) if cache_dir else None}
    try:
        return hf_hub_download(**kwargs, local_files_only=True)
    except Exception:
        pass  # not cached yet
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        raise ScorerUnavailable(f"{what} is not in the local cache and HF_HUB_OFFLINE is set.")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise ScorerUnavailable(f"{what} is not cached and {host} cannot be reached ({e}).") from e
    try:
        return hf_hub_download(**kwargs)
    except Exception as e:
        raise ScorerUnavailable(f"{what} could not be downloaded ({type(e).__name__}: {str(e).strip()[:200]}).") from e
