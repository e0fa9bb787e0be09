"""PNG / JPEG / TIFF / BMP through Pillow, plus the value-scaling helpers DICOM shares.

Every loader returns float32 in [0, 1]: ``[H, W]`` for grey images, ``[H, W, 3]`` for colour.
"""

from __future__ import annotations

import math
import re
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageReadError

PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})

Window = str | tuple[float, float]
"""``"file"``, ``"minmax"`` or ``(center, width)``."""

WINDOW_MODES = ("file", "minmax")
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")

# Exceptions Pillow raises for corrupt, truncated or hostile files.
_PILLOW_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    Image.DecompressionBombError,
)
_RGB_MODES = ("RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")

MAX_PIXELS = 178_956_970
"""Largest image medal decodes (width x height, e.g. 13,377 x 13,377): Pillow's own
decompression-bomb limit (2 x its default ``Image.MAX_IMAGE_PIXELS``), fixed here so that it
does not depend on a global another library may change. Larger files (Pillow formats and
DICOM frames) are skipped with the reason, never decoded."""


def check_pixels(path: Path, width: int, height: int) -> None:
    """Raise :class:`ImageReadError` if a ``width`` x ``height`` image is over
    :data:`MAX_PIXELS`."""
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            path, _too_large(f"{width}x{height} = {width * height / 1e6:.0f}", MAX_PIXELS)
        )


def _too_large(size: str, limit: int) -> str:
    where = (
        "medal.io.MAX_PIXELS"
        if limit == MAX_PIXELS
        else "2 x Pillow's Image.MAX_IMAGE_PIXELS, lowered in this process"
    )
    return (
        f"image of {size} million pixels is over the limit of {limit / 1e6:.0f} million "
        f"({where}); downscale it to use it"
    )


def reduce_factor(width: int, height: int, min_size: int | None) -> int:
    """The integer factor an image is shrunk by (box average) so that each side stays at
    least ``min_size`` (1: not at all). Of the factors from half the largest such to the
    largest, the one leaving the fewest rows and columns over (cropped evenly from both
    edges) is taken, so the picture's geometry is kept (1500 x 1100 -> 10, not 13)."""
    if not min_size or min_size <= 0:
        return 1
    largest = min(width, height) // min_size
    if largest < 2:
        return 1
    return min(
        range(max(2, largest // 2), largest + 1),
        key=lambda f: (width % f / width + height % f / height, -f),
    )


def check_window(window: object) -> Window:
    """Validate a ``window`` argument; returns it (a list pair becomes a tuple).

    Raises ``ValueError`` for anything but ``"file"``, ``"minmax"`` or a finite
    ``(center, width)`` with ``width > 0``: a bad window is a caller bug, not a bad file.
    """
    if isinstance(window, str):
        if window in WINDOW_MODES:
            return window
    elif (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in window)
    ):
        center, width = float(window[0]), float(window[1])
        if math.isfinite(center) and math.isfinite(width) and width > 0:
            return (center, width)
    raise ValueError(
        f"window must be 'file', 'minmax' or (center, width) with finite values "
        f"and width > 0, got {window!r}"
    )


def scale_minmax(values: np.ndarray) -> np.ndarray:
    """Scale an array (any shape) by its own min..max to float32 [0, 1]; constant -> zeros."""
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(x.shape, dtype=np.float32)
    lo, hi = float(x[finite].min()), float(x[finite].max())
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.float32)
    out = np.clip(np.nan_to_num((x - lo) / (hi - lo), nan=0.0), 0.0, 1.0)
    return out.astype(np.float32)


def apply_window(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 VOI window mapped to float32 [0, 1] (same shape as ``values``).

    ``function``: ``LINEAR`` (needs ``width >= 1``), ``LINEAR_EXACT`` or ``SIGMOID``
    (``width > 0``). Raises ``ValueError`` for an invalid window.
    """
    if not (math.isfinite(center) and math.isfinite(width)):
        raise ValueError(f"window center/width must be finite, got ({center}, {width})")
    x = np.asarray(values, dtype=np.float64)
    function = (function or "LINEAR").strip().upper()
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"LINEAR window width must be >= 1, got {width:g}")
        if width == 1:  # the standard's formula degenerates to a step at center - 0.5
            out = (x > center - 0.5).astype(np.float64)
        else:
            out = (x - (center - 0.5)) / (width - 1.0) + 0.5
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"LINEAR_EXACT window width must be > 0, got {width:g}")
        out = (x - center) / width + 0.5
    elif function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"SIGMOID window width must be > 0, got {width:g}")
        # Clipping the exponent keeps np.exp from overflowing (and warning) far from center.
        out = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - center) / width, -700.0, 700.0)))
    else:
        raise ValueError(f"unknown VOI LUT function {function!r} (expected {VOI_FUNCTIONS})")
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0).astype(np.float32)


def apply_user_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """A ``(center, width)`` override: the DICOM LINEAR window (what viewers show) when
    ``width >= 1``; LINEAR_EXACT below that, where LINEAR is undefined (e.g. float images)."""
    return apply_window(values, center, width, "LINEAR" if width >= 1 else "LINEAR_EXACT")


def load_pillow(
    path: str | Path, *, window: Window = "file", min_size: int | None = None
) -> np.ndarray:
    """Decode a Pillow-readable file to float32 [0, 1], ``[H, W]`` (grey) or ``[H, W, 3]``.

    EXIF orientation is applied; multi-page files give their first page; alpha is dropped.
    ``window="file"`` scales by the bit depth (8-bit /255, 16-bit /65535),
    ``"minmax"`` by the image's own range, ``(center, width)`` windows the raw values.
    ``min_size``: the caller needs no more than this many pixels on the shorter side, so a
    larger image is returned reduced by an integer factor (box average of the raw values,
    as Pillow's ``Image.reduce``) with each side still >= ``min_size``; a JPEG is decoded at
    reduced resolution to begin with (Pillow ``Image.draft``, DCT scaling). Without it, the
    full resolution. Images over :data:`MAX_PIXELS` are refused unread.
    Raises :class:`~medal.errors.ImageReadError` for a missing, corrupt, truncated or too
    large file.
    """
    window = check_window(window)
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than fails) on e.g. odd EXIF or palette transparency data.
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                check_pixels(path, *im.size)
                if min_size and im.format == "JPEG":
                    im.draft(im.mode, (min_size, min_size))  # each side stays >= min_size
                im.load()
                im = ImageOps.exif_transpose(im)  # type: ignore[assignment]
                arr, full_scale = _pixels(im, min_size)
    except Image.DecompressionBombError as e:  # Pillow checks first, on opening
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)) / 1e6:.0f}" if found else "over"
        limit = min(MAX_PIXELS, 2 * int(Image.MAX_IMAGE_PIXELS or MAX_PIXELS))
        raise ImageReadError(path, _too_large(size, limit)) from None
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image Pillow can read") from None
    except _PILLOW_ERRORS as e:
        raise ImageReadError(path, f"cannot decode image: {_one_line(e)}") from None
    if window == "minmax" or (window == "file" and full_scale is None):
        out = scale_minmax(arr)
    elif isinstance(window, tuple):
        out = apply_user_window(arr, *window)
    else:
        out = np.clip(np.nan_to_num(arr.astype(np.float32) / np.float32(full_scale)), 0.0, 1.0)
    return np.ascontiguousarray(out, dtype=np.float32)


def _pixels(im: Image.Image, min_size: int | None = None) -> tuple[np.ndarray, float | None]:
    """Raw pixel values ``[H, W]`` or ``[H, W, 3]`` and the value meaning full brightness
    (``None``: no natural full scale, so ``window="file"`` falls back to min-max), reduced
    to ``min_size`` (see :func:`load_pillow`)."""
    arr, full_scale = _raw_pixels(im)
    factor = reduce_factor(arr.shape[1], arr.shape[0], min_size)
    return (block_mean(arr, factor) if factor > 1 else arr), full_scale


def block_mean(arr: np.ndarray, factor: int) -> np.ndarray:
    """``[H, W, ...]`` -> ``[H // f, W // f, ...]`` float32, the mean of each f x f block; the
    rows and columns left over are cropped evenly from both edges. No full-size float copy
    is made (numpy reduces in buffered chunks)."""
    h, w = arr.shape[0] // factor * factor, arr.shape[1] // factor * factor
    top, left = (arr.shape[0] - h) // 2, (arr.shape[1] - w) // 2
    blocks = arr[top : top + h, left : left + w].reshape(
        h // factor, factor, w // factor, factor, *arr.shape[2:]
    )
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def _raw_pixels(im: Image.Image) -> tuple[np.ndarray, float | None]:
    mode = im.mode
    if mode in ("P", "PA"):
        # Via RGBA so palette transparency is dropped without Pillow's conversion warning.
        target = "L" if _palette_is_grey(im) else "RGB"
        im = im.convert("RGBA").convert(target)
    elif mode in ("1", "LA", "La"):
        im = im.convert("L")
    elif mode in _RGB_MODES and mode != "RGB":
        im = im.convert("RGB")
    mode = im.mode
    arr = np.asarray(im)
    if mode in ("L", "RGB"):
        return arr, 255.0
    if mode.startswith("I;16"):
        return arr.astype(np.float32), 65535.0
    if mode == "I":
        in_16_bit = arr.size == 0 or (arr.min() >= 0 and arr.max() <= 65535)
        return arr.astype(np.float64), 65535.0 if in_16_bit else None
    if mode == "F":
        arr = arr.astype(np.float32)
        finite = arr[np.isfinite(arr)]
        in_unit = finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1)
        return arr, 1.0 if in_unit else None
    raise ValueError(f"unsupported image mode {mode}")


def _palette_is_grey(im: Image.Image) -> bool:
    palette = im.getpalette() or []
    triples = np.asarray(palette[: len(palette) // 3 * 3]).reshape(-1, 3)
    return bool(triples.size) and bool((triples == triples[:, :1]).all())


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__
