"""Decoding image files into float32 arrays in [0, 1].

Every loader returns ``[H, W]`` for grey images and ``[H, W, 3]`` (RGB) for colour ones, and
raises :class:`~medal.errors.ImageReadError` (one-line ``reason``) for a file it cannot read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dicom import (
    DICOM_SUFFIXES,
    DicomFrame,
    count_dicom_frames,
    load_dicom,
    looks_like_dicom,
    read_dicom_frame,
    read_dicom_header,
)
from .images import MAX_PIXELS, PILLOW_SUFFIXES, Window, check_window, load_pillow

IMAGE_SUFFIXES: frozenset[str] = PILLOW_SUFFIXES | DICOM_SUFFIXES
"""Lower-case suffixes treated as images when scanning folders (DICOM may also have none)."""

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "DicomFrame",
    "Window",
    "count_frames",
    "load_image",
    "read_dicom_frame",
    "read_dicom_header",
    "sniff_format",
]


def sniff_format(path: str | Path) -> str | None:
    """``"dicom"``, ``"pillow"`` or ``None`` (not an image medal reads).

    By suffix first (``.dcm``/``.dicom`` -> DICOM, :data:`IMAGE_SUFFIXES` Pillow ones ->
    ``"pillow"``); any other file is DICOM only if it has the ``DICM`` magic at offset 128
    or starts like a DICOM data set written without the preamble (archives often name DICOM
    files by UID or give them no suffix at all; see :func:`~medal.io.dicom.looks_like_dicom`).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in PILLOW_SUFFIXES:
        return "pillow"
    return "dicom" if looks_like_dicom(path) else None


def load_image(
    path: str | Path,
    *,
    window: Window = "file",
    frame: str | int = "middle",
    min_size: int | None = None,
) -> np.ndarray:
    """Decode one file to float32 in [0, 1], C-contiguous: ``[H, W]`` (grey) or ``[H, W, 3]``.

    ``window``: ``"file"`` (DICOM: the file's VOI window or LUT, else min-max; other formats:
    divided by the bit depth's maximum, 255 or 65535), ``"minmax"`` (the image's own range;
    a constant image gives zeros) or ``(center, width)`` (a linear window on DICOM modality
    values, or on raw pixel values for other formats).
    ``frame``: ``"middle"`` or a frame index, used for multi-frame DICOM only (single-frame
    files have just one frame to give); an index outside a multi-frame file raises.
    ``min_size``: a PNG/JPEG/TIFF/BMP larger than needed for this many pixels on its shorter
    side is decoded reduced (see :func:`~medal.io.images.load_pillow`); DICOM is always
    decoded in full. Files over :data:`MAX_PIXELS` are refused unread.
    Raises :class:`~medal.errors.ImageReadError` for an unreadable file and ``ValueError``
    for an invalid ``window`` / ``frame`` argument.
    """
    window = check_window(window)
    path = Path(path)
    if sniff_format(path) == "dicom":
        return load_dicom(path, window=window, frame=frame)
    if frame != "middle" and (not isinstance(frame, (int, np.integer)) or isinstance(frame, bool)):
        raise ValueError(f"frame must be 'middle' or an int, got {frame!r}")
    return load_pillow(path, window=window, min_size=min_size)


def count_frames(path: str | Path) -> int:
    """Number of frames: NumberOfFrames for DICOM, 1 for anything else.

    Raises :class:`~medal.errors.ImageReadError` for an unreadable DICOM file.
    """
    path = Path(path)
    return count_dicom_frames(path) if sniff_format(path) == "dicom" else 1
