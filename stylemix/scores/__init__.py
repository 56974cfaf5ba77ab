"""The scores stage: CLIP models, the score arithmetic, and the style judge (CLIP or CSD: which one,
each LoRA's centroid in its space, trigger words).  See docs/scores.md and docs/architecture.md."""
