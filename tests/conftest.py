"""Settings for every test: no telemetry from BentoML, no network at run time."""

from __future__ import annotations

import os

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_global_state():
    """Each test leaves torch's process-wide settings as it found them: a CLI's main() run in-process may turn
    autograd off or set the thread count (as the real command does for its own process)."""
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    yield
    torch.set_grad_enabled(grad)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
