"""``medal.io.read_dicom_frame``: one DICOM frame at full depth for display (the labelling
page's DICOM path), and no module outside ``medal.io`` reaching into its private helpers."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medal.errors import ImageReadError
from medal.io import DicomFrame, read_dicom_frame
from test_io import dicom_dataset, save_dicom

ROOT = Path(__file__).parents[1]


def ct(path: Path, frames: list[np.ndarray], **attrs: object) -> Path:
    """A CT of 12-bit stored values, intercept -1024 (Hounsfield units = stored - 1024)."""
    stored = np.stack([np.clip(f + 1024, 0, 4095).astype(np.uint16) for f in frames])
    ds = dicom_dataset(
        stored if len(frames) > 1 else stored[0],
        bits_stored=12,
        Modality="CT",
        RescaleSlope="1",
        RescaleIntercept="-1024",
        **attrs,
    )
    return save_dicom(path, ds)


def test_grey_frames_give_modality_values_and_the_file_window(tmp_path):
    hu = np.arange(-1000, 1048, 2, dtype=np.int64).reshape(32, 32)
    path = ct(tmp_path / "ct.dcm", [hu, hu + 100, hu + 200], WindowCenter="40", WindowWidth="400")
    f = read_dicom_frame(path)
    assert isinstance(f, DicomFrame)
    assert (f.frames, f.index, f.photometric, f.modality) == (3, 1, "MONOCHROME2", "CT")
    assert f.values is not None and f.values.dtype == np.float64
    assert np.array_equal(f.values, hu + 100)
    assert f.window == (40.0, 400.0) and f.rescaled
    assert np.array_equal(read_dicom_frame(path, 2).values, hu + 200)
    with pytest.raises(
        ImageReadError,
        match=r"ct\.dcm: frame 3 out of range \(file has 3 "
        r"frames\)",
    ):
        read_dicom_frame(path, 3)


def test_window_from_a_voi_lut_and_none_without_one(tmp_path):
    hu = np.zeros((8, 8), np.int64)
    plain = read_dicom_frame(ct(tmp_path / "plain.dcm", [hu]))
    assert (plain.frames, plain.index, plain.window) == (1, 0, None)
    ds = pydicom.dcmread(tmp_path / "plain.dcm")
    item = pydicom.Dataset()
    item.LUTDescriptor = [256, 1000, 8]
    item.LUTData = np.arange(256, dtype=np.uint16).tobytes()
    ds.VOILUTSequence = [item]
    ds.save_as(tmp_path / "lut.dcm")
    assert read_dicom_frame(tmp_path / "lut.dcm").window == (1128.0, 256.0)


def test_colour_has_no_modality_values(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    f = read_dicom_frame(save_dicom(tmp_path / "rgb.dcm", dicom_dataset(rgb, photometric="RGB")))
    assert f.values is None and f.photometric == "RGB" and f.window is None


def test_the_pixel_limit_applies(tmp_path):
    path = save_dicom(tmp_path / "huge.dcm", dicom_dataset(np.zeros((4, 4), np.uint16)))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 14_000, 14_000
    ds.save_as(path)
    with pytest.raises(
        ImageReadError,
        match=r"huge\.dcm: image of 14000x14000 = 196 million "
        r"pixels is over the limit",
    ):
        read_dicom_frame(path)


def test_no_module_outside_io_uses_its_private_names():
    """``medal.io``'s underscore names are its own: other modules use its public API."""
    io_modules = {"medal.io", "medal.io.dicom", "medal.io.images"}
    found = []
    for path in sorted((ROOT / "medal").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("medal", "io"):
            continue
        package = ".".join(rel.with_suffix("").parts[:-1])
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = (
                    package.split(".")[: len(package.split(".")) - node.level + 1]
                    if node.level
                    else []
                )
                module = ".".join([*base, *([node.module] if node.module else [])])
                for a in node.names:
                    if f"{module}.{a.name}" in io_modules:
                        aliases.add(a.asname or a.name)
                    elif module in io_modules and a.name.startswith("_"):
                        found.append(f"{rel}: from {module} import {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in io_modules:
                        aliases.add(a.asname or a.name)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                found.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}")
    assert found == []
