"""The machine a figure came from: the CPU's model, its widest vector instruction set and the threads used.

Every bench puts `cpu_info()` in its JSON, so a figure always says which CPU produced it (the project's
machines are either AVX2-only AMD EPYCs or Intel Xeons with AVX-512 and AMX, and the ratios differ between
them). `.ci/run` prints it too:

    python bench/machine.py
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

# The flags that decide which kernels run (ours, PyTorch's oneDNN, vLLM's), widest last.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_info(threads: int | None = None) -> dict:
    """{"model", "isa" ("amx" | "avx512" | "avx2" | the architecture), "flags" (those of ISA_FLAGS present),
    "cores" (this process may use), "threads" (torch's intra-op threads, or the given count)}."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = ("amx" if "amx_bf16" in flags else "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags
           else platform.machine())
    if threads is None:
        try:
            import torch

            threads = torch.get_num_threads()
        except ImportError:
            threads = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "isa": isa, "flags": [f for f in ISA_FLAGS if f in flags], "cores": cores,
            "threads": threads}


def describe(info: dict) -> str:
    """One line for logs and tables: 'AMD EPYC (avx512: avx2 fma avx512f avx512_bf16), 2 cores'."""
    return f"{info['model']} ({info['isa']}: {' '.join(info['flags']) or 'no listed flags'}), {info['cores']} cores"


if __name__ == "__main__":
    info = cpu_info()
    print(describe(info))
    print(json.dumps(info))
