"""Caption options with kohya's names and meaning (sd-scripts' `process_caption`), and tokenising.

A caption is comma-separated tags; StyleMix's start with the trigger word.  Per image and step:

1. `caption_dropout_rate`: with this chance the whole caption becomes "" (unconditional training);
2. otherwise, with `shuffle_caption` or `caption_tag_dropout_rate`, the tags are split at commas: the
   first `keep_tokens` stay as they are (the trigger word among them: keep_tokens >= 1), the rest are
   shuffled (`shuffle_caption`) and then each dropped with chance `caption_tag_dropout_rate`.

All draws come from the sample's own caption generator (trainers.batches.sample_generator, stream
"captions"), so a resumed run sees the same captions, however many processes train, and the other
draws of a step are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stylemix.errors import StyleMixError


@dataclass(frozen=True)
class CaptionOptions:
    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0

    @classmethod
    def of(cls, config) -> "CaptionOptions":
        return cls(config.shuffle_caption, config.keep_tokens, config.caption_dropout_rate,
                   config.caption_tag_dropout_rate)

    @property
    def varies(self) -> bool:
        """True when captions change from step to step (then they cannot be encoded once and cached)."""
        return self.shuffle or self.dropout_rate > 0 or self.tag_dropout_rate > 0

    @property
    def splits_tags(self) -> bool:
        return self.shuffle or self.tag_dropout_rate > 0


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def check_keep_tokens(options: CaptionOptions, captions: list[str], files: list) -> None:
    """Refuse keep_tokens larger than a caption's tag count (when tags are shuffled or dropped), naming the
    image; called with the dataset's captions before any model loads."""
    if not options.splits_tags or options.keep_tokens == 0:
        return
    counts = [len(split_tags(c)) for c in captions]
    shortest = min(range(len(counts)), key=counts.__getitem__)
    if counts[shortest] < options.keep_tokens:
        name = getattr(files[shortest], "name", files[shortest])
        raise StyleMixError(f"Invalid keep tokens {options.keep_tokens}: the caption of {name} has only "
                            f"{counts[shortest]} comma-separated tag(s) ({captions[shortest][:80]!r}); use a number "
                            f"from 0 to {counts[shortest]}.")


def process_caption(caption: str, options: CaptionOptions, g: torch.Generator) -> str:
    """The caption as one step trains on it (kohya's order: dropout, keep, shuffle, tag dropout)."""
    if options.dropout_rate > 0 and torch.rand((), generator=g).item() < options.dropout_rate:
        return ""
    if not options.splits_tags:
        return caption
    tags = split_tags(caption)
    fixed, flex = tags[:options.keep_tokens], tags[options.keep_tokens:]
    if options.shuffle:
        flex = [flex[i] for i in torch.randperm(len(flex), generator=g).tolist()]
    if options.tag_dropout_rate > 0:
        flex = [t for t in flex if torch.rand((), generator=g).item() >= options.tag_dropout_rate]
    return ", ".join(fixed + flex)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids [n, 77], padded and truncated as the text encoder was trained."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
