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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import NORMALISE_MEAN, NORMALISE_STD
from .fitting import check_finite


@dataclass(frozen=True)
class SSLSettings:
    """What a pretraining depends on besides the images (part of its cache key)."""

    epochs: int = 30
    batch_size: int = 256
    temperature: float = 0.2
    lr: float = 1e-3
    projection_dim: int = 128
    seed: int = 0


class Views:
    """Random views for contrastive learning of a whole batch at once, on normalised
    ``[B, C, S, S]`` tensors: a random crop of 50–100 % of the area with aspect 3/4–4/3 and a
    rotation of up to ±10° (one affine resampling per image), brightness and contrast jitter
    (±40 %), a light blur for half the images, and Gaussian noise.

    Batched with ``affine_grid``/``grid_sample`` rather than torchvision's per-image v2
    transforms: per-image transforms made an epoch over 4,700 28×28 images take minutes on a
    2-core CPU, most of it in Python overhead; this takes about a second.
    """

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``x [B, C, S, S]`` -> one random view of each image ``[B, C, S, S]``."""
        b = len(x)

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
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        img = (x * NORMALISE_STD + NORMALISE_MEAN).clamp(0, 1)
        img = F.grid_sample(
            img, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )
        mean = img.mean(dim=(1, 2, 3), keepdim=True)
        contrast, bright = u(0.6, 1.4).view(b, 1, 1, 1), u(0.6, 1.4).view(b, 1, 1, 1)
        img = ((img - mean) * contrast + mean) * bright
        blur = (torch.rand(b, generator=gen) < 0.5).view(b, 1, 1, 1)
        c = img.shape[1]
        kernel = torch.tensor([0.25, 0.5, 0.25])
        kernel = (kernel[:, None] * kernel[None, :]).expand(c, 1, 3, 3)
        blurred = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)
        img = torch.where(blur, blurred, img)
        img = (img + 0.03 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
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
    settings."""
    h = hashlib.sha256()
    for i in sorted(image_ids):
        h.update(i.encode())
        h.update(b"\0")
    h.update(
        json.dumps(
            [preprocess, model, dataclasses.asdict(settings)], sort_keys=True, default=str
        ).encode()
    )
    return h.hexdigest()[:24]


def pretrain(
    backbone: nn.Module,
    feature_dim: int,
    x: torch.Tensor,
    settings: SSLSettings,
    *,
    device: torch.device,
    progress: bool = True,
    log: Callable[[float, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Train ``backbone`` (``[B, C, S, S] -> [B, D]``) contrastively on ``x [N, C, S, S]`` in
    place; returns its state dict (on CPU). bf16 autocast on CUDA. ``log(loss, step)`` gets
    each optimiser step's loss as it trains (TensorBoard)."""
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    proj = nn.Sequential(
        nn.Linear(feature_dim, feature_dim),
        nn.ReLU(inplace=True),
        nn.Linear(feature_dim, settings.projection_dim),
    )
    backbone.to(device).train()
    proj.to(device).train()
    params = [*backbone.parameters(), *proj.parameters()]
    opt = torch.optim.Adam(params, lr=settings.lr)
    n = len(x)
    bs = min(settings.batch_size, n)
    steps = max(1, n // bs) * settings.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    views = Views()
    bar = tqdm(
        range(settings.epochs),
        desc="self-supervised pretraining",
        unit="epoch",
        disable=not progress,
        leave=False,
    )
    t0 = time.perf_counter()
    for epoch in bar:
        perm = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for i in range(0, n - bs + 1, bs):  # full batches only: NT-Xent needs negatives
            xb = x[perm[i : i + bs]]
            v1, v2_ = views(xb, gen).to(device), views(xb, gen).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                z1, z2 = proj(backbone(v1)), proj(backbone(v2_))
            loss = nt_xent(z1.float(), z2.float(), settings.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(xb)
            seen += len(xb)
            if log is not None:
                log(loss.item(), int(sched.last_epoch))
        bar.set_postfix(loss=f"{total / max(seen, 1):.3f}")
        check_finite(
            total / max(seen, 1) + _weights_sum(backbone),
            f"in self-supervised pretraining epoch {epoch + 1} of {settings.epochs}",
            "representation.lr",
            settings.lr,
        )
    if progress:
        tqdm.write(
            f"self-supervised pretraining: {settings.epochs} epochs on {n} images in "
            f"{time.perf_counter() - t0:.0f} s"
        )
    backbone.eval()
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}


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
    x: torch.Tensor,
    settings: SSLSettings,
    *,
    device: torch.device,
    progress: bool = True,
    log: Callable[[float, int], None] | None = None,
) -> None:
    """Pretrain ``backbone`` on ``x`` and cache its weights at ``path`` (atomically); ``log``
    as for :func:`pretrain`."""
    state = pretrain(backbone, feature_dim, x, settings, device=device, progress=progress, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{time.time_ns()}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)
