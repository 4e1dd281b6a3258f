"""The kernel tests' CPU cases under Triton's interpreter, in a subprocess, for sessions where triton was
imported before they could switch the interpreter on (the whole suite: see tests/kernels_helpers.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["tests/test_kernels_decode_attention.py", "tests/test_kernels_lm_head.py", "tests/test_kernels_moe.py",
           "tests/test_kernels_sampling.py"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_tests_pass_under_the_triton_interpreter():
    helpers = sys.modules.get("tests.kernels_helpers")
    if helpers is not None and helpers._triton.interpreting():
        pytest.skip("the kernel tests ran in this process, under the interpreter")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *MODULES],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "imported before TRITON_INTERPRET" not in run.stdout, run.stdout[-3000:]
