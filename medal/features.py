"""Backbone features under a frozen backbone, computed once per image.

With ``train.freeze_backbone`` the backbone never changes between rounds, so an image's
features ``[D]`` do not either: scoring a round then needs only the head's dropout samples,
and the pool is decoded and passed through the backbone once per project (and once per
simulation, whose runs share one cache folder) instead of once per round.
The cache is one :class:`FeatureStore` folder per backbone (its weights and the image settings
are the key), so a backbone fine-tuned by ``train.finetune`` (LP-FT) gets a store of its own,
computed once for that round's weights, and never the self-supervised backbone's features.
Features are written a batch at a time as they are computed and read a batch at a time when
the pool is scored, so neither holds the pool's ``[N, D]``. What needs every feature at once
gathers them: the zero-label first round's TypiClust (:func:`stream_features`),
semi-supervised training of the head (:func:`medal.inputs.frozen_features`), and the
selections that work in the feature space from the stored scores (cold start, coreset,
TypiClust, BADGE and the like; see :func:`medal.query.select`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import make_loader
from .models import MCModel

FEATURE_BATCH = 512
"""Images per forward pass when a set's backbone features are computed (the batch of
:func:`medal.train.backbone_features`, so streamed features equal those of the whole set)."""


def backbone_key(backbone: nn.Module, preprocess: Sequence[object]) -> str:
    """Key of a backbone's features: a hash of its weights and buffers (``[*]`` tensors, in
    state-dict order) and of the image settings that make its inputs."""
    h = hashlib.sha256()
    for name, t in backbone.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(list(preprocess), default=str).encode())
    return h.hexdigest()[:24]


class FeatureStore:
    """``{image id: features [D] float32}`` for one backbone, on disk, read a batch at a time.

    The store is a folder of immutable segment files, each written whole under a temporary
    name and renamed into place (:class:`FeatureWriter`), so a crash mid-write leaves only a
    temporary file that is never read::

        <folder>/
            00000001-<random>.f32   a query's new images, up to SEGMENT_ROWS per segment
            00000002-<random>.f32
            .<pid>-<random>.tmp     a segment being written (removed when a day old)

    A segment is ``rows [n, D] float32`` (little-endian, row by row), then a UTF-8 JSON footer
    ``{"format": "medal-features", "version": 1, "dim": D, "ids": [n image ids]}``, then the
    footer's length (8 bytes, little-endian) and :data:`MAGIC`. A segment cut short, or whose
    size does not match its footer, tail or magic, is removed when the store is opened: its
    images' features are computed again, never read from it. (The rows carry no checksum,
    like the decode cache's and the scores' files: bytes changed in place are not noticed.)
    An image in several segments (processes that computed it at the same time) is read from
    the first, in the order of the names.

    Rows are read with ``pread`` a batch at a time: the file's pages stay in the operating
    system's page cache, outside the process's resident memory, so scoring a pool of any size
    holds one batch of features (:meth:`read`), never ``[N, D]`` (:meth:`lookup` does, for the
    callers that need every feature at once).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._segments: list[_Segment] = []
        self._starts = np.zeros(1, np.int64)
        self._index: dict[int, dict[str, int]] = {}
        self._scan()

    def _scan(self) -> None:
        """(Re)read the segments' footers; damaged segments are removed."""
        self._segments, self._index = [], {}
        names = sorted(self.folder.glob("*" + SUFFIX)) if self.folder.is_dir() else []
        for path in names:
            try:
                self._segments.append(_Segment(path))
            except ValueError:
                path.unlink(missing_ok=True)  # derived data: its images are computed again
            except FileNotFoundError:
                pass
        sizes = [len(s.ids) for s in self._segments]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def _rows_of(self, dim: int) -> dict[str, int]:
        """``{image id: global row}`` over the segments of width ``dim`` (first one wins)."""
        if dim not in self._index:
            index: dict[str, int] = {}
            for s, seg in enumerate(self._segments):
                if seg.dim == dim:
                    base = int(self._starts[s])
                    for r, i in enumerate(seg.ids):
                        index.setdefault(i, base + r)
            self._index[dim] = index
        return self._index[dim]

    def __len__(self) -> int:
        return len({i for seg in self._segments for i in seg.ids})

    def found(self, ids: Sequence[str], dim: int) -> np.ndarray:
        """``[N] bool``: which of ``ids`` have features of width ``dim`` stored."""
        index = self._rows_of(dim)
        return np.array([i in index for i in ids], dtype=bool)

    def read(self, ids: Sequence[str], dim: int) -> np.ndarray:
        """Features ``[len(ids), dim] float32`` of ``ids``, which must all be stored
        (:meth:`found`), read in one ``pread`` per run of consecutive rows."""
        index = self._rows_of(dim)
        try:
            g = np.array([index[i] for i in ids], dtype=np.int64)
        except KeyError as e:
            raise KeyError(f"{self.folder}: no features of width {dim} for image {e}") from None
        out = np.empty((len(g), dim), np.float32)
        if not len(g):
            return out
        seg = np.searchsorted(self._starts, g, side="right") - 1
        row = g - self._starts[seg]
        cut = np.flatnonzero((np.diff(seg) != 0) | (np.diff(row) != 1)) + 1
        for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(g)]):
            out[a:b] = self._segments[int(seg[a])].rows(int(row[a]), b - a)
        return out

    def lookup(self, ids: Sequence[str], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """``(features [N, dim] float32, found [N] bool)``; rows not found are zero. Holds all
        ``N`` rows: for callers that need every feature at once."""
        found = self.found(ids, dim)
        out = np.zeros((len(ids), dim), np.float32)
        have = np.flatnonzero(found)
        for c in range(0, len(have), FEATURE_BATCH):
            rows = have[c : c + FEATURE_BATCH]
            out[rows] = self.read([ids[int(r)] for r in rows], dim)
        return out, found

    def writer(self, dim: int) -> FeatureWriter:
        """A new segment of width ``dim``; see :class:`FeatureWriter`."""
        return FeatureWriter(self, dim)

    def add(self, ids: Sequence[str], feats: np.ndarray) -> None:
        """Store features ``[M, D]`` of ``ids`` (those not stored yet) as one new segment."""
        feats = np.asarray(feats, np.float32)
        with self.writer(feats.shape[1]) as w:
            w.write(ids, feats)


class FeatureWriter:
    """Writes segments of a :class:`FeatureStore`: ``with store.writer(D) as w:
    w.write(ids, feats [B, D])`` a batch at a time. Every :data:`SEGMENT_ROWS` images, and on
    leaving the block without an error, the segment is flushed to disk and renamed into place
    (so a crash loses at most the segment being written); on an error the unfinished segment
    is removed. Images already stored, or written earlier by this writer, are skipped."""

    def __init__(self, store: FeatureStore, dim: int) -> None:
        self.store, self.dim = store, dim
        self._known = set(store._rows_of(dim))
        store.folder.mkdir(parents=True, exist_ok=True)
        _remove_stale(store.folder)
        self._start()

    def _start(self) -> None:
        self.ids: list[str] = []
        self.tmp = self.store.folder / f".{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
        self._f = open(self.tmp, "wb")

    def write(self, ids: Sequence[str], feats: np.ndarray) -> None:
        """Append features ``[B, dim]`` of ``ids`` (``B = len(ids)``)."""
        feats = np.asarray(feats, dtype="<f4")
        if feats.shape != (len(ids), self.dim):
            raise ValueError(f"features {feats.shape} for {len(ids)} ids of width {self.dim}")
        keep = []
        for r, i in enumerate(ids):
            if i not in self._known:
                self._known.add(i)
                keep.append(r)
        self.ids += [ids[r] for r in keep]
        self._f.write(np.ascontiguousarray(feats[keep]).tobytes())
        if len(self.ids) >= SEGMENT_ROWS:
            self._finish()
            self._start()

    def _finish(self) -> None:
        """Write the footer, flush the segment to disk and rename it into place (or remove
        it when it holds no image)."""
        footer = json.dumps(
            {"format": "medal-features", "version": 1, "dim": self.dim, "ids": self.ids}
        ).encode()
        self._f.write(footer + struct.pack("<Q", len(footer)) + MAGIC)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self.ids:
            self.tmp.replace(
                self.store.folder / f"{_next_number(self.store.folder):08d}"
                f"-{uuid.uuid4().hex[:8]}{SUFFIX}"
            )
        self.tmp.unlink(missing_ok=True)

    def commit(self) -> None:
        """Finish the last segment, and re-read the store."""
        self._finish()
        self.store._scan()

    def abort(self) -> None:
        """Remove the unfinished segment (finished ones stay), and re-read the store."""
        self._f.close()
        self.tmp.unlink(missing_ok=True)
        self.store._scan()

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


SEGMENT_ROWS = 65536
"""Images per segment at most (and one batch more): how much a crash mid-computation loses."""
MAGIC = b"MEDALFT1"
"""The last 8 bytes of a feature segment."""
SUFFIX, TMP_SUFFIX = ".f32", ".tmp"
STALE_SECONDS = 24 * 3600
"""A temporary segment not written to for this long is a crashed writer's, and removed."""


class _Segment:
    """One segment file of a :class:`FeatureStore`, checked on opening (``ValueError`` when
    damaged); rows read with ``pread``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 16:
                raise ValueError(f"{path}: truncated")
            f.seek(size - 16)
            (n_footer,), magic = struct.unpack("<Q", f.read(8)), f.read(8)
            if magic != MAGIC or n_footer > size - 16:
                raise ValueError(f"{path}: not a feature segment (truncated or damaged)")
            f.seek(size - 16 - n_footer)
            try:
                footer = json.loads(f.read(n_footer))
                self.dim, self.ids = int(footer["dim"]), [str(i) for i in footer["ids"]]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}: unreadable footer") from None
        self.row_bytes = 4 * self.dim
        if self.dim < 1 or size != len(self.ids) * self.row_bytes + n_footer + 16:
            raise ValueError(f"{path}: truncated or damaged ({size} bytes)")
        self._fd: int | None = None

    def rows(self, start: int, count: int) -> np.ndarray:
        """Rows ``start .. start + count`` as ``[count, dim] float32`` (one read)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        n = count * self.row_bytes
        buf = os.pread(self._fd, n, start * self.row_bytes)
        if len(buf) != n:
            raise OSError(f"{self.path}: short read at row {start} (the file was truncated)")
        return np.frombuffer(buf, "<f4").reshape(count, self.dim)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]


def _next_number(folder: Path) -> int:
    """One more than the highest segment number in ``folder``: later segments sort later."""
    numbers = [int(p.name[:8]) for p in folder.glob("*" + SUFFIX) if p.name[:8].isdigit()]
    return max(numbers, default=0) + 1


def _remove_stale(folder: Path) -> None:
    """Remove crashed writers' temporary segments (not written to for a day)."""
    now = time.time()
    for p in folder.glob("." + "*" + TMP_SUFFIX):
        try:
            if now - p.stat().st_mtime > STALE_SECONDS:
                p.unlink()
        except FileNotFoundError:
            pass


def open_feature_store(folder: Path) -> FeatureStore:
    """The feature store in ``folder``. A cache written by medal before the store (one
    ``<folder>.pt`` file, ``{"ids": [N], "features": [N, D]}``) is converted into a segment
    once (holding its ``[N, D]`` while it is) and removed; one that cannot be read is removed
    (its features are computed again)."""
    legacy = folder.with_name(folder.name + ".pt")
    if legacy.is_file():
        try:
            data = torch.load(legacy, map_location="cpu", weights_only=True)
            ids, feats = [str(i) for i in data["ids"]], data["features"].float().numpy()
            if len(ids) == len(feats) and feats.ndim == 2:
                FeatureStore(folder).add(ids, feats)
        except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt
            pass
        legacy.unlink(missing_ok=True)
    return FeatureStore(folder)


@torch.no_grad()
def iter_features(
    model: MCModel,
    ds: torch.utils.data.Dataset,
    device: torch.device,
    *,
    batch_size: int = FEATURE_BATCH,
    num_workers: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray, dict[int, str]]]:
    """Deterministic backbone features (``model.features``) of ``ds`` (items ``(x [C, S, S],
    i, reason)``), a batch at a time through a ``DataLoader`` (pinned memory on CUDA): memory
    holds one batch of images, never the whole set.

    Yields, per batch, ``(features [b, D] float32, kept [b] indices into ds, {index: reason})``
    for its ``b`` readable images and its unreadable ones.
    """
    model.eval()
    loader = make_loader(ds, batch_size, num_workers, pin_memory=device.type == "cuda")
    for x, idx, why in loader:
        ok = torch.tensor([r == "" for r in why], dtype=torch.bool)
        reasons = {j: r for j, r in zip(idx.tolist(), why) if r}
        feats = np.zeros((0, model.feature_dim), np.float32)
        if ok.any():
            good = x if ok.all() else x[ok]
            feats = model.features(good.to(device, non_blocking=True)).float().cpu().numpy()
        yield feats, idx[ok].numpy().astype(np.int64), reasons


def stream_features(
    model: MCModel,
    ds: torch.utils.data.Dataset,
    device: torch.device,
    *,
    batch_size: int = FEATURE_BATCH,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """The features of :func:`iter_features` gathered: ``(features [M, D] float32, kept [M]
    indices into ds, {index: reason})`` for the ``M`` readable images, in order. Holds
    ``[M, D]``: for the zero-label first round, whose TypiClust needs every feature at once."""
    feats: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    reasons: dict[int, str] = {}
    for f, k, why in iter_features(
        model, ds, device, batch_size=batch_size, num_workers=num_workers
    ):
        feats.append(f)
        kept.append(k)
        reasons |= why
    out = np.concatenate(feats) if feats else np.zeros((0, model.feature_dim), np.float32)
    rows = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    return out, rows, reasons
