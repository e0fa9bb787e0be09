"""Pixels for the labelling page: full-depth values of one image frame and the window presets
the page offers (DICOM: the modality values after the modality LUT, e.g. Hounsfield units;
other images: their stored values). The browser applies window, inversion, zoom and pan itself
on a canvas; the 8-bit previews are not used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError
from ..io import load_image, read_dicom_frame, sniff_format

# Projection radiography has no calibrated units: its presets come from the image's histogram.
PROJECTION_MODALITIES = ("CR", "DX", "DR", "RG", "MG", "RF", "XA", "IO", "PX")
CT_PRESETS = (
    ("lung", -600.0, 1500.0),
    ("mediastinum", 50.0, 350.0),
    ("bone", 400.0, 1800.0),
    ("brain", 40.0, 80.0),
    ("abdomen", 50.0, 400.0),
)
"""CT presets: (name, center, width) in Hounsfield units."""


def read_pixels(path: Path, frame: int | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Full-depth values of one frame for the page, and what the page needs to show them.

    Grey DICOM: the modality values (modality LUT applied: rescale or LUT sequence, e.g.
    Hounsfield units), from :func:`medal.io.read_dicom_frame`, with the
    file's window (its first VOI window; a VOI LUT sequence is given as the window spanning
    the LUT's input range), photometric interpretation and modality. Colour DICOM and other
    files: :func:`medal.io.load_image` scaled back to their bit depth (255 or 65535).
    Returns ``(meta, values [H, W] or [H, W, 3] float32)``.
    """
    meta: dict[str, Any] = {
        "frames": 1,
        "frame": 0,
        "modality": "",
        "photometric": "",
        "window": None,
        "units": "",
    }
    if sniff_format(path) == "dicom":
        f = read_dicom_frame(path, frame)
        meta |= {
            "frames": f.frames,
            "frame": f.index,
            "photometric": f.photometric,
            "modality": f.modality,
        }
        values = f.values
        if values is not None:
            meta["window"] = None if f.window is None else list(f.window)
            if f.modality == "CT" and f.rescaled:
                meta["units"] = "HU"
        else:  # colour, palette, or anything the grey path does not take
            values = load_image(path, frame=f.index).astype(np.float64) * 255.0
            meta["window"] = [127.5, 255.0]
    else:
        values, top = _pillow_values(path)
        meta["window"] = [top / 2.0, top]
    values = np.ascontiguousarray(values, dtype=np.float32)
    finite = values[np.isfinite(values)]
    qs = (0.5, 1, 5, 30, 40, 50, 60, 70, 95, 99, 99.5)
    pct = np.percentile(finite, qs) if finite.size else np.zeros(len(qs))
    meta |= {
        "height": int(values.shape[0]),
        "width": int(values.shape[1]),
        "channels": 1 if values.ndim == 2 else int(values.shape[2]),
        "min": float(finite.min()) if finite.size else 0.0,
        "max": float(finite.max()) if finite.size else 0.0,
        "percentiles": {f"{q:g}": float(v) for q, v in zip(qs, pct)},
    }
    meta["presets"] = window_presets(meta)
    return meta, values


def window_presets(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Window presets ``{name, center, width}`` for one image; the first is the default view.

    The file's own window first; CT: lung, mediastinum, bone, brain, abdomen in Hounsfield
    units; projection radiographs (CR, DX, MG ...): lung, mediastinum and bone windows taken
    from the image's histogram (their values have no calibrated unit), mirrored for
    MONOCHROME1; every image: its full range and the 1-99 % range.
    """
    p = meta["percentiles"]
    out: list[tuple[str, float, float]] = []

    def span(name: str, lo: float, hi: float) -> None:
        out.append((name, (lo + hi) / 2.0, max(hi - lo, 1e-6)))

    if meta["window"]:
        out.append(("file", *meta["window"]))
    if meta["modality"] == "CT":
        out += CT_PRESETS
    elif meta["modality"] in PROJECTION_MODALITIES and meta["channels"] == 1:
        # dark on screen (air-filled lung) is low values in MONOCHROME2, high in MONOCHROME1
        mono1 = meta["photometric"] == "MONOCHROME1"
        spans: tuple[tuple[str, float, float], ...] = (
            ("lung", 1, 60),
            ("mediastinum", 30, 95),
            ("bone", 50, 99.5),
        )
        for name, lo, hi in spans:
            if mono1:
                lo, hi = 100 - hi, 100 - lo
            span(name, p[f"{lo:g}"], p[f"{hi:g}"])
    span("full range", meta["min"], meta["max"])
    span("1-99 %", p["1"], p["99"])
    return [{"name": n, "center": float(c), "width": float(w)} for n, c, w in out]


def _pillow_values(path: Path) -> tuple[np.ndarray, float]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            top = 65535.0 if im.mode.startswith("I") else 255.0
    except OSError as e:
        raise ImageReadError(path, f"cannot read image: {e}") from None
    return np.rint(load_image(path).astype(np.float64) * top), top


def encode_pixels(meta: dict[str, Any], values: np.ndarray) -> bytes:
    """One response body: 4-byte little-endian JSON length, the JSON ``meta`` (padded with
    spaces to a multiple of 4 bytes), then the values as little-endian float32."""
    head = json.dumps(meta).encode()
    head += b" " * (-(len(head) + 4) % 4)
    return len(head).to_bytes(4, "little") + head + values.astype("<f4").tobytes()
