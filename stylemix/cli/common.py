"""Pieces several subcommands share: the workspace, the mixer, progress bars."""

from __future__ import annotations

import sys

from stylemix.paths import Workspace


def workspace(args) -> Workspace:
    return Workspace.default(getattr(args, "loras_dir", None))


def open_mixer(args):
    """Load the base model (cached) and a mixer over the LoRA library; fails with ModelLoadError."""
    from stylemix.lora.library import LoraLibrary
    from stylemix.mixer import Mixer
    from stylemix.models import load_model

    loaded = load_model(args.model, args.device, args.dtype, safety_checker=getattr(args, "safety_checker", False))
    if loaded.is_tiny:
        print("stylemix: WARNING: running the built-in TINY model (random weights): "
              "images are not real pictures and scores are demo values.", file=sys.stderr)
    mixer = Mixer(loaded, LoraLibrary(workspace(args).loras, base_model=loaded.model_id))
    if getattr(args, "compile", None):  # explicit only: for one image a compile costs more than it saves
        from stylemix.accel import compile_pipeline, fuse_qkv, fuse_qkv_wanted

        if fuse_qkv_wanted():  # as the server does, so `--compile generate` gives the server's pixels
            fuse_qkv(mixer)
        compile_pipeline(loaded.pipe)
    return mixer


def tqdm_progress(total: int, desc: str, disable: bool = False):
    """A tqdm bar on stderr plus a `progress(done, total)` callback that moves it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, disable=disable or not sys.stderr.isatty(), leave=False)

    def progress(done: int, total_: int) -> None:
        bar.total = total_
        bar.n = done
        bar.refresh()

    return bar, progress
