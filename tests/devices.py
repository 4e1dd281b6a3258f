"""The devices a test can run on: a `device` fixture over "cpu", plus "cuda" where torch sees a GPU (skipped,
with the reason, where it does not). A test module takes it with `device = devices.device`
(an assignment, not `from devices import device`, which ruff reads as an import the argument shadows)."""

from __future__ import annotations

import pytest
import torch

DEVICES = ("cpu", "cuda")


def skip_reason(device: str) -> str | None:
    """Why `device` cannot run here, or None when it can."""
    if device == "cuda" and not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}, cuda.is_available() is False)"
    return None


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """"cpu" or "cuda"; the CUDA run is skipped on a machine without a GPU."""
    reason = skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param
