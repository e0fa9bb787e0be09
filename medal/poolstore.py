"""A set of images' model inputs in one compact file on disk, read a batch at a time.

Self-supervised pretraining reads the same images every epoch; the per-image files of the
decode cache (:class:`medal.data.DecodeCache`) make that one file open per image per epoch,
and gathering the set into one float32 tensor makes memory grow with the pool. A
:class:`PoolStore` instead keeps the decoded inputs of one ordered set of images in a single
``.npy`` file of float16 (what the decode cache stores, so the values are the same cold or
warm, and the same as :class:`~medal.data.ImageDataset` returns)::

    <decode cache root>/<settings key>/sets/<set key>/
        images.npy     [N, C, S, S] float16 (row i: image i of the set; zeros if unreadable)
        reasons.json   {"i": one-line decode error} for the unreadable images

The settings key is the decode cache's (preprocessing version, channels, size, window,
frame); the set key a hash of the images' content ids (and frames) in order. A store is
filled by streaming the set through an :class:`~medal.data.ImageDataset` and a
``DataLoader`` (its workers), written into a temporary folder and renamed into place, so it
is never read half-written and several processes may read it (or race to write it: the
first rename wins); a fill killed midway leaves its temporary folder, which the next fill of
the set removes. Rows are read with ``pread``: the file's pages stay in the operating
system's page cache, shared by every process and not counted in any process's resident
memory, so reading a pool of any size holds one batch at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import DecodeCache, ImageDataset, make_loader
from .faults import crash_point

STORE_DTYPE = np.dtype(np.float16)
"""The stored dtype: float16 is exactly what the decode cache keeps, so results are unchanged."""

_IMAGES, _REASONS = "images.npy", "reasons.json"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def set_key(ids: Sequence[str], frames: Sequence[int | None] | None = None) -> str:
    """Key of an ordered set of images: a hash of their content ids (and frames)."""
    h = hashlib.sha256(json.dumps([list(ids), list(frames or [])]).encode())
    return h.hexdigest()[:24]


class StoredImages(torch.utils.data.Dataset):
    """A filled store, read lazily. Item ``i`` is ``(x [C, S, S] float32, i, reason)`` as for
    :class:`~medal.data.ImageDataset`: ``reason`` is ``""`` for a good image, the one-line
    decode error otherwise (then ``x`` is zeros). Picklable for ``DataLoader`` workers: each
    process opens the file itself."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        path = self.folder / _IMAGES
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version != (1, 0):
                raise ValueError(f"{path}: not a pool store (.npy version {version})")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            self.offset = f.tell()
        if fortran or dtype != STORE_DTYPE or len(shape) != 4:
            raise ValueError(f"{path}: not a pool store ({dtype}, shape {shape})")
        self.shape: tuple[int, int, int, int] = tuple(shape)  # type: ignore[assignment]
        self.row_bytes = int(np.prod(shape[1:])) * STORE_DTYPE.itemsize
        if path.stat().st_size != self.offset + self.shape[0] * self.row_bytes:
            raise ValueError(f"{path}: truncated")
        raw = json.loads((self.folder / _REASONS).read_text(encoding="utf-8"))
        self.reasons: dict[int, str] = {int(k): str(v) for k, v in raw.items()}
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, count: int) -> np.ndarray:
        """Rows ``start .. start + count`` as float16 ``[count, C, S, S]`` (one read)."""
        if self._fd is None or self._pid != os.getpid():  # a DataLoader worker opens its own
            self._fd = os.open(self.folder / _IMAGES, os.O_RDONLY)
            self._pid = os.getpid()
        n = count * self.row_bytes
        buf = os.pread(self._fd, n, self.offset + start * self.row_bytes)
        if len(buf) != n:
            raise OSError(f"{self.folder / _IMAGES}: short read at row {start}")
        return np.frombuffer(buf, STORE_DTYPE).reshape(count, *self.shape[1:])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        x = torch.from_numpy(self._read(i, 1)[0].astype(np.float32))
        return x, i, self.reasons.get(i, "")

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Images ``start .. stop`` as float32 ``[stop - start, C, S, S]`` in one read
        (unreadable images are zeros: see :attr:`reasons`)."""
        stop = min(stop, len(self))
        if start >= stop:
            return torch.zeros(0, *self.shape[1:])
        return torch.from_numpy(self._read(start, stop - start).astype(np.float32))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)  # type: ignore[arg-type]


class PoolStore:
    """The stores of image sets under a decode cache root, for one set of preprocessing
    settings (those of the :class:`~medal.data.ImageDataset` that fills them)."""

    def __init__(self, root: Path, ds: ImageDataset) -> None:
        if len(ds) and len(ds.ids) != len(ds):
            raise ValueError("a pool store needs the images' content ids (ImageDataset ids=)")
        self.ds = ds
        settings = DecodeCache(
            root, channels=ds.channels, size=ds.size, window=ds.window, frame=ds.frame
        )
        self.folder = settings.dir / "sets" / set_key(ds.ids, ds.frames)

    def open(self) -> StoredImages | None:
        """The filled store of this set, or ``None`` if there is none (or it is damaged)."""
        try:
            store = StoredImages(self.folder)
        except (OSError, ValueError, EOFError):
            return None
        return store if len(store) == len(self.ds) else None

    def fill(self, *, batch_size: int = 256, num_workers: int = 0) -> StoredImages:
        """Decode the set (through the decode cache) a batch at a time into a new store, and
        rename it into place; another process's finished store is kept if it won the race."""
        ds = self.ds
        self._remove_dead_fills()
        tmp = self.folder.with_name(f".{self.folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            reasons: dict[str, str] = {}
            header = {
                "descr": np.lib.format.dtype_to_descr(STORE_DTYPE),
                "fortran_order": False,
                "shape": (len(ds), ds.channels, ds.size, ds.size),
            }
            with open(tmp / _IMAGES, "wb") as f:
                np.lib.format.write_array_header_1_0(f, header)
                for x, idx, why in make_loader(ds, batch_size, num_workers):
                    f.write(x.to(torch.float16).numpy().tobytes())
                    crash_point("poolstore.filling")
                    reasons |= {str(j): r for j, r in zip(idx.tolist(), why) if r}
            (tmp / _REASONS).write_text(json.dumps(reasons), encoding="utf-8")
            self._place(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return StoredImages(self.folder)

    def _remove_dead_fills(self) -> None:
        """Remove what killed fills of this set left beside it: temporary folders
        (``.<set>.<pid>.<hex>``) whose process is gone, and folders moved aside
        (``.<set>.<hex>.old``). A live process's temporary folder is left alone."""
        prefix = f".{self.folder.name}."
        if not self.folder.parent.is_dir():
            return
        for p in self.folder.parent.iterdir():
            if not p.name.startswith(prefix):
                continue
            rest = p.name[len(prefix) :].split(".")
            dead = len(rest) == 2 and rest[0].isdigit() and not _alive(int(rest[0]))
            if dead or (len(rest) == 2 and rest[1] == "old"):
                shutil.rmtree(p, ignore_errors=True)

    def _place(self, filled: Path) -> None:
        """Rename the folder ``filled`` into place. A good store already there (another
        process's, renamed first) is kept; a damaged one is moved aside and removed."""
        try:
            os.rename(filled, self.folder)
            return
        except OSError:
            if self.open() is not None:
                return
        aside = self.folder.with_name(f".{self.folder.name}.{uuid.uuid4().hex[:8]}.old")
        try:
            os.rename(self.folder, aside)
        except FileNotFoundError:  # another process moved it first
            pass
        shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(filled, self.folder)
        except OSError:
            if self.open() is None:
                raise


def stored_images(
    ds: ImageDataset, root: Path, *, batch_size: int = 256, num_workers: int = 0
) -> torch.utils.data.Dataset:
    """``ds``'s images from their store under the decode cache ``root``, filling it first if
    there is none. A disk that cannot hold the store (full, read-only) does not stop the
    command: ``ds`` itself is returned (the same items, decoded or read from the decode cache
    one at a time), and so is a dataset without content ids (``image.cache = false``).
    Either way item ``i`` is ``(x [C, S, S] float32, i, reason)``."""
    if len(ds.ids) != len(ds):
        return ds
    store = PoolStore(root, ds)
    found = store.open()
    if found is not None:
        return found
    try:
        return store.fill(batch_size=batch_size, num_workers=num_workers)
    except (OSError, ValueError):
        return ds
