"""Per-user limits for a shared Space, checked before any work starts.

The defaults fit a free Hugging Face Space (about 50 GB of disk, one small GPU or a CPU, a few
dozen visitors); an admin changes them with the environment variables named beside each field,
e.g. `STYLEMIX_MAX_LORAS=20`.  Without auth, a visitor who clears their browser storage is a
new user with fresh quotas: a public Space that must hold firm limits should turn auth on.

Nothing is counted in memory: LoRAs, jobs, datasets and outputs are counted in their folders at
each check, so the limits hold across app processes sharing one storage (replicas), and the LoRA
checks run under the library's write lock with the change they allow (`LoraLibrary.lock`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from stylemix.errors import StyleMixError

MB = 1024**2


class QuotaError(StyleMixError):
    """Over a per-user limit: nothing was done."""


@dataclass(frozen=True)
class Quotas:
    # LoRAs a user may own (trained + imported; queued training jobs count too).  STYLEMIX_MAX_LORAS
    max_loras: int = 10
    # Their total size: rank-32 SD1.5 LoRAs are ~40-80 MB, so 10 fit.  STYLEMIX_MAX_LORA_MB
    max_lora_mb: int = 1024
    # Prepared datasets (data/<user>/): a few hundred 512 px images.  STYLEMIX_MAX_DATASET_MB
    max_dataset_mb: int = 500
    # Training jobs queued or running at once: one GPU trains one job at a time, so more only
    # makes other users wait.  STYLEMIX_MAX_QUEUED_JOBS
    max_queued_jobs: int = 2
    # Generated images and experiment runs kept in outputs/<user>/; the oldest are removed first.
    # STYLEMIX_MAX_OUTPUTS
    max_outputs: int = 200
    # Images one experiment run may make: the seed protocol's 110 fit.  STYLEMIX_MAX_EXPERIMENT_IMAGES
    max_experiment_images: int = 120

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "Quotas":
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            var = "STYLEMIX_" + f.name.upper()
            if var in env:
                try:
                    values[f.name] = int(env[var])
                except ValueError:
                    raise StyleMixError(f"{var}={env[var]!r}: expected a whole number.") from None
                if values[f.name] < 0:
                    raise StyleMixError(f"{var}={env[var]!r}: must be 0 or more.")
        return cls(**values)

    # ---------------------------------------------------------------- checks

    def check_loras(self, count: int, used_bytes: int, new_bytes: int = 0, adding: int = 1) -> None:
        """Before an import or a training job: `count` LoRAs and `used_bytes` already owned."""
        if count + adding > self.max_loras:
            raise QuotaError(f"You already own {count} LoRAs (limit {self.max_loras}, queued training jobs "
                             "included): delete one in the Library tab first.")
        if used_bytes + new_bytes > self.max_lora_mb * MB:
            raise QuotaError(f"Your LoRAs would take {(used_bytes + new_bytes) / MB:.0f} MB (limit "
                             f"{self.max_lora_mb} MB): delete one in the Library tab first.")

    def check_dataset(self, used_bytes: int, new_bytes: int) -> None:
        if used_bytes + new_bytes > self.max_dataset_mb * MB:
            raise QuotaError(f"Your datasets would take {(used_bytes + new_bytes) / MB:.0f} MB (limit "
                             f"{self.max_dataset_mb} MB; this upload is {new_bytes / MB:.1f} MB): upload fewer "
                             "images or replace one of your datasets.")

    def check_jobs(self, active: int) -> None:
        if active >= self.max_queued_jobs:
            raise QuotaError(f"You already have {active} training job(s) queued or running (limit "
                             f"{self.max_queued_jobs}): wait for one to finish or cancel it.")

    def check_experiment(self, images: int) -> None:
        if images > self.max_experiment_images:
            raise QuotaError(f"This experiment would make {images} images (limit {self.max_experiment_images} "
                             "per run): use fewer prompts, seeds, LoRAs or sweep weights.")


def folder_bytes(path) -> int:
    """Total size of the regular files under `path` (0 if it does not exist); symlinks are not followed."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            total += st.st_size
    return total
