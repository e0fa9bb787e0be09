"""Memory estimates: refuse a training that cannot fit instead of being killed by the kernel.

Training holds every labelled, validation and test image in memory as float32
``[C, S, S]`` (``data.load_all``) and keeps each layer's output of a batch for the backward
pass. Both grow with ``model.image_size`` squared: at 2048 one image through ``small_cnn``
keeps about 2 GB of activations, so the default batch of 32 needs ~70 GB. The activations per
image are measured exactly, without memory, by running the model on PyTorch's ``meta``
device (shapes only).

The estimate is compared with the memory available: ``MemAvailable`` from ``/proc/meminfo``
and, inside a container, the room left under its cgroup limit; where neither is known (not
Linux) nothing is checked. ``MEDAL_MEMORY_CHECK=off`` in the environment skips the check.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from .config import Config
from .errors import ConfigError
from .models import create_model

MEMORY_CHECK_ENV = "MEDAL_MEMORY_CHECK"
"""Set to ``off`` to skip the memory check (e.g. when swap makes room the estimate ignores)."""

HEADROOM = 0.9
"""Share of the available memory a command may plan to use."""


def available_memory() -> int | None:
    """Bytes this process can still allocate: ``MemAvailable`` and, under a cgroup (v2 or
    v1) memory limit, the room left below it; ``None`` where unknown."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = int(Path("/sys/fs/cgroup", usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            found.append(max(int(limit) - usage, 0))
    return min(found) if found else None


def activation_bytes(cfg: Config) -> tuple[int, int]:
    """``(training, inference)`` bytes of float32 activations per image of the configured
    model at ``model.image_size``: the sum of every layer's output (kept for the backward
    pass), and the largest input + output of one layer (all inference needs at once).
    Measured on the ``meta`` device: no memory is used, no weights are read."""
    m = cfg.model
    with torch.device("meta"):
        model = create_model(m.name, len(cfg.classes), in_channels=m.channels,
                             dropout=m.dropout, hidden=m.hidden,
                             backbone_dropout=m.backbone_dropout)
    total, largest = 0, 0

    def hook(mod: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal total, largest
        if isinstance(output, torch.Tensor):
            size_in = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))
            total += output.numel()
            largest = max(largest, size_in + output.numel())

    leaves = [mod for mod in model.modules() if not list(mod.children())]
    handles = [mod.register_forward_hook(hook) for mod in leaves]
    try:
        with torch.no_grad():
            model.eval()
            model(torch.empty(1, m.channels, m.image_size, m.image_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return 4 * total, 4 * largest


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_training_memory(cfg: Config, n_images: int, n_eval: int,
                          device: torch.device) -> None:
    """Raise :class:`ConfigError` (one line naming the keys, with a batch size or image size
    that fits) when training is estimated not to fit: ``n_images`` held in memory in all,
    of which the largest evaluation set (validation or test) has ``n_eval``.

    Host memory holds the images (twice while they are gathered) and, on the CPU, the
    activations of one training batch (or of one validation batch, at most 512 images, if
    larger) and the weights with their AdamW state. On CUDA the activations are compared
    with the GPU's free memory instead.
    """
    if os.environ.get(MEMORY_CHECK_ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return
    m, t = cfg.model, cfg.train
    image = 4 * m.channels * m.image_size ** 2
    held = 2 * n_images * image
    train_act, infer_act = activation_bytes(cfg)
    val_batch = min(512, n_eval)  # train.predict_deterministic's batch
    act = max(t.batch_size * train_act, val_batch * infer_act)
    params = 16 * sum(p.numel() for p in create_model(
        m.name, len(cfg.classes), in_channels=m.channels, hidden=m.hidden).parameters())
    on_gpu = device.type == "cuda"
    host_need = held + (0 if on_gpu else act + params)
    host_free = available_memory()
    checks = [("memory", host_need, host_free)]
    if on_gpu:
        checks.append(("GPU memory", act + params, torch.cuda.mem_get_info(device)[0]))
    for what, need, free in checks:
        if free is None or need <= HEADROOM * free:
            continue
        room = HEADROOM * free - (held if what == "memory" else 0) - params
        batch = int(room // train_act) if room > 0 else 0
        batch = 2 ** int(math.log2(batch)) if batch >= 1 else 0
        scale = math.sqrt(HEADROOM * free / need)
        size = max(8, int(m.image_size * scale) // 8 * 8)
        fixes = [f"train.batch_size = {batch}"] if batch >= 1 and \
            batch * train_act >= val_batch * infer_act else []
        fixes.append(f"model.image_size = {size}")
        raise ConfigError(
            f"not enough {what} to train: about {_gb(need)} needed, {_gb(free)} available "
            f"(model.image_size = {m.image_size}: {n_images} images held in memory "
            f"{_gb(held)}, one batch of train.batch_size = {t.batch_size} through "
            f"{m.name} {_gb(t.batch_size * train_act)}); set {' or '.join(fixes)} "
            f"({MEMORY_CHECK_ENV}=off skips this check)")
