"""TensorBoard logging of a project (``train.tensorboard = true``).

One TensorBoard run per project, ``<workspace>/tensorboard``, so that rounds read as curves.
Each part of the project (a model round's training, the self-supervised pretraining) has its
own event file in that run, written while it trains; training a part again replaces its file,
so a retrained round never shows twice:

==================================  ===========================================================
tag                                 step
==================================  ===========================================================
``labels/<split>/<metric>``         the number of labels the model round trained on: the
                                    round's reported MC-dropout metrics on ``validation`` /
                                    ``test`` (as ``medal status`` shows), i.e. the learning
                                    curve
``labels/model_round``,             the same step: which model round it is, its best epoch
``labels/best_epoch``
``round-NNN/train/loss``            written while model round NNN trains: each epoch (full
                                    training) or each optimiser step of the head (a frozen
                                    backbone's probe)
``round-NNN/validation/<metric>``   each evaluated epoch (deterministic predictions, as the
                                    best epoch is chosen); a probe: its last step
``pretraining/loss``                each optimiser step of the self-supervised pretraining
==================================  ===========================================================

Per-class metrics are named by class (``sensitivity/pneumonia``) everywhere. Confusion counts
and undefined metrics (NaN) are left out. View with ``tensorboard --logdir
<workspace>/tensorboard`` (or the folder above several workspaces, to compare projects). Needs
the optional ``tensorboard`` package (``pip install 'medal-al[tensorboard]'``); torch's own
writer does the writing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .workspace import round_name

INSTALL = "pip install 'medal-al[tensorboard]'"


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            f"train.tensorboard = true needs the tensorboard package, which is not "
            f"installed: {INSTALL} (or set train.tensorboard = false)"
        ) from None
    return SummaryWriter


def require() -> None:
    """Raise :class:`ConfigError` (one line: what to install) unless TensorBoard can be
    written. Called before training so a missing package never costs a training run."""
    _summary_writer()


def _scalars(metrics: Mapping[str, Any]) -> list[tuple[str, float]]:
    out = []
    for k, v in sorted(metrics.items()):
        if k.startswith("confusion/") or v is None:
            continue
        f = float(v)
        if math.isfinite(f):
            out.append((k, f))
    return out


class RunPart:
    """The event file of one part (a model round: ``round-003``; ``pretraining``) of the
    project's run in ``root``; an earlier file of the same part is removed first. Use as a
    context manager."""

    def __init__(self, root: Path, part: str) -> None:
        writer_cls = _summary_writer()
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob(f"events.out.tfevents.*.{part}"):
            old.unlink()
        self.part = part
        self.writer = writer_cls(log_dir=str(root), filename_suffix=f".{part}")

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One point, left out when not finite."""
        if math.isfinite(float(value)):
            self.writer.add_scalar(tag, float(value), int(step))

    def row(self, row: Mapping[str, Any], step: int) -> None:
        """A training history row (``loss``, ``val_<metric>``) of this model round at
        ``step`` (a :data:`medal.train.TrainingLog`); written at once, so TensorBoard shows the
        training while it runs."""
        if row.get("loss") is not None:
            self.scalar(f"{self.part}/train/loss", float(row["loss"]), step)
        val = {k[4:]: v for k, v in row.items() if k.startswith("val_")}
        for k, v in _scalars(val):
            self.scalar(f"{self.part}/validation/{k}", v, step)
        self.writer.flush()

    def pretraining_loss(self, loss: float, step: int) -> None:
        """One optimiser step of the self-supervised pretraining."""
        self.scalar("pretraining/loss", loss, step)

    def round_metrics(
        self,
        n_labels: int,
        model_round: int,
        metrics: Mapping[str, Mapping[str, Any]],
        best_epoch: int,
    ) -> None:
        """The model round's reported metrics (``{split: {metric: value}}``) against the
        number of labels it trained on."""
        for split, m in metrics.items():
            for k, v in _scalars(m):
                self.scalar(f"labels/{split}/{k}", v, n_labels)
        self.scalar("labels/model_round", model_round, n_labels)
        self.scalar("labels/best_epoch", best_epoch, n_labels)

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> RunPart:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def round_part(root: Path, model_round: int) -> RunPart:
    """The event file of model round ``model_round``'s training."""
    return RunPart(root, round_name(model_round))


def pretraining_part(root: Path) -> RunPart:
    """The event file of the self-supervised pretraining (one per workspace)."""
    return RunPart(root, "pretraining")
