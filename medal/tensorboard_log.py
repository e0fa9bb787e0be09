"""TensorBoard logging of a round's training (``train.tensorboard = true``).

One TensorBoard run per model round, ``<workspace>/tensorboard/round-NNN``, written once after
training from the history that :func:`medal.train.fit` / :func:`medal.train.fit_probe` return:

================================  =========================================================
tag                               step
================================  =========================================================
``train/loss``                    epoch (a frozen-backbone probe: one point at epoch 1)
``validation/<metric>``           each evaluated epoch (deterministic predictions, as the
                                  best epoch is chosen)
``final/<split>/<metric>``        the model round: the round's reported MC-dropout metrics
                                  on ``validation`` / ``test`` (as ``medal status`` shows)
``final/best_epoch``              the model round
================================  =========================================================

Confusion counts and undefined metrics (NaN) are left out. View every round with
``tensorboard --logdir <workspace>/tensorboard``. Needs the optional ``tensorboard`` package
(``pip install 'medal-al[tensorboard]'``); torch's own writer does the writing.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

INSTALL = "pip install 'medal-al[tensorboard]'"


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"train.tensorboard = true needs the tensorboard package, which is not "
                          f"installed: {INSTALL} (or set train.tensorboard = false)") from None
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


def write_round(log_dir: Path, model_round: int, history: Sequence[Mapping[str, Any]],
                metrics: Mapping[str, Mapping[str, Any]], best_epoch: int) -> None:
    """Write one model round's run to ``log_dir``, replacing an earlier run of the same round
    (a round trained again must not show two curves). ``history``: one row per epoch
    (``epoch``, ``loss``, ``val_<metric>`` on evaluated epochs); ``metrics``: ``{split:
    {metric: value}}``."""
    writer_cls = _summary_writer()
    if log_dir.exists():
        shutil.rmtree(log_dir)
    log_dir.mkdir(parents=True)
    writer = writer_cls(log_dir=str(log_dir))
    try:
        for row in history:
            step = int(row["epoch"])
            if row.get("loss") is not None:
                writer.add_scalar("train/loss", float(row["loss"]), step)
            val = {k[4:]: v for k, v in row.items() if k.startswith("val_")}
            for k, v in _scalars(val):
                writer.add_scalar(f"validation/{k}", v, step)
        for split, m in metrics.items():
            for k, v in _scalars(m):
                writer.add_scalar(f"final/{split}/{k}", v, model_round)
        writer.add_scalar("final/best_epoch", float(best_epoch), model_round)
    finally:
        writer.close()
