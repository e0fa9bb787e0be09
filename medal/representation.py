"""Self-supervised pretraining of the backbone on the unlabelled pool (SimCLR-style).

The pool holds thousands of images without labels. Contrastive pretraining (SimCLR: two random
views of each image, NT-Xent loss over a batch) turns them into a backbone whose features
separate the classes before a single label is spent; the classifier trained on a few labels then
starts from it. The learned backbone is cached by image content and settings, so every round
and every simulation run on the same images reuses one pretraining.

Written with a short loss and batched torch views rather than a self-supervised library
(lightly): the loss is a dozen lines, the views must work on 1-channel medical images, on our
normalised tensors and fast on a 2-core CPU, and no extra dependency is needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .data import NORMALISE_MEAN, NORMALISE_STD
from .errors import DataError
from .fitting import check_finite


@dataclass(frozen=True)
class SSLSettings:
    """What a pretraining depends on besides the images (part of its cache key, see
    :func:`cache_key`)."""

    epochs: int = 30
    batch_size: int = 256
    temperature: float = 0.2
    lr: float = 1e-3
    projection_dim: int = 128
    seed: int = 0
    min_steps: int = 0
    max_steps: int = 3000


@dataclass(frozen=True)
class StepPlan:
    """How long a pretraining runs: ``steps`` optimiser steps of ``batch`` images drawn from
    ``images`` readable ones, ``per_epoch`` full batches per pass over them."""

    steps: int
    batch: int
    images: int
    per_epoch: int
    natural: int
    """``epochs x per_epoch``, the steps before the clamp to [min_steps, max_steps]."""

    @property
    def epochs(self) -> int:
        """Passes over the images (the last one cut short when the steps end inside it)."""
        return -(-self.steps // self.per_epoch)

    def describe(self) -> str:
        clamp = ""
        if self.steps != self.natural:
            which = "max_steps" if self.steps < self.natural else "min_steps"
            clamp = f" (representation.{which}; {self.natural} for the epochs)"
        return (
            f"{self.steps} steps{clamp} of {self.batch} images x 2 views on {self.images} "
            f"images ({self.steps / self.per_epoch:.3g} epochs)"
        )


def plan_steps(n_images: int, settings: SSLSettings) -> StepPlan:
    """steps = clamp(epochs x (N // batch), min_steps, max_steps) for ``N = n_images`` (>= 2)
    and ``batch = min(batch_size, N)``: full batches only, as NT-Xent needs negatives."""
    batch = min(settings.batch_size, n_images)
    per_epoch = n_images // batch
    natural = settings.epochs * per_epoch
    steps = min(max(natural, settings.min_steps), settings.max_steps)
    return StepPlan(steps, batch, n_images, per_epoch, natural)


class Views:
    """Random views for contrastive learning of a whole batch at once, on normalised
    ``[B, C, S, S]`` tensors: a random crop of 50–100 % of the area with aspect 3/4–4/3 and a
    rotation of up to ±10° (one affine resampling per image), brightness and contrast jitter
    (±40 %), a light blur for half the images, and Gaussian noise.

    Batched with ``affine_grid``/``grid_sample`` rather than torchvision's per-image v2
    transforms: per-image transforms made an epoch over 4,700 28×28 images take minutes on a
    2-core CPU, most of it in Python overhead; this takes about a second.

    Every random number is drawn for the whole batch of ``batch`` images from ``gen`` (on the
    CPU, so a seed gives the same views on any device) and ``x`` holds the ``rows`` of it this
    process works on (a rank's shard under torchrun), so the views do not depend on how a
    batch is split. The per-image Gaussian noise comes from ``gen`` too, unless a ``noise``
    generator on ``x``'s device is given (on CUDA: no full-size tensor made on the host).
    """

    def __call__(
        self,
        x: torch.Tensor,
        gen: torch.Generator,
        *,
        batch: int | None = None,
        rows: range | None = None,
        noise: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``x [b, C, S, S]`` (rows ``rows`` of a batch of ``batch``; default all of them)
        -> one random view of each image ``[b, C, S, S]`` on ``x``'s device."""
        b = len(x) if batch is None else batch
        keep = slice(None) if rows is None else slice(rows.start, rows.stop)
        dev = x.device

        def u(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(b, generator=gen)

        area, aspect = u(0.5, 1.0), torch.exp(u(math.log(3 / 4), math.log(4 / 3)))
        sx = (area * aspect).sqrt().clamp(max=1.0)
        sy = (area / aspect).sqrt().clamp(max=1.0)
        tx, ty = (1 - sx) * u(-1, 1), (1 - sy) * u(-1, 1)
        angle = u(-10, 10) * math.pi / 180
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [torch.stack([sx * cos, -sy * sin, tx], 1), torch.stack([sx * sin, sy * cos, ty], 1)], 1
        )
        grid = F.affine_grid(theta[keep].to(dev), list(x.shape), align_corners=False)
        img = (x * NORMALISE_STD + NORMALISE_MEAN).clamp(0, 1)
        img = F.grid_sample(
            img, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )
        mean = img.mean(dim=(1, 2, 3), keepdim=True)
        contrast, bright = u(0.6, 1.4).view(b, 1, 1, 1), u(0.6, 1.4).view(b, 1, 1, 1)
        img = ((img - mean) * contrast[keep].to(dev) + mean) * bright[keep].to(dev)
        blur = (torch.rand(b, generator=gen) < 0.5).view(b, 1, 1, 1)[keep].to(dev)
        c = img.shape[1]
        kernel = torch.tensor([0.25, 0.5, 0.25], device=dev)
        kernel = (kernel[:, None] * kernel[None, :]).expand(c, 1, 3, 3)
        blurred = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)
        img = torch.where(blur, blurred, img)
        shape = (b, *img.shape[1:])
        if noise is None:
            eps = torch.randn(shape, generator=gen)[keep].to(dev)
        else:
            eps = torch.randn(shape, generator=noise, device=dev)[keep]
        img = (img + 0.03 * eps).clamp(0, 1)
        return (img - NORMALISE_MEAN) / NORMALISE_STD


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy for paired embeddings ``[B, P]`` x 2:
    each view's positive is the other view of its image, the other 2B-2 are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    b = len(z1)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


def cache_key(
    image_ids: Sequence[str], preprocess: dict, model: dict, settings: SSLSettings
) -> str:
    """Stable key of a pretraining: the set of image ids, image settings, architecture, SSL
    settings.

    ``min_steps`` and ``max_steps`` enter the key only where they can change the number of
    steps, so the keys of pretrainings they leave alone are those from before they existed:
    ``min_steps`` when above 0 (the steps are at least ``epochs``, so 0 never binds), and
    ``max_steps`` when it cuts the steps ``epochs x (N // batch)`` of ``N = len(image_ids)``
    (unreadable images only lower N, so a cap that does not bind here does not bind later).
    """
    h = hashlib.sha256()
    for i in sorted(image_ids):
        h.update(i.encode())
        h.update(b"\0")
    fields = dataclasses.asdict(settings)
    del fields["min_steps"], fields["max_steps"]
    if settings.min_steps > 0:
        fields["min_steps"] = settings.min_steps
    if plan_steps(max(len(image_ids), 1), settings).natural > settings.max_steps:
        fields["max_steps"] = settings.max_steps
    h.update(json.dumps([preprocess, model, fields], sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


class TensorImages(torch.utils.data.Dataset):
    """Images already in memory ``x [N, C, S, S]`` under :class:`medal.data.ImageDataset`'s
    contract: item ``i`` is ``(x[i], i, "")`` (for benchmarks and tests that hold arrays)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        return self.x[i], i, ""


Images = torch.utils.data.Dataset | torch.Tensor
"""What :func:`pretrain` learns from: a dataset whose item ``i`` is ``(x [C, S, S] float32, i,
reason)`` (``reason`` ``""`` for a readable image, as :class:`medal.data.ImageDataset`), or a
tensor ``[N, C, S, S]`` of images in memory."""


class _Batches:
    """The batches (lists of indices) a DataLoader reads next: set before each pass, so one
    loader (and its worker processes) serves every pass."""

    def __init__(self, batches: list[list[int]] | None = None) -> None:
        self.batches = batches or []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _loader(
    data: torch.utils.data.Dataset, batches: _Batches, num_workers: int, pin: bool
) -> torch.utils.data.DataLoader:
    """Batches of ``data`` in the order of ``batches``, the workers kept between passes; the
    loader draws its workers' seed from its own generator, not the global one (the model's
    randomness stays as it was)."""
    return torch.utils.data.DataLoader(
        data,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),
    )


def readable_indices(
    data: torch.utils.data.Dataset, num_workers: int, ranks: tuple[int, int] = (0, 1)
) -> torch.Tensor:
    """Indices ``[M]`` (ascending) of the readable items of ``data``: one pass that holds one
    batch at a time (and fills the decode cache for the passes after it); under torchrun each
    rank (``ranks`` = (rank, world size)) reads its share and all learn the whole list."""
    rank, world = ranks
    mine = list(range(rank, len(data), world))  # type: ignore[arg-type]
    batches = [mine[i : i + 256] for i in range(0, len(mine), 256)]
    kept: list[int] = []
    for _, idx, reasons in _loader(data, _Batches(batches), num_workers, False):
        kept += [int(i) for i, r in zip(idx, reasons) if r == ""]
    if world > 1:
        parts: list[list[int]] = [[] for _ in range(world)]
        torch.distributed.all_gather_object(parts, kept)
        kept = [i for part in parts for i in part]
    return torch.tensor(sorted(kept), dtype=torch.long)


def pretrain(
    backbone: nn.Module,
    feature_dim: int,
    data: Images,
    settings: SSLSettings,
    *,
    device: torch.device,
    num_workers: int = 0,
    progress: bool = True,
    log: Callable[[float, int], None] | None = None,
    ranks: tuple[int, int] = (0, 1),
) -> tuple[dict[str, torch.Tensor], StepPlan]:
    """Train ``backbone`` (``[B, C, S, S] -> [B, D]``) contrastively on the readable images of
    ``data`` in place, for :func:`plan_steps` optimiser steps; returns its state dict (on CPU)
    and the plan it ran. ``log(loss, step)`` gets each step's loss as it trains (TensorBoard).

    Streams: each step reads its batch through a DataLoader (``num_workers`` processes,
    pinned memory on CUDA), so memory does not grow with the pool. With the seed, the batch
    order and the views are those of holding the images in memory (one permutation per pass
    from the seeded generator, then two views per batch). On CUDA: channels_last and bf16
    autocast. Under torchrun every rank calls it with ``ranks`` = (rank, world size)
    (:func:`medal.distributed.ranks`): each works on a shard of every batch, NT-Xent sees all
    ranks' embeddings (the global batch's negatives) and the gradients are summed. BatchNorm
    statistics are each rank's own (as in DistributedDataParallel training).
    """
    if isinstance(data, torch.Tensor):
        data = TensorImages(data)
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    run = PretrainingRun(backbone, feature_dim, settings, device, ranks)
    good = readable_indices(data, num_workers, ranks)
    if len(good) < 2:
        raise DataError(
            "representation.method = 'simclr' needs at least 2 readable images "
            "in the pool and labelled set"
        )
    plan = plan_steps(len(good), settings)
    run.start(plan, progress, log)
    batches = _Batches()
    loader = _loader(data, batches, num_workers, device.type == "cuda")
    for epoch in range(plan.epochs):
        perm = torch.randperm(plan.images, generator=gen)
        left = plan.steps - run.step
        starts = range(0, plan.images - plan.batch + 1, plan.batch)[:left]
        rows = distributed.shard(plan.batch, *ranks)
        batches.batches = [
            good[perm[i : i + plan.batch]][rows.start : rows.stop].tolist() for i in starts
        ]
        for xb, _, reasons in loader:
            if any(reasons):  # read before, unreadable now: never train on its zeros
                raise DataError(f"an image became unreadable while pretraining: {max(reasons)}")
            run.train_step(xb.to(device, non_blocking=True), gen)
        run.end_epoch(epoch)
    return run.finish(), plan


class PretrainingRun:
    """One pretraining's model, projection head, optimiser and schedule, its progress bar and
    its running loss (the steps of :func:`pretrain`)."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        s: SSLSettings,
        device: torch.device,
        ranks: tuple[int, int] = (0, 1),
    ) -> None:
        self.backbone, self.settings, self.device, self.ranks = backbone, s, device, ranks
        self.proj = nn.Sequential(
            nn.Linear(feature_dim, feature_dim),
            nn.ReLU(inplace=True),
            nn.Linear(feature_dim, s.projection_dim),
        )
        cuda = device.type == "cuda"
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format
        backbone.to(device).train()
        if cuda:  # faster convolutions with tensor cores
            backbone.to(memory_format=torch.channels_last)
        self.proj.to(device).train()
        self.params = [*backbone.parameters(), *self.proj.parameters()]
        self.opt = torch.optim.Adam(self.params, lr=s.lr)
        self.noise = torch.Generator(device).manual_seed(s.seed) if cuda else None
        self.views = Views()
        self.step, self.seen = 0, 0
        self.total = torch.zeros((), device=device)  # summed on the device: no sync per step

    def start(
        self, plan: StepPlan, progress: bool, log: Callable[[float, int], None] | None
    ) -> None:
        self.plan, self.log, self.t0 = plan, log, time.perf_counter()
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=plan.steps)
        self.progress = progress and self.ranks[0] == 0
        if self.progress:
            tqdm.write(f"self-supervised pretraining: {plan.describe()}")
        self.bar = tqdm(
            total=plan.steps,
            desc="self-supervised pretraining",
            unit="step",
            disable=not self.progress,
            leave=False,
        )

    def train_step(self, xb: torch.Tensor, gen: torch.Generator) -> None:
        """One optimiser step on this rank's rows ``xb [b, C, S, S]`` of a batch."""
        batch, (rank, world) = self.plan.batch, self.ranks
        rows = distributed.shard(batch, rank, world)
        v1, v2 = (
            self.views(xb, gen, batch=batch, rows=rows, noise=self.noise).contiguous(
                memory_format=self.memory_format
            )
            for _ in range(2)
        )
        on_cuda = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on_cuda):
            z1, z2 = self.proj(self.backbone(v1)), self.proj(self.backbone(v2))
        sizes = distributed.shard_sizes(batch, world)
        z1, z2 = (
            distributed.gather_rows(z1.float(), sizes),
            distributed.gather_rows(z2.float(), sizes),
        )
        loss = nt_xent(z1, z2, self.settings.temperature)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.sum_gradients(self.params, world)
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.total, self.seen = self.total + loss.detach() * batch, self.seen + batch
        if self.log is not None:  # a host sync per step, only for TensorBoard
            self.log(loss.item(), int(self.sched.last_epoch))
        self.bar.update(1)
        if self.step == min(3, self.plan.steps) and self.progress:
            total = (time.perf_counter() - self.t0) / self.step * self.plan.steps
            tqdm.write(
                f"self-supervised pretraining: about {_duration(total)} in all "
                f"(estimated from the first {self.step} steps)"
            )

    def end_epoch(self, epoch: int) -> None:
        mean = float(self.total) / max(self.seen, 1)
        self.bar.set_postfix(loss=f"{mean:.3f}")
        check_finite(
            mean + _weights_sum(self.backbone),
            f"in self-supervised pretraining epoch {epoch + 1} of {self.plan.epochs}",
            "representation.lr",
            self.settings.lr,
        )
        self.total, self.seen = torch.zeros((), device=self.device), 0

    def finish(self) -> dict[str, torch.Tensor]:
        self.bar.close()
        if self.progress:
            tqdm.write(
                f"self-supervised pretraining: {self.plan.steps} steps on {self.plan.images} "
                f"images in {time.perf_counter() - self.t0:.0f} s"
            )
        self.backbone.to(memory_format=torch.contiguous_format).eval()
        state = self.backbone.state_dict()
        return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _weights_sum(module: nn.Module) -> float:
    """NaN or infinite when any floating-point weight or buffer of ``module`` is."""
    with torch.no_grad():
        return sum(
            float(t.double().sum()) for t in module.state_dict().values() if t.is_floating_point()
        )


def load_cached(path: Path, backbone: nn.Module) -> bool:
    """Load a cached pretrained backbone into ``backbone``; False (and the unreadable file
    removed) when there is none to use."""
    if not path.is_file():
        return False
    try:
        backbone.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return True
    except Exception:  # noqa: BLE001 - an unreadable or mismatched cache entry is rebuilt
        path.unlink(missing_ok=True)
        return False


def pretrain_and_cache(
    path: Path,
    backbone: nn.Module,
    feature_dim: int,
    data: Images,
    settings: SSLSettings,
    *,
    device: torch.device,
    num_workers: int = 0,
    progress: bool = True,
    log: Callable[[float, int], None] | None = None,
    ranks: tuple[int, int] = (0, 1),
) -> StepPlan:
    """Pretrain ``backbone`` on ``data`` and cache its weights at ``path`` (atomically; with
    several ``ranks`` rank 0 writes and the others wait for it); returns the plan it ran.
    ``num_workers``, ``log``, ``ranks`` as for :func:`pretrain`."""
    state, plan = pretrain(
        backbone,
        feature_dim,
        data,
        settings,
        device=device,
        num_workers=num_workers,
        progress=progress,
        log=log,
        ranks=ranks,
    )
    if ranks[0] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{time.time_ns()}.tmp")
        torch.save(state, tmp)
        tmp.replace(path)
    if ranks[1] > 1:
        torch.distributed.barrier()
    return plan
