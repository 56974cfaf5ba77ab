"""Re-create the example LoRAs the app offers on a fresh offline start (tiny model only).

    python assets/make_example_loras.py            # writes assets/example_loras/<name>/

Each example set in assets/examples/ is prepared as a dataset (tiny captioner) and trained for a
few steps on the built-in TINY model with StyleMix's own trainer, so the LoRA folders are the
real thing (weights, stylemix.json, loss curve, samples, style centroid from the tiny CLIP).
They are demo LoRAs for a demo model: the app copies them into the library only when it runs
on the tiny model, since they cannot fit a real SD1.5 (different layer widths).
Takes about a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from stylemix.datasets.captioning import load_captioner  # noqa: E402
from stylemix.datasets.prepare import DatasetConfig, prepare_dataset  # noqa: E402
from trainers.lora import TrainConfig, train  # noqa: E402

EXAMPLES = ROOT / "assets" / "examples"
OUT = ROOT / "assets" / "example_loras"
# example set -> (LoRA name, trigger word)
SETS = {"kenney_flat": ("kenney_flat", "knyflt"), "pixel_city": ("pixel_city", "pxcty")}


def make(out: Path = OUT, steps: int = 12, resolution: int = 64) -> list[Path]:
    torch.manual_seed(0)
    captioner = load_captioner("tiny")
    made = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for folder, (name, trigger) in SETS.items():
            ds = prepare_dataset([EXAMPLES / folder], name, trigger, tmp / "data", DatasetConfig(size=64),
                                 captioner=captioner)
            config = TrainConfig(data_dir=str(ds.path), name=name, loras_dir=str(tmp / "loras"), model="tiny",
                                 device="cpu", resolution=resolution, rank=4, alpha=4, max_steps=steps,
                                 learning_rate=1e-3, batch_size=2, sample_every=0, sample_steps=4,
                                 sample_prompts=["{trigger}, a small house", "{trigger}, a character"],
                                 checkpoint_every=10_000, seed=0)
            train(config, tmp / "work" / name)
            dest = out / name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(tmp / "loras" / name, dest)
            made.append(dest)
            logging.info("wrote %s", dest)
    return made


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    for d in make(args.out, args.steps):
        print(d, sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) // 1024, "KiB")
