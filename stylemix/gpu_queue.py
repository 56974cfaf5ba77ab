"""A fair GPU queue: one re-entrant lock per pipeline that serves interactive work first.

Every piece of GPU work on a pipeline (a compose request, one image of an experiment, a LoRA
load) holds the pipeline's lock.  A plain lock lets whoever asks first win, and a long
experiment that held the GPU for its whole run made every slider wait for minutes.  Here:

- long work (experiments, weight maps, balance searches) runs inside `background()`, and takes
  the lock per image (`Mixer.generate`), so it gives the GPU back between images;
- when the lock is released it goes to the oldest waiting *interactive* request first, then to
  the oldest background one.  So a compose request that arrives during an experiment waits at
  most for the image being made (bench/bench_queue.py measures it);
- within one priority, first come first served (tickets), so two experiments interleave.

The lock is re-entrant (the mixer takes it in nested calls); a thread that already holds it
never waits, whatever its priority.

A compiled pipeline's model calls run on one thread of their own (`ModelThread`), whichever thread
holds the lock: torch records CUDA graphs per thread.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

INTERACTIVE, BACKGROUND = 0, 1
_local = threading.local()


@contextmanager
def background() -> Iterator[None]:
    """GPU work started by this thread inside the block yields to interactive requests."""
    before = getattr(_local, "priority", INTERACTIVE)
    _local.priority = BACKGROUND
    try:
        yield
    finally:
        _local.priority = before


def current_priority() -> int:
    return getattr(_local, "priority", INTERACTIVE)


class PriorityRLock:
    """A re-entrant lock granting waiters by (priority, arrival); usable as `with lock:`."""

    def __init__(self, history: int = 256):
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._waiting: list[tuple[int, int]] = []  # (priority, ticket) of threads waiting
        self._tickets = itertools.count()
        # (priority, thread name) of each first acquisition, newest last: lets tests and the
        # benchmark see the order in which work got the GPU (bounded, so it never grows)
        self.grants: deque = deque(maxlen=history)

    def acquire(self, blocking: bool = True, timeout: float = -1, priority: int | None = None) -> bool:
        me = threading.get_ident()
        prio = current_priority() if priority is None else priority
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            if self._owner is None and not self._waiting:
                self._take(me, prio)
                return True
            if not blocking:
                return False
            entry = (prio, next(self._tickets))
            self._waiting.append(entry)
            try:
                ok = self._cond.wait_for(lambda: self._owner is None and min(self._waiting) == entry,
                                         None if timeout is None or timeout < 0 else timeout)
                if not ok:
                    return False
                self._take(me, prio)
                return True
            finally:
                self._waiting.remove(entry)
                self._cond.notify_all()  # the next in line re-checks who is first now

    def _take(self, me: int, prio: int) -> None:
        self._owner, self._depth = me, 1
        self.grants.append((prio, threading.current_thread().name))

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a PriorityRLock not held by this thread")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def waiting(self) -> list[int]:
        """Priorities of the threads now waiting (for tests and the benchmark)."""
        with self._cond:
            return [p for p, _ in sorted(self._waiting)]

    def __enter__(self) -> "PriorityRLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ModelThread:
    """One thread for all of a pipeline's denoising loops and decodes; callers wait for their call.

    torch keeps the CUDA graphs that `torch.compile` records (mode "reduce-overhead") per thread:
    every thread that calls a compiled model records its own graphs, in its own memory pool.
    Gradio serves requests from a pool of worker threads, so without this each worker would record
    every graph again (and hold another pool of GPU memory).  A call runs in the caller's
    contextvars (Gradio's progress bar reads them); its exception comes back to the caller; a call
    made from this thread itself runs inline.  After a fork (ZeroGPU serves requests in a child
    process) the thread is started again in the child.
    """

    def __init__(self, name: str = "stylemix-model"):
        self._name = name
        self._executor: ThreadPoolExecutor | None = None
        self._pid: int | None = None
        self._ident: int | None = None
        self._guard = threading.Lock()

    def run(self, fn, /, *args, **kwargs):
        if threading.get_ident() == self._ident and os.getpid() == self._pid:
            return fn(*args, **kwargs)
        with self._guard:
            if self._executor is None or self._pid != os.getpid():
                self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._name, initializer=self._started)
                self._pid = os.getpid()
                # the thread ends with its pipeline (tests and model switches make many)
                weakref.finalize(self, self._executor.shutdown, wait=False)
            executor = self._executor
        return executor.submit(contextvars.copy_context().run, fn, *args, **kwargs).result()

    @property
    def ident(self) -> int | None:
        """The thread id that runs the calls (None before the first call)."""
        return self._ident

    def _started(self) -> None:
        self._ident = threading.get_ident()


class PrioritySlots:
    """N interchangeable pipelines granted like `PriorityRLock`: by (priority, arrival), re-entrantly.

    One app over several GPUs (stylemix/pipelines.py) hands each piece of work whichever pipeline is
    free.  A single queue for all of them (rather than one lock per pipeline, tried in turn) keeps
    the GPU queue's promise: the oldest interactive request gets the next pipeline that frees up.
    A thread that holds a slot gets the same slot again (nested calls stay on one pipeline);
    `acquire(every=True)` (library changes) waits until no pipeline works.  The head of the queue
    is served strictly: a free pipeline never goes to a later arrival while an earlier one of the
    same or higher priority waits for all of them, so a library change is never starved.
    """

    def __init__(self, n: int, history: int = 256):
        if n < 1:
            raise ValueError("PrioritySlots needs at least one slot")
        self._cond = threading.Condition(threading.Lock())
        self._holder: list[int | None] = [None] * n
        self._depth = [0] * n
        self._waiting: list[tuple[int, int]] = []  # (priority, ticket) of threads waiting
        self._tickets = itertools.count()
        # (priority, thread name, slot) of each first acquisition, newest last (tests, benchmarks)
        self.grants: deque = deque(maxlen=history)

    def __len__(self) -> int:
        return len(self._holder)

    def held(self) -> list[int]:
        """The slots the calling thread holds."""
        me = threading.get_ident()
        with self._cond:
            return [i for i, h in enumerate(self._holder) if h == me]

    def _free_for(self, me: int, which: int | None, every: bool) -> list[int] | None:
        """The slots to take now (None: not yet)."""
        if every:
            return list(range(len(self._holder))) if all(h in (None, me) for h in self._holder) else None
        if which is not None:
            return [which] if self._holder[which] is None else None
        free = [i for i, h in enumerate(self._holder) if h is None]
        return free[:1] or None

    def acquire(self, which: int | None = None, every: bool = False, priority: int | None = None) -> list[int]:
        """Take one free slot (`which`: that one; `every`: all of them); returns the slots taken."""
        me = threading.get_ident()
        prio = current_priority() if priority is None else priority
        with self._cond:
            mine = [i for i, h in enumerate(self._holder) if h == me]
            if mine and not every and (which is None or which in mine):
                slot = mine[0] if which is None else which  # re-entrant: stay on the pipeline already held
                self._depth[slot] += 1
                return [slot]
            entry = (prio, next(self._tickets))
            self._waiting.append(entry)
            try:
                self._cond.wait_for(lambda: min(self._waiting) == entry
                                    and self._free_for(me, which, every) is not None)
                taken = self._free_for(me, which, every)
                for i in taken:
                    if self._holder[i] is None:
                        self.grants.append((prio, threading.current_thread().name, i))
                    self._holder[i] = me
                    self._depth[i] += 1
                return taken
            finally:
                self._waiting.remove(entry)
                self._cond.notify_all()  # the next in line re-checks who is first now

    def release(self, slots: list[int]) -> None:
        me = threading.get_ident()
        with self._cond:
            if any(self._holder[i] != me for i in slots):
                raise RuntimeError("release of a pipeline slot not held by this thread")
            for i in slots:
                self._depth[i] -= 1
                if self._depth[i] == 0:
                    self._holder[i] = None
            self._cond.notify_all()

    def waiting(self) -> list[int]:
        """Priorities of the threads now waiting (for tests and the benchmark)."""
        with self._cond:
            return [p for p, _ in sorted(self._waiting)]

    def busy(self) -> int:
        """How many slots are held now."""
        with self._cond:
            return sum(h is not None for h in self._holder)
