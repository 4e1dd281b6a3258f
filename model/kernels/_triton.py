"""Where the Triton kernels run: compiled for a CUDA device, or in Triton's interpreter for CPU tensors
(tests on machines without a GPU). Triton is optional: without it every entry takes another path."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the entries fall back to the reference or C++ paths
    triton = None
    tl = None


def available() -> bool:
    """Whether Triton is importable."""
    return triton is not None


def jit(fn):
    """triton.jit, or the plain function when Triton is absent (its module still imports)."""
    return fn if triton is None else triton.jit(fn)


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels ($TRITON_INTERPRET=1 when triton was first imported)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def launcher(kernel, device: torch.device):
    """The kernel, checked to be runnable on tensors of `device`: compiled on CUDA, or on CPU tensors by
    Triton's interpreter (numpy: slow, for tests; float32 and float16 - its bfloat16 dot is wrong), which
    must have been switched on ($TRITON_INTERPRET=1) before triton was first imported."""
    if triton is None:
        raise RuntimeError("the Triton path needs triton (pip install 'triton>=3.6')")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton kernels run on CUDA tensors, got {device.type}; for CPU tensors set "
                           f"TRITON_INTERPRET=1 before triton is first imported")
    return kernel


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
