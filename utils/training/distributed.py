"""What DDP ranks must agree on, and the collectives that make them agree.

A decision that one rank takes alone (stop now, shrink alpha, save best) can hang a run: the
rank that stops leaves the others waiting in the next all-reduce until the NCCL timeout. So
the trainer reduces epoch metrics over all ranks (`reduce_sums`), lets rank 0 decide and
broadcasts the decision (`broadcast_object`), and asks every rank before stopping on a
non-finite loss (`any_rank`). Every function here is a no-op (returns its input) in a
single-process run, and is collective in a distributed one: all ranks must call it, in the
same order.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _device() -> torch.device:
    """Where collective tensors live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_sums(values: Mapping[str, float], op: str = "sum") -> Dict[str, float]:
    """Element-wise sum (op="sum") or maximum (op="max") of a name -> number mapping over
    ranks. Every rank must pass the same names; the result is identical on all ranks."""
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    if not is_distributed():
        return {k: float(v) for k, v in values.items()}
    names = sorted(values)
    # The names go along, so ranks that log other sets of parts all fail loudly, not silently.
    every = all_gather_object(names)
    if any(other != names for other in every):
        raise RuntimeError(f"ranks reduce different metrics: {every}")
    tensor = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(names, tensor.tolist()))


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one rank."""
    if not is_distributed():
        return bool(flag)
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` (any picklable object) on every rank."""
    if not is_distributed():
        return obj
    box: List[Optional[T]] = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]  # type: ignore[return-value]


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out

