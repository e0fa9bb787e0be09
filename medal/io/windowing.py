"""Scaling raw pixel values to [0, 1]."""

from __future__ import annotations

import numpy as np


def minmax(arr: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the array's own range (a constant image becomes zeros)."""
    arr = arr.astype(np.float32, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return (arr - lo) / (hi - lo)


def linear_window(arr: np.ndarray, center: float, width: float,
                  function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window to [0, 1] (``LINEAR``, ``LINEAR_EXACT`` or ``SIGMOID``)."""
    x = arr.astype(np.float64, copy=False)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        out = np.clip((x - center) / width + 0.5, 0.0, 1.0)
    else:
        if width < 1:
            raise ValueError(f"window width must be >= 1, got {width}")
        w1 = max(width - 1.0, 1e-12)
        out = np.clip((x - (center - 0.5)) / w1 + 0.5, 0.0, 1.0)
    return out.astype(np.float32)
