"""The scores stage: CLIP models, the score arithmetic, and the style judge (which CLIP, each LoRA's
centroid and trigger word).  See docs/architecture.md."""
