"""scripts/prepare_variants.py: the stress variants are what their names say and load as configs."""

import csv
from collections import Counter
from pathlib import Path

import pytest

from medal.config import load_config

from conftest import load_script


def _script():
    return load_script("prepare_variants")


def _truth(folder: Path) -> list[dict[str, str]]:
    with open(folder / "images" / "pool_truth.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_variants_have_their_pools_classes_and_a_loadable_config(tmp_path):
    pv = _script()
    assert pv.main(["--out", str(tmp_path), "--only", "pn500,retref"]) == 0
    pn = _truth(tmp_path / "pn500")
    assert len(pn) == 500 and {r["label"] for r in pn} == {"normal", "pneumonia"}
    assert all((tmp_path / "pn500" / "images" / r["file"]).is_file() for r in pn)
    ret = Counter(r["label"] for r in _truth(tmp_path / "retref"))
    # RetinaMNIST's 1,080 train images: grades 0-1 (486 + 128) are not referable, 2-4 are
    assert ret == {"nonreferable": 614, "referable": 466}
    tests = {p.parent.name for p in (tmp_path / "retref" / "images" / "test").rglob("*.png")}
    assert tests == {"nonreferable", "referable"}
    cfg = load_config(tmp_path / "retref" / "config.toml")
    assert cfg.classes == ("nonreferable", "referable") and cfg.model.channels == 3
    # ret4: the same images, grade 4 (66 train, 20 test images) against the rest
    pv.prepare("ret4", tmp_path)
    assert Counter(r["label"] for r in _truth(tmp_path / "ret4")) == {
        "other": 1014,
        "proliferative": 66,
    }
    assert [r["file"] for r in _truth(tmp_path / "ret4")] == [
        r["file"] for r in _truth(tmp_path / "retref")
    ]
    assert len(list((tmp_path / "ret4" / "images" / "test" / "proliferative").iterdir())) == 20
    # the cut is the variant's definition: the same files every time
    again = tmp_path / "again"
    assert pv.main(["--out", str(again), "--only", "pn500"]) == 0
    assert _truth(again / "pn500") == pn


@pytest.mark.parametrize(
    ("name", "normal", "pneumonia"), [("pnimb4", 240, 960), ("pnimb9", 120, 1080)]
)
def test_the_imbalanced_variants_have_their_ratios(tmp_path, name, normal, pneumonia):
    pv = _script()
    pv.prepare(name, tmp_path)
    assert Counter(r["label"] for r in _truth(tmp_path / name)) == {
        "normal": normal,
        "pneumonia": pneumonia,
    }


def test_an_unknown_variant_is_refused_naming_the_valid_ones(tmp_path, capsys):
    pv = _script()
    try:
        pv.main(["--out", str(tmp_path), "--only", "pn9000"])
    except SystemExit as e:
        assert e.code == 2
    assert "pn500, pn1200, pnimb4, pnimb9, retref, ret4" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
