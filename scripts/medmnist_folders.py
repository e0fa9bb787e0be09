"""Shared steps of the prepare_* scripts: MedMNIST .npz file -> ordinary image folders."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def save_png(path: Path, img: np.ndarray) -> None:
    """``img``: uint8 ``[H, W]`` (gray) or ``[H, W, 3]`` (RGB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def already_prepared(out: Path, settings: dict[str, Any], force: bool) -> bool:
    """True if ``out`` holds folders made with ``settings``; exits if made with others."""
    marker = out / "prepared.json"
    if marker.is_file() and not force:
        if json.loads(marker.read_text()) == settings:
            print(f"{out} is already prepared (use --force to rebuild)")
            return True
        sys.exit(f"error: {out} was prepared with other settings; use --force to rebuild it")
    return False


def load_verified(npz: Path, sha256: str, out: Path) -> Any:
    """The arrays of ``npz`` after checking its sha256; clears ``out`` for a rebuild."""
    digest = hashlib.sha256(npz.read_bytes()).hexdigest()
    if digest != sha256:
        sys.exit(f"error: {npz} has sha256 {digest}, expected {sha256}")
    if out.exists():
        shutil.rmtree(out)
    return np.load(npz)


def class_balanced_start(
    y: np.ndarray, n_classes: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """``size`` training indices spread evenly over the classes (earlier classes get the
    remainder)."""
    per_class = [size // n_classes + (c < size % n_classes) for c in range(n_classes)]
    return np.concatenate(
        [rng.choice(np.flatnonzero(y == c), k, replace=False) for c, k in enumerate(per_class)]
    )


def write_truth(out: Path, rows: Sequence[tuple[str, str]]) -> None:
    """The hidden pool labels (``file,label``, files relative to ``out``)."""
    with open(out / "pool_truth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerows(rows)


def write_eval_splits(
    out: Path, d: Any, classes: Sequence[str], save: Callable[[Path, np.ndarray], None] = save_png
) -> None:
    """The official val and test splits as ``validation/<class>/`` and ``test/<class>/``."""
    for split, folder in (("val", "validation"), ("test", "test")):
        xs, ys = d[f"{split}_images"], d[f"{split}_labels"].ravel()
        for i in range(len(xs)):
            save(out / folder / classes[ys[i]] / f"{split}_{i:05d}.png", xs[i])


def finish(out: Path, settings: dict[str, Any]) -> None:
    (out / "prepared.json").write_text(json.dumps(settings))
