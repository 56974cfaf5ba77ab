"""Test set-up: offline, few threads (CI has 2 cores), tiny models only.

Default runs (`-m 'not slow'`, from pyproject's addopts) are always offline: nothing is ever
downloaded.  A run that selects the slow tests (`pytest -m slow`), which use real checkpoints,
stays online when the Hugging Face hub answers, so they can download what is not cached yet;
when it does not, the run goes offline (cached weights are still used, nothing waits on the hub's
retries) and the tests that need a download skip with `HUB_UNREACHABLE`, the reason.

The hub client reads HF_HUB_OFFLINE when it is first imported, so the choice is made in
`pytest_configure` (the marker expression is known there) before anything imports it.
"""

import os
import socket
from urllib.parse import urlparse

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("STYLEMIX_MODEL", "tiny")
# Tests that do not name a style judge get CLIP, whatever is installed on this machine (a local CSD
# install would otherwise change every default score); the CSD tests name their judge.
os.environ.setdefault("STYLEMIX_STYLE_JUDGE", "clip")

HUB_PROBE_TIMEOUT_S = 3.0
HUB_UNREACHABLE: str | None = None  # why the hub cannot be used in this run (None: it can)


def _selects_slow(markexpr: str) -> bool:
    """Whether `-m markexpr` selects a test marked only `slow`."""
    if not markexpr:
        return False  # no -m at all: pyproject's addopts always sets one; a bare run is a default run
    try:
        from _pytest.mark.expression import Expression

        return bool(Expression.compile(markexpr).evaluate(lambda name, **_: name == "slow"))
    except Exception:  # a pytest without that module: read the expression plainly
        return "slow" in markexpr and "not slow" not in markexpr


def _hub_unreachable() -> str | None:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"the Hugging Face hub ({host}) cannot be reached: {e}"
    return None


def pytest_configure(config):
    global HUB_UNREACHABLE
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        HUB_UNREACHABLE = "HF_HUB_OFFLINE is set"
    elif not _selects_slow(config.getoption("markexpr", "")):
        HUB_UNREACHABLE = "default test runs are offline (select the real-model tests with -m slow)"
    else:
        HUB_UNREACHABLE = _hub_unreachable()
    if HUB_UNREACHABLE:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"

    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    from stylemix.models import quiet_library_logs

    quiet_library_logs()


def hub_or_skip(what: str) -> None:
    """Skip, naming why, when `what` is not cached and the hub cannot be used in this run."""
    if HUB_UNREACHABLE:
        pytest.skip(f"{what} is not in the local cache and {HUB_UNREACHABLE}")


@pytest.fixture
def tiny_pipe():
    """A fresh tiny SD1.5 pipeline (random weights, seed 0): safe to add adapters to."""
    from stylemix.models import tiny_pipeline

    return tiny_pipeline()


@pytest.fixture
def workspace(tmp_path):
    from stylemix.paths import Workspace

    ws = Workspace.at(tmp_path)
    for p in (ws.loras, ws.data, ws.jobs, ws.outputs):
        p.mkdir(parents=True)
    return ws
