"""Samples -> tensors: the decode cache, torch datasets, transforms and in-memory loading.

Scanning folders and label CSVs and content ids are :mod:`medal.scan`'s; its names are
re-exported here for ``from medal.data import ...``.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from .errors import ImageReadError
from .io import load_image

NORMALISE_MEAN = 0.5
NORMALISE_STD = 0.25


def to_tensor(img: np.ndarray, channels: int, size: int) -> torch.Tensor:
    """Float image in [0, 1], ``[H, W]`` or ``[H, W, 3]`` -> normalised ``[channels, size, size]``.

    The image is resized to a square (aspect ratio not kept) with antialiasing.
    """
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] == 3 and channels == 1:
        t = TF.rgb_to_grayscale(t)
    elif t.shape[0] == 1 and channels == 3:
        t = t.expand(3, -1, -1)
    if t.shape[-2:] != (size, size):
        t = TF.resize(t, [size, size], antialias=True)
    return ((t - NORMALISE_MEAN) / NORMALISE_STD).contiguous()


PREPROCESS_VERSION = 2  # 2: large images decoded reduced (DECODE_REDUCING_GAP)
"""Bump when decoding or preprocessing changes, so old cache entries are not reused."""

DECODE_REDUCING_GAP = 3
"""A model input of size S is decoded from an image reduced (integer box average; JPEG by
DCT scaling) to no less than ``DECODE_REDUCING_GAP * S`` pixels on its shorter side, then
resized with antialiasing, as Pillow's ``reducing_gap``: at 3 the result is
indistinguishable from resizing the full image, and a 12000 x 12000 scan never exists as a
full-size float array."""


class DecodeCache:
    """Preprocessed pixels on disk, keyed by image content id and preprocessing settings.

    ``<root>/<settings key>/<id[:2]>/<id>.npy`` holds the model input ``[C, S, S]`` (float16);
    ``<id>.err`` holds the one-line reason a file could not be decoded, so broken files are not
    retried every round. A changed file has a new content id, changed settings a new key, so
    stale entries are never read. Entries are written to a unique temporary name and renamed
    into place (atomic), so several processes can read and fill the cache at once.
    """

    def __init__(
        self,
        root: Path,
        *,
        channels: int,
        size: int,
        window: str | tuple[float, float],
        frame: str | int,
    ) -> None:
        settings = json.dumps(
            [PREPROCESS_VERSION, channels, size, window, frame, NORMALISE_MEAN, NORMALISE_STD]
        )
        self.key = hashlib.sha256(settings.encode()).hexdigest()[:16]
        self.dir = Path(root) / self.key

    def _path(self, image_id: str, suffix: str) -> Path:
        return self.dir / image_id[:2] / f"{image_id}{suffix}"

    def get(self, image_id: str) -> torch.Tensor | str | None:
        """The cached tensor, the cached failure reason, or ``None`` if not cached."""
        try:
            return torch.from_numpy(np.load(self._path(image_id, ".npy")).astype(np.float32))
        except FileNotFoundError:
            pass
        except (ValueError, OSError, EOFError):  # a damaged entry: decode again
            return None
        try:
            return self._path(image_id, ".err").read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def put(self, image_id: str, value: torch.Tensor | str) -> None:
        final = self._path(image_id, ".err" if isinstance(value, str) else ".npy")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            if isinstance(value, str):
                tmp.write_text(value, encoding="utf-8")
            else:
                with open(tmp, "wb") as f:
                    np.save(f, value.numpy().astype(np.float16))
            os.replace(tmp, final)
        except OSError:  # a full or read-only disk must not stop a round; just don't cache
            tmp.unlink(missing_ok=True)


class ImageDataset(torch.utils.data.Dataset):
    """Decodes images lazily. Item ``i`` is ``(x [C, S, S], i, reason)``; ``reason`` is ``""``
    for a good image and the one-line decode error otherwise (then ``x`` is zeros), so a broken
    file is reported instead of crashing a DataLoader worker.

    With ``ids`` (content ids, one per path) and ``cache_dir``, decoded inputs go through a
    :class:`DecodeCache`, so each image is decoded once across rounds and processes.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        channels: int,
        size: int,
        window: str | tuple[float, float] = "file",
        frame: str | int = "middle",
        ids: Sequence[str] | None = None,
        cache_dir: Path | None = None,
        frames: Sequence[int | None] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.frames = list(frames) if frames is not None else None
        self.channels, self.size, self.window, self.frame = channels, size, window, frame
        if (ids is None) != (cache_dir is None):
            raise ValueError("the decode cache needs both ids and cache_dir")
        self.ids: list[str] = list(ids) if ids is not None else []
        self.cache = (
            DecodeCache(cache_dir, channels=channels, size=size, window=window, frame=frame)
            if cache_dir is not None
            else None
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        if self.cache is not None:
            hit = self.cache.get(self.ids[i])
            if isinstance(hit, torch.Tensor):
                return hit, i, ""
            if isinstance(hit, str):
                return torch.zeros(self.channels, self.size, self.size), i, hit
        try:
            fi = self.frames[i] if self.frames else None
            frame = fi if fi is not None else self.frame
            x = to_tensor(
                load_image(
                    self.paths[i],
                    window=self.window,
                    frame="middle" if frame == "all" else frame,
                    min_size=DECODE_REDUCING_GAP * self.size,
                ),
                self.channels,
                self.size,
            )
        except ImageReadError as e:
            if self.cache is not None:
                self.cache.put(self.ids[i], e.reason)
            return torch.zeros(self.channels, self.size, self.size), i, e.reason
        if self.cache is not None:
            self.cache.put(self.ids[i], x)
            x = x.half().float()  # what the cache returns next time: same result cold or warm
        return x, i, ""


def make_loader(
    ds: torch.utils.data.Dataset, batch_size: int, num_workers: int, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """Batches ``(x [B, C, S, S], i [B], reasons)`` of a dataset with
    :class:`ImageDataset`'s items, in order."""
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def load_all(
    paths: Sequence[Path],
    *,
    channels: int,
    size: int,
    window: str | tuple[float, float] = "file",
    frame: str | int = "middle",
    num_workers: int = 0,
    batch_size: int = 256,
    ids: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    frames: Sequence[int | None] | None = None,
) -> tuple[torch.Tensor, np.ndarray, dict[Path, str]]:
    """Decode ``paths`` into memory (through the decode cache when ``ids``/``cache_dir``).

    Returns ``(x [M, C, S, S], kept [M] indices into paths, {path: reason} for skipped files)``.
    The batches are copied into one tensor allocated up front, so memory holds the set once
    (and one batch), not twice as gathering the batches and then concatenating them would.
    """
    ds = ImageDataset(
        paths,
        channels=channels,
        size=size,
        window=window,
        frame=frame,
        ids=ids,
        cache_dir=cache_dir,
        frames=frames,
    )
    out = torch.empty(len(ds), channels, size, size)
    kept: list[int] = []
    skipped: dict[Path, str] = {}
    for x, idx, reasons in make_loader(ds, batch_size, num_workers):
        ok = torch.tensor([r == "" for r in reasons], dtype=torch.bool)
        good = x if ok.all() else x[ok]
        out[len(kept) : len(kept) + len(good)] = good
        kept += idx[ok].tolist()
        skipped |= {ds.paths[j]: r for j, r in zip(idx.tolist(), reasons) if r}
    return out[: len(kept)], np.asarray(kept, dtype=np.int64), skipped
