"""medal.scan: sorted scans of folders and label CSVs, content ids."""

import numpy as np
import pytest
from PIL import Image

from conftest import save
from medal.errors import DataError
from medal.scan import file_sha256, scan_folder, scan_source


def test_scan_is_sorted_recursive_and_skips_hidden_and_non_images(tmp_path):
    img = np.zeros((4, 4), np.uint8)
    for name in ["b/2.png", "a.png", "b/1.dcm", ".hidden/x.png", "c/.y.png", "notes.txt"]:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".png"):
            save(p, img)
        elif name.endswith(".dcm"):
            save(p, img, as_dicom=True)
        else:
            p.write_text("x")
    got = [p.relative_to(tmp_path).as_posix() for p in scan_folder(tmp_path)]
    assert got == ["a.png", "b/1.dcm", "b/2.png"]


def test_labelled_folder_and_csv(tmp_path):
    img = np.zeros((4, 4), np.uint8)
    save(tmp_path / "lab" / "Normal" / "a.png", img)
    save(tmp_path / "lab" / "pneumonia" / "b.png", img + 1)
    e = scan_source(tmp_path / "lab", ["normal", "pneumonia"])
    assert [(x.path.name, x.label) for x in e] == [("a.png", "normal"), ("b.png", "pneumonia")]
    (tmp_path / "lab" / "other").mkdir()
    save(tmp_path / "lab" / "other" / "c.png", img)
    with pytest.raises(DataError, match="'other' are not classes; allowed: normal, pneumonia"):
        scan_source(tmp_path / "lab", ["normal", "pneumonia"])

    csv = tmp_path / "list.csv"
    csv.write_text(
        "file,label\nlab/Normal/a.png, NORMAL\nlab/pneumonia/b.png,covid\nmissing.png,normal\n"
    )
    with pytest.raises(DataError) as err:
        scan_source(csv, ["normal", "pneumonia"])
    assert "line 3: label 'covid'" in str(err.value)
    assert "line 4: file not found" in str(err.value)
    csv.write_text("file,label\nlab/Normal/a.png, NORMAL\n")
    assert scan_source(csv, ["normal", "pneumonia"])[0].label == "normal"


def test_sha256_is_content_id(tmp_path):
    a = save(tmp_path / "a.png", np.zeros((3, 3), np.uint8))
    b = tmp_path / "b.png"
    b.write_bytes(a.read_bytes())
    assert file_sha256(a) == file_sha256(b)
    Image.fromarray(np.ones((3, 3), np.uint8)).save(b)
    assert file_sha256(a) != file_sha256(b)
