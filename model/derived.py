"""Weights derived from a module's parameters for inference (transposed, stacked or absorbed copies), kept
while the parameters stand and remade when they change. Remade in place: the tensors keep their addresses,
so a CUDA graph captured over them reads the new values (the rollout engine's decode graphs)."""

from __future__ import annotations

from collections.abc import Callable

import torch


class DerivedWeights:
    """One module's derived tensors and the key (parameter addresses and versions) they were made from."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.tensors: tuple[torch.Tensor | None, ...] | None = None

    def get(self, key: tuple, make: Callable[[], tuple[torch.Tensor | None, ...]]) -> tuple[torch.Tensor | None, ...]:
        """The tensors for `key`: kept, or made by `make()`, into the old tensors where each has the same
        shape and dtype."""
        if self.tensors is not None and self.key == key:
            return self.tensors
        fresh = make()
        old = self.tensors
        if old is not None and all(_same(a, b) for a, b in zip(old, fresh)):
            with torch.no_grad():
                for a, b in zip(old, fresh):
                    if a is not None:
                        a.copy_(b)
        else:
            self.tensors = fresh
        self.key = key
        return self.tensors

    def mark_stale(self) -> None:
        """Remake at the next `get` whatever the key (a change the versions do not show: an optimizer such as
        fused AdamW writes the parameters without bumping their version counters)."""
        self.key = None

    def refresh(self, getter: Callable[[], object]) -> None:
        """Remake now, in place, if made before: `getter` is the module's accessor that calls `get`."""
        self.mark_stale()
        if self.tensors is not None:
            getter()


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
