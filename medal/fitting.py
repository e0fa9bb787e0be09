"""What every training loop uses: the :class:`FitResult` record, inverse-frequency class
weights, the training-time augmentation and the stop on a non-finite loss (the loops of
:mod:`medal.train`, the LP-FT fine-tuning of :mod:`medal.finetune` and the self-supervised
pretraining of :mod:`medal.representation` share them)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.transforms import v2

from .config import Config
from .data import NORMALISE_MEAN, NORMALISE_STD
from .errors import ModelError


@dataclass
class FitResult:
    epochs: int
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def class_weights(
    y: np.ndarray, n_classes: int, prior: Sequence[float] | None = None
) -> torch.Tensor:
    """Class weights ``[K]`` for labels ``y [N]``, 0 for absent classes, scaled so that the
    images' weights sum to ``N``.

    Without ``prior``: inverse label frequency (every class present weighs the same in total).
    With ``prior`` (``[K]`` class shares of the population the labels were drawn from, e.g. the
    pool's prevalence): inverse prior. A selection that depends only on the image (uncertainty
    sampling) changes the labels' class shares but not the ratio of the classes' likelihoods up
    to a constant that these weights undo, so the head's argmax stays balanced where actively
    chosen labels over-represent a rare class (Run I7 of docs/experiments-acquisition.md)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    if prior is None:
        w[present] = counts.sum() / (present.sum() * counts[present])
    else:
        inv = 1.0 / np.asarray(prior, np.float64)
        w[present] = inv[present] * counts.sum() / (counts[present] * inv[present]).sum()
    return torch.tensor(w, dtype=torch.float32)


def class_prior_note(cfg: Config, labels: Sequence[str]) -> str | None:
    """The training report's line when ``train.class_prior`` sets the class weights: the
    configured shares beside the shares of ``labels`` (the labelled set's class names)."""
    prior = cfg.class_prior()
    if prior is None:
        return None
    n = max(len(labels), 1)
    given = ", ".join(f"{c} {p:.0%}" for c, p in zip(cfg.classes, prior))
    seen = ", ".join(f"{c} {sum(1 for x in labels if x == c) / n:.0%}" for c in cfg.classes)
    return f"class weights from train.class_prior ({given}); the labels are {seen}"


def loss_weights(y: np.ndarray, cfg: Config) -> torch.Tensor:
    """:func:`class_weights` of ``y [N]`` under ``cfg`` (``train.class_prior`` when set)."""
    return class_weights(y, len(cfg.classes), cfg.class_prior())


class Augmenter:
    """Training-time augmentation with torchvision.transforms.v2, per image, on normalised
    tensors ``[C, S, S]`` (undone to [0, 1] for the intensity jitter, then re-normalised)."""

    def __init__(self, size: int, hflip: bool) -> None:
        steps: list[v2.Transform] = [
            v2.RandomResizedCrop(size, scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomRotation(10),
            v2.ColorJitter(brightness=0.15, contrast=0.15),
        ]
        if hflip:
            steps.insert(0, v2.RandomHorizontalFlip())
        self.t = v2.Compose(steps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, S, S]`` -> augmented ``[B, C, S, S]``."""
        out = [
            (self.t((img * NORMALISE_STD + NORMALISE_MEAN).clamp(0, 1)) - NORMALISE_MEAN)
            / NORMALISE_STD
            for img in x
        ]
        return torch.stack(out)


def check_finite(value: float, when: str, lr_key: str, lr: float) -> None:
    """Stop a training whose loss, weights or outputs became NaN or infinite: one line, raised
    before anything is saved, so the previous checkpoint stays the current one."""
    if not math.isfinite(value):
        raise ModelError(
            f"training stopped {when}: the loss, weights or outputs became {value} "
            f"(not finite); {lr_key} = {lr:g} is probably too high (try 10 times "
            f"lower); nothing was saved, the previous checkpoint stays current"
        )
