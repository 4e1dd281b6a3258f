"""Shared by the kernel tests: Triton's interpreter switched on for CPU tensors (it must be, before triton is
first imported), and a `device` fixture over the devices the Triton kernels can run on here.

In the whole suite an earlier test module has imported triton already (transformers imports torch._dynamo,
which imports triton): the CPU cases then skip here and tests/test_kernels_interpreted.py runs these modules
again in a subprocess with TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from model.kernels import _triton


def triton_devices() -> list:
    """CUDA where present; the CPU through Triton's interpreter where it could be switched on."""
    params = []
    if torch.cuda.is_available():
        params.append("cuda")
    reason = ("triton is not installed" if not _triton.available() else
              "triton was imported before TRITON_INTERPRET=1 could be set (test_kernels_interpreted.py runs these in "
              "a subprocess)" if not _triton.interpreting() else None)
    params.append(pytest.param("cpu", marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return params


@pytest.fixture(params=triton_devices())
def device(request) -> torch.device:
    return torch.device(request.param)
