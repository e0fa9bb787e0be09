"""Evaluation metrics of a trained model (AUROC, balanced accuracy, calibration, per-class
sensitivity and specificity; scikit-learn's where it has them), the validation monitor that
picks the best epoch, and how a metric is shown."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm


def monitor_value(metrics: dict[str, float], name: str) -> float:
    """Higher is better; NaN when any part is undefined (e.g. AUROC on a one-class set)."""
    if name == "loss":
        return -metrics["loss"]
    values = [metrics.get(part) for part in name.split("+")]
    if any(v is None or not np.isfinite(v) for v in values):
        return float("nan")
    return float(sum(values))  # type: ignore[arg-type]


def defined_monitor(metrics: dict[str, float], name: str) -> tuple[str, str | None]:
    """The monitor to select epochs by: ``name`` if defined on these validation metrics, else
    its defined parts, else the validation loss; with a note saying why when it falls back."""
    if np.isfinite(monitor_value(metrics, name)):
        return name, None
    parts = [p for p in name.split("+") if metrics.get(p) is not None and np.isfinite(metrics[p])]
    used = "+".join(parts) if parts else "loss"
    missing = [p for p in name.split("+") if p not in parts]
    return used, (
        f"train.monitor {name!r} is undefined on this validation set "
        f"({', '.join(missing)} needs more classes present; validation has "
        f"{int(metrics.get('n', 0))} image(s)); selecting epochs by {used!r} instead"
    )


def show_metric(v: float | None, digits: int = 3) -> str:
    """A metric for people: ``0.912``, or ``–`` when it is undefined (None or NaN)."""
    return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |accuracy - confidence| * share."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def classification_metrics(
    y: np.ndarray, probs: np.ndarray, n_classes: int, classes: Sequence[str] | None = None
) -> dict[str, float]:
    """Metrics from labels ``y [N]`` and probabilities ``probs [N, K]`` (scikit-learn based).

    accuracy, balanced_accuracy (over the classes present in ``y``), auroc (binary, or macro
    one-vs-rest), loss (mean negative log-likelihood), ece, and per class ``sensitivity/<c>``,
    ``specificity/<c>`` and ``confusion/<true>/<predicted>`` counts. A metric the split cannot
    define is NaN: AUROC when any class is absent from ``y``, the sensitivity of a class with no
    example, the specificity of a class that is every example.
    """
    y = np.asarray(y)
    names = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
    labels = list(range(n_classes))
    pred = probs.argmax(1)
    p = np.clip(probs / probs.sum(1, keepdims=True), 1e-12, 1.0)
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" on small splits
        warnings.simplefilter("ignore", UserWarning)
        out = {
            "n": float(len(y)),
            "accuracy": float(skm.accuracy_score(y, pred)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
            "loss": float(skm.log_loss(y, p, labels=labels)),
            "ece": expected_calibration_error(y, p),
        }
    present = np.unique(y)
    if len(present) < n_classes:
        out["auroc"] = float("nan")
    elif n_classes == 2:
        out["auroc"] = float(skm.roc_auc_score(y, p[:, 1]))
    else:
        out["auroc"] = float(
            skm.roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels)
        )
    cm = skm.confusion_matrix(y, pred, labels=labels)
    for i, c in enumerate(names):
        tp, fn = cm[i, i], cm[i].sum() - cm[i, i]
        fp = cm[:, i].sum() - cm[i, i]
        tn = cm.sum() - tp - fn - fp
        out[f"sensitivity/{c}"] = float(tp / (tp + fn)) if tp + fn else float("nan")
        out[f"specificity/{c}"] = float(tn / (tn + fp)) if tn + fp else float("nan")
        for j, d in enumerate(names):
            out[f"confusion/{c}/{d}"] = float(cm[i, j])
    return out
