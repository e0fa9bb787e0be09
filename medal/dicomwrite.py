"""Write grayscale images as DICOM files with pydicom (bundled demo data and tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    patient_id: str = "ANON",
    transfer_syntax: str = ExplicitVRLittleEndian,
    uid_source: str | None = None,
) -> Path:
    """Save ``pixels [H, W]`` (unsigned ints that fit ``bits_stored``) as a Secondary Capture.

    ``slope``/``intercept`` become the modality LUT (RescaleSlope/Intercept), ``window`` the
    VOI window (center, width). With ``uid_source`` the SOP, study and series UIDs are derived
    from it (pydicom's hashed ``entropy_srcs``), so the same call writes the same bytes; without
    it they are random.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be [H, W], got shape {pixels.shape}")
    if pixels.min() < 0 or pixels.max() >= 2**bits_stored:
        raise ValueError(f"pixel values must fit {bits_stored} unsigned bits")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage

    def uid(kind: str) -> UID:
        return generate_uid(entropy_srcs=None if uid_source is None else [uid_source, kind])

    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.Modality = "OT"
    _set_pixels(ds, pixels, photometric, bits_stored)
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    if window is not None:
        ds.WindowCenter = f"{window[0]:g}"
        ds.WindowWidth = f"{window[1]:g}"
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _set_pixels(ds: Dataset, pixels: np.ndarray, photometric: str, bits_stored: int) -> None:
    """The Image Pixel module of ``ds``: ``pixels [H, W]`` (one sample, unsigned), stored in 8
    bits when ``bits_stored`` fits them, else in 16."""
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    dtype = np.uint8 if ds.BitsAllocated == 8 else np.uint16
    ds.PixelData = pixels.astype(dtype).tobytes()
