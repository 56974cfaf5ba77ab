"""Test set-up: offline, few threads (CI has 2 cores), tiny models only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("STYLEMIX_MODEL", "tiny")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from stylemix.models import quiet_library_logs  # noqa: E402

quiet_library_logs()


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
