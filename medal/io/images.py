"""PNG / JPEG / TIFF / BMP through Pillow: 8- and 16-bit, gray, palette, RGB(A), CMYK."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageReadError
from .windowing import linear_window, minmax

PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


def load_pillow(path: Path, *, window: str | tuple[float, float] = "file") -> np.ndarray:
    """``[H, W]`` or ``[H, W, 3]`` float32 in [0, 1]. EXIF orientation is applied."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            arr, full_scale = _to_array(im)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(path, f"cannot decode image: {e}") from None
    if window == "minmax":
        return minmax(arr)
    if isinstance(window, tuple):
        return linear_window(arr, window[0], window[1])
    return np.clip(arr.astype(np.float32) / full_scale, 0.0, 1.0)


def _to_array(im: Image.Image) -> tuple[np.ndarray, float]:
    """Pixel values and the value that means "full brightness" for the mode."""
    mode = im.mode
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA"):
        im = im.convert("RGB" if mode == "RGBA" else "L")
    elif mode == "CMYK" or mode == "YCbCr" or mode == "HSV" or mode == "LAB":
        im = im.convert("RGB")
    elif mode == "1":
        im = im.convert("L")
    mode = im.mode
    arr = np.asarray(im)
    if mode in ("L", "RGB"):
        return arr, 255.0
    if mode.startswith("I;16") or (mode == "I" and arr.size and 0 <= arr.min()
                                   and arr.max() <= 65535):
        return arr.astype(np.float32), 65535.0
    if mode == "I":
        return arr.astype(np.float32), float(max(arr.max(), 1))
    if mode == "F":
        return arr.astype(np.float32), 1.0
    raise ValueError(f"unsupported image mode {mode}")
