"""De-identification of exported DICOM copies: DICOM PS3.15 Annex E, Basic Application Level
Confidentiality Profile, applied with the whole of Table E.1-1.

The table (:func:`basic_profile`) is the 2026c edition's Table E.1-1 as the
``dicom-anonymizer`` package ships it (``dicomanonymizer.dicom_anonymization_databases.
dicomfields_2026c``, generated from the standard's own table: 655 rows, including the
repeating groups of curves ``(50xx,xxxx)`` and overlays ``(60xx,3000)``, ``(60xx,4000)``).
Only the table is taken from that package; medal applies it itself, because its engine does not
clean attributes nested in sequences, writes ``00010101`` into dates the table removes, draws
random UIDs (a new mapping in every process) and leaves the preamble and file meta alone.

What a de-identified copy gets (PS3.15 E.1.1 action codes):

- ``X`` (and ``X/Z``, ``X/D``, ``X/Z/D``, ``X/Z/U*``, whose first choice is X): removed. The
  copy is for a radiologist to label; none of these attributes is needed to show the image.
- ``Z`` and ``Z/D``: kept present with an empty value (a sequence with no items).
- ``D``: a dummy value of the element's VR (``ANONYMIZED``, ``19000101``, 0, ...); a sequence
  becomes one empty item; a UID is replaced as under ``U``.
- ``U``: a new UID derived from the original and a per-workspace secret, so the same original
  UID always maps to the same new UID (studies and series stay grouped, across rounds too) but
  cannot be traced back. Every other UID that is not a registered standard UID (a SOP class,
  a transfer syntax, a coding scheme ...) is replaced the same way.
- Sequences the table does not list are cleaned item by item, recursively ("K: cleaned for
  sequences"); other attributes the table does not list are kept, pixel data unchanged.
- Private attributes (odd groups) are removed, at every level; curve (``50xx``) and overlay
  (``60xx``) groups are removed whole (the table removes their data and comments; the rest of
  the group would describe an overlay that is gone); group lengths, command elements
  ``(0000,eeee)`` (which have no place in a file) and the trailing padding are removed.
- The 128-byte preamble is zeroed; the file meta is rebuilt with only what Part 10 requires
  (no source, sending or receiving AE titles, no private information).
- ``PatientIdentityRemoved = YES``, ``DeidentificationMethod`` and
  ``DeidentificationMethodCodeSequence`` (DCM 113100, Basic Application Confidentiality
  Profile) record what was done.

Not covered: burned-in text in the pixels (check ``BurnedInAnnotation`` for such data), text in
attributes the table keeps, and the profile's options (retain dates, clean descriptors, ...).
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from .errors import DataError

#: the edition of PS3.15 whose Table E.1-1 is applied
BASIC_PROFILE_EDITION = "2026c"
_TABLE_MODULE = "dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c"
# dicom-anonymizer's name for each group of rows -> the action code in Table E.1-1
_GROUPS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}

# UIDs that name a standard thing (a class, a syntax), not an instance, whatever their value: kept
KEEP_UIDS = {
    "SOPClassUID",
    "ReferencedSOPClassUID",
    "MediaStorageSOPClassUID",
    "TransferSyntaxUID",
    "ImplementationClassUID",
    "CodingSchemeUID",
    "ContextGroupExtensionCreatorUID",
    "RelatedGeneralSOPClassUID",
    "OriginalSpecializedSOPClassUID",
    "ReferencedSOPClassUIDInFile",
    "ReferencedTransferSyntaxUIDInFile",
}
_TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}
_DUMMY = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
    "UR": "urn:anonymized",
}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_TRAILING_PADDING = 0xFFFCFFFC


@functools.cache
def basic_profile() -> dict[tuple[int, ...], str]:
    """Table E.1-1: ``{(group, element): action}``, plus the repeating groups as
    ``{(group, element, group_mask, element_mask): action}`` (a tag matches when
    ``tag.group & group_mask == group`` and ``tag.element & element_mask == element``).
    Actions are the table's codes: ``X``, ``Z``, ``D``, ``U``, ``Z/D``, ``X/Z``, ``X/D``,
    ``X/Z/D``, ``X/Z/U*``.
    """
    try:
        table = importlib.import_module(_TABLE_MODULE)
    except ModuleNotFoundError as e:
        raise ImportError(
            f"de-identification needs the package dicom-anonymizer (its copy of "
            f"Table E.1-1): {e}; reinstall medal-al with its dependencies"
        ) from e
    rows: dict[tuple[int, ...], str] = {}
    for group, code in _GROUPS.items():
        for row in getattr(table, group):
            if tuple(row) in rows:
                raise RuntimeError(f"{_TABLE_MODULE}: {row} is listed twice")
            rows[tuple(row)] = code
    return rows


@functools.cache
def _compiled() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for row, code in basic_profile().items():
        if len(row) == 2:
            exact[(row[0] << 16) | row[1]] = code
        else:
            a, b, c, d = row
            masked.append((a, b, c, d, code))
    return exact, masked


def action_for(tag: int) -> str | None:
    """The Table E.1-1 action for ``tag``, or None where the table does not list it."""
    exact, masked = _compiled()
    if tag in exact:
        return exact[tag]
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, gmask, emask, code in masked:
        if group & gmask == g and element & emask == e:
            return code
    return None


def new_uid(old: str, secret: str) -> str:
    """A UID derived from ``old`` and ``secret``: the same inputs give the same UID."""
    return generate_uid(prefix="2.25.", entropy_srcs=[secret, str(old)])


def deidentify(ds: Dataset, secret: str) -> Dataset:
    """De-identify ``ds`` in place (dataset, nested sequences, file meta, preamble); return it."""
    _clean(ds, secret)
    if "SOPInstanceUID" not in ds:  # Part 10 needs one; a random one identifies nothing
        ds.SOPInstanceUID = generate_uid()
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = (
        f"medal: DICOM PS3.15 Annex E basic profile (Table E.1-1, {BASIC_PROFILE_EDITION})"
    )
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.file_meta = _clean_file_meta(ds)
    ds.preamble = bytes(128)
    return ds


def _clean(ds: Dataset, secret: str) -> None:
    for elem in list(ds):  # a copy: elements are deleted while walking
        tag = int(elem.tag)
        if (
            elem.tag.is_private
            or elem.tag.element == 0
            or elem.tag.group == 0
            or tag == _TRAILING_PADDING
            or elem.tag.group >> 8 in (0x50, 0x60)
        ):
            del ds[tag]
            continue
        code = action_for(tag)
        vr = elem.VR.split(" or ")[0]
        if code is None:
            if vr == "SQ":
                for item in elem.value:
                    _clean(item, secret)
            elif vr == "UI" and elem.keyword not in KEEP_UIDS:
                _replace_uids(elem, secret, keep_registered=True)
        elif code.startswith("X") or code == "U" and vr != "UI":  # a UID medal cannot read
            del ds[tag]
        elif code.startswith("Z"):
            _empty(elem, vr)
        elif code == "U" or vr == "UI":
            _replace_uids(elem, secret, keep_registered=False)
        else:  # "D"
            _dummy(elem, vr)


def _replace_uids(elem: DataElement, secret: str, *, keep_registered: bool) -> None:
    def one(v: str) -> str:
        if not v or keep_registered and UID(v).name != v:  # a registered standard UID
            return v
        return new_uid(v, secret)

    if elem.VM > 1:
        elem.value = [one(str(v)) for v in elem.value]
    elif elem.value:
        elem.value = one(str(elem.value))


def _empty(elem: DataElement, vr: str) -> None:
    elem.value = Sequence() if vr == "SQ" else None


def _dummy(elem: DataElement, vr: str) -> None:
    if vr == "SQ":
        elem.value = Sequence([Dataset()])
    elif vr in _TEXT_VRS:
        elem.value = "ANONYMIZED"
    elif vr in _DUMMY:
        elem.value = _DUMMY[vr]
    elif vr in _BINARY_VRS:
        elem.value = bytes(8)
    else:  # US, SS, UL, SL, FL, FD, UV, SV, AT
        elem.value = 0


def _clean_file_meta(ds: Dataset) -> FileMetaDataset:
    """Only the file meta Part 10 requires, the implementation named as pydicom writes it."""
    old = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" in old:
        meta.TransferSyntaxUID = old.TransferSyntaxUID
    else:  # no file meta (no preamble, no DICM): the encoding pydicom detected
        implicit, little = getattr(ds, "original_encoding", (True, True))
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little
            else ExplicitVRBigEndian
        )
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    return meta


def deidentify_file(src: Path, dst: Path, secret: str) -> None:
    """Write a de-identified copy of the DICOM file ``src`` to ``dst``.

    A file without preamble and ``DICM`` prefix (plain dataset, as some archives store them) is
    read as pydicom reads it with ``force=True``, and written with a zero preamble and file meta.
    """
    try:
        ds = pydicom.dcmread(src, force=True)
        deidentify(ds, secret)
        ds.save_as(dst, enforce_file_format=True)
    except OSError as e:
        if e.errno is not None:  # reading or writing the file failed (no space, gone, ...)
            raise
        # pydicom's parser raises OSError without errno for malformed data ("No tag to read")
        raise DataError(
            f"{src}: cannot write a de-identified copy ({e}); repair the file or "
            f"move it out of the pool"
        ) from e
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for odd files
        raise DataError(
            f"{src}: cannot write a de-identified copy ({type(e).__name__}: "
            f"{e}); repair the file or move it out of the pool"
        ) from e
