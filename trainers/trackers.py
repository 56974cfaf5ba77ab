"""Watching a run: the smoothed loss and accelerate's TensorBoard tracker.

The smoothed loss is an exponential moving average of the step losses with bias correction (the
smoothing TensorBoard's slider and Adam use), so its first value is the first loss rather than a
tenth of it; it is rebuilt from the loss curve on resume.  TensorBoard event files go to
`<job>/logs/train/` when the tensorboard package is installed (`tensorboard --logdir jobs/<id>/logs`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from pathlib import Path

from stylemix.training.progress import LossHistory

LOGS_DIR = "logs"
RUN_NAME = "train"
EMA_BETA = 0.9  # about the last 10 steps


class Curve(LossHistory):
    """A thinned curve (LossHistory's merging) whose values keep 6 significant digits, not 6 decimals:
    a learning rate of 2.5e-7 must not show as 0."""

    def as_list(self) -> list[list[float]]:
        return [[int(s), float(f"{v:.6g}")] for s, v, _ in self.points]


class SmoothedLoss:
    def __init__(self, beta: float = EMA_BETA) -> None:
        self.beta, self.avg, self.n = beta, 0.0, 0

    @classmethod
    def of(cls, curve: list) -> "SmoothedLoss":
        s = cls()
        for _, loss in curve:
            s.add(loss)
        return s

    def add(self, loss: float) -> float:
        self.n += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * float(loss)
        return self.value

    @property
    def value(self) -> float | None:
        return self.avg / (1 - self.beta ** self.n) if self.n else None


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def accelerator_options(config, work_dir: Path) -> dict:
    """Accelerator(...) keywords: TensorBoard into <work_dir>/logs when wanted and installed, else none."""
    if not (config.tensorboard and tensorboard_installed()):
        return {}
    return {"log_with": "tensorboard", "project_dir": str(Path(work_dir) / LOGS_DIR)}


def start(accelerator, config) -> None:
    """Open the trackers (main process only, as accelerate does), with the run's scalar settings as hparams."""
    if accelerator.log_with:
        settings = {k: v for k, v in asdict(config).items()
                    if isinstance(v, (int, float, str, bool)) and k not in ("owner", "loras_dir")}
        accelerator.init_trackers(RUN_NAME, config=settings)


def log(accelerator, step: int, values: dict) -> None:
    if accelerator.log_with:
        accelerator.log({k: v for k, v in values.items() if v is not None}, step=step)
