"""How far a training run is and how long it has left, from measured times; its loss curve, kept small.

The trainer (trainers/lora.py) feeds these and writes what they say into the job's status.json;
the app and `stylemix jobs show` only read it.  Plain Python (no torch), so it is unit-tested alone.
"""

from __future__ import annotations

import statistics

# The phases of a job, in order, as written to status.json "phase" (the page and the CLI word them).
STARTING, LOADING, CACHING, TRAINING, SAMPLING, SAVING, SCORING = (
    "starting", "loading", "caching", "training", "sampling", "saving", "scoring")
PHASES = (STARTING, LOADING, CACHING, TRAINING, SAMPLING, SAVING, SCORING)

END_GUESS_S = 3.0  # saving the LoRA and its style centroid, before it was ever measured (CPU tiny: ~1-3 s)
MIN_LEFT_S = 1.0  # while work remains the time left is never shown as 0


class SmoothedDuration:
    """Seconds per unit of work (a step, a sample image), smoothed so that the time left does not jump.

    The first few measurements give their median (the first step is often slow: allocation, warm-up);
    after that an exponential moving average of *seconds* (not of rates: one fast step cannot halve
    the estimate), each measurement limited to [1/2, 2] x the current estimate, so a step slowed by a
    garbage collection or a checkpoint moves it a little, and a lasting change still wins in a few
    dozen steps.
    """

    WARMUP = 5

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha, self.first, self.value = alpha, [], None

    def add(self, seconds: float) -> None:
        seconds = max(0.0, float(seconds))
        if len(self.first) < self.WARMUP:
            self.first.append(seconds)
            self.value = statistics.median(self.first)
            return
        seconds = min(max(seconds, self.value / 2), self.value * 2)
        self.value += self.alpha * (seconds - self.value)


def sample_rounds(total_steps: int, sample_every: int, after: int = 0) -> list[int]:
    """The steps in (after, total_steps] at which the trainer makes samples (every `sample_every`, and the last)."""
    steps = set(range(sample_every, total_steps + 1, sample_every)) if sample_every else set()
    steps.add(total_steps)
    return sorted(s for s in steps if s > after)


class Estimator:
    """A run's time left and share done, counting all of its remaining work.

    The work is the optimizer steps, the sample images (`images_per_round` at each sample step) and
    the end (saving the LoRA, scoring its style).  Each kind is timed as it happens (`step`, `sample`,
    `end`); the time spent sampling and saving is never counted as training speed.  Before the first
    sample image is timed it is guessed from the step time (a sample image is `sample_steps` UNet
    passes, x2 with guidance; a step is about 3 passes per image of the batch).
    """

    def __init__(self, total_steps: int, step: int = 0, sample_every: int = 0, images_per_round: int = 0,
                 sample_steps: int = 25, batch_size: int = 1, guidance: bool = True) -> None:
        self.total_steps, self.step = total_steps, step
        self.rounds = sample_rounds(total_steps, sample_every) if images_per_round else []
        self.images_per_round = images_per_round
        self.images_done = sum(1 for s in self.rounds if s <= step) * images_per_round
        self.per_step, self.per_image = SmoothedDuration(), SmoothedDuration()
        self.image_guess = sample_steps * (2 if guidance else 1) / (3 * max(1, batch_size))
        self.end_s, self.end_spent = END_GUESS_S, 0.0
        self.top = 0.0  # the highest share reported: the bar never goes back while estimates settle

    # ---- measurements
    def step_done(self, step: int, seconds: float) -> None:
        self.step = step
        self.per_step.add(seconds)

    def image_done(self, seconds: float) -> None:
        self.images_done += 1
        self.per_image.add(seconds)

    def end_progress(self, seconds_spent: float) -> None:
        """Time spent so far on saving and scoring (the end's estimate grows if it runs over)."""
        self.end_spent = seconds_spent
        self.end_s = max(self.end_s, seconds_spent + MIN_LEFT_S)

    # ---- estimates
    def _image_s(self) -> float | None:
        if self.per_image.value is not None:
            return self.per_image.value
        return None if self.per_step.value is None else self.per_step.value * self.image_guess

    def seconds_left(self) -> float | None:
        """Seconds of work left (None until a step was timed); at least MIN_LEFT_S while any remains."""
        step_s, image_s = self.per_step.value, self._image_s()
        if step_s is None:
            return None
        images_left = len(self.rounds) * self.images_per_round - self.images_done
        left = ((self.total_steps - self.step) * step_s + max(0, images_left) * image_s
                + max(0.0, self.end_s - self.end_spent))
        return max(MIN_LEFT_S, left)

    def share_done(self) -> float:
        """Work done / all work, in [0, 0.99] (1.0 is said by the job's end, not by an estimate)."""
        left = self.seconds_left()
        if left is None:
            return self.top
        done = self.step * self.per_step.value + self.images_done * self._image_s() + self.end_spent
        share = min(0.99, done / (done + left)) if done + left > 0 else 0.0
        self.top = max(self.top, share)
        return self.top


class LossHistory:
    """The loss curve for display, at most `max_points` points however long the run.

    Each point is [last step, mean loss] of a run of `stride` consecutive steps; when the points
    would exceed `max_points` the stride doubles and neighbouring points merge (means weighted by
    their step counts).  Adding a step is O(1) on average, so the trainer keeps it current every step.
    """

    def __init__(self, max_points: int = 500) -> None:
        self.max_points, self.stride = max(2, max_points), 1
        self.points: list[list[float]] = []  # [step, mean loss, count]

    @classmethod
    def of(cls, curve: list, max_points: int = 500) -> "LossHistory":
        h = cls(max_points)
        for step, loss in curve:
            h.add(step, loss)
        return h

    def add(self, step: int, loss: float) -> None:
        bucket = (int(step) - 1) // self.stride
        last = self.points[-1] if self.points else None
        if last is not None and (int(last[0]) - 1) // self.stride == bucket:
            last[1] = (last[1] * last[2] + loss) / (last[2] + 1)
            last[0], last[2] = int(step), last[2] + 1
        else:
            self.points.append([int(step), float(loss), 1])
        while len(self.points) > self.max_points:
            self.stride *= 2
            merged: list[list[float]] = []
            for p in self.points:
                if merged and (int(merged[-1][0]) - 1) // self.stride == (int(p[0]) - 1) // self.stride:
                    m = merged[-1]
                    m[1] = (m[1] * m[2] + p[1] * p[2]) / (m[2] + p[2])
                    m[0], m[2] = p[0], m[2] + p[2]
                else:
                    merged.append(list(p))
            self.points = merged

    def as_list(self) -> list[list[float]]:
        return [[int(s), round(v, 6)] for s, v, _ in self.points]
