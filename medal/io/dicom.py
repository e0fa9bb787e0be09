"""DICOM through pydicom 3: frames, modality LUT, VOI window/LUT, photometric interpretation.

:func:`load_dicom` returns float32 in [0, 1], ``[H, W]`` for MONOCHROME1/2 and ``[H, W, 3]``
(RGB) for colour images.

Memory: a frame is decoded at its full Rows x Columns (pydicom's decoders give no reduced
resolution; JPEG 2000's resolution levels are not exposed through them), so each frame is
checked against :data:`~medal.io.images.MAX_PIXELS` before any pixel data is read. Pixel
data is not read with the header (values over :data:`DEFER_BYTES` are left in the file), and
of a multi-frame file only the frame used is read (``pydicom.pixels.pixel_array`` on the
file): a file of many frames costs one frame's memory, not the whole file's. Compressed
(encapsulated) pixel data is the exception: pydicom reads all of its fragments with the
header.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..errors import ImageReadError
from .images import (
    Window,
    _one_line,
    apply_user_window,
    apply_window,
    check_pixels,
    check_window,
    scale_minmax,
)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
DEFER_BYTES = 1 << 20
"""Element values larger than this are not read with the dataset; pydicom reads them from the
file when they are used (``dcmread(defer_size=...)``)."""
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
GREY = ("MONOCHROME1", "MONOCHROME2")

# Attributes that Enhanced (multi-frame) IODs move into functional group macros.
_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
_LUT_KEYWORDS = (
    "ModalityLUTSequence",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PixelRepresentation",
    "BitsStored",
    "BitsAllocated",
)


# A data set written without the 128-byte preamble and "DICM" (older archives, some PACS
# exports) starts with its first element: the file meta group 0002 (explicit VR) or, with no
# file meta at all, group 0008 (Specific Character Set, Image Type, SOP Class UID ...).
_RAW_START_GROUPS = (0x0002, 0x0008)


def looks_like_dicom(path: str | Path) -> bool:
    """True if the file has the ``DICM`` prefix after the 128-byte preamble, or starts like a
    DICOM data set without one (a group 0002/0008 element tag followed by a two-letter VR or a
    plausible 32-bit length): such a file is read with pydicom's ``force=True`` and kept only
    if it holds an image."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8 or int.from_bytes(head[0:2], "little") not in _RAW_START_GROUPS:
        return False
    vr = head[4:6]
    explicit = vr.isalpha() and vr.isupper()
    return explicit or int.from_bytes(head[4:8], "little") < (1 << 16)


def read_dicom_header(path: str | Path) -> Dataset:
    """The file's dataset without its pixel data (for metadata such as frame count).

    Raises :class:`~medal.errors.ImageReadError` if the file is not readable DICOM.
    """
    return _read(Path(path), header_only=True)


def count_dicom_frames(path: str | Path) -> int:
    """NumberOfFrames (1 when absent). Raises ImageReadError for an unreadable file."""
    return _n_frames(read_dicom_header(path))


@dataclass(frozen=True)
class DicomFrame:
    """One frame of a DICOM file as a viewer needs it (:func:`read_dicom_frame`)."""

    frames: int
    """NumberOfFrames (1 when absent)."""
    index: int
    """The frame read (0 for a single-frame file)."""
    photometric: str
    """PhotometricInterpretation, upper case (``""`` when absent)."""
    modality: str
    """Modality, upper case (``""`` when absent)."""
    values: np.ndarray | None
    """Grey (MONOCHROME1/2) frames: the modality values ``[H, W]`` float64 (rescale or
    modality LUT applied, e.g. Hounsfield units), as stored: MONOCHROME1 is not inverted.
    ``None`` for colour and palette images and files without pixel data (use
    :func:`load_dicom` for them, which also says why a file cannot be shown)."""
    window: tuple[float, float] | None
    """The file's own window ``(center, width)`` in modality values: its first VOI window,
    else the input range of its first VOI LUT; ``None`` when it has neither."""
    rescaled: bool
    """The frame's values were rescaled (RescaleSlope present: Hounsfield units for CT)."""


def read_dicom_frame(path: str | Path, frame: int | None = None) -> DicomFrame:
    """One frame (``None``: the middle one) of a DICOM file at full depth, for display.

    The same reading as :func:`load_dicom` (the pixel limit checked before any pixel data is
    read; one frame read of a multi-frame file; Enhanced multi-frame functional groups),
    stopping at the modality values instead of mapping them to [0, 1]. Raises
    :class:`~medal.errors.ImageReadError` with a one-line reason.
    """
    path = Path(path)
    ds = _read(path, header_only=False)
    n = _n_frames(ds)
    index = _frame_index(path, n, "middle" if frame is None else int(frame))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    modality = str(ds.get("Modality", "")).strip().upper()
    values, window, rescaled = None, None, False
    if photometric in GREY and any(k in ds for k in PIXEL_KEYWORDS):
        check_pixels(path, int(ds.get("Columns") or 0), int(ds.get("Rows") or 0))
        arr = _decode(path, ds, index if n > 1 else None)
        if arr.ndim == 2:
            luts = _frame_luts(ds, index)
            values = _modality_values(path, arr, luts)
            window = _stated_window(luts)
            rescaled = "RescaleSlope" in luts
    return DicomFrame(n, index, photometric, modality, values, window, rescaled)


def load_dicom(
    path: str | Path, *, window: Window = "file", frame: str | int = "middle"
) -> np.ndarray:
    """Decode one frame to float32 [0, 1]: ``[H, W]`` (MONOCHROME1/2) or ``[H, W, 3]`` (colour).

    Grey: modality LUT, then ``window`` (``"file"``: the file's first VOI window or VOI LUT,
    else min-max; ``"minmax"``; or ``(center, width)`` on modality values), then MONOCHROME1
    is inverted so bright always means high values. Colour: scaled by the bit depth under
    ``"file"``. ``frame``: ``"middle"`` or an index into a multi-frame file (ignored for
    single-frame files). Raises :class:`~medal.errors.ImageReadError` with a one-line reason.
    """
    window = check_window(window)
    if frame != "middle" and (not isinstance(frame, (int, np.integer)) or isinstance(frame, bool)):
        raise ValueError(f"frame must be 'middle' or an int, got {frame!r}")
    path = Path(path)
    ds = _read(path, header_only=False)
    if not any(k in ds for k in PIXEL_KEYWORDS):
        if "Rows" in ds and "Columns" in ds:  # an image header without its image
            raise ImageReadError(
                path,
                f"no pixel data after the header of a {ds.Rows}x"
                f"{ds.Columns} image (SOP class {_sop_class_name(ds)}; "
                f"truncated file?)",
            )
        raise ImageReadError(path, f"no pixel data (SOP class {_sop_class_name(ds)})")
    check_pixels(path, int(ds.get("Columns") or 0), int(ds.get("Rows") or 0))
    n_frames = _n_frames(ds)
    index = _frame_index(path, n_frames, frame)
    arr = _decode(path, ds, index if n_frames > 1 else None)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR":
        return _palette(path, ds, arr, window)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        # pydicom converts YBR_FULL / YBR_FULL_422 to RGB while decoding (as_rgb=True).
        return _colour(arr, int(ds.get("BitsStored") or 8), window)
    if arr.ndim == 2:
        return _grey(path, _frame_luts(ds, index), arr, photometric, window)
    raise ImageReadError(
        path,
        f"unsupported pixel layout: shape {arr.shape}, "
        f"photometric interpretation {photometric or 'missing'}",
    )


def _frame_index(path: Path, n_frames: int, frame: str | int) -> int:
    """The frame to read: ``"middle"`` or ``frame`` (checked), 0 for single-frame files."""
    if n_frames == 1:
        return 0
    index = n_frames // 2 if frame == "middle" else int(frame)
    if not 0 <= index < n_frames:
        raise ImageReadError(path, f"frame {index} out of range (file has {n_frames} frames)")
    return index


def _read(path: Path, *, header_only: bool) -> Dataset:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds: Dataset = pydicom.dcmread(
                path,
                stop_before_pixels=header_only,
                defer_size=None if header_only else DEFER_BYTES,
            )
        for w in caught:
            # pydicom only warns when a file ends inside encapsulated (compressed) pixel data.
            if "end of file reached" in str(w.message).lower():
                raise ImageReadError(path, "truncated file (it ends inside the pixel data)")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except InvalidDicomError:  # no preamble / file meta: accept it only if it holds an image
        ds = _read_forced(path)
        if header_only:
            for keyword in PIXEL_KEYWORDS:
                if keyword in ds:
                    delattr(ds, keyword)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot read file: {e.strerror or _one_line(e)}") from None
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for corrupt files
        raise ImageReadError(path, f"corrupt DICOM file: {_one_line(e)}") from None
    _ensure_transfer_syntax(ds)
    return ds


def _read_forced(path: Path) -> Dataset:
    try:
        with warnings.catch_warnings():
            # Parsing a non-DICOM file with force=True warns about every garbage element.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
        is_image = any(k in ds for k in PIXEL_KEYWORDS) and "Rows" in ds and "Columns" in ds
    except Exception:  # noqa: BLE001 - garbage input makes the forced parse fail arbitrarily
        is_image = False
    if not is_image:
        raise ImageReadError(path, "not a DICOM file (no DICM header and no image in it)")
    return ds


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Files without file meta: record the encoding pydicom detected, so pixels can decode."""
    meta = ds.get("file_meta") or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        if implicit:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        ds.file_meta = meta


def _n_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _sop_class_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID") or ds.get("file_meta", FileMetaDataset()).get(
        "MediaStorageSOPClassUID"
    )
    if not uid:
        return "unknown"
    uid = UID(str(uid))
    return uid.name if uid.is_valid else str(uid)


def _decode(path: Path, ds: Dataset, index: int | None) -> np.ndarray:
    """One frame (``index``) or the only frame: ``[H, W]`` or ``[H, W, samples]``."""
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ImageReadError(path, f"unsupported transfer syntax {ts.name}") from None
    if not decoder.is_available:
        raise ImageReadError(
            path, f"unsupported transfer syntax {ts.name} (no decoder installed)"
        ) from None
    stored = _stored_pixel_bytes(path, ds)
    if stored is not None and not ts.is_compressed:
        try:
            expected = int(get_expected_length(ds, "bytes"))
        except Exception:  # noqa: BLE001 - bad group 0028 values; decoding reports it below
            expected = 0
        if stored < expected:
            raise ImageReadError(path, f"truncated pixel data ({stored} of {expected} bytes)")
    deferred = "PixelData" in ds and ds.get_item("PixelData", keep_deferred=True).value is None
    try:
        if deferred and index is not None:  # read this frame alone from the file
            arr = pydicom.pixels.pixel_array(path, index=index, transfer_syntax_uid=ts)
        else:
            arr = pydicom.pixels.pixel_array(ds, index=index)
    except Exception as e:  # noqa: BLE001 - decoders raise many types for broken data
        raise ImageReadError(
            path, f"cannot decode pixel data ({ts.name}): {_one_line(e)}"
        ) from None
    return arr


def _stored_pixel_bytes(path: Path, ds: Dataset) -> int | None:
    """Bytes of PixelData present in the file (``None`` without PixelData), without reading
    a deferred value: what the file holds after the value's offset, at most its length."""
    if "PixelData" not in ds:
        return None
    elem: Any = ds.get_item("PixelData", keep_deferred=True)  # a deferred RawDataElement
    if elem.value is not None:
        return len(elem.value)
    try:
        after = path.stat().st_size - int(elem.value_tell)
    except OSError:
        return 0
    return max(0, min(int(elem.length), after))


def _frame_luts(ds: Dataset, index: int) -> Dataset:
    """The LUT-related attributes that apply to frame ``index``.

    Enhanced multi-frame files keep rescale and window in the Shared / Per-frame Functional
    Groups instead of the top level; the most specific source wins.
    """
    luts = Dataset()
    luts.file_meta = ds.file_meta  # pydicom's LUT code reads the byte order from here
    for keyword in _LUT_KEYWORDS:
        if keyword in ds:
            luts[keyword] = ds[keyword]
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    groups = [shared[0] if shared else None, per_frame[index] if index < len(per_frame) else None]
    for group in groups:
        for macro in _FRAME_MACROS:
            items = group.get(macro) if group is not None else None
            if items:
                for elem in items[0]:
                    luts[elem.tag] = elem
    return luts


def _modality_values(path: Path, arr: np.ndarray, luts: Dataset) -> np.ndarray:
    """Stored values -> modality values (float64): rescale or modality LUT sequence."""
    if np.issubdtype(arr.dtype, np.floating):  # Float Pixel Data has no modality LUT
        return arr.astype(np.float64)
    try:
        return np.asarray(apply_modality_lut(arr, luts), dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - malformed LUT attributes
        raise ImageReadError(path, f"bad modality LUT: {_one_line(e)}") from None


def _stated_window(luts: Dataset) -> tuple[float, float] | None:
    """The file's own window ``(center, width)`` in modality values: its first VOI window
    (width > 0), else the input range of its first VOI LUT; ``None`` if neither is usable."""
    if "WindowCenter" in luts and "WindowWidth" in luts:
        try:
            center, width = _first(luts.WindowCenter), _first(luts.WindowWidth)
            if width > 0:
                return center, width
        except (TypeError, ValueError, IndexError):
            pass
    seq = luts.get("VOILUTSequence")
    if seq:
        try:
            entries, first = int(seq[0].LUTDescriptor[0]) or 65536, float(seq[0].LUTDescriptor[1])
            return first + entries / 2.0, float(entries)
        except (AttributeError, IndexError, TypeError, ValueError):
            pass
    return None


def _grey(
    path: Path, luts: Dataset, arr: np.ndarray, photometric: str, window: Window
) -> np.ndarray:
    values = _modality_values(path, arr, luts)
    if window == "minmax":
        out = scale_minmax(values)
    elif isinstance(window, tuple):
        out = apply_user_window(values, *window)
    else:
        out = _file_window(path, luts, values)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def _file_window(path: Path, luts: Dataset, values: np.ndarray) -> np.ndarray:
    """The file's first VOI LUT or window mapped to [0, 1]; min-max when it has neither."""
    if luts.get("VOILUTSequence"):
        try:
            item = luts.VOILUTSequence[0]
            out = apply_voi_lut(np.rint(values).astype(np.int64), luts, index=0)
        except Exception as e:  # noqa: BLE001 - malformed LUT
            raise ImageReadError(path, f"bad VOI LUT: {_one_line(e)}") from None
        # Scale by the LUT's nominal output depth; some files declare fewer bits than used.
        bits = int(item.LUTDescriptor[2])
        top = max(2.0**bits - 1.0, float(np.max(out)) if out.size else 0.0, 1.0)
        return out.astype(np.float64) / top
    if "WindowCenter" in luts and "WindowWidth" in luts:
        try:
            center, width = _first(luts.WindowCenter), _first(luts.WindowWidth)
            function = str(luts.get("VOILUTFunction") or "LINEAR").strip().upper()
            if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
                function = "LINEAR"
            return apply_window(values, center, width, function)
        except (TypeError, ValueError, IndexError):
            pass  # an unusable window in the file: show the image by its range instead
    return scale_minmax(values)


def _first(value: object) -> float:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def _colour(rgb: np.ndarray, bits: int, window: Window) -> np.ndarray:
    """``[H, W, 3]`` raw RGB samples to float32 [0, 1]."""
    if window == "minmax":
        out = scale_minmax(rgb)
    elif isinstance(window, tuple):
        out = apply_user_window(rgb, *window)
    else:
        out = rgb.astype(np.float32) / np.float32(2 ** min(max(bits, 1), 32) - 1)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def _palette(path: Path, ds: Dataset, arr: np.ndarray, window: Window) -> np.ndarray:
    try:
        rgb = apply_color_lut(arr, ds)
    except Exception as e:  # noqa: BLE001 - missing or malformed palette LUTs
        raise ImageReadError(path, f"bad palette colour LUT: {_one_line(e)}") from None
    # LUT entries are 8 or 16 bits (descriptor value 3); pydicom returns uint8 / uint16 to match.
    return _colour(rgb[..., :3], 8 if rgb.dtype == np.uint8 else 16, window)
