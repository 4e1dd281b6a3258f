"""What this CPU multiplies natively, as the rollout backends decide their dtype by it."""

from __future__ import annotations


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), as vLLM decides it."""
    import torch

    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(is_amx()) if callable(is_amx) else False


def cpu_has_bf16_dot() -> bool:
    """Whether this CPU multiplies bfloat16 natively: AMX tiles, or AVX-512 BF16 (Zen 4 EPYCs, Cooper Lake).
    Elsewhere oneDNN converts every bfloat16 matmul to float32 and back."""
    if cpu_has_amx():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)
    except OSError:
        return False
