"""A whole network trained beside the frozen head, their probabilities averaged
(``train.companion``).

A frozen self-supervised backbone with a linear head wins with tens of labels; with hundreds
its ceiling can be below that of a network trained end to end on the labels. Fine-tuning the
backbone (LP-FT, :mod:`medal.finetune`) closed a third of that gap on RetinaMNIST. Averaging
the frozen head with a separately trained whole network, the companion, raises random-pick
learning curves (docs/experiments-lpft.md, Runs F5, M1, M2) and ends above whole-network
training on PneumoniaMNIST, but 0.001-0.002 below it on RetinaMNIST, and in the simulated
loop from 100 labels on it lowers BALD's curves (docs/experiments-acquisition.md, Runs C1,
C2). With the head chosen by cross-validation (:mod:`medal.headchoice`) and both held back
until the labels cover half the images, the pair ends above whole-network training on both
bundled sets and leaves BALD's loop where it was (docs/experiments-lpft.md, Runs X1, X2): so
by default ``train.companion = "auto"`` with ``train.companion_min_coverage = 0.5``. How it
works:

* It joins once there are ``train.companion_min_labels`` training labels in all and they
  cover ``train.companion_min_coverage`` of the images, labels ÷ (labels + unlabelled pool)
  (``train.companion = "auto"``; both fixed in advance, using nothing but the labels spent),
  or every round (``"always"``). Below that the frozen head predicts alone, because a
  whole network trained on a few dozen images drags the average down.
* It is trained from random weights every round (the previous round's companion is not
  warm-started: what was measured), as ``train.freeze_backbone = false`` trains: the
  configured ``model.name`` with a hidden layer of :data:`COMPANION_HIDDEN` units, epochs of
  ``train.batch_size``, the best epoch by ``train.monitor`` on ``train.companion_holdout`` of
  the labels (stratified; drawn with the round's seed). The frozen head still trains on every
  label.
* Its dropout is in its head only, so its MC samples cost one backbone pass per image.
  Sample t of the pair is the mean of the head's sample t and the companion's sample t
  (``[B, T, C]`` either way), so BALD, entropy and the other scores take them unchanged, and
  every prediction, metric and manifest probability is of the average. With
  ``query.companion_samples = "mixture"`` the query's scores take both models' samples side
  by side instead (``[B, 2T, C]``), which keeps their disagreement for BALD.
* It is saved in the round's checkpoint (``companion.*`` weights and its shape under
  ``"companion"``), so ``medal query`` and the labelling page see the pair the round trained.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from .config import Config, companion_on
from .models import MCModel

COMPANION_HIDDEN = 128
"""Units of the companion's hidden layer: the whole-network default of medal before 0.2."""


def companion_decision(cfg: Config, n_labels: int, pool_size: int = 0) -> tuple[bool, str]:
    """Whether the round trains a companion on ``n_labels`` labelled images beside
    ``pool_size`` unlabelled pool images (0: the labels cover every image), and a line saying
    why (empty when ``train.companion = "off"``)."""
    tc = cfg.train
    if not companion_on(cfg):
        return False, ""
    if tc.companion == "always":
        return True, 'train.companion = "always"'
    if n_labels < tc.companion_min_labels:
        return False, (
            f'frozen head alone (train.companion = "auto"): the whole-network companion joins '
            f"once {tc.companion_min_labels} training labels are given; now {n_labels}"
        )
    share = n_labels / (n_labels + pool_size)
    if n_labels < tc.companion_min_coverage * (n_labels + pool_size):
        return False, (
            f'frozen head alone (train.companion = "auto"): the labels cover {share:.0%} of the '
            f"images, train.companion_min_coverage is {tc.companion_min_coverage:.0%}"
        )
    covers = f", covering {share:.0%} of the images" if tc.companion_min_coverage > 0 else ""
    return True, (
        f"{n_labels} training labels{covers}, at least {tc.companion_min_labels}"
        ' (train.companion = "auto")'
    )


def companion_spec(cfg: Config) -> dict[str, Any]:
    """The companion's shape, as saved in a checkpoint beside its weights."""
    return {
        "name": cfg.model.name,
        "num_classes": len(cfg.classes),
        "in_channels": cfg.model.channels,
        "dropout": cfg.model.dropout,
        "hidden": COMPANION_HIDDEN,
    }


def build_companion(spec: dict[str, Any]) -> MCModel:
    """A companion of shape ``spec`` (:func:`companion_spec`, kept as its ``spec``), random
    weights."""
    comp = MCModel(
        str(spec["name"]),
        int(spec["num_classes"]),
        in_channels=int(spec["in_channels"]),
        dropout=float(spec["dropout"]),
        hidden=int(spec["hidden"]),
        features="last",
    )
    comp.spec = dict(spec)
    return comp


def holdout_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``(train, held out)`` of labels ``y [N]``: ``fraction`` held out, stratified by
    class when every class present has two images or more, at least one row on each side."""
    y = np.asarray(y, np.int64)
    rows = np.arange(len(y))
    counts = np.bincount(y)
    strat = y if counts[counts > 0].min(initial=len(y)) >= 2 else None
    n_val = min(max(1, round(fraction * len(y))), len(y) - 1)
    k = len(np.unique(y))
    if n_val < k or len(y) - n_val < k:
        strat = None  # too few rows on one side for every class
    tr, va = train_test_split(rows, test_size=n_val, stratify=strat, random_state=seed)
    return np.sort(tr), np.sort(va)
