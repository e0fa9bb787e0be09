#!/usr/bin/env python3
"""Fingerprint a simulation folder, to show that a refactor left behaviour unchanged.

    python scripts/simulation_fingerprint.py OUT

Prints the SHA-256 of OUT/results.csv with its wall-clock columns (``*_seconds``) removed, and
of every round's full manifest (file, image id, source path, rank, score, prediction,
probabilities): the round folder's ``manifest.csv`` where it holds the predictions, else the
copy the workspace keeps in ``labelling/manifests/round-NNN.csv`` (blind rounds). The
simulation folder's own path is replaced by ``<out>`` first, so two folders compare. Run the
same ``medal simulate`` command before and after a change into two folders; equal prints mean
the same picks, labels and metrics.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
from pathlib import Path


def results_digest(out: Path) -> tuple[str, int]:
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    keep = [k for k in (rows[0] if rows else {}) if not k.endswith("_seconds")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, keep, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return hashlib.sha256(buf.getvalue().encode()).hexdigest(), len(rows)


def manifests_digest(out: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    folders = sorted(out.glob("*/seed-*/labelling/round-*"))
    for folder in folders:
        data = (folder / "manifest.csv").read_bytes()
        if b"predicted" not in data.split(b"\n", 1)[0]:
            data = (folder.parent / "manifests" / f"{folder.name}.csv").read_bytes()
        h.update(str(folder.relative_to(out)).encode())
        h.update(data.replace(str(out.resolve()).encode(), b"<out>"))
    return h.hexdigest(), len(folders)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", type=Path, help="the --out folder of a medal simulate run")
    out = p.parse_args(argv).out
    digest, n = results_digest(out)
    print(f"results.csv without seconds: {digest} ({n} rows)")
    digest, n = manifests_digest(out)
    print(f"full manifests: {digest} ({n} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
