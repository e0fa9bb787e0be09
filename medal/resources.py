"""Memory estimates: refuse a command that cannot fit instead of being killed by the kernel.

Training holds every labelled, validation and test image in memory as float32
``[C, S, S]`` (``data.load_all``, once) and keeps each layer's output of a batch for the
backward pass; the pool is never held: scoring it and computing its backbone features read
it a batch at a time. Both grow with ``model.image_size`` squared: at 2048 one image
through ``small_cnn`` keeps about 3 GB of activations, so the default batch of 32 needs
~100 GB. The activations per image are measured exactly, without memory, by running the
model on PyTorch's ``meta`` device (shapes only).

Three commands are estimated, each before it loads an image: training
(:func:`check_training_memory`), scoring the pool (:func:`check_query_memory`: a batch of
images and its activations at a time, the pool's list, and the scores and features of the
whole pool where the selection needs them all) and self-supervised pretraining
(:func:`check_pretraining_memory`: the images are streamed, a few batches in memory at a
time, and two views of a batch keep their activations).

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

from .acquisition import get_strategy
from .companion import companion_decision
from .config import Config, full_sampling
from .errors import ConfigError
from .features import FEATURE_BATCH
from .models import model_from_config

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
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
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
    with torch.device("meta"):
        model = model_from_config(cfg, load_pretrained=False)
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
            size = cfg.model.image_size
            model(torch.empty(1, cfg.model.channels, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return 4 * total, 4 * largest


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _check_off() -> bool:
    return os.environ.get(MEMORY_CHECK_ENV, "").strip().lower() in ("off", "0", "false", "no")


def _power_of_two_below(n: float, least: int = 1) -> int:
    """The largest power of two <= ``n`` (at least ``least``), or 0 if ``n < least``."""
    if n < least:
        return 0
    return 2 ** int(math.log2(n))


def _image_size_that_fits(cfg: Config, need: float, free: int) -> int:
    """``model.image_size`` scaled so that ``need`` (which grows with its square) fits."""
    scale = math.sqrt(HEADROOM * free / need)
    return max(8, int(cfg.model.image_size * scale) // 8 * 8)


def _model_sizes(cfg: Config) -> tuple[int, int]:
    """``(parameters, feature dimension)`` of the configured model, from the ``meta`` device
    (no memory used)."""
    with torch.device("meta"):
        model = model_from_config(cfg, load_pretrained=False)
    return sum(p.numel() for p in model.parameters()), model.feature_dim


def check_training_memory(cfg: Config, n_images: int, n_eval: int, device: torch.device) -> None:
    """Raise :class:`ConfigError` (one line naming the keys, with a batch size or image size
    that fits) when training is estimated not to fit: ``n_images`` held in memory in all,
    of which the largest evaluation set (validation or test) has ``n_eval``.

    Host memory holds the images (once: ``data.load_all`` fills one tensor), the loader's
    batches in flight while they are decoded, and, on the CPU, the activations of one
    training batch (or of one validation batch, at most 512 images, if larger) and the
    weights with their AdamW state. On CUDA the activations are compared
    with the GPU's free memory instead.
    """
    if _check_off():
        return
    m, t = cfg.model, cfg.train
    image = 4 * m.channels * m.image_size**2
    held = (n_images + min(LOAD_BATCH, n_images) * _in_flight(cfg)) * image
    train_act, infer_act = activation_bytes(cfg)
    val_batch = min(512, n_eval)  # train.predict_deterministic's batch
    act = max(t.batch_size * train_act, val_batch * infer_act)
    params = 16 * sum(p.numel() for p in model_from_config(cfg, load_pretrained=False).parameters())
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
        fixes = (
            [f"train.batch_size = {batch}"]
            if batch >= 1 and batch * train_act >= val_batch * infer_act
            else []
        )
        fixes.append(f"model.image_size = {size}")
        raise ConfigError(
            f"not enough {what} to train: about {_gb(need)} needed, {_gb(free)} available "
            f"(model.image_size = {m.image_size}: {n_images} images held in memory "
            f"{_gb(held)}, one batch of train.batch_size = {t.batch_size} through "
            f"{m.name} {_gb(t.batch_size * train_act)}); set {' or '.join(fixes)} "
            f"({MEMORY_CHECK_ENV}=off skips this check)"
        )


LOAD_BATCH = 256
"""The batch of ``data.load_all``, which decodes the sets training holds."""


def _in_flight(cfg: Config) -> int:
    """Batches of decoded images a ``DataLoader`` holds at once: two prefetched per worker
    and the one in use, each twice while it is collated (or pinned)."""
    return 2 * (1 + 2 * cfg.num_workers)


POOL_ITEM_BYTES = 2048
"""Host memory per pool image that any query holds whatever its batch: the image's records
read from the ledger and the folders, its entry in the pool's list (path, id, label), in the
scored rows' ids and flags and in the feature store's index (scripts/bench_pool_scale.py: the
default query's peak grew by 77 to 157 MiB, 1.1 to 2.2 KB per image, from 5,000 to 80,000
images in two runs)."""


def _query_parts(
    cfg: Config,
    n_pool: int,
    n_labelled: int,
    device: torch.device,
    zero_label: bool,
    top_k: bool = False,
) -> tuple[list[tuple[str, float]], float, int, float]:
    """What scoring holds in host memory, as (what, bytes) parts; the bytes per image of
    ``query.batch_size`` (0 where the batch size does not matter), the replicas of a batch in
    one forward call, and the activation bytes of one image (see :func:`check_query_memory`)."""
    m, q = cfg.model, cfg.query
    image = 4 * m.channels * m.image_size**2
    _, infer_act = activation_bytes(cfg)
    params, dim = _model_sizes(cfg)
    T, C = q.mc_samples, len(cfg.classes)
    mode = "full" if full_sampling(cfg) else "head"
    # a frozen backbone's features (or a zero-label start's) are computed by streaming the
    # pool through the backbone in batches of FEATURE_BATCH; the features are kept
    streamed = zero_label or (cfg.train.freeze_backbone and mode == "head")
    on_cpu = device.type != "cuda"
    parts: list[tuple[str, float]] = []
    per_image = 0.0  # bytes per image of query.batch_size (0: the batch size does not matter)
    calls = 1  # replicas of a batch in one forward call
    if streamed:
        batch = min(FEATURE_BATCH, n_pool)
        parts.append(
            (
                f"a batch of {batch} through {m.name} for the backbone features",
                batch * (_in_flight(cfg) * image + on_cpu * infer_act),
            )
        )
    else:
        batch = min(q.batch_size, n_pool)
        if mode == "full":
            max_items = q.max_batch_items or (4096 if device.type == "cuda" else q.batch_size)
            calls = max(1, min(T, max_items // batch))
        per_image = _in_flight(cfg) * image + on_cpu * calls * infer_act
        parts.append(
            (
                f"one batch of query.batch_size = {q.batch_size} through {m.name}"
                + (f" ({calls} replicas at once)" if calls > 1 else ""),
                batch * per_image,
            )
        )
    parts.append((f"the list of {n_pool} pool images", POOL_ITEM_BYTES * n_pool))
    if streamed and not zero_label:
        parts += _companion_parts(cfg, n_pool, n_labelled, on_cpu * infer_act)
    if zero_label:
        parts.append((f"features of {n_pool} images", 2 * 4 * n_pool * dim))
    else:
        if not top_k:  # a selection from every score: features and scores of the whole pool
            parts.append((f"scores of {n_pool} images", 4 * n_pool * (T * C + 2 * dim)))
        if q.cold_start != "off" or get_strategy(q.strategy).needs_labelled_features:
            loading = min(LOAD_BATCH, n_labelled) * _in_flight(cfg)
            parts.append((f"{n_labelled} labelled images held", (n_labelled + loading) * image))
    parts.append(("weights", 4 * params))
    return parts, per_image, calls, infer_act


def _companion_parts(
    cfg: Config, n_pool: int, n_labelled: int, act: float
) -> list[tuple[str, float]]:
    """What the whole-network companion (``train.companion``) adds to a frozen-backbone query:
    its samples of the whole pool (``[N, T, C]`` float32; twice that with
    ``query.companion_samples = "mixture"``, whose stored scores hold 2T samples) and one batch
    of images through it (``act``: the activation bytes of one image where they are counted).
    None where no companion joins ``n_labelled`` labels beside ``n_pool`` pool images
    (:func:`~medal.companion.companion_decision`), or when the scores leave it out
    (``"head"``)."""
    q = cfg.query
    if not companion_decision(cfg, n_labelled, n_pool)[0] or q.companion_samples == "head":
        return []
    image = 4 * cfg.model.channels * cfg.model.image_size**2
    mixture = 2 if q.companion_samples == "mixture" else 1  # the stored scores' T doubles
    return [
        (
            f"the companion's samples of {n_pool} images",
            mixture * 4 * n_pool * q.mc_samples * len(cfg.classes),
        ),
        (
            f"one batch of query.batch_size = {q.batch_size} through the companion",
            min(q.batch_size, n_pool) * (_in_flight(cfg) * image + act),
        ),
    ]


def _batch_fixes(
    cfg: Config,
    n_pool: int,
    need: float,
    free: float,
    per_image: float,
    calls: int,
    infer_act: float,
) -> list[str]:
    """The ``query.batch_size`` (or ``query.max_batch_items``) settings that would fit."""
    q = cfg.query
    if not per_image:
        return []
    fixed = need - min(q.batch_size, n_pool) * per_image
    batch = _power_of_two_below((HEADROOM * free - fixed) / per_image)
    if batch:
        return [f"query.batch_size = {batch}"]
    if calls > 1:  # one replica per call: query.max_batch_items = 0 (auto) on the CPU
        one = per_image - (calls - 1) * infer_act
        batch = _power_of_two_below((HEADROOM * free - fixed) / one)
        if batch:
            return [
                "query.max_batch_items = 0"
                + (f" and query.batch_size = {batch}" if batch < q.batch_size else "")
            ]
    return []


def check_query_memory(
    cfg: Config,
    n_pool: int,
    n_labelled: int,
    device: torch.device,
    *,
    zero_label: bool = False,
    top_k: bool = False,
) -> None:
    """Raise :class:`ConfigError` (one line with the estimate, the memory available and a
    ``query.batch_size`` or ``model.image_size`` that fits) when scoring a pool of ``n_pool``
    images is estimated not to fit in host memory.

    Counted: the images of the batches in flight (``query.batch_size``, with the data
    loader's prefetching: two per worker, and the gathered copy), the activations of one
    forward call on the CPU (``query.batch_size`` images, or up to ``query.max_batch_items``
    replicas of them in full-network sampling; on CUDA a batch that does not fit is halved
    while scoring, so GPU memory is not estimated), the pool's list (:data:`POOL_ITEM_BYTES`
    per image), the scores of the whole pool in float32 (``[N, T, C]``, ``[N, D]`` twice)
    unless the round is the streaming ``top_k`` of a per-image score, the ``n_labelled``
    labelled images where the strategy needs their features (coreset, typiclust) or a cold
    start embeds them. A frozen backbone's features (counted even where the feature store
    holds them) and a ``zero_label`` first round's stream the pool: batches of
    :data:`~medal.features.FEATURE_BATCH` images and their activations, and for the zero-label
    TypiClust the features of the whole pool. Where a companion joins (``train.companion``, for
    ``n_labelled`` labels beside the pool) its samples of the whole pool (``[N, T, C]``
    float32) and one batch through it.
    :func:`check_pretraining_memory` covers a zero-label round's pretraining."""
    if _check_off():
        return
    if zero_label and cfg.representation.method == "none":
        return  # the command refuses: a zero-label start needs a representation
    free = available_memory()
    if free is None or n_pool == 0:
        return
    parts, per_image, calls, infer_act = _query_parts(
        cfg, n_pool, n_labelled, device, zero_label, top_k
    )
    need = sum(b for _, b in parts)
    if need <= HEADROOM * free:
        return
    m = cfg.model
    fixes = _batch_fixes(cfg, n_pool, need, free, per_image, calls, infer_act)
    fixes.append(f"model.image_size = {_image_size_that_fits(cfg, need, free)}")
    what = "choose the first round" if zero_label else "score the pool"
    shown = (
        ", ".join(
            f"{name} {_gb(b)}" for name, b in sorted(parts, key=lambda p: -p[1]) if b >= 0.05e9
        )
        or "each part under 0.1 GB"
    )
    raise ConfigError(
        f"not enough memory to {what}: about {_gb(need)} needed, {_gb(free)} available "
        f"(model.image_size = {m.image_size}: {shown}); set {' or '.join(fixes)} "
        f"({MEMORY_CHECK_ENV}=off skips this check)"
    )


def check_pretraining_memory(cfg: Config, n_images: int, device: torch.device) -> str | None:
    """Raise :class:`ConfigError` (one line with the estimate, the memory available and a
    ``representation.batch_size`` or ``model.image_size`` that fits) when self-supervised
    pretraining on ``n_images`` is estimated not to fit; otherwise return the estimate as a
    line for the user (``None`` when nothing was checked).

    Pretraining streams the images batch by batch (:func:`medal.representation.pretrain`), so
    the pool's size matters only where it is smaller than a batch. Each step holds the
    batches being read ahead (one per DataLoader worker and two ahead of each, float32),
    makes two random views of its ``representation.batch_size`` images (a few float32 copies
    each while they are made) whose activations the backward pass keeps; with the weights
    and their Adam state. On CUDA the activations are compared with the GPU's free memory.
    """
    if _check_off() or n_images < 2:
        return None
    m, r = cfg.model, cfg.representation
    image = 4 * m.channels * m.image_size**2
    train_act, _ = activation_bytes(cfg)
    params = 16 * _model_sizes(cfg)[0]
    batch = min(r.batch_size, n_images)
    on_gpu = device.type == "cuda"
    # per image of a batch: the batches read ahead, the two views and the temporaries of
    # making them (on the host), and the activations of both views (where the model runs)
    ahead, views, act = (2 * max(cfg.num_workers, 1) + 1) * image, 6 * image, 2 * train_act
    host = (0 if on_gpu else params, ahead + views + (0 if on_gpu else act))
    checks = [("memory", host, available_memory())]
    if on_gpu:
        checks.append(("GPU memory", (params, 2 * image + act), torch.cuda.mem_get_info(device)[0]))
    said = []
    for what, (fixed, per_image), free in checks:
        need = fixed + batch * per_image
        if free is None or need <= HEADROOM * free:
            said.append(
                f"{what}: about {_gb(need)} needed" + (f", {_gb(free)} available" if free else "")
            )
            continue
        fixes = []
        best = _power_of_two_below((HEADROOM * free - fixed) / per_image, least=2)
        if best:
            fixes.append(f"representation.batch_size = {best}")
        fixes.append(f"model.image_size = {_image_size_that_fits(cfg, need, free)}")
        raise ConfigError(
            f"not enough {what} for self-supervised pretraining: about {_gb(need)} needed, "
            f"{_gb(free)} available (model.image_size = {m.image_size}: batches read ahead "
            f"{_gb(batch * ahead)}, two views of a batch of representation.batch_size "
            f"= {r.batch_size} through {m.name} {_gb(batch * act)}); set {' or '.join(fixes)} "
            f"({MEMORY_CHECK_ENV}=off skips this check)"
        )
    return f"{n_images} images streamed: " + "; ".join(said)
