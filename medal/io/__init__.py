"""Decoding image files into float arrays in [0, 1] (``[H, W]`` gray or ``[H, W, 3]`` colour)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dicom import count_dicom_frames, load_dicom
from .images import PILLOW_SUFFIXES, load_pillow

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
IMAGE_SUFFIXES = frozenset(PILLOW_SUFFIXES | DICOM_SUFFIXES)

__all__ = ["IMAGE_SUFFIXES", "count_frames", "load_image", "sniff_format"]


def _has_dicm_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def sniff_format(path: str | Path) -> str | None:
    """``"dicom"``, ``"pillow"`` or ``None`` (not an image medal reads).

    DICOM: a ``.dcm``/``.dicom`` suffix, or any file with the ``DICM`` magic at offset 128
    (archives often store DICOM files without a suffix).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in PILLOW_SUFFIXES:
        return "pillow"
    if suffix == "" or suffix.lstrip(".").isdigit():
        return "dicom" if _has_dicm_magic(path) else None
    return None


def load_image(path: str | Path, *, window: str | tuple[float, float] = "file",
               frame: str | int = "middle") -> np.ndarray:
    """Decode one file to float32 in [0, 1]: ``[H, W]`` (gray) or ``[H, W, 3]`` (colour).

    ``window``: ``"file"`` (DICOM: the file's VOI window, else min-max; other formats: scaled by
    their bit depth), ``"minmax"``, or ``(center, width)``. ``frame``: multi-frame DICOM frame.
    Raises :class:`~medal.errors.ImageReadError` with a one-line reason.
    """
    path = Path(path)
    if sniff_format(path) == "dicom":
        return load_dicom(path, window=window, frame=frame)
    return load_pillow(path, window=window)


def count_frames(path: str | Path) -> int:
    """Frames in a file (1 for anything but multi-frame DICOM)."""
    path = Path(path)
    return count_dicom_frames(path) if sniff_format(path) == "dicom" else 1
