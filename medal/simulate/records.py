"""What one run records beside its ledger: the wall-clock seconds of each round
(``seconds.csv``) and the labels given, counted as the report counts them."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..config import Config
from ..workspace import Workspace

SECONDS_COLUMNS = ("train_seconds", "score_seconds", "query_seconds", "round_seconds")
"""results.csv's timings, wall-clock seconds: ``train_seconds`` fitting the model only (from
the ledger); ``score_seconds`` MC-dropout scoring and selection of the round's images (from the
ledger; empty for round 0); ``query_seconds`` the whole query: scoring, selection and export of
the round folder (copies, previews, manifest; empty for round 0); ``round_seconds`` the whole
round: query, simulated labelling, ingest and training with its image loading, evaluation and
checkpoint (round 0: the first training). The last two are measured by the run and kept in its
``seconds.csv``; they are empty for a round that an interruption split in two."""


def record_seconds(
    run_dir: Path, model_round: int, query_seconds: float | None, round_seconds: float | None
) -> None:
    """Append one model round's timings to ``<run>/seconds.csv`` (a later row wins)."""
    path = run_dir / "seconds.csv"
    new = not path.is_file()
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["round", "query_seconds", "round_seconds"])
        w.writerow(
            [
                model_round,
                *("" if v is None else round(v, 3) for v in (query_seconds, round_seconds)),
            ]
        )


def read_seconds(run_dir: Path) -> dict[int, dict[str, float | str]]:
    """``{model round: {"query_seconds": s, "round_seconds": s}}`` from ``seconds.csv``; an
    unmeasured value is ``""``."""
    path = run_dir / "seconds.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {
            int(r["round"]): {
                k: float(r[k]) if r.get(k) else "" for k in ("query_seconds", "round_seconds")
            }
            for r in csv.DictReader(f)
            if (r.get("round") or "").isdigit()
        }


def record_pretraining_seconds(path: Path, measured: dict[str, float]) -> dict[str, float]:
    """Merge ``{backbone: seconds}`` into the JSON file ``path`` without overwriting a backbone
    already there (its first measurement is the pretraining; later ones load it from the
    cache), and return the merged record. Written to a temporary name and renamed."""
    try:
        known = {str(k): float(v) for k, v in json.loads(path.read_text("utf-8")).items()}
    except (FileNotFoundError, ValueError, AttributeError, TypeError):
        known = {}
    merged = {**{k: round(v, 3) for k, v in measured.items()}, **known}
    if merged != known:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    return merged


LABEL_COLUMNS = ("labels", "labels_train", "labels_holdout")
"""results.csv's label counts: ``labels`` every class label the simulated radiologist gave up
to that model round (start set and ingested rounds, held-out validation labels included; the
x axis of every curve and table), ``labels_train`` those the model was trained on,
``labels_holdout`` those held out for validation (``train.validation_fraction``, when no
validation set was passed). ``labels - labels_train - labels_holdout`` were unreadable."""


def labels_given(
    records: Sequence[Any], classes: Sequence[str], model_rounds: Iterable[int]
) -> dict[int, int]:
    """``{model round k: images whose latest label recorded in rounds <= k is a class}``.

    ``records`` are the ledger's label rows in insertion order (``image_id``, ``label``,
    ``round``); the model of round k is trained after the labels of round k are ingested.
    """
    wanted = set(classes)
    out = {}
    for k in model_rounds:
        latest: dict[str, str] = {}
        for rec in records:
            if rec.round <= k:
                latest[rec.image_id] = rec.label
        out[k] = sum(1 for lab in latest.values() if lab in wanted)
    return out


def label_counts(cfg: Config, model_rounds: Sequence[int]) -> tuple[dict[int, int], int]:
    """Labels given per model round and the size of the frozen validation hold-out."""
    with Workspace(cfg, lock=False) as ws:
        records = ws.db.labels()
        chosen = ws.db.holdout() or []
        current = ws.db.current_labels()
    holdout = sum(1 for i in chosen if current.get(i) in cfg.classes)
    return labels_given(records, cfg.classes, model_rounds), holdout


def parse_metric(v: Any) -> float | None:
    """A metric cell as a float; ``None`` when undefined (None, empty, NaN, infinite)."""
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def format_metric(v: Any, digits: int = 3) -> str:
    f = parse_metric(v)
    return "–" if f is None else f"{f:.{digits}f}"
