"""DICOM through pydicom: modality LUT, VOI window/LUT, photometric interpretation, frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from ..errors import ImageReadError
from .windowing import linear_window, minmax

GRAY = ("MONOCHROME1", "MONOCHROME2")


def _read(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except InvalidDicomError:
        try:  # DICOM written without the 128-byte preamble / file meta
            ds = pydicom.dcmread(path, force=True)
        except Exception as e:  # noqa: BLE001
            raise ImageReadError(path, f"not a DICOM file: {e}") from None
        if "PixelData" not in ds:
            raise ImageReadError(path, "not a DICOM file (no DICM header and no pixel data)")
        if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
            ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        return ds
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for broken files
        raise ImageReadError(path, f"broken DICOM file: {type(e).__name__}: {e}") from None


def _sop_name(ds: pydicom.Dataset) -> str:
    uid = ds.get("SOPClassUID")
    return getattr(uid, "name", str(uid)) if uid else "unknown SOP class"


def count_dicom_frames(path: Path) -> int:
    ds = _read(path)
    return int(ds.get("NumberOfFrames", 1) or 1)


def load_dicom(path: Path, *, window: str | tuple[float, float] = "file",
               frame: str | int = "middle") -> np.ndarray:
    """``[H, W]`` (monochrome) or ``[H, W, 3]`` (colour) float32 in [0, 1]."""
    ds = _read(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ImageReadError(path, f"no pixel data ({_sop_name(ds)})")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = n_frames // 2 if frame == "middle" else int(frame)
    if not 0 <= index < n_frames:
        raise ImageReadError(path, f"frame {index} out of range (file has {n_frames})")
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - decoder errors come in many types
        ts = ds.file_meta.get("TransferSyntaxUID", "unknown")
        name = getattr(ts, "name", str(ts))
        raise ImageReadError(path, f"cannot decode pixel data ({name}): {e}") from None
    if n_frames > 1:
        arr = arr[index]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric in GRAY:
        return _gray(ds, arr, photometric, window, path)
    return _colour(ds, arr, photometric, path)


def _gray(ds: pydicom.Dataset, arr: np.ndarray, photometric: str,
          window: str | tuple[float, float], path: Path) -> np.ndarray:
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if isinstance(window, tuple):
        out = linear_window(values, window[0], window[1])
    elif window == "minmax":
        out = minmax(values)
    elif "VOILUTSequence" in ds:
        out = minmax(apply_voi_lut(values, ds, index=0))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        try:
            out = linear_window(values, center, width, str(ds.get("VOILUTFunction", "LINEAR")))
        except ValueError as e:
            raise ImageReadError(path, f"bad window in file: {e}") from None
    else:
        out = minmax(values)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return np.ascontiguousarray(out, dtype=np.float32)


def _first(v: object) -> float:
    return float(v[0]) if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else float(v)


def _colour(ds: pydicom.Dataset, arr: np.ndarray, photometric: str, path: Path) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        scale = float(2 ** (16 if bits > 8 else 8) - 1)
    elif arr.ndim == 3 and arr.shape[-1] == 3:
        rgb = arr  # pydicom converts YBR_* to RGB when decoding
        scale = float(2 ** int(ds.get("BitsStored", 8)) - 1)
    else:
        raise ImageReadError(path, f"unsupported photometric interpretation {photometric!r}")
    return np.ascontiguousarray(np.clip(rgb.astype(np.float32) / scale, 0, 1))
