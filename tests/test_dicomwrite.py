"""medal.dicomwrite: the DICOM writer of the bundled data and the tests."""

from __future__ import annotations

import hashlib

import numpy as np
import pydicom

from medal.dicomwrite import write_dicom


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_uid_source_makes_the_file_bytes_repeatable(tmp_path):
    px = np.arange(64, dtype=np.uint16).reshape(8, 8) * 16
    a = write_dicom(tmp_path / "a.dcm", px, uid_source="train-00001")
    b = write_dicom(tmp_path / "b.dcm", px, uid_source="train-00001")
    c = write_dicom(tmp_path / "c.dcm", px, uid_source="train-00002")
    assert _sha(a) == _sha(b)  # the same source: the same bytes, so the same content id
    da, dc = pydicom.dcmread(a), pydicom.dcmread(c)
    assert da.SOPInstanceUID != dc.SOPInstanceUID
    assert len({da.SOPInstanceUID, da.StudyInstanceUID, da.SeriesInstanceUID}) == 3
    assert da.file_meta.MediaStorageSOPInstanceUID == da.SOPInstanceUID
    np.testing.assert_array_equal(da.pixel_array, px)


def test_without_uid_source_each_file_gets_new_uids(tmp_path):
    px = np.zeros((4, 4), np.uint16)
    a = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", px))
    b = pydicom.dcmread(write_dicom(tmp_path / "b.dcm", px))
    assert a.SOPInstanceUID != b.SOPInstanceUID
