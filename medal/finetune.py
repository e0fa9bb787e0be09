"""LP-FT: after the linear probe, fine-tune the whole network once the labels can carry it.

A frozen self-supervised backbone with a linear head (the probe, :func:`medal.train.fit_probe`)
wins with tens of labels, but its ceiling with many labels is below that of training the whole
network. LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution") trains the probe first and then fine-tunes the backbone and
head together at a small learning rate, so the head starts right and the early gradients do
not wreck the pretrained features.

``train.finetune`` decides when: ``"off"`` (the probe only), ``"always"``, or ``"auto"``: once
every class has at least ``train.finetune_min_per_class`` training labels, a count fixed in
advance that uses nothing but the labels spent (no hold-out is needed to decide).

Choices, and why:

* A fixed schedule (``train.epochs`` epochs of ``train.batch_size``, at least
  ``train.min_steps`` steps, cosine learning rate), the last epoch kept: no epoch is chosen on a
  hold-out, so a tiny one cannot mislead it and every label trains.
* The head at ``train.lr``, the backbone at ``train.lr * train.finetune_lr_scale`` (0.1).
* BatchNorm layers stay in eval mode: their running statistics are the self-supervised
  pretraining's (computed on the whole pool), which batches of a few dozen labelled images
  would only make noisier; their affine weights are fine-tuned with the backbone.
  ``train.finetune_batchnorm = "update"`` lets the labelled batches update them instead.
* The head's feature standardisation stays as the probe fitted it.
* Only the model in memory changes: the cached self-supervised backbone file is read, never
  written, and features are keyed by a hash of the backbone's weights
  (:func:`medal.features.backbone_key`), so a fine-tuned backbone gets its own. They are this
  workspace's alone (``MCModel.backbone_tuned``, kept in the checkpoint): they go to its
  ``features-tuned/`` folder, not the shared cache, and a new round's replace the last's.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import Config
from .errors import ModelError
from .models import MCModel
from .fitting import Augmenter, FitResult, loss_weights


def finetune_decision(cfg: Config, y: np.ndarray) -> tuple[bool, str]:
    """Whether to fine-tune after the probe on training labels ``y [N]`` (class indices), and a
    line saying why. Uses only the label counts per class."""
    tc = cfg.train
    if tc.finetune == "off":
        return False, ""
    if tc.finetune == "always":
        return True, 'train.finetune = "always"'
    counts = np.bincount(np.asarray(y, np.int64), minlength=len(cfg.classes))
    short = [f"{c} {int(n)}" for c, n in zip(cfg.classes, counts) if n < tc.finetune_min_per_class]
    if short:
        return False, (
            f'backbone kept frozen (train.finetune = "auto"): fine-tuning starts '
            f"once every class has {tc.finetune_min_per_class} labels; now "
            f"{', '.join(short)}"
        )
    return True, (
        f'every class has at least {tc.finetune_min_per_class} labels (train.finetune = "auto")'
    )


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode (running statistics fixed); returns their count."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


def finetune(
    model: MCModel,
    x: torch.Tensor,
    y: np.ndarray,
    cfg: Config,
    *,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
) -> FitResult:
    """Fine-tune backbone and head of ``model`` (its head already trained by the probe) on
    ``x [N, C, S, S]``, ``y [N]``: the module docstring says how. Returns the training's
    history (mean loss per epoch)."""
    t0 = time.perf_counter()
    tc = cfg.train
    n = len(x)
    steps_per_epoch = math.ceil(n / tc.batch_size)
    epochs = max(tc.epochs, math.ceil(tc.min_steps / steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device)
    opt = torch.optim.AdamW(
        [
            {"params": model.backbone.parameters(), "lr": tc.lr * tc.finetune_lr_scale},
            {"params": model.head.parameters(), "lr": tc.lr},
        ],
        weight_decay=tc.weight_decay,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    weight = loss_weights(y, cfg).to(device) if tc.balance != "none" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    yt = torch.as_tensor(y, dtype=torch.long)
    aug = Augmenter(x.shape[-1], tc.hflip) if tc.augment else None
    history = []
    for epoch in tqdm(
        range(1, epochs + 1), desc="fine-tuning", unit="epoch", disable=not progress, leave=False
    ):
        loss = _epoch(
            model,
            opt,
            sched,
            loss_fn,
            x,
            yt,
            torch.randperm(n, generator=gen),
            tc.batch_size,
            device,
            aug,
            tc.finetune_batchnorm == "update",
        )
        history.append({"epoch": float(epoch), "loss": loss})
    model.eval()
    model.backbone_tuned = True
    return FitResult(
        epochs=epochs, best_epoch=epochs, history=history, seconds=time.perf_counter() - t0
    )


def _epoch(
    model: MCModel,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    x: torch.Tensor,
    yt: torch.Tensor,
    perm: torch.Tensor,
    batch_size: int,
    device: torch.device,
    aug: Augmenter | None,
    update_batchnorm: bool = False,
) -> float:
    """One pass in the order ``perm`` (dropout on, BatchNorm statistics fixed unless
    ``update_batchnorm``); the mean loss.
    A loss that is not finite stops the training with an error rather than saving NaN
    weights."""
    model.train()
    if not update_batchnorm:
        freeze_batchnorm(model)
    total = 0.0
    for i in range(0, len(perm), batch_size):
        idx = perm[i : i + batch_size]
        xb = aug(x[idx]) if aug is not None else x[idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model(xb.to(device)).float(), yt[idx].to(device))
        if not torch.isfinite(loss):
            raise ModelError(
                f"fine-tuning diverged: loss {float(loss)} at batch "
                f"{i // batch_size + 1}; lower train.lr or "
                f'train.finetune_lr_scale, or set train.finetune = "off"'
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(idx)
    return total / len(perm)


def after_probe(
    model: MCModel,
    x: torch.Tensor,
    y: np.ndarray,
    cfg: Config,
    probe: FitResult,
    *,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
) -> FitResult:
    """The probe's result ``probe``, followed by fine-tuning when :func:`finetune_decision`
    says so; the decision (and the fine-tuning's epochs and time) in its notes."""
    go, why = finetune_decision(cfg, y)
    if not go:
        if why:
            probe.notes.append(why)
        return probe
    ft = finetune(model, x, y, cfg, device=device, seed=seed, progress=progress)
    line = (
        f"backbone fine-tuned after the probe (LP-FT), {why}: {ft.epochs} epochs, "
        f"backbone lr {cfg.train.lr * cfg.train.finetune_lr_scale:g}, head lr "
        f"{cfg.train.lr:g}, loss {ft.history[-1]['loss']:.4f}, {ft.seconds:.0f} s"
    )
    if progress:
        tqdm.write(line)
    shifted = [{**row, "epoch": row["epoch"] + probe.epochs} for row in ft.history]
    return FitResult(
        epochs=probe.epochs + ft.epochs,
        best_epoch=probe.epochs + ft.epochs,
        history=[*probe.history, *shifted],
        seconds=probe.seconds + ft.seconds,
        notes=[*probe.notes, line],
    )
