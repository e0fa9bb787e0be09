"""Training between rounds, evaluation metrics and checkpoints."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn import metrics as skm
from torch import nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

from . import __version__
from .config import Config
from .errors import ModelError
from .models import MCModel, create_model


@dataclass
class FitResult:
    epochs: int
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def build_model(cfg: Config) -> MCModel:
    m = cfg.model
    return create_model(m.name, len(cfg.classes), in_channels=m.channels, dropout=m.dropout,
                        hidden=m.hidden, pretrained=m.pretrained)


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``[K]`` (mean 1 over the classes present; 0 for absent ones)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def _augmenter() -> v2.Transform:
    return v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.92, 1.08))


def fit(model: MCModel, x: torch.Tensor, y: np.ndarray, cfg: Config, *, epochs: int,
        device: torch.device, x_val: torch.Tensor | None = None,
        y_val: np.ndarray | None = None, seed: int = 0, progress: bool = True) -> FitResult:
    """Train ``model`` on ``x [N, C, S, S]``, ``y [N]`` (class indices) and keep the best epoch.

    The best epoch is chosen on the validation set (highest balanced accuracy + AUROC, then
    lowest training loss); without one, the last epoch is kept. Epochs are raised so that at least ``train.min_steps`` optimiser
    steps run, which keeps tiny labelled sets from under-training.
    """
    t0 = time.perf_counter()
    tc = cfg.train
    n = len(x)
    if n == 0:
        raise ModelError("no labelled images to train on")
    steps_per_epoch = math.ceil(n / tc.batch_size)
    epochs = max(epochs, math.ceil(tc.min_steps / steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    weight = class_weights(y, len(cfg.classes)).to(device) if tc.class_weighted else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    yt = torch.as_tensor(y, dtype=torch.long)
    aug = _augmenter() if tc.augment else None
    best_key: tuple[float, ...] | None = None
    best_state, best_epoch = None, epochs
    history = []
    bar = tqdm(range(1, epochs + 1), desc="training", unit="epoch", disable=not progress,
               leave=False)
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, tc.batch_size):
            idx = perm[i:i + tc.batch_size]
            xb = x[idx]
            if aug is not None:
                xb = torch.stack([aug(img) for img in xb])
            xb, yb = xb.to(device), yt[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        row = {"epoch": epoch, "loss": total / n}
        if x_val is not None and y_val is not None and len(x_val):
            p = predict_deterministic(model, x_val, device)
            m = classification_metrics(y_val, p, len(cfg.classes))
            row.update({f"val_{k}": v for k, v in m.items() if not isinstance(v, list)})
            key = (_nan0(m.get("balanced_accuracy")) + _nan0(m.get("auroc")), -row["loss"])
            if best_key is None or key > best_key:
                best_key, best_epoch = key, epoch
                best_state = copy.deepcopy(model.state_dict())
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(epochs=epochs, best_epoch=best_epoch, history=history,
                     seconds=time.perf_counter() - t0)


def _nan0(v: float | None) -> float:
    return 0.0 if v is None or not np.isfinite(v) else float(v)


@torch.no_grad()
def predict_deterministic(model: MCModel, x: torch.Tensor, device: torch.device,
                          batch_size: int = 512) -> np.ndarray:
    """Dropout off: ``x [N, C, S, S]`` -> probabilities ``[N, K]``."""
    model.eval()
    out = [model(x[i:i + batch_size].to(device)).float().softmax(-1).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def classification_metrics(y: np.ndarray, probs: np.ndarray, n_classes: int
                           ) -> dict[str, float]:
    """Accuracy, balanced accuracy and AUROC (binary, or macro one-vs-rest) from ``probs [N, K]``.

    AUROC is NaN when ``y`` holds a single class (it is undefined then).
    """
    y = np.asarray(y)
    pred = probs.argmax(1)
    out = {"n": float(len(y)),
           "accuracy": float(skm.accuracy_score(y, pred)),
           "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred))}
    if len(np.unique(y)) < 2:
        out["auroc"] = float("nan")
    elif n_classes == 2:
        out["auroc"] = float(skm.roc_auc_score(y, probs[:, 1]))
    else:
        p = probs / probs.sum(1, keepdims=True)
        present = np.unique(y)
        if len(present) < n_classes:
            out["auroc"] = float(np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in present]))
        else:
            out["auroc"] = float(skm.roc_auc_score(y, p, multi_class="ovr", average="macro",
                                                   labels=list(range(n_classes))))
    return out


# --- checkpoints ----------------------------------------------------------------------------
def save_checkpoint(path: Path, model: MCModel, cfg: Config, round: int,
                    extra: dict[str, Any] | None = None) -> None:
    """Weights + effective config + class names + medal version, written atomically."""
    payload = {"state_dict": model.state_dict(), "config": cfg.to_dict(),
               "classes": list(cfg.classes), "model_name": cfg.model.name,
               "channels": cfg.model.channels, "medal_version": __version__, "round": round,
               **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model: MCModel, classes: Sequence[str], model_name: str,
                    channels: int) -> dict[str, Any]:
    """Load weights into ``model``; refuse a checkpoint for other classes or architecture."""
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot read checkpoint {path}: {e}") from None
    if list(ck.get("classes", [])) != list(classes):
        raise ModelError(f"checkpoint {path} was trained for classes {ck.get('classes')}, "
                         f"but the config has {list(classes)}")
    if ck.get("model_name") != model_name or ck.get("channels") != channels:
        raise ModelError(f"checkpoint {path} is a {ck.get('model_name')} with "
                         f"{ck.get('channels')} input channel(s); the config asks for "
                         f"{model_name} with {channels}")
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise ModelError(f"checkpoint {path} does not fit the model: {e}") from None
    return ck
