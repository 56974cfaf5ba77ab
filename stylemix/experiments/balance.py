"""Automatic balancing: weights whose images show the styles in the shares an artist asks for.

The seed report's "future work".  Naive weights equal to the target shares rarely give those
shares: LoRAs differ in strength (a pixel-art LoRA at 0.4 can dominate a watercolor at 0.6).
The search is a damped multiplicative update, the fixed-point iteration of proportional fitting:

    w_i <- w_i * (target_i / share_i) ** eta,  then rescaled to the current total strength

which is exact in one step when share_i is proportional to (k_i w_i)^p with p = 1/eta, and
converges for any monotone share function when eta is halved after a step that made things
worse (back to the best point so far).  Prompt fidelity is a constraint: the mean CLIP score
must stay within `clip_tolerance` of the best single LoRA's; while it does not, the total
strength shrinks (the usual cause of a CLIP drop is too much LoRA overall).

Each evaluation is one small, few-step preview generation (one image per seed); the result
reports how many, and the path, which `weight_maps.draw_share_map` draws on a weight map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from stylemix.errors import StyleMixError
from stylemix.recipe import WEIGHT_LIMIT, Recipe

logger = logging.getLogger("stylemix")


@dataclass
class BalanceConfig:
    share_tolerance: float = 0.03  # stop when every share is within this of its target (absolute)
    clip_tolerance: float = 0.02  # CLIP score may be at most this below the best single LoRA's (raw cosine)
    max_evaluations: int = 10  # preview generations for the search itself (singles and base not included)
    total_strength: float | None = None  # sum of weights to keep; None: the naive start's (sum of targets = 1)
    shrink: float = 0.85  # total strength factor after a point that broke the CLIP constraint
    max_ratio: float = 4.0  # largest change of one weight in one step (a style at share 0 is not a division by 0)
    # previews: small, few-step images; the shares of a 256 px 8-step image track the final image's
    preview_steps: int = 8
    preview_size: int = 256
    preview_seeds: tuple[int, ...] = (0, 1)


@dataclass
class BalanceStep:
    weights: dict[str, float]
    shares: dict[str, float]
    clip_score: float | None
    error: float  # largest |share - target|
    clip_ok: bool


@dataclass
class BalanceResult:
    target: dict[str, float]
    best: BalanceStep
    naive: BalanceStep  # weights = target shares (times the total strength)
    path: list[BalanceStep]  # every evaluated point, in order
    evaluations: int  # preview generations of the search (len(path))
    generations: int  # every preview generation, the singles and the base image included
    images: int  # images generated in all
    reached: bool  # share and CLIP tolerances both met
    clip_floor: float | None  # best single LoRA's CLIP score minus the tolerance
    best_single: dict[str, float] = field(default_factory=dict)  # LoRA -> its CLIP score alone
    style_judge: str | None = None  # what measured the shares (CLIP or CSD): one judge for the whole search

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _check_target(target: dict[str, float]) -> dict[str, float]:
    if not isinstance(target, dict) or len(target) < 2:
        raise StyleMixError("Balancing needs target shares for at least two LoRAs (e.g. watercolor=0.6 pixelart=0.4).")
    for k, v in target.items():
        if not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise StyleMixError(f"Target share of {k!r} is {v!r}; shares are numbers from 0 to 1.")
    total = sum(target.values())
    if abs(total - 1) > 0.02:
        raise StyleMixError(f"Target shares must add up to 1 (100%); these add up to {total:g}.")
    return {k: float(v) / total for k, v in target.items()}


def balance(evaluate: Callable[[dict[str, float]], tuple[dict[str, float], float | None]], target: dict[str, float],
            clip_floor: float | None = None, config: BalanceConfig | None = None,
            start: dict[str, float] | None = None) -> tuple[BalanceStep, BalanceStep, list[BalanceStep], bool]:
    """The search itself, on any `evaluate(weights) -> (shares, clip score)`.

    Returns (best, naive, path, reached).  The naive point (weights = target x total) is always
    the first evaluation, so the result is never worse than the naive choice.
    """
    cfg = config or BalanceConfig()
    target = _check_target(target)
    names = list(target)
    total = cfg.total_strength if cfg.total_strength is not None else 1.0
    if not 0 < total <= WEIGHT_LIMIT * len(names):
        raise StyleMixError(f"total_strength {total!r} must be positive and at most {WEIGHT_LIMIT * len(names)}.")
    path: list[BalanceStep] = []

    def run(w: dict[str, float]) -> BalanceStep:
        shares, clip = evaluate(dict(w))
        err = max(abs(shares.get(n, 0.0) - target[n]) for n in names)
        ok = clip_floor is None or (clip is not None and clip >= clip_floor)
        step = BalanceStep(dict(w), dict(shares), clip, err, ok)
        path.append(step)
        return step

    def key(s: BalanceStep):
        return (not s.clip_ok, s.error)

    def done(s: BalanceStep) -> bool:
        return s.clip_ok and s.error <= cfg.share_tolerance

    w0 = {n: round(target[n] * total, 4) for n in names} if start is None else {n: float(start[n]) for n in names}
    naive = best = run(w0)
    eta = 1.0
    while len(path) < cfg.max_evaluations and not done(best):
        scale = sum(best.weights.values()) or total
        if not best.clip_ok:
            scale *= cfg.shrink
        eps = 0.02
        raw = {}
        for n in names:
            ratio = ((target[n] + eps) / (best.shares.get(n, 0.0) + eps)) ** eta
            ratio = min(cfg.max_ratio, max(1 / cfg.max_ratio, ratio))
            raw[n] = max(best.weights[n], 1e-3) * ratio if target[n] > 0 else 0.0
        s = sum(raw.values()) or 1.0
        w = {n: round(min(WEIGHT_LIMIT, v * scale / s), 4) for n, v in raw.items()}
        if w == best.weights:
            if eta < 1 / 64:
                break  # no move left
            eta /= 2
            continue
        step = run(w)
        if key(step) < key(best):
            best = step
        else:
            eta /= 2  # overshoot: smaller steps from the best point
    return best, naive, path, done(best)


def balance_mix(mixer, recipe: Recipe, target: dict[str, float], config: BalanceConfig | None = None,
                judge=None, progress: Callable[[int, int, str], None] | None = None) -> BalanceResult:
    """Balance the LoRAs named in `target` for `recipe`'s prompt, on small few-step previews.

    Needs every LoRA's style centroid (for shares).  Generations: 1 base image and one per single
    LoRA (the CLIP reference), then one per search step, each of len(preview_seeds) images.
    """
    from stylemix.scores.judge import StyleJudge

    cfg = config or BalanceConfig()
    target = _check_target(target)
    names = list(target)
    judge = judge or StyleJudge.for_mixer(mixer, names, require=True)
    preview = recipe.with_(steps=cfg.preview_steps, width=cfg.preview_size, height=cfg.preview_size,
                           batch_size=len(cfg.preview_seeds), seed=cfg.preview_seeds[0])
    if list(cfg.preview_seeds) != list(range(cfg.preview_seeds[0], cfg.preview_seeds[0] + len(cfg.preview_seeds))):
        raise StyleMixError("preview_seeds must be consecutive (they are one batch: seed, seed+1, ...).")
    preview.validate()
    counter = {"gen": 0, "img": 0}
    budget = cfg.max_evaluations + 1 + len(names)

    def generate(weights: dict[str, float]):
        res = mixer.generate(preview.with_(loras=weights))
        counter["gen"] += 1
        counter["img"] += len(res.images)
        if progress:
            progress(counter["gen"], budget, ", ".join(f"{k}={v:g}" for k, v in weights.items()) or "base")
        return res.images

    base = generate({})

    def evaluate(weights: dict[str, float]):
        scores = judge.score(generate(weights), recipe.prompt, base_images=base, weights=weights)
        shares = {n: sum(s.shares.get(n, 0.0) for s in scores) / len(scores) for n in names}
        clips = [s.clip_score for s in scores if s.clip_score is not None]
        return shares, (sum(clips) / len(clips) if clips else None)

    total = cfg.total_strength if cfg.total_strength is not None else 1.0
    best_single = {n: evaluate({n: min(WEIGHT_LIMIT, total)})[1] for n in names}
    singles = [v for v in best_single.values() if v is not None]
    floor = max(singles) - cfg.clip_tolerance if singles else None
    best, naive, path, reached = balance(evaluate, target, floor, cfg)
    logger.info("balance: %d search generations, error %.3f (naive %.3f)", len(path), best.error, naive.error)
    return BalanceResult(target=target, best=best, naive=naive, path=path, evaluations=len(path),
                         generations=counter["gen"], images=counter["img"], reached=reached, clip_floor=floor,
                         best_single=best_single, style_judge=judge.style_judge)
