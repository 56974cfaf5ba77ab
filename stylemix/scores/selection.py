"""Which style judge measures style similarity and shares: CLIP's image embeddings or CSD's style descriptors.

The choice, in order: the caller's (`--style-judge clip|csd`), then $STYLEMIX_STYLE_JUDGE, then
CSD where its weights are installed (`stylemix judge install csd`), else CLIP.  The CLIP score
(image against prompt) is always CLIP's: CSD has no text tower.  With the built-in tiny base
model each judge is its tiny random counterpart (demo values).
"""

from __future__ import annotations

import logging
import os

import torch

from stylemix.errors import StyleMixError
from stylemix.scores.clip_models import DEFAULT_CLIP_MODEL, DEFAULT_PRETRAINED, Scorer, ScorerUnavailable, load_scorer

logger = logging.getLogger("stylemix")

STYLE_JUDGE_ENV = "STYLEMIX_STYLE_JUDGE"
STYLE_JUDGES = {
    "clip": "CLIP image embeddings (mostly content: what is drawn as much as how)",
    "csd": "CSD style descriptors (ViT-L/14 trained to match style, not content; Somepalli et al. 2024)",
}
_announced: set[tuple[str, str]] = set()


def check_judge_name(name: str) -> str:
    """'clip' or 'csd' (any case); StyleMixError naming the choices otherwise."""
    key = str(name).strip().lower()
    if key not in STYLE_JUDGES:
        raise StyleMixError(f"Unknown style judge {name!r}: choose {' or '.join(STYLE_JUDGES)}.")
    return key


def judge_arg(text: str) -> str:
    """argparse `type=` for --style-judge: a bad name is a usage error before anything loads."""
    import argparse

    try:
        return check_judge_name(text)
    except StyleMixError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def resolve_style_judge(choice: str | None = None, judge_dir=None) -> tuple[str, str]:
    """(kind, why it was chosen): the choice, else $STYLEMIX_STYLE_JUDGE, else csd if installed, else clip."""
    from stylemix.scores.csd_install import is_installed

    if choice:
        return check_judge_name(choice), "chosen"
    env = os.environ.get(STYLE_JUDGE_ENV, "").strip()
    if env:
        return check_judge_name(env), f"${STYLE_JUDGE_ENV}"
    if is_installed(judge_dir):
        return "csd", "default: CSD weights installed"
    return "clip", "default: CSD not installed (`stylemix judge install csd`)"


def pick_style_scorer(tiny: bool, device: str | torch.device | None = None, choice: str | None = None,
                      clip_scorer: Scorer | None = None, clip_model: str | None = None,
                      pretrained: str = DEFAULT_PRETRAINED, judge_dir=None):
    """The style judge's scorer (a clip_models.Scorer or a csd.CsdScorer), named once in the log.

    clip_scorer: the CLIP already loaded for the CLIP score, reused when the judge is CLIP.
    Raises ScorerUnavailable (CSD not installed, hash mismatch, ...) or StyleMixError (unknown name).
    """
    kind, why = resolve_style_judge(choice, judge_dir)
    if kind == "clip":

        scorer = clip_scorer or pick_scorer(tiny, device, clip_model, pretrained)
    else:
        from stylemix.scores.csd_install import load_csd_scorer

        scorer = load_csd_scorer(device, tiny=tiny, judge_dir=judge_dir)
    if (scorer.name, why) not in _announced:  # once per process and judge: every image would repeat it
        _announced.add((scorer.name, why))
        logger.info("Style judge: %s (%s)%s.", scorer.name, why, ", demo values" if scorer.is_demo else "")
    return scorer


def pick_style_scorer_or_reason(*args, **kwargs):
    """(scorer, None), or (None, "why the style judge is unavailable")."""
    try:
        return pick_style_scorer(*args, **kwargs), None
    except ScorerUnavailable as e:
        logger.warning("Style judge unavailable: %s", e)
        return None, str(e)


def describe_style_judge(tiny: bool, choice: str | None = None, judge_dir=None) -> tuple[str, str]:
    """(a few words for the model's one-line banner, one Markdown sentence for its details), without
    loading anything: which judge measures style, and why that one."""
    try:
        kind, why = resolve_style_judge(choice, judge_dir)
    except StyleMixError as e:
        return "Style judge: none.", f"**Style judge:** none: {e}"
    name = {"clip": "CLIP", "csd": "CSD"}[kind]
    demo = " (tiny random, demo values)" if tiny else ""
    return (f"Style judge: {name}.",
            f"**Style judge:** {name}{demo}, {STYLE_JUDGES[kind]}; {why}. The CLIP score (prompt match) is "
            "always CLIP's (docs/scores.md).")


def available_style_scorers(tiny: bool, device: str | torch.device | None = None, judge_dir=None) -> list:
    """Every judge that can be loaded here (CLIP, and CSD if installed or tiny): a new LoRA's centroid is
    computed with each, so switching judges later never needs its training images again."""
    from stylemix.scores.csd_install import load_csd_scorer
    from stylemix.scores.csd_install import is_installed

    out = []
    for load in (lambda: pick_scorer(tiny, device),
                 lambda: load_csd_scorer(device, tiny=True) if tiny else
                 (load_csd_scorer(device, judge_dir=judge_dir) if is_installed(judge_dir) else None)):
        try:
            scorer = load()
        except ScorerUnavailable as e:
            logger.warning("Style judge unavailable for centroids: %s", e)
            continue
        if scorer is not None:
            out.append(scorer)
    return out


def pick_scorer(tiny: bool, device: str | torch.device | None = None, clip_model: str | None = None,
                pretrained: str = DEFAULT_PRETRAINED) -> Scorer:
    """The CLIP that judges images of a model: the tiny random demo CLIP for the tiny base model (or
    clip_model "tiny"), else `clip_model` (default ViT-B-32/openai).  Raises ScorerUnavailable."""
    if tiny:
        return load_scorer(device=device, tiny=True)
    return load_scorer(clip_model or DEFAULT_CLIP_MODEL, pretrained, device=device)


def pick_scorer_or_reason(tiny: bool, device: str | torch.device | None = None, clip_model: str | None = None,
                          pretrained: str = DEFAULT_PRETRAINED) -> tuple[Scorer | None, str | None]:
    """(scorer, None), or (None, "why scores are unavailable"): for callers that go on without scores."""
    try:
        return pick_scorer(tiny, device, clip_model, pretrained), None
    except ScorerUnavailable as e:
        logger.warning("Scores unavailable: %s", e)
        return None, str(e)
