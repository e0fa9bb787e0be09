"""DICOM decoding within bounded memory (issue 13).

A DICOM frame is decoded at its full Rows x Columns (pydicom's decoders give no reduced
resolution), so the pixel limit ``medal.io.MAX_PIXELS`` applies to each frame and is checked
before any pixel data is read; of a multi-frame file only the frame used is read. Files are
written by pydicom; the large ones are sparse (their pixel data is a hole on disk).
"""

from __future__ import annotations

import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medal.errors import ImageReadError
from medal.io import load_image
from medal.io.images import MAX_PIXELS
from test_io import dicom_dataset, save_dicom

MB = 1_000_000


def peak_bytes(fn) -> tuple[object, int]:
    """``fn()`` and the most memory Python and numpy held at once while it ran."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def claim_pixel_bytes(path: Path, n_bytes: int, frames: int) -> Path:
    """Rewrite a pydicom-written file (explicit VR little endian) so that its header says
    ``frames`` frames and its PixelData holds ``n_bytes``, the file extended to that size with a
    hole (zeros that take no disk space)."""
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = frames
    ds.save_as(path)
    data = bytearray(path.read_bytes())
    at = data.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")  # (7FE0,0010) OW, 2 reserved bytes
    assert at > 0
    struct.pack_into("<I", data, at + 8, n_bytes)
    value = at + 12
    path.write_bytes(bytes(data[:value]))
    with open(path, "r+b") as f:
        f.truncate(value + n_bytes)
    return path


def test_one_frame_of_a_multi_frame_file_is_read_not_the_whole_file(tmp_path):
    """64 frames of 512 x 512 (33 MB): decoding the middle frame used 42 MB when the whole
    file was read; now about one frame's worth."""
    frames = (np.arange(64 * 512 * 512) % 4000).astype(np.uint16).reshape(64, 512, 512)
    path = save_dicom(tmp_path / "mf.dcm", dicom_dataset(frames))
    x, peak = peak_bytes(lambda: load_image(path, window="minmax"))
    want = frames[32].astype(np.float64)
    np.testing.assert_allclose(x, (want - want.min()) / (want.max() - want.min()), atol=1e-6)
    assert peak < 16 * MB, peak / MB  # 42 MB when the whole file was read
    x, _ = peak_bytes(lambda: load_image(path, window="minmax", frame=5))
    want = frames[5].astype(np.float64)
    np.testing.assert_allclose(x, (want - want.min()) / (want.max() - want.min()), atol=1e-6)


def test_a_file_of_many_large_frames_costs_one_frame(tmp_path):
    """40 frames of 4096 x 4096 at 16 bits: a 1.3 GB file (sparse here). One 33 MB frame is
    read and decoded, not the whole file."""
    path = save_dicom(tmp_path / "big.dcm", dicom_dataset(np.zeros((4096, 4096), np.uint16)))
    claim_pixel_bytes(path, 40 * 4096 * 4096 * 2, 40)
    if os.stat(path).st_blocks * 512 > 200 * MB:
        path.unlink()
        pytest.skip("this file system does not make sparse files")
    x, peak = peak_bytes(lambda: load_image(path))
    assert x.shape == (4096, 4096) and float(x.max()) == 0.0
    assert peak < 400 * MB, peak / MB  # one frame: uint16 and float copies of 16.8 Mpixels


def test_a_header_claiming_more_frames_than_the_file_holds_is_refused_unread(tmp_path, monkeypatch):
    """NumberOfFrames = 100,000 of 4096 x 4096: 3.4 TB claimed by a 64 KB file. Refused as
    truncated from the sizes alone, before any decoding."""
    path = save_dicom(tmp_path / "liar.dcm", dicom_dataset(np.zeros((4096, 4096), np.uint16)))
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 100_000
    ds.PixelData = bytes(65536)
    ds.save_as(path)

    def no(*args, **kwargs):
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no)
    with pytest.raises(
        ImageReadError,
        match=r"liar\.dcm: truncated pixel data \(65536 of "
        r"3355443200000 bytes\)",
    ):
        load_image(path)


def test_a_frame_over_the_pixel_limit_is_refused_before_its_pixels_are_read(tmp_path, monkeypatch):
    """Each frame must be within MAX_PIXELS (179 million): 3 frames of 14,000 x 14,000
    (1.2 GB claimed, sparse) are refused with the reason; no pixel data is read or decoded."""
    path = save_dicom(tmp_path / "huge.dcm", dicom_dataset(np.zeros((2, 2), np.uint16)))
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 14_000
    ds.save_as(path)
    claim_pixel_bytes(path, 3 * 14_000 * 14_000 * 2, 3)
    assert 14_000**2 > MAX_PIXELS

    def no(*args, **kwargs):
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no)
    _, peak = peak_bytes(lambda: _refused(path))
    assert peak < 20 * MB, peak / MB


def _refused(path: Path) -> None:
    with pytest.raises(
        ImageReadError,
        match=r"huge\.dcm: image of 14000x14000 = 196 million "
        r"pixels is over the limit of 179 million "
        r"\(medal\.io\.MAX_PIXELS\)",
    ):
        load_image(path)
