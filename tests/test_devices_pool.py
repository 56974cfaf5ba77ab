"""One app over several devices (stylemix/pipelines.py), checked on the CPU with two CPU pipelines.

STYLEMIX_DEVICES=cpu,cpu loads the tiny model twice; two users' renders must run at the same time
(each starts before the other ends: times taken inside the render, at its denoising steps), each
on its own pipeline, and each image must equal what one pipeline alone makes for the same recipe.
"""

import threading
import time

import numpy as np
import pytest

from helpers import make_library_lora
from stylemix import gpu_queue
from stylemix.errors import StyleMixError
from stylemix.pipelines import MixerPool, members, parse_devices
from stylemix.recipe import Recipe
from stylemix.service import StyleMixService, new_owner_token

ANN, BOB = new_owner_token(), new_owner_token()
STEP_PAUSE_S = 0.3  # a pause inside each denoising step: the renders last long enough to overlap surely


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture
def pooled(workspace, monkeypatch):
    make_library_lora(workspace.loras, "ink", seed=11)
    make_library_lora(workspace.loras, "neon", seed=12)
    monkeypatch.setenv("STYLEMIX_DEVICES", "cpu,cpu")
    return StyleMixService.start("tiny", workspace, examples=False)


def test_device_lists_are_parsed_and_bad_ones_refused():
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices(" cpu , cpu ") == ["cpu", "cpu"]
    assert parse_devices(None) == [None] and parse_devices("") == [None]
    with pytest.raises(StyleMixError, match="separated by commas"):
        parse_devices("cpu,,cpu")
    with pytest.raises(StyleMixError, match="Invalid device 'gpu0'"):
        parse_devices("cpu,gpu0")
    with pytest.raises(StyleMixError, match="of one kind"):
        parse_devices("cpu,meta")
    import torch

    with pytest.raises(StyleMixError, match="does not exist"):
        parse_devices(f"cpu,cuda:{torch.cuda.device_count() + 3}")


def test_slots_serve_interactive_first_and_every_waits_for_all():
    slots = gpu_queue.PrioritySlots(2)
    a = slots.acquire()
    assert slots.acquire() == a and slots.held() == a  # re-entrant: the same pipeline again
    slots.release(a)
    taken, go = [], threading.Event()

    def hold_other():
        taken.extend(slots.acquire())
        go.wait(10)
        slots.release(taken)

    t = threading.Thread(target=hold_other)
    t.start()
    while slots.busy() < 2:
        time.sleep(0.005)
    assert taken != a
    order = []

    def want(name, prio, every=False):
        got = slots.acquire(every=every, priority=prio)
        order.append(name)
        slots.release(got)

    waiters = [threading.Thread(target=want, args=("bg", gpu_queue.BACKGROUND)),
               threading.Thread(target=want, args=("all", gpu_queue.INTERACTIVE, True)),
               threading.Thread(target=want, args=("ui", gpu_queue.INTERACTIVE))]
    for i, w in enumerate(waiters):
        w.start()
        while len(slots.waiting()) < i + 1:
            time.sleep(0.005)
    slots.release(a)  # one pipeline frees up: `all` is first in line and waits for the other one too,
    time.sleep(0.1)  # and nobody behind it takes the free one meanwhile
    assert order == [] and len(slots.waiting()) == 3
    go.set()
    for w in waiters + [t]:
        w.join(10)
    assert order == ["all", "ui", "bg"], order
    with pytest.raises(RuntimeError, match="not held"):
        slots.release(a)


def test_two_users_render_at_once_on_two_pipelines_with_single_pipeline_images(pooled):
    pool = pooled.mixer
    assert isinstance(pool, MixerPool) and len(members(pool)) == 2
    assert members(pool)[0].pipe is not members(pool)[1].pipe
    assert members(pool)[0].library is members(pool)[1].library  # one shared library
    recipes = {ANN: Recipe("a cat", loras={"ink": 0.8}, seed=5, steps=3, width=64, height=64),
               BOB: Recipe("a house", loras={"neon": 0.6, "ink": 0.3}, seed=7, steps=3, width=64, height=64)}
    times = {o: [] for o in recipes}
    outs, errors = {}, []

    def render(owner):
        def step(done, total):  # inside the render: the pipeline is held while this runs
            times[owner].append(time.monotonic())
            time.sleep(STEP_PAUSE_S)
        try:
            outs[owner] = pooled.compose(owner, recipes[owner], progress=step, score=False)
        except Exception as e:  # noqa: BLE001  (reported below, with the other thread joined)
            errors.append(e)

    pool.slots.grants.clear()
    threads = [threading.Thread(target=render, args=(o,), name=o) for o in recipes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    (a0, a1), (b0, b1) = [(times[o][0], times[o][-1]) for o in recipes]
    assert a0 < b1 and b0 < a1, f"the renders did not overlap: {times}"  # each started before the other ended
    used = {slot for _, name, slot in pool.slots.grants if name in recipes}
    assert used == {0, 1}, pool.slots.grants  # one pipeline each

    # each image equals what one pipeline alone makes for the same recipe
    from stylemix.mixer import Mixer
    from stylemix.models import load_model

    single = Mixer(load_model("tiny", "cpu", replica=7), pooled.library)  # a third copy, never in the pool
    for owner, recipe in recipes.items():
        ref = single.generate(recipe).images[0]
        from PIL import Image

        got = Image.open(outs[owner].image_paths[0])
        assert np.array_equal(pixels(got), pixels(ref)), owner


def test_previews_experiments_and_library_changes_work_on_a_pool(pooled, tmp_path, monkeypatch):
    pool = pooled.mixer
    preview = pooled.preview(ANN, Recipe("a cat", loras={"ink": 1.0}, steps=4, width=64, height=64))
    assert preview is not None and preview.image.size[0] > 0
    # each pipeline has its own preview scheduler (one object would share the running loop's state)
    per = pooled.previewer._per_pipeline
    assert len(per) == 2 and len({id(s) for s, _ in per.values()}) == 2
    pool.slots.grants.clear()
    run = pooled.run_experiment(BOB, "protocol", ["ink", "neon"], ["a cat"], [0, 1], steps=2, size=64)
    assert run["kind"] == "protocol"
    assert all(p == gpu_queue.BACKGROUND for p, _, _ in pool.slots.grants)  # experiments yield to renders
    # the experiment's images spread over both pipelines, and its files are those of one pipeline alone
    assert sorted({slot for _, _, slot in pool.slots.grants}) == [0, 1], pool.slots.grants
    monkeypatch.delenv("STYLEMIX_DEVICES")
    single = StyleMixService.start("tiny", pooled.workspace, examples=False)  # one pipeline
    assert not isinstance(single.mixer, MixerPool)
    alone = single.run_experiment(BOB, "protocol", ["ink", "neon"], ["a cat"], [0, 1], steps=2, size=64)
    for f in ("results.csv", "summary.csv"):
        a, b = (run["protocol"].out_dir / f).read_text(), (alone["protocol"].out_dir / f).read_text()
        assert a == b, (f, a, b)
    # a rename waits for every pipeline (`pool.lock`), then both see the new name
    from helpers import make_lora_file

    pooled.import_lora(ANN, str(make_lora_file(tmp_path / "s.safetensors", seed=3)), "annstyle")
    pooled.rename_lora(ANN, "annstyle", "annstyle2")
    out = pooled.compose(ANN, Recipe("a cat", loras={"annstyle2": 0.5}, steps=1, width=64, height=64), score=False)
    assert out.result.weights_used == {"annstyle2": 0.5}
    assert pool.slots.busy() == 0 and not pool.slots.waiting()


def test_each_pipeline_of_a_pool_is_warmed_up_on_its_own(pooled, monkeypatch):
    """Compiling (CUDA only) is per pipeline: each compiles and renders its warm-up shapes itself, so no
    user's first render on the second GPU waits for a compile.  The compile itself is stubbed here."""
    import stylemix.accel as accel

    compiled = []
    monkeypatch.setattr(accel, "compile_pipeline", lambda pipe: compiled.append(pipe))
    monkeypatch.setattr(accel, "fuse_qkv_wanted", lambda: False)
    pool = pooled.mixer
    pool.slots.grants.clear()
    pooled.compile_and_warm_up()
    assert compiled == [m.pipe for m in members(pool)]
    assert sorted({slot for _, _, slot in pool.slots.grants}) == [0, 1]
