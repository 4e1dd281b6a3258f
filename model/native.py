"""C++ kernels of ours, built on first use with the machine's compiler (torch.utils.cpp_extension) and
cached beside the compiled decode packages. Only the compiled decode step uses them (it needs a compiler
anyway); the eager paths stay plain PyTorch.

latent_attention: one decode step of weight-absorbed MLA attention in a single pass over each sequence's
latent context (see csrc/latent_attention.cpp). PyTorch's batched matmuls read the context twice, once
for the scores and once for the values; this reads each tile of positions from memory once, with an
online softmax, and multiplies four heads by two rows at a time in AVX2 registers (a portable loop
elsewhere)."""

from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "latent_attention.cpp"


def _build_dir(flags: list[str]) -> Path:
    from .compiled import cache_dir  # the same cache root as the AOTI packages

    # -march=native code is only valid on this CPU's instruction set: keyed by it, torch's version, the flags
    # and the source
    key = f"{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|{flags}|{SOURCE.read_bytes().hex()}"
    return cache_dir().parent / "ext" / f"latent_attention-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@cache
def latent_attention_kernel(verbose: bool = False, portable: bool = False):
    """The built extension's `latent_attention(q [B, H, R], context [B, C, R], bias [B, S], rank, scale)
    -> [B, H, rank]` (float32). Compiles once per machine (some 30 s), then loads the cached library.
    portable: without the AVX2 code (what other CPUs run; for tests)."""
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-march=native", "-fopenmp"] + (["-DR1_PORTABLE"] if portable else [])
    build = _build_dir(flags)
    if verbose and not any(build.glob("*.so")):
        print("compiling the decode step's latent attention kernel (once per machine) ...", flush=True)
    build.mkdir(parents=True, exist_ok=True)
    name = "r1_grpo_latent_attention" + ("_portable" if portable else "")
    module = load(name=name, sources=[str(SOURCE)], build_directory=str(build), extra_cflags=flags,
                  extra_ldflags=["-fopenmp"], verbose=bool(os.environ.get("R1_GRPO_VERBOSE_BUILD")))
    return module.latent_attention
