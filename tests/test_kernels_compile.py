"""Every Triton kernel of model.kernels compiles for sm_90 (H100/H200) and sm_80 (A100) at the tile sizes the
dispatch launches, within the card's shared memory: checked here without a GPU (`python -m model.kernels.aot`,
in a subprocess, since the test process runs Triton's interpreter). Prints shared memory and wgmma use."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# not imported here: this process's triton must first be put in interpreter mode (tests/kernels_helpers.py)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
ROOT = Path(__file__).resolve().parents[1]


def _compile(only: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    runs = [subprocess.Popen([sys.executable, "-m", "model.kernels.aot", "--arch", arch, "--only", only],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for arch in ("90", "80")]  # one process per architecture, side by side
    failed = []
    for run in runs:
        out, _ = run.communicate(timeout=600)
        print(out)
        if run.returncode != 0:
            failed.append(out)
    assert not failed, "\n".join(failed)


def test_every_kernel_compiles_for_sm90_and_sm80_in_bfloat16():
    _compile("[bf16]")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_every_kernel_compiles_for_sm90_and_sm80_in_other_dtypes(dtype):
    _compile(f"[{dtype}]")


def test_lm_head_chunked_row_kernels_compile_for_sm90_and_sm80_in_every_dtype():
    """The CUDA default LM head's row kernels (no tl.dot, a few seconds) in each dtype the logits can have."""
    _compile("lm_head_chunked")
