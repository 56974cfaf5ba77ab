"""CSD, the style judge: Contrastive Style Descriptors (Somepalli et al. 2024, arXiv:2404.01292).

The architecture is written here after the published code (github learn2phoenix/CSD,
`CSD/model.py`, class `CSD_CLIP`): OpenAI CLIP's ViT-L/14 image tower with its `proj` removed
(`backbone`), and two 1024x768 heads copied from that `proj`: `last_layer_style` and
`last_layer_content`.  The style descriptor is `normalize(backbone(x) @ last_layer_style)`.
The backbone is the tower open_clip builds for `ViT-L-14` (its key names are OpenAI's), with
QuickGELU, the activation OpenAI's weights were trained with; preprocessing is CLIP's (224 px,
bicubic resize of the short side, centre crop, OpenAI mean/std), as CSD's `transforms_branch0`.

Weights are only ever read from the safetensors file `stylemix judge install csd` wrote
(csd_install.py), after its sha256 is checked against the install record.  `tiny=True` builds
the same structure at a tiny size with random weights: demo values, as the tiny CLIP's.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Mapping, Sequence

import torch

from stylemix.errors import StyleMixError
from stylemix.scores.clip_models import ScorerUnavailable, embed_in_batches

logger = logging.getLogger("stylemix")


@dataclass(frozen=True)
class CsdConfig:
    """The size of a CSD model: open_clip vision-tower settings and the heads' output size."""

    name: str  # the judge's name before the weights' hash: "CSD-ViT-L"
    image_size: int
    patch_size: int
    width: int  # the backbone's feature size: the heads' rows
    layers: int
    head_width: int  # width // head_width attention heads, as open_clip counts them
    output_dim: int  # the style descriptor's size: the heads' columns

    def vision_cfg(self):
        from open_clip.model import CLIPVisionCfg

        return CLIPVisionCfg(layers=self.layers, width=self.width, head_width=self.head_width,
                             patch_size=self.patch_size, image_size=self.image_size)


# open_clip's "ViT-L-14" (vision_cfg 224/24/1024/14, head_width 64, embed_dim 768) = OpenAI's ViT-L/14.
CSD_VIT_L = CsdConfig("CSD-ViT-L", image_size=224, patch_size=14, width=1024, layers=24, head_width=64,
                      output_dim=768)
TINY_CSD = CsdConfig("tiny-random-csd", image_size=64, patch_size=8, width=64, layers=2, head_width=32,
                     output_dim=32)
TINY_CSD_NAME = "tiny-random-csd (demo values)"
TINY_CSD_SEED = 0
HEADS = ("last_layer_style", "last_layer_content")


class CsdModel(torch.nn.Module):
    """CSD_CLIP with the default content head: `backbone` (CLIP visual, proj removed) and two heads.

    Its state dict keys are the released checkpoint's once `module.` is stripped:
    `backbone.<OpenAI CLIP visual keys>`, `last_layer_style`, `last_layer_content`.
    """

    def __init__(self, cfg: CsdConfig) -> None:
        super().__init__()
        from open_clip.model import _build_vision_tower

        self.cfg = cfg
        self.backbone = _build_vision_tower(cfg.output_dim, cfg.vision_cfg(), quick_gelu=True)
        proj = self.backbone.proj
        # CSD deep-copies `proj` into both heads before dropping it; random init follows suit.
        self.last_layer_style = torch.nn.Parameter(proj.detach().clone())
        self.last_layer_content = torch.nn.Parameter(proj.detach().clone())
        self.backbone.proj = None  # backbone(x) is then the pooled 1024-d feature, ln_post applied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, output_dim] unit-norm style descriptors (the published forward's `style_output`)."""
        feature = self.backbone(x)
        return torch.nn.functional.normalize(feature @ self.last_layer_style, dim=-1)


def expected_shapes(cfg: CsdConfig = CSD_VIT_L) -> dict[str, tuple[int, ...]]:
    """Every key of a CSD state dict with its shape, from the architecture itself (built without memory)."""
    with torch.device("meta"):
        model = CsdModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(tensors: Mapping[str, object], cfg: CsdConfig = CSD_VIT_L, what: str = "CSD weights") -> None:
    """Strict: every expected key present with the expected shape, nothing else, floating tensors only.

    Raises one StyleMixError naming every problem (a renamed key shows as one missing and one unexpected).
    """
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in tensors]
    unexpected = [k for k in tensors if k not in want]
    bad = []
    for k, v in tensors.items():
        if k not in want:
            continue
        if not isinstance(v, torch.Tensor):
            bad.append(f"{k} is a {type(v).__name__}, not a tensor")
        elif not v.is_floating_point():
            bad.append(f"{k} has dtype {v.dtype}, not a floating type")
        elif tuple(v.shape) != want[k]:
            bad.append(f"{k} has shape {list(v.shape)}, expected {list(want[k])}")
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if bad:
        problems.append("; ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
    if problems:
        raise StyleMixError(f"{what} do not fit {cfg.name} ({len(want)} tensors expected): {'; '.join(problems)}.")


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def build_csd(tensors: Mapping[str, torch.Tensor], cfg: CsdConfig = CSD_VIT_L) -> CsdModel:
    """A CsdModel holding `tensors` (checked strictly first), in float32, eval mode.

    Built on the meta device and filled with assign=True: no 300M-parameter random init to throw away.
    """
    check_state_dict(tensors, cfg)
    with torch.device("meta"):
        model = CsdModel(cfg)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
    return model.eval()


# --------------------------------------------------------------------------- the scorer


@dataclass
class CsdScorer:
    """A CSD model ready to embed images on one device: the style half of scoring (no text tower)."""

    model: CsdModel
    preprocess: Callable  # PIL image -> [3, 224, 224], CLIP's eval transform
    name: str  # "CSD-ViT-L/<first 12 hex of the weights' sha256>" or TINY_CSD_NAME
    device: torch.device
    is_demo: bool = False
    batch_size: int = 16  # ViT-L/14 activations at 16 x 224^2 stay under ~1 GB
    kind: ClassVar[str] = "csd"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.last_layer_style.shape[-1])

    @torch.no_grad()
    def embed_images(self, images: Sequence) -> torch.Tensor:
        """[N, D] unit-norm style descriptors (float32, on the scorer's device), in batches."""
        return embed_in_batches(self, images, self.model)  # CsdModel returns unit-norm descriptors


def csd_preprocess(cfg: CsdConfig) -> Callable:
    """CSD's `transforms_branch0`: bicubic resize of the short side, centre crop, OpenAI mean/std."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return open_clip.image_transform(cfg.image_size, is_train=False, mean=OPENAI_DATASET_MEAN,
                                     std=OPENAI_DATASET_STD, interpolation="bicubic", resize_mode="shortest")


def random_csd(cfg: CsdConfig = TINY_CSD, seed: int = TINY_CSD_SEED) -> CsdModel:
    """A CsdModel with deterministic random weights (the tiny demo judge; the bench's full-size one)."""
    with torch.random.fork_rng(devices=[]):  # deterministic weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        return CsdModel(cfg).eval()


def tiny_csd_scorer(device: str | torch.device = "cpu", seed: int = TINY_CSD_SEED) -> CsdScorer:
    """A fresh tiny random CSD (the real structure, 2 layers, 64 px): demo values only."""
    logger.warning("Using the tiny random CSD: style scores are DEMO VALUES, not real measurements.")
    return CsdScorer(model=random_csd(TINY_CSD, seed).to(device), preprocess=csd_preprocess(TINY_CSD),
                     name=TINY_CSD_NAME, device=torch.device(device), is_demo=True)


def csd_scorer_from_file(path: str | Path, sha256: str, device: str | torch.device = "cpu",
                         cfg: CsdConfig = CSD_VIT_L) -> CsdScorer:
    """The scorer for an installed safetensors file whose sha256 was already checked (csd_install.load_installed)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # a file cut short after its header was checked
        raise ScorerUnavailable(f"{path}: unreadable ({type(e).__name__}: {str(e)[:200]}); "
                                "reinstall with `stylemix judge install csd`.") from None
    try:
        model = build_csd(tensors, cfg)
    except StyleMixError as e:
        raise ScorerUnavailable(f"{e} Reinstall with `stylemix judge install csd`.") from None
    return CsdScorer(model=model.to(device), preprocess=csd_preprocess(cfg), name=f"{cfg.name}/{sha256[:12]}",
                     device=torch.device(device))
