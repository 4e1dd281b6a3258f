"""Data parallelism on PyTorch's own stack: the process group from torchrun's environment, DDP or FSDP2
(`fully_shard`) around the trained module, and the few collectives the trainer needs (sums of counts and
metrics, gathers of small per-rank lists, full weights and optimizer state for checkpoints).

Every helper is the identity (or a no-op) when no process group is running, so a single-process run needs
none and behaves exactly as before. The trainer's use of this module is described in docs/distributed.md."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

Parallel = Literal["ddp", "fsdp"]


# ----- the process group ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """This process's place among the training processes (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def backend(device: torch.device | str = "cpu") -> str:
    """gloo when the models live on the CPU; on CUDA, NCCL for the CUDA tensors (gradients, the routers'
    expert loads) and gloo still for the few CPU ones (counts, metrics, pickled objects), each collective
    picking by its tensors' device."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def world_from_env() -> World:
    """This process's place as torchrun describes it (RANK, WORLD_SIZE, LOCAL_RANK); one process without it."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def init_from_env(device: torch.device | str = "cpu") -> World:
    """Joins the process group torchrun describes in the environment, with the backend for `device` (this
    rank's, `grpo.build.resolve_device`: cuda:LOCAL_RANK on GPUs); one process (no WORLD_SIZE, or 1) starts
    none. Rendezvous (MASTER_ADDR/PORT, or torchrun's c10d store across nodes) comes from the env."""
    world = world_from_env()
    if world.world_size > 1 and not is_distributed():
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's communicator and the default CUDA device: this rank's GPU
        dist.init_process_group(backend(device))
    return world


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ----- collectives on small things --------------------------------------------------------------------------
def all_reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """Sums each value over the ranks; every rank must pass the same keys. float64 so counts stay exact."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sums a tensor over the ranks in place (and returns it)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on at least one: a loop all ranks leave together."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(value: int) -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable, small), in rank order; [obj] in one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----- the trained module -----------------------------------------------------------------------------------
def wrap(module: nn.Module, parallel: Parallel, blocks: Sequence[nn.Module] = ()) -> nn.Module:
    """The module whose backward reduces gradients over the ranks.

    ddp:  DistributedDataParallel. Buffers are not synced from rank 0 at each forward: the per-rank
          expert-load counters must stay per rank, and the routing bias is kept equal by the trainer.
    fsdp: FSDP2. Each of `blocks` (the decoder layers) is sharded as its own unit, then the rest (embedding,
          final norm, LM head) with the root; parameters, gradients and the optimizer's state built on them
          are sharded along dim 0 over the ranks. The module is sharded in place; the returned object is
          `module` itself.
    Both reduce by the MEAN over ranks; the trainer's losses are normalized by global counts, so it
    multiplies them by the world size to get the sum (see `loss_scale`).
    """
    if not is_distributed():
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, forward_sync_buffers=False)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = next(module.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")


def loss_scale() -> int:
    """What each rank multiplies its loss by before the backward: DDP and FSDP average the gradients over
    the W ranks, but a loss already divided by the global batch's token count must have its gradients
    SUMMED over ranks (the ranks' losses add up to the global loss). W * mean = sum."""
    return dist.get_world_size() if is_distributed() else 1


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Around a micro-batch's forward and backward: with enabled=False the gradients only accumulate
    locally (DDP's no_sync, FSDP2's requires_gradient_sync); the last micro-batch of a step reduces them."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with model.no_sync() if not enabled else nullcontext():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ that also takes FSDP's sharded (DTensor) gradients; returns the global norm."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor: the norm reduced over the shards
        norm = norm.full_tensor()
    return float(norm)


# ----- full (unsharded) state -------------------------------------------------------------------------------
def _full(value: Any) -> Any:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """module.state_dict() with FSDP's shards gathered into whole tensors (a collective under FSDP: every
    rank calls it); plain tensors are returned as they are."""
    return {k: _full(v) for k, v in module.state_dict().items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state, whole (unsharded) and keyed by parameter NAME, not by position: it loads
    into any number of ranks, sharded or not. Every rank calls it (FSDP gathers); the result is complete on
    rank 0 and may be empty elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    offload = is_distributed()  # gather into rank 0's CPU memory only
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=offload))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Loads `optimizer_state`'s result on every rank (each shard takes its part)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if any(isinstance(p, int) for group in state["param_groups"] for p in group["params"]):
        optimizer.load_state_dict(state)  # a checkpoint written before names were used: by position
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
