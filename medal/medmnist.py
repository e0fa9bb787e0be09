"""The bundled MedMNIST files (``data/<name>/<name>.npz``) as ordinary image folders, as a
user's data would be; used by ``scripts/prepare_<name>.py``, the demo and the benchmarks.

Each preparation writes, under ``out``::

    labelled/<class>/train_NNNNN.png     small labelled start set, spread evenly over the classes
    pool/...                             the rest of train, unlabelled (PNG; PneumoniaMNIST also
                                         writes a share as DICOM under pool/dicom/)
    validation/<class>/val_NNNNN.png     the official val split
    test/<class>/test_NNNNN.png          the official test split
    pool_truth.csv                       hidden pool labels (``file,label``; simulations only)
    prepared.json                        the settings it was made with

The source file's sha256 is checked first, and the same settings write the same bytes (the
DICOM UIDs derive from the image index), so a fresh clone prepares identical folders. Paths are
passed in by the caller (the checkout's ``data/``); nothing here is located relative to this
file.

Data: MedMNIST v2 (CC BY 4.0); see ``data/<name>/ATTRIBUTION.md``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .dicomwrite import write_dicom
from .errors import DataError

PNEUMONIAMNIST_SHA256 = "e1792d3f03751cb101e99f19a63b3c1941436c988665f47853417b05be250cd8"
PNEUMONIAMNIST_CLASSES = ("normal", "pneumonia")
RETINAMNIST_SHA256 = "254915f5f0a2074665c4676356824cf4ef4a3bcab233894b4bafcaf48962bd69"
RETINAMNIST_CLASSES = ("grade0", "grade1", "grade2", "grade3", "grade4")
BUNDLED = ("pneumoniamnist", "retinamnist")
"""The data sets that ship with the checkout (``data/<name>/<name>.npz``)."""
SHA256 = {"pneumoniamnist": PNEUMONIAMNIST_SHA256, "retinamnist": RETINAMNIST_SHA256}
"""The sha256 of each bundled ``<name>.npz``."""


def save_png(path: Path, img: np.ndarray) -> None:
    """``img``: uint8 ``[H, W]`` (gray) or ``[H, W, 3]`` (RGB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def already_prepared(out: Path, settings: dict[str, Any], force: bool) -> bool:
    """True if ``out`` holds folders made with ``settings`` (and says so); raises
    :class:`DataError` if they were made with others (``force`` rebuilds instead)."""
    marker = out / "prepared.json"
    if marker.is_file() and not force:
        if json.loads(marker.read_text()) == settings:
            print(f"{out} is already prepared (use --force to rebuild)")
            return True
        raise DataError(f"{out} was prepared with other settings; use --force to rebuild it")
    return False


def read_verified(npz: Path, sha256: str) -> dict[str, np.ndarray]:
    """The arrays of ``npz`` (``{split}_images`` ``[N, 28, 28]`` or ``[N, 28, 28, 3]`` uint8,
    ``{split}_labels`` ``[N, 1]``) after checking its sha256 (:class:`DataError` if it
    differs; :data:`SHA256` holds the bundled files').

    Read into memory once: indexing ``np.load``'s lazy file decompresses the whole array on
    every access, which made a loop over images quadratic."""
    digest = hashlib.sha256(npz.read_bytes()).hexdigest()
    if digest != sha256:
        raise DataError(f"{npz} has sha256 {digest}, expected {sha256}")
    with np.load(npz) as z:
        return {k: z[k] for k in z.files}


def load_verified(npz: Path, sha256: str, out: Path) -> dict[str, np.ndarray]:
    """:func:`read_verified`, then clears ``out`` for a rebuild."""
    d = read_verified(npz, sha256)
    if out.exists():
        shutil.rmtree(out)
    return d


def class_balanced_start(
    y: np.ndarray, n_classes: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """``size`` training indices (``[size]``) from the labels ``y`` (``[N]``), spread evenly over
    the classes (earlier classes get the remainder)."""
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
    out: Path,
    d: dict[str, np.ndarray],
    classes: Sequence[str],
    save: Callable[[Path, np.ndarray], None] = save_png,
) -> None:
    """The official val and test splits of the npz arrays ``d`` as ``validation/<class>/`` and
    ``test/<class>/``."""
    for split, folder in (("val", "validation"), ("test", "test")):
        xs, ys = d[f"{split}_images"], d[f"{split}_labels"].ravel()
        for i in range(len(xs)):
            save(out / folder / classes[ys[i]] / f"{split}_{i:05d}.png", xs[i])


def finish(out: Path, settings: dict[str, Any]) -> None:
    """Record the settings (``prepared.json``): the folders are complete."""
    (out / "prepared.json").write_text(json.dumps(settings))


def _pneumonia_dicom(path: Path, img: np.ndarray, index: int) -> None:
    # 12-bit stored values with a CT-like rescale and a window that maps them back onto 0..1,
    # so the demo exercises the modality LUT and VOI path and sees the same pixels as the PNGs.
    stored = img.astype(np.uint16) * 16
    write_dicom(
        path,
        stored,
        bits_stored=12,
        slope=1.0,
        intercept=-1024.0,
        window=(1016.5, 4081.0),
        patient_id=f"PNEUMOMNIST{index:05d}",
        uid_source=f"pneumoniamnist-train-{index:05d}",
    )


def _labelled_start(
    out: Path,
    x: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    labelled: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the class-balanced start set of the train split (``x [N, ...]``, ``y [N]``), write
    it as PNGs under ``out/labelled/<class>/``; returns (start indices, the rest: the pool)."""
    start = class_balanced_start(y, len(classes), labelled, rng)
    for i in sorted(start):
        save_png(out / "labelled" / classes[y[i]] / f"train_{i:05d}.png", x[i])
    return start, np.setdiff1d(np.arange(len(x)), start)


def prepare_pneumoniamnist(
    npz: Path, out: Path, *, labelled: int, dicom_fraction: float, seed: int, force: bool
) -> Path:
    """PneumoniaMNIST (28x28 gray chest X-rays, normal/pneumonia) as folders under ``out``, a
    ``dicom_fraction`` share of the pool as 12-bit DICOM (once; ``prepared.json`` records the
    settings). Returns ``out``."""
    settings = {
        "labelled": labelled,
        "dicom_fraction": dicom_fraction,
        "seed": seed,
        "source_sha256": PNEUMONIAMNIST_SHA256,
    }
    if already_prepared(out, settings, force):
        return out
    classes = PNEUMONIAMNIST_CLASSES
    d = load_verified(npz, PNEUMONIAMNIST_SHA256, out)
    rng = np.random.default_rng(seed)
    x, y = d["train_images"], d["train_labels"].ravel()
    start, pool = _labelled_start(out, x, y, classes, labelled, rng)
    as_dicom = set(rng.choice(pool, int(round(len(pool) * dicom_fraction)), replace=False))
    truth = []
    for i in pool:
        if i in as_dicom:
            rel = f"dicom/train_{i:05d}.dcm"
            _pneumonia_dicom(out / "pool" / rel, x[i], int(i))
        else:
            rel = f"png/train_{i:05d}.png"
            save_png(out / "pool" / rel, x[i])
        truth.append((f"pool/{rel}", classes[y[i]]))
    write_truth(out, truth)
    write_eval_splits(out, d, classes)
    finish(out, settings)
    print(
        f"prepared {out}: {len(start)} labelled, {len(pool)} pool "
        f"({len(as_dicom)} as DICOM), {len(d['val_images'])} validation, "
        f"{len(d['test_images'])} test"
    )
    return out


def prepare_retinamnist(npz: Path, out: Path, *, labelled: int, seed: int, force: bool) -> Path:
    """RetinaMNIST (28x28 RGB fundus photographs, diabetic retinopathy grades 0-4 as five
    classes) as PNG folders under ``out`` (once; ``prepared.json`` records the settings).
    Returns ``out``."""
    settings = {"labelled": labelled, "seed": seed, "source_sha256": RETINAMNIST_SHA256}
    if already_prepared(out, settings, force):
        return out
    classes = RETINAMNIST_CLASSES
    d = load_verified(npz, RETINAMNIST_SHA256, out)
    rng = np.random.default_rng(seed)
    x, y = d["train_images"], d["train_labels"].ravel()
    start, pool = _labelled_start(out, x, y, classes, labelled, rng)
    truth = []
    for i in pool:
        rel = f"pool/train_{i:05d}.png"
        save_png(out / rel, x[i])
        truth.append((rel, classes[y[i]]))
    write_truth(out, truth)
    write_eval_splits(out, d, classes)
    finish(out, settings)
    print(
        f"prepared {out}: {len(start)} labelled, {len(pool)} pool, "
        f"{len(d['val_images'])} validation, {len(d['test_images'])} test"
    )
    return out


def prepare_bundled(data: Path, name: str) -> Path:
    """The bundled data set ``name``'s folders, ``data/<name>/images``, prepared from
    ``data/<name>/<name>.npz`` with the prepare script's defaults (once). ``data`` is the
    checkout's ``data/`` folder."""
    npz, images = data / name / f"{name}.npz", data / name / "images"
    if name == "pneumoniamnist":
        return prepare_pneumoniamnist(
            npz, images, labelled=20, dicom_fraction=0.1, seed=0, force=False
        )
    if name == "retinamnist":
        return prepare_retinamnist(npz, images, labelled=25, seed=0, force=False)
    raise DataError(f"no bundled data set {name!r}; bundled: {', '.join(BUNDLED)}")
