"""medal.medmnist: the bundled MedMNIST files as image folders (what the prepare scripts,
the demo and the benchmarks run)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medal.errors import DataError
from medal.medmnist import (
    BUNDLED,
    SHA256,
    class_balanced_start,
    prepare_bundled,
    prepare_retinamnist,
    read_verified,
)

DATA = Path(__file__).resolve().parents[1] / "data"
RETINA = DATA / "retinamnist" / "retinamnist.npz"


def test_class_balanced_start_spreads_the_size_over_the_classes():
    y = np.repeat([0, 1, 2], 10)
    start = class_balanced_start(y, 3, 7, np.random.default_rng(0))
    assert len(set(start.tolist())) == 7
    assert np.bincount(y[start]).tolist() == [3, 2, 2]  # earlier classes get the remainder


def test_the_bundled_files_are_the_ones_recorded():
    for name in BUNDLED:
        d = read_verified(DATA / name / f"{name}.npz", SHA256[name])
        assert {f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")} <= set(
            d
        )


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_prepare_retinamnist_writes_every_split_once(tmp_path, capsys):
    out = tmp_path / "images"
    assert prepare_retinamnist(RETINA, out, labelled=10, seed=0, force=False) == out
    labelled = files(out / "labelled")
    assert len(labelled) == 10
    assert sorted({p.parent.name for p in labelled}) == [f"grade{g}" for g in range(5)]
    with open(out / "pool_truth.csv", newline="") as f:
        truth = list(csv.DictReader(f))
    pool = files(out / "pool")
    assert [out / r["file"] for r in truth] == pool and len(pool) == 1080 - 10
    assert {r["label"] for r in truth} <= {f"grade{g}" for g in range(5)}
    assert (len(files(out / "validation")), len(files(out / "test"))) == (120, 400)
    before = {p: p.stat().st_mtime_ns for p in files(out)}
    capsys.readouterr()
    prepare_retinamnist(RETINA, out, labelled=10, seed=0, force=False)
    assert "already prepared" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in files(out)} == before
    with pytest.raises(DataError, match="prepared with other settings; use --force"):
        prepare_retinamnist(RETINA, out, labelled=10, seed=1, force=False)
    assert {p: p.stat().st_mtime_ns for p in files(out)} == before
    prepare_retinamnist(RETINA, out, labelled=5, seed=1, force=True)
    assert len(files(out / "labelled")) == 5 and len(files(out / "pool")) == 1080 - 5


def test_a_changed_source_file_is_refused_and_nothing_is_deleted(tmp_path):
    npz = tmp_path / "retinamnist.npz"
    data = bytearray(RETINA.read_bytes())
    data[-1] ^= 1
    npz.write_bytes(bytes(data))
    out = tmp_path / "images"
    out.mkdir()
    (out / "mine.png").write_bytes(b"keep")
    with pytest.raises(DataError, match=r"retinamnist\.npz has sha256 [0-9a-f]{64}, expected"):
        prepare_retinamnist(npz, out, labelled=5, seed=0, force=True)
    assert (out / "mine.png").read_bytes() == b"keep"


def test_an_unknown_bundled_name_lists_the_bundled_ones(tmp_path):
    with pytest.raises(
        DataError, match="no bundled data set 'chestmnist'; bundled: pneumoniamnist"
    ):
        prepare_bundled(tmp_path, "chestmnist")
