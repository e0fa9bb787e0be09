"""Running under torchrun: process-group setup and the few collective steps medal needs.

``torchrun --nproc-per-node N -m medal query -c CONFIG`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in the environment. medal then uses NCCL on
GPUs and gloo on CPU. Rank 0 alone owns the workspace (ledger, checkpoints, exports); the other
ranks only read the model and images and send their results to rank 0.

Every command is one code path for one process or many (as torchvision's reference
``train.py`` with its ``save_on_master``): plan on rank 0 (:func:`on_main`, :func:`main_only`),
work on every rank (:func:`my_share` of the batches), finish on rank 0 with what
:func:`gather` brought. With one process (no torchrun) every helper is a pass-through.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeGuard, TypeVar

import torch
import torch.distributed as dist

from .errors import MedalError

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world_size() > 1


def rank() -> int:
    return (
        dist.get_rank()
        if dist.is_available() and dist.is_initialized()
        else int(os.environ.get("RANK", "0"))
    )


def is_main() -> bool:
    return rank() == 0


def ranks() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` without torchrun."""
    return rank(), world_size()


def init(device_name: str) -> torch.device:
    """Join the process group started by torchrun (once) and return this rank's device."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=_dt.timedelta(minutes=60))
    return torch.device("cuda", local) if use_cuda else torch.device("cpu")


def setup(device_name: str) -> torch.device:
    """This process's device: under torchrun, join the process group (:func:`init`); with one
    process, the configured device (``"auto"``: CUDA when available)."""
    if is_distributed():
        return init(device_name)
    from .models import resolve_device

    return resolve_device(device_name)


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled); ``obj`` itself with one process."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order); ``None`` elsewhere; ``[obj]`` with one
    process."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn()`` on rank 0 and hand its result, or its :class:`MedalError`, to every rank
    (so all ranks stop together with rank 0's message); with one process, ``fn()``."""
    if not is_distributed():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except MedalError as e:
            error = e
    result, error = broadcast((result, error))
    if error is not None:
        raise error
    return result


@contextmanager
def main_only(open_: Callable[[], AbstractContextManager[T]]) -> Iterator[T | None]:
    """``with open_() as x`` on rank 0 (e.g. the workspace, which only rank 0 opens); ``None``
    on the other ranks."""
    if not is_main():
        yield None
        return
    with open_() as x:
        yield x


def on_rank0(held: T | None) -> TypeGuard[T]:
    """Whether this process is rank 0, the one that holds ``held`` (what :func:`main_only`
    opened, or what only rank 0 made); every other rank holds ``None``. The named spelling
    of ``held is not None`` in code that runs on every rank."""
    if (held is not None) != is_main():
        has = "holds" if held is not None else "lacks"
        raise RuntimeError(f"rank {rank()} {has} what only rank 0 holds")
    return held is not None


def my_share(n: int) -> range:
    """This rank's share of ``n`` items (e.g. scoring batches): every world-size-th from its
    rank; all of them with one process."""
    return range(rank(), n, world_size()) if is_distributed() else range(n)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _GatherRows(torch.autograd.Function):
    """All ranks' rows ``[n_r, ...]`` -> ``[sum n_r, ...]`` in rank order; the backward pass
    returns each rank the gradient of its own rows (every rank computes the same loss from the
    gathered rows, so its rows' gradient is complete without a reduction)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        r, biggest = dist.get_rank(), max(sizes)
        ctx.rows = (sum(sizes[:r]), sum(sizes[: r + 1]))
        padded = torch.zeros((biggest, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        lo, hi = ctx.rows
        return grad[lo:hi], None


def gather_rows(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Every rank's ``x [sizes[rank], ...]`` concatenated in rank order ``[sum(sizes), ...]``,
    differentiable (for a loss every rank computes alike from all rows, as NT-Xent over the
    global batch); ``x`` itself when ``sizes`` has one rank."""
    if len(sizes) == 1:
        return x
    return _GatherRows.apply(x, tuple(sizes))


def sum_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Add up the gradients of ``params`` over the ``world`` ranks (each rank's gradient is
    its share of one loss); nothing with one."""
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def shard(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous rows of a batch of ``n`` split over ``world`` ranks (sizes
    differ by at most one, lower ranks first): each rank a part of every batch."""
    lo = rank * (n // world) + min(rank, n % world)
    return range(lo, lo + n // world + (rank < n % world))


def shard_sizes(n: int, world: int) -> tuple[int, ...]:
    """The size of every rank's :func:`shard` of a batch of ``n``, in rank order."""
    return tuple(len(shard(n, r, world)) for r in range(world))
