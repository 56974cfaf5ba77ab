"""Image captions with BLIP (transformers), batched and on the GPU when there is one.

`load_captioner(name)` never crashes a preprocessing run: when BLIP cannot be loaded
(offline, wrong name) it logs a loud warning and returns a FallbackCaptioner whose
`is_fallback` flag travels into dataset.json, so nobody mistakes a neutral caption for a
real one.  `tiny_blip_captioner()` builds a BLIP with random weights and a small offline
WordPiece vocabulary in code: the real BlipForConditionalGeneration.generate path, without
a download, for tests and offline demos.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from stylemix.errors import StyleMixError
from stylemix.models import CACHE_DIR, pick_device, pick_dtype

logger = logging.getLogger("stylemix")

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
TINY_CAPTIONER = "tiny"  # random-weight BLIP built in code
NO_CAPTIONER = ("none", "off", "fallback")  # explicitly ask for the neutral caption
FALLBACK_CAPTION = "an image"  # neutral: says nothing wrong about the content


class Captioner(Protocol):
    name: str
    is_fallback: bool

    def caption(self, images: list[Image.Image]) -> list[str]: ...


@dataclass
class FallbackCaptioner:
    """Gives every image the same neutral caption; `reason` says why no real captioner runs."""

    reason: str = "no captioner requested"
    text: str = FALLBACK_CAPTION
    name: str = "fallback"
    is_fallback: bool = True

    def caption(self, images: list[Image.Image]) -> list[str]:
        return [self.text for _ in images]


@dataclass
class BlipCaptioner:
    """BLIP image captioning (`BlipForConditionalGeneration`) over batches of PIL images."""

    model: object  # transformers.BlipForConditionalGeneration
    processor: object  # transformers.BlipProcessor
    name: str = DEFAULT_CAPTIONER
    batch_size: int = 8  # images per forward pass; 8 fits BLIP-base in ~2 GB at fp16
    max_new_tokens: int = 30  # BLIP captions are short sentences
    prompt: str | None = None  # conditional captioning prefix, e.g. "a drawing of"; None = unconditional
    is_fallback: bool = False
    generate_kwargs: dict = field(default_factory=dict)  # e.g. {"num_beams": 3}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def caption(self, images: list[Image.Image]) -> list[str]:
        out: list[str] = []
        dtype = next(self.model.parameters()).dtype
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            kwargs = {"images": batch, "return_tensors": "pt"}
            if self.prompt:
                kwargs["text"] = [self.prompt] * len(batch)
            inputs = self.processor(**kwargs)
            inputs = {k: v.to(self.device) for k, v in inputs.items() if hasattr(v, "to")}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **self.generate_kwargs)
            out.extend(" ".join(t.split()) for t in self.processor.batch_decode(ids, skip_special_tokens=True))
        return out


def load_captioner(name: str | None = DEFAULT_CAPTIONER, device: str | None = None, dtype: str | None = None,
                   fallback: bool = True, batch_size: int = 8) -> Captioner:
    """A captioner by name: a hub id or local folder of a BLIP model, "tiny", or "none".

    When the model cannot be loaded and `fallback` is true (the default), log a loud warning
    and return a FallbackCaptioner (check `.is_fallback`); with `fallback=False` raise
    StyleMixError instead.
    """
    name = (name or DEFAULT_CAPTIONER).strip()
    if name.lower() in NO_CAPTIONER:
        return FallbackCaptioner(reason="captioning switched off (--captioner none)")
    if name == TINY_CAPTIONER:
        logger.warning("Using the built-in TINY BLIP captioner (random weights): captions are random words.")
        return tiny_blip_captioner(batch_size=batch_size)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    try:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        processor = BlipProcessor.from_pretrained(name)
        model = BlipForConditionalGeneration.from_pretrained(name, dtype=dt).to(dev).eval()
    except Exception as e:  # offline, no such model, not a BLIP: one readable line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        message = f"Cannot load captioner {name!r} ({type(e).__name__}: {first})"
        if not fallback:
            raise StyleMixError(message + ". Check the name and your connection, or use --captioner none.") from e
        logger.warning("!" * 72)
        logger.warning("%s.", message)
        logger.warning("Captions fall back to the neutral %r (plus the trigger word); edit them later or "
                       "re-run with a reachable BLIP model.", FALLBACK_CAPTION)
        logger.warning("!" * 72)
        return FallbackCaptioner(reason=message)
    return BlipCaptioner(model=model, processor=processor, name=name, batch_size=batch_size)


# --------------------------------------------------------------------------- tiny BLIP

# A small WordPiece vocabulary: BLIP's special tokens plus ordinary caption words, so the
# random model's output decodes to readable (if meaningless) text.
_TINY_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
_TINY_WORDS = ("a an the of with and on in at picture drawing painting photo sprite pixel art cartoon "
               "character landscape city street night sky tree house flower car cat dog bird red blue "
               "green yellow small big bright dark colorful game tile icon").split()


def _tiny_vocab_file() -> Path:
    out = CACHE_DIR / "tiny-blip"
    path = out / "vocab.txt"
    text = "\n".join(_TINY_SPECIAL + _TINY_WORDS) + "\n"
    if not path.exists() or path.read_text() != text:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".vocab.txt.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def tiny_blip(seed: int = 0):
    """(model, processor): BlipForConditionalGeneration with random weights, 32x32 inputs, offline."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    tokenizer = BertTokenizer(str(_tiny_vocab_file()), bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    vocab = len(_TINY_SPECIAL) + len(_TINY_WORDS)
    ids = {t: i for i, t in enumerate(_TINY_SPECIAL)}
    config = BlipConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                         bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"],
                         pad_token_id=ids["[PAD]"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=32),
        projection_dim=32, image_text_hidden_size=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    return model, processor


def tiny_blip_captioner(seed: int = 0, batch_size: int = 8) -> BlipCaptioner:
    model, processor = tiny_blip(seed)
    # min_new_tokens: a random model may emit [SEP] at once; force a few words to decode.
    return BlipCaptioner(model=model, processor=processor, name=TINY_CAPTIONER, batch_size=batch_size,
                         max_new_tokens=8, generate_kwargs={"min_new_tokens": 3})
