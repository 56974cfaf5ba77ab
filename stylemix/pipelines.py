"""One app over several GPUs: one pipeline (and one `Mixer`) per device, work to whichever is free.

`STYLEMIX_DEVICES=cuda:0,cuda:1` (or `--device cuda:0,cuda:1`) loads the model once per device.
Each pipeline keeps its own resident LoRAs and its own merged weights, because a mix is written
into the weights (stylemix/mixer.py): two renders with different mixes can only run at once on two
copies.  The LoRA library is shared, so a LoRA imported or renamed is seen by every pipeline.

`MixerPool` looks like one `Mixer` to the service, the experiments and the scorer: each `generate`
takes whichever pipeline frees up first, through one fair queue (`gpu_queue.PrioritySlots`), so
interactive requests still go before experiment images, and an experiment spreads its images over
every free pipeline between them.  Nested calls from a thread that holds a pipeline stay on it.
`pool.lock` waits until no pipeline works (replacing, renaming or deleting a LoRA; compiling).

`cpu,cpu` is accepted (two pipelines on one device): it is how the tests check the pool without a
GPU; it doubles the memory and, on a CPU, shares the same cores.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

from stylemix.errors import StyleMixError
from stylemix.gpu_queue import PrioritySlots
from stylemix.lora.library import LoraLibrary
from stylemix.mixer import Mixer, MixResult
from stylemix.models import LoadedModel, load_model
from stylemix.recipe import Recipe

DEVICES_ENV = "STYLEMIX_DEVICES"


def parse_devices(spec: str | None) -> list[str | None]:
    """'cuda:0,cuda:1' -> ['cuda:0', 'cuda:1']; None or '' -> [None] (the default device).

    Each name is checked by torch; a CUDA index the machine does not have is refused here, in one
    sentence, rather than by the first render."""
    if not spec or not str(spec).strip():
        return [None]
    names = [s.strip() for s in str(spec).split(",")]
    if any(not s for s in names):
        raise StyleMixError(f"Invalid device list {spec!r}: give device names separated by commas, "
                            "e.g. cuda:0,cuda:1.")
    kinds = set()
    for name in names:
        if name == "auto":
            kinds.add("auto")
            continue
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise StyleMixError(f"Invalid device {name!r} in {spec!r}: use cpu, cuda, cuda:N or mps.") from None
        if dev.type == "cuda" and dev.index is not None and dev.index >= max(torch.cuda.device_count(), 0):
            raise StyleMixError(f"Device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                                "CUDA device(s).")
        kinds.add(dev.type)
    if len(kinds) > 1:
        # any request may go to any pipeline: a CPU beside a GPU would make some renders 100x slower, and a
        # dtype chosen per device would make one recipe's image depend on where it ran
        raise StyleMixError(f"Invalid device list {spec!r}: use devices of one kind (e.g. cuda:0,cuda:1).")
    return names


def devices_wanted(device: str | None = None) -> list[str | None]:
    """The devices the app renders on: `device` (--device) if given, else $STYLEMIX_DEVICES, else the default."""
    return parse_devices(device if device else os.environ.get(DEVICES_ENV))


def members(mixer) -> list[Mixer]:
    """The mixers behind `mixer`: a pool's pipelines, or the one mixer itself."""
    return list(getattr(mixer, "members", None) or [mixer])


@contextmanager
def checkout(mixer) -> Iterator[Mixer]:
    """Hold one pipeline for a few calls (a preview checks, then renders): a pool's free one, or the mixer's lock."""
    if isinstance(mixer, MixerPool):
        with mixer.checkout() as m:
            yield m
    else:
        with mixer.lock:
            yield mixer


def make_mixer(loaded: LoadedModel, library: LoraLibrary, devices: list[str | None],
               dtype: str | None = None) -> "Mixer | MixerPool":
    """A `Mixer` on `loaded` alone, or a `MixerPool` with one more copy of its model per further device.

    `loaded` is the first device's model (already loaded, or the tiny fallback): every copy is that
    same model, so every pipeline makes the same image for the same recipe."""
    first = Mixer(loaded, library)
    if len(devices) <= 1:
        return first
    mixers, seen = [first], {str(loaded.device): 1}
    for dev in devices[1:]:
        key = str(torch.device(dev)) if dev and dev != "auto" else str(loaded.device)
        replica = seen.get(key, 0)  # a second pipeline on one device needs its own weights
        seen[key] = replica + 1
        other = load_model(loaded.model_id, dev or str(loaded.device), dtype, replica=replica)
        mixers.append(Mixer(other, library))
    return MixerPool(mixers)


class _AllPipelines:
    """`with pool.lock:` -- every pipeline, once each is free (library changes wait for renders in progress)."""

    def __init__(self, pool: "MixerPool"):
        self._pool = pool

    def __enter__(self) -> "_AllPipelines":
        pool = self._pool
        taken = pool.slots.acquire(every=True)
        for m in pool.members:  # uncontended: the slots are ours; taken so each Mixer's own checks hold
            m.lock.acquire()
        pool._stack().append(taken)
        return self

    def __exit__(self, *exc) -> None:
        pool = self._pool
        taken = pool._stack().pop()
        for m in reversed(pool.members):
            m.lock.release()
        pool.slots.release(taken)


class MixerPool:
    """Several `Mixer`s of one model, one per pipeline, used as one (see the module's text)."""

    def __init__(self, mixers: list[Mixer]):
        if len({id(m.pipe) for m in mixers}) != len(mixers):
            raise StyleMixError("Each pipeline of a pool needs its own copy of the model.")
        self.members = list(mixers)
        self.slots = PrioritySlots(len(mixers))
        self.lock = _AllPipelines(self)
        import threading

        self._local = threading.local()

    def _stack(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    @contextmanager
    def checkout(self, which: int | Mixer | None = None) -> Iterator[Mixer]:
        """Hold a pipeline (`which`: that one) and its mixer's lock; the same one again if this thread has one."""
        if isinstance(which, Mixer):
            which = self.members.index(which)
        taken = self.slots.acquire(which=which)
        mixer = self.members[taken[0]]
        try:
            with mixer.lock:
                yield mixer
        finally:
            self.slots.release(taken)

    def current(self) -> Mixer:
        """The pipeline this thread holds, else the first (for what all pipelines share: model, library)."""
        held = self.slots.held()
        return self.members[held[0]] if held else self.members[0]

    def generate(self, recipe: Recipe, progress=None, options=None) -> MixResult:
        """`Mixer.generate` on whichever pipeline is free first (interactive requests first)."""
        with self.checkout() as mixer:
            return mixer.generate(recipe, progress=progress, options=options)

    def ensure_loaded(self, names) -> None:
        for m in self.members:
            with self.checkout(m):
                m.ensure_loaded(names)

    def load_extra_adapter(self, source: str, adapter_id: str, weight_name: str | None = None) -> None:
        for m in self.members:
            with self.checkout(m):
                m.load_extra_adapter(source, adapter_id, weight_name)

    def restore_base_weights(self) -> None:
        for m in self.members:
            with self.checkout(m):
                m.restore_base_weights()

    def unload(self, name: str) -> None:
        for m in self.members:
            with self.checkout(m):
                m.unload(name)

    def __getattr__(self, name: str):
        # loaded, pipe, library, state, merge, prompt_with_triggers, ...: the held pipeline's, else the first's
        if name.startswith("__") or name in ("members", "slots", "lock", "_local"):
            raise AttributeError(name)
        return getattr(self.current(), name)

    def __len__(self) -> int:
        return len(self.members)

    def describe(self) -> str:
        """'2 pipelines (cuda:0, cuda:1)' for the model banner and logs."""
        return f"{len(self.members)} pipelines ({', '.join(str(m.loaded.device) for m in self.members)})"
