"""De-identification (DICOM PS3.15 Annex E basic profile, the whole of Table E.1-1), driven
through the real export path: a workspace, its pool, ``export_round`` with
``labelling.deidentify = true``. Markers are unique strings (or byte patterns) put into every
attribute the table removes, empties or replaces, into sequences, private tags, the preamble and
the file meta; none may survive anywhere under the round folder."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from conftest import CLASSES, make_image, save, write_config
from medal import deid
from medal.config import load_config
from medal.dicomwrite import write_dicom
from medal.labelling import Candidate, export_round
from medal.workspace import Workspace
from medal.sources import sync

UID_ROOT = "1.2.999.7331."  # marker UIDs; medal's new UIDs are 2.25.<digits>


@pytest.fixture(autouse=True)
def lenient_pydicom(monkeypatch):
    """Markers are not valid dates, ages, ...: let pydicom write and read them as they are."""
    monkeypatch.setattr(pydicom_config.settings, "writing_validation_mode", pydicom_config.IGNORE)
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.IGNORE)


class Markers:
    """Unique marker values by VR; remembers the bytes to look for in the exported files."""

    def __init__(self) -> None:
        self.found: dict[bytes, str] = {}  # marker bytes -> where it was put
        self.n = 0

    def text(self, where: str) -> str:
        self.n += 1
        m = f"MDLMK{self.n:04d}Q"
        self.found[m.encode()] = where
        return m

    def value(self, vr: str, where: str):
        vr = vr.split(" or ")[0]
        if vr == "UI":
            self.n += 1
            m = f"{UID_ROOT}{self.n}.7"  # ends in .7: no marker is a prefix of another
            self.found[m.encode()] = where
            return m
        if vr in ("DS", "IS"):  # '+' and 'E' occur in no UID and no other exported text
            self.n += 1
            m = f"+{self.n}E+73" if vr == "DS" else f"+{7331_0000 + self.n}"
            self.found[m.encode()] = where
            return m
        if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "UN"):
            return self.text(where).encode() + b"\0\0"  # 12 bytes: a multiple of 2, 4 (not 8)
        fmt = {
            "US": "H",
            "SS": "h",
            "UL": "L",
            "SL": "l",
            "FL": "f",
            "FD": "d",
            "UV": "Q",
            "SV": "q",
            "AT": "L",
        }.get(vr)
        if fmt is not None:  # numbers whose little-endian bytes spell a text marker
            raw = self.text(where).encode().ljust(16, b"\0")
            return list(struct.unpack(f"<{16 // struct.calcsize(fmt)}{fmt}", raw))
        return self.text(where)  # AE AS CS DA DT LO LT PN SH ST TM UC UR UT and unknown


def concrete_tag(row: tuple[int, ...]) -> int:
    """One real tag for a table row (repeating groups: the second group, e.g. 6002)."""
    if len(row) == 2:
        return (row[0] << 16) | row[1]
    group, element, _, element_mask = row
    return ((group + 2) << 16) | (element if element_mask else 0x3000)  # 50xx: Curve Data


def vr_of(tag: int) -> str:
    """The dictionary's VR; tags newer than pydicom's dictionary are written as LO."""
    vr = dictionary_VR(tag) if dictionary_has_tag(tag) else "LO"
    return vr.split(" or ")[0]


def fill_table(ds: Dataset, markers: Markers, where: str) -> None:
    """Every Table E.1-1 attribute (outside the file meta) into ``ds``, each with a marker."""
    for row in deid.basic_profile():
        tag = concrete_tag(row)
        if tag >> 16 in (0x0000, 0x0002):
            continue  # command elements cannot be written to a file; file meta: fill_file_meta
        vr = vr_of(tag)
        label = f"{where} ({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if vr == "SQ":
            ds.add_new(tag, vr, Sequence([item(markers, label)]))
        else:
            ds.add_new(tag, vr, markers.value(vr, label))


def item(markers: Markers, where: str) -> Dataset:
    """A sequence item with identifying attributes and a private tag."""
    it = Dataset()
    it.PatientName = markers.text(f"{where} item PatientName")
    it.InstitutionName = markers.text(f"{where} item InstitutionName")
    it.OtherPatientIDs = markers.text(f"{where} item OtherPatientIDs")
    block = it.private_block(0x0029, markers.text(f"{where} item private creator"), create=True)
    block.add_new(0x01, "LO", markers.text(f"{where} item private LO"))
    return it


def fill_file_meta(ds: Dataset, markers: Markers) -> None:
    meta = ds.file_meta
    rows = [concrete_tag(row) for row in deid.basic_profile()]
    # the table's file-meta row: Media Storage SOP Instance UID (pydicom writes the dataset's)
    assert [t for t in rows if t >> 16 == 0x0002] == [0x00020003]
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID  # a marker UID
    meta.SourceApplicationEntityTitle = markers.text("file meta SourceApplicationEntityTitle")
    meta.SendingApplicationEntityTitle = markers.text("file meta SendingApplicationEntityTitle")
    meta.ReceivingApplicationEntityTitle = markers.text("file meta ReceivingAE")
    meta.ImplementationVersionName = markers.text("file meta ImplementationVersionName")
    meta.ImplementationClassUID = markers.value("UI", "file meta ImplementationClassUID")
    meta.PrivateInformationCreatorUID = markers.value("UI", "file meta PrivateInfoCreatorUID")
    meta.PrivateInformation = markers.value("OB", "file meta PrivateInformation")


def identified_dicom(path: Path, markers: Markers, pixel: int, *, nested: bool) -> None:
    """A 16x16 image carrying markers everywhere: the table's attributes at the top level
    (``nested=False``) or two sequences deep in sequences the table does not list."""
    write_dicom(path, np.full((16, 16), pixel, np.uint16), bits_stored=12)
    ds = pydicom.dcmread(path)
    where = path.name
    if nested:  # Anatomic Region Sequence > Anatomic Region Modifier Sequence: not in the table
        assert deid.action_for(0x00082218) is None and deid.action_for(0x00082220) is None
        outer, inner = item(markers, f"{where} outer"), Dataset()
        fill_table(inner, markers, f"{where} nested")
        outer.AnatomicRegionModifierSequence = Sequence([inner])
        ds.AnatomicRegionSequence = Sequence([outer])
    else:
        fill_table(ds, markers, where)
    for group, vr in ((0x0009, "LO"), (0x0011, "UN"), (0x6001, "OB")):  # 6001: odd, private
        block = ds.private_block(group, markers.text(f"{where} creator {group:04X}"), create=True)
        block.add_new(0x10, vr, markers.value(vr, f"{where} private {group:04X}"))
    ds.add_new(0x60000022, "LO", markers.text(f"{where} OverlayDescription"))
    ds.add_new(0x60000010, "US", 16)  # Overlay Rows
    if nested:
        ds.SOPInstanceUID = markers.value("UI", f"{where} SOPInstanceUID")
    fill_file_meta(ds, markers)
    markers.found.pop(ds.StudyInstanceUID.encode(), None)
    ds.StudyInstanceUID = f"{UID_ROOT}0.7"  # shared by both files
    markers.found[ds.StudyInstanceUID.encode()] = "StudyInstanceUID"
    ds.preamble = b"MDLMK-PREAMBLE-" + bytes(113)
    markers.found[b"MDLMK-PREAMBLE-"] = f"{where} preamble"
    ds.save_as(path, enforce_file_format=True)


def export(tmp_path: Path) -> Path:
    """``labelling.deidentify = true``; every pool file exported by the real export path."""
    rng = np.random.default_rng(0)
    for split in ("labelled", "validation"):
        for c, name in enumerate(CLASSES):
            save(tmp_path / "data" / split / name / "x.png", make_image(c, rng))
    cfg = load_config(write_config(tmp_path), {"labelling.deidentify": True})
    with Workspace(cfg) as ws:
        snap = sync(ws)
        chosen = [
            Candidate(it, 1.0 / (i + 1), np.array([0.5, 0.5])) for i, it in enumerate(snap.pool)
        ]
        assert len(chosen) == len(list((tmp_path / "data" / "pool").iterdir()))
        return export_round(
            ws,
            ws.next_round(),
            chosen,
            strategy="random",
            model_round=0,
            pool_size=len(snap.pool),
            score_seconds=0.0,
        )


def exported_dicoms(folder: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


def test_table_is_the_whole_basic_profile():
    table = deid.basic_profile()
    assert len(table) >= 650  # Table E.1-1, 2026c edition: 655 rows
    named = {
        "ContentCreatorName": "Z/D",
        "VerifyingObserverName": "D",
        "PatientName": "Z",
        "ReasonForTheRequestedProcedure": "X",
        "AdmittingDate": "X",
        "DetectorID": "X/D",
        "StudyInstanceUID": "U",
        "InstitutionName": "X/Z/D",
    }
    for keyword, code in named.items():
        assert deid.action_for(pydicom.datadict.tag_for_keyword(keyword)) == code, keyword
    assert deid.action_for(0x60023000) == "X" and deid.action_for(0x50040010) == "X"
    assert deid.action_for(0x00280010) is None  # Rows: kept


def test_no_marker_survives_a_deidentified_export(tmp_path):
    pool = tmp_path / "data" / "pool"
    pool.mkdir(parents=True)
    markers = Markers()
    identified_dicom(pool / "top.dcm", markers, 100, nested=False)
    identified_dicom(pool / "nested.dcm", markers, 1000, nested=True)
    assert len(markers.found) > 2 * len(deid.basic_profile())
    sources = b"".join(p.read_bytes() for p in sorted(pool.iterdir()))
    assert sorted(w for m, w in markers.found.items() if m not in sources) == []  # all really there
    folder = export(tmp_path)
    survivors = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            survivors += [f"{where} -> {p.name}" for m, where in markers.found.items() if m in data]
    assert not survivors, f"{len(survivors)} markers survived:\n" + "\n".join(survivors[:40])
    out = exported_dicoms(folder)
    assert len(out) == 2
    for ds in out:
        assert ds.preamble == bytes(128)
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientName == ""  # Z: kept, empty
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert "SourceApplicationEntityTitle" not in ds.file_meta
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage  # registered: kept
        assert not any(e.tag.is_private for e in ds.iterall())
        assert not any(e.tag.group >> 8 == 0x60 for e in ds)  # overlay groups gone
    # the same original UID gives the same new UID in both files; pixels unchanged
    assert out[0].StudyInstanceUID == out[1].StudyInstanceUID
    assert out[0].StudyInstanceUID.startswith("2.25.")
    assert sorted(int(ds.pixel_array[0, 0]) for ds in out) == [100, 1000]
    nested = next(ds for ds in out if "AnatomicRegionSequence" in ds)
    inner = nested.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0]
    assert "PatientName" in inner and inner.PatientName == ""  # cleaned two levels deep
    assert "ReasonForTheRequestedProcedure" not in inner


def test_dicom_without_preamble_exports_deidentified(tmp_path):
    pool = tmp_path / "data" / "pool"
    path = write_dicom(pool / "bare.dcm", np.full((16, 16), 700, np.uint16), bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.PatientName, ds.InstitutionName = "MDLMK^BARE", "MDLMK General"
    study = ds.StudyInstanceUID
    del ds.file_meta
    ds.preamble = None
    ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    data = path.read_bytes()
    assert data[128:132] != b"DICM" and data[:4] != b"DICM"  # no preamble, no file meta
    folder = export(tmp_path)
    assert not list(folder.parent.glob(".round-*.tmp"))
    [p] = sorted(folder.glob("*.dcm"))
    assert b"MDLMK" not in p.read_bytes()
    out = pydicom.dcmread(p)  # a Part 10 file now: no force needed
    assert out.preamble == bytes(128)
    assert out.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert out.PatientIdentityRemoved == "YES" and "InstitutionName" not in out
    assert out.StudyInstanceUID != study and out.StudyInstanceUID.startswith("2.25.")
    assert int(out.pixel_array[0, 0]) == 700
