"""The frozen backbone's head, chosen by cross-validation on the labelled set.

A linear dropout head on frozen self-supervised features wins with tens of labels, and on some
data it stays best (PneumoniaMNIST); on others a hidden layer ranks far better once hundreds of
labels are in (RetinaMNIST's five grades, every label, fresh seeds: 0.7332 with the choice
against 0.7257 with the linear head and whole-network training's 0.7325; docs/experiments-lpft.md,
Run H1). Which one a project needs is not known in advance, so ``train.head_choice = "cv"``
(or ``"auto"``, the default, where it applies) decides it from the labels spent, each round:

* only with ``train.head_choice_min_labels`` (100) training labels or more, and at least 2 of
  every class; fewer keep the linear head (a choice on a handful of labels is noise);
* only once the training labels cover ``train.head_choice_min_coverage`` of the images
  (training labels ÷ (training labels + unlabelled pool images); half by default, 0 for no
  condition): on a strategy's picks the cross-validation is biased while they are a small,
  chosen part of the pool (Runs H1-H2b);
* a stratified k-fold split of the training labels (k = :data:`FOLDS`, or the smallest class's
  count if lower; seeded by the round's seed) trains both heads by the probe's supervised
  schedule on the other folds' features;
* their out-of-fold probabilities (dropout off) over every training label are scored by the
  macro AUROC medal reports (:func:`medal.metrics.classification_metrics`); the hidden layer
  is chosen only if it scores strictly higher (ties, and undefined scores, keep linear).

When the hidden layer is chosen, the query's samples come from a linear head trained beside it
(``query.head_choice_samples = "linear"``, :func:`medal.train._fit_scorer`): scored by the hidden
layer, BALD picked worse images (Runs H1, H1-D).

The cost is 2k extra fits of the head on features already computed: seconds on a CPU for a
few hundred labels, about a minute for 4,700.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from .config import Config, head_choice_on
from .metrics import classification_metrics
from .models import StochasticHead

FOLDS = 5
"""Folds of the cross-validation (fewer when the smallest class has fewer labels)."""

HeadFit = Callable[[torch.nn.Module, torch.Tensor, np.ndarray], None]
"""Trains a head in place on features ``[N, D]`` and labels ``[N]`` (the probe's schedule)."""


@dataclass(frozen=True)
class HeadChoice:
    """The chosen head's hidden units (0: linear), the folds, and each candidate's
    out-of-fold macro AUROC keyed by its hidden units; or, with ``waiting``, the linear head
    kept without a cross-validation, and why."""

    hidden: int
    folds: int
    scores: dict[int, float]
    waiting: str = ""

    def note(self) -> str:
        """One line for the training's log."""
        if self.waiting:
            return f"head: linear, {self.waiting}"
        name = "linear" if self.hidden == 0 else f"hidden layer of {self.hidden}"
        shown = ", ".join(
            f"{'linear' if h == 0 else f'hidden {h}'} {s:.4f}" for h, s in self.scores.items()
        )
        return f"head: {name}, by {self.folds}-fold cross-validation (out-of-fold AUROC {shown})"


def choose_head(
    f: torch.Tensor,
    y: np.ndarray,
    cfg: Config,
    seed: int,
    fit_head: HeadFit,
    pool_size: int = 0,
) -> HeadChoice | None:
    """The head for features ``f [N, D]`` with labels ``y [N]`` as ``train.head_choice``
    decides, or None where it does not apply ("off", too few labels, a class with fewer
    than 2); the linear head, ``waiting``, while the labels cover less than
    ``train.head_choice_min_coverage`` of the N + ``pool_size`` images. ``fit_head`` trains a
    fresh head as the probe does (seeded by the caller); ``pool_size``: the unlabelled pool
    images (0: none, the labels cover every image)."""
    t = cfg.train
    n_classes = len(cfg.classes)
    counts = np.bincount(y, minlength=n_classes)
    if not head_choice_on(cfg) or len(y) < t.head_choice_min_labels or counts.min() < 2:
        return None
    if len(y) < t.head_choice_min_coverage * (len(y) + pool_size):
        share = len(y) / (len(y) + pool_size)
        return HeadChoice(
            0,
            0,
            {},
            f"no choice yet: the labels cover {share:.0%} of the images, "
            f"train.head_choice_min_coverage is {t.head_choice_min_coverage:.0%}",
        )
    k = int(min(FOLDS, counts.min()))
    folds = StratifiedKFold(k, shuffle=True, random_state=seed % 2**32)
    splits = list(folds.split(np.zeros(len(y)), y))
    scores: dict[int, float] = {}
    for hidden in (0, t.head_choice_hidden):
        p = np.zeros((len(y), n_classes), np.float32)
        for train_rows, held_rows in splits:
            torch.manual_seed(seed)  # the same initial head in every fold
            head = StochasticHead(f.shape[1], hidden, n_classes, cfg.model.dropout).to(f.device)
            fit_head(head, f[torch.from_numpy(train_rows).to(f.device)], y[train_rows])
            head.eval()
            with torch.no_grad():
                held = f[torch.from_numpy(held_rows).to(f.device)]
                p[held_rows] = head(held).float().softmax(-1).cpu().numpy()
        scores[hidden] = float(classification_metrics(y, p, n_classes)["auroc"])
    better = scores[t.head_choice_hidden] > scores[0]  # False when either is NaN
    return HeadChoice(t.head_choice_hidden if better else 0, k, scores)
