"""C++ kernels of ours, built on first use with the machine's compiler (torch.utils.cpp_extension) and
cached beside the compiled decode packages. Only the compiled decode step uses them (it needs a compiler
anyway); the eager paths stay plain PyTorch.

latent_attention: one decode step of weight-absorbed MLA attention in a single pass over each sequence's
    latent context (csrc/latent_attention.cpp). PyTorch's batched matmuls read the context twice, once
    for the scores and once for the values; this reads each tile of positions from memory once, with an
    online softmax, and multiplies four heads by two rows at a time in AVX2 registers (a portable loop
    elsewhere).
latent_attention_paged: the same, reading the paged cache in place through block tables (no gather).
routed_experts: a decode step's routed experts, each on exactly its own tokens (csrc/routed_experts.cpp)."""

from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / f for f in ("latent_attention.cpp", "routed_experts.cpp", "bindings.cpp")]


def cache_dir() -> Path:
    """Where compiled packages are kept: $R1_GRPO_CACHE/aoti, else ~/.cache/r1-grpo/aoti ($XDG_CACHE_HOME honoured).
    The kernels built here sit beside them (`cache_dir().parent / "ext"`); `model.compiled` imports this."""
    root = os.environ.get("R1_GRPO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "r1-grpo"
    return Path(root) / "aoti"


def _build_dir(flags: list[str]) -> Path:
    # -march=native code is only valid on this CPU's instruction set: keyed by it, torch's version, the flags
    # and the sources
    source = b"".join(f.read_bytes() for f in SOURCES).hex()
    key = f"{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|{flags}|{source}"
    return cache_dir().parent / "ext" / f"decode_kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@cache
def decode_kernels(verbose: bool = False, portable: bool = False):
    """The built extension, a module with (float32, CPU tensors):
        latent_attention(q [B, H, R], context [B, C, R], bias [B, S], rank, scale) -> [B, H, rank]
        latent_attention_paged(q [B, H, R], pool [N, R], block_tables [B, W] int32, lengths [B] int64,
                               block_size, rank, scale) -> [B, H, rank]
        routed_experts(base [N, D], x [N, D], weights [N, K], expert_ids [N, K] int64,
                       gate_up [E, ceil(I/8), D, 16], down [E, ceil(D/16), I, 16] (`Experts.packed_weights`))
            -> base + the experts' weighted sum [N, D]
    Compiles once per machine (some 50 s), then loads the cached library.
    portable: without the AVX2 code (what other CPUs run; for tests)."""
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-march=native", "-fopenmp"] + (["-DR1_PORTABLE"] if portable else [])
    build = _build_dir(flags)
    if verbose and not any(build.glob("*.so")):
        print("compiling the decode step's C++ kernels (once per machine) ...", flush=True)
    build.mkdir(parents=True, exist_ok=True)
    name = "r1_grpo_decode_kernels" + ("_portable" if portable else "")
    return load(name=name, sources=[str(f) for f in SOURCES], build_directory=str(build), extra_cflags=flags,
                extra_ldflags=["-fopenmp"], verbose=bool(os.environ.get("R1_GRPO_VERBOSE_BUILD")))
