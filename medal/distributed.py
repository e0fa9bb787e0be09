"""Running under torchrun: process-group setup and the few collective steps medal needs.

``torchrun --nproc-per-node N -m medal query -c CONFIG`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in the environment. medal then uses NCCL on
GPUs and gloo on CPU. Rank 0 alone owns the workspace (ledger, checkpoints, exports); the other
ranks only read the model and images and send their results to rank 0.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else \
        int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device_name: str) -> torch.device:
    """Join the process group started by torchrun (once) and return this rank's device."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=_dt.timedelta(minutes=60))
    return torch.device("cuda", local) if use_cuda else torch.device("cpu")


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled)."""
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order); ``None`` elsewhere."""
    out: list[Any] | None = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
