"""Monte Carlo dropout sampling: images -> per-sample class probabilities ``[N, T, C]``.

Head-only sampling (the default) runs the deterministic backbone once per image and samples
only the dropout head, with the features expanded to ``[T * B, D]`` so the T samples are one
vectorised call. Full-network sampling (dropout inside the backbone) replicates each batch
into as few forward calls as ``max_batch_items`` allows.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import ImageDataset
from .errors import ModelError, WorkspaceError
from .models import MCModel, forward_steps, set_mc_mode, split_at_first_dropout


@dataclass
class MCResult:
    probs: np.ndarray
    """``[M, T, C]`` float32 softmax probabilities of the M readable images."""
    features: np.ndarray
    """``[M, D]`` float32 backbone features (for diversity-based acquisition)."""
    kept: np.ndarray
    """``[M]`` int64: positions of the readable images in the input list."""
    skipped: dict[Path, str] = field(default_factory=dict)
    """Unreadable files and why."""
    top_index: np.ndarray | None = None
    """With ``top_k``: rows (into ``probs``) of the k best images, best first."""
    top_scores: np.ndarray | None = None
    ids: np.ndarray | None = None
    """``[M]`` str: the image ids of the readable images (when the scorer was given ids)."""


def dropout_mask(shape: Sequence[int], p: float, dtype: torch.dtype) -> torch.Tensor:
    """The scaled mask ``Bernoulli(1 - p) / (1 - p)`` of shape ``shape`` that ``nn.Dropout(p)``
    multiplies a CPU input of that shape by, with the same random numbers: on the CPU,
    ``torch.rand(float64) < 1 - p`` draws what ``bernoulli_(1 - p)`` (in ``F.dropout``) draws,
    one double per element in order, so a seed gives the same masks and leaves the generator
    in the same state (tested), about ten times faster."""
    keep = 1.0 - p
    return (torch.rand(tuple(shape), dtype=torch.float64) < keep).to(dtype).div_(keep)


def _fast_dropout(m: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``m(x)`` is a sampling ``nn.Dropout`` that :func:`dropout_mask` reproduces: a
    contiguous float CPU input and ``0 < p < 1`` (``F.dropout`` draws nothing otherwise)."""
    return (
        type(m) is nn.Dropout
        and m.training
        and 0.0 < m.p < 1.0
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.is_contiguous()
        and x.numel() > 0
    )


def sample_through(steps: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``steps`` in turn, as ``nn.Sequential(*steps)(x)`` gives it (the same
    values and random numbers), with CPU dropout masks from :func:`dropout_mask`."""
    for m in steps:
        if _fast_dropout(m, x):
            x = x * dropout_mask(x.shape, cast(nn.Dropout, m).p, x.dtype)
        else:
            x = m(x)
    return x


def head_samples(
    model: MCModel, feats: torch.Tensor, T: int, head: nn.Module | None = None
) -> torch.Tensor:
    """``feats [B, D]`` -> probabilities ``[B, T, C]`` from T dropout samples of the head
    (``head``, by default ``model.head``).

    The head's steps before its first dropout layer (the linear head's standardisation) run
    once on ``[B, D]``; the rest on the T samples, rows ``t * B + b`` (``[T * B, D]``), which
    on the CPU the first dropout's mask makes without copying the features T times. The same
    samples for the same seed as the head run on the features expanded to ``[T * B, D]``."""
    B = feats.shape[0]
    prefix, rest = split_at_first_dropout(forward_steps(model.head if head is None else head))
    h = prefix(feats)
    steps = list(rest)
    if steps and _fast_dropout(steps[0], h):
        mask = dropout_mask((T, *h.shape), cast(nn.Dropout, steps[0]).p, h.dtype)
        x, steps = (h.unsqueeze(0) * mask).view(T * B, -1), steps[1:]
    else:
        x = h.unsqueeze(0).expand(T, *h.shape).reshape(T * B, -1)
    logits = sample_through(steps, x).float().view(T, B, -1)
    return logits.softmax(-1).transpose(0, 1)


def with_companion(model: MCModel, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The head's samples ``probs [B, T, C]`` on images ``x [B, C, S, S]``, averaged sample by
    sample with those of ``model.companion`` (:func:`mixed`) when it has one; the caller seeds
    and sets the MC mode."""
    comp = model.companion
    if comp is None:
        return probs
    return mixed(probs, head_samples(comp, comp.features(x), probs.shape[1]))


def mixed(head: torch.Tensor, companion: torch.Tensor) -> torch.Tensor:
    """Samples ``[B, T, C]`` of the frozen head and its companion (:mod:`medal.companion`):
    sample t of one averaged with sample t of the other."""
    return (head + companion.to(head.device, head.dtype)) / 2


@torch.no_grad()
def mc_predict_tensors(
    model: MCModel,
    x: torch.Tensor,
    T: int,
    *,
    device: torch.device,
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """In-memory images ``x [N, C, S, S]`` -> (probs ``[N, T, C]``, features ``[N, D]``);
    with a companion (``train.companion``) the probabilities are the pair's."""
    set_mc_mode(model)
    probs, feats = [], []
    with _seeded(seed, device):
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device)
            f = model.features(xb)
            probs.append(with_companion(model, xb, head_samples(model, f, T)).cpu())
            feats.append(f.float().cpu())
    if not probs:
        return np.zeros((0, T, 0), np.float32), np.zeros((0, model.feature_dim), np.float32)
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


def full_samples(
    model: MCModel, x: torch.Tensor, T: int, max_items: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """T stochastic passes of the whole network over ``x [B, C, S, S]``.

    The backbone's steps before its first dropout layer (:meth:`MCModel.backbone_split`: a
    ResNet's stem and ``layer1``) run once, on ``[B, ...]``; their output is replicated for the
    rest of the network in as few forward calls as ``max_items`` (images per call) allows, the
    k replicas of a call sample-major (rows ``t * B + b``). The samples are those of the whole
    model run on ``x`` replicated k times, call after call, for the same seed.

    Returns (probabilities ``[B, T, C]``, features averaged over the T samples ``[B, D]``).
    """
    B = x.shape[0]
    per_call = max(1, min(T, max_items // max(B, 1)))
    prefix, rest = model.backbone_split()
    head = forward_steps(model.head)
    h = _run_deterministic(prefix, x)  # once
    probs, feat_sums = [], []
    for t0 in range(0, T, per_call):
        k = min(per_call, T - t0)
        # a copy, so that an in-place first step of `rest` leaves h as it is
        f = rest(h.repeat(k, *([1] * (h.ndim - 1))))  # [k*B, D], k independent dropout masks
        probs.append(sample_through(head, f).float().softmax(-1).view(k, B, -1))
        feat_sums.append(f.float().view(k, B, -1).sum(0))
    return torch.cat(probs).transpose(0, 1), torch.stack(feat_sums).sum(0) / T


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _run_deterministic(prefix: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``prefix(x)``, or :class:`~medal.errors.ModelError` if it drew random numbers (a random
    operation that is no dropout module, which sampling once would share between samples)."""
    before = _rng_state(x.device)
    h = prefix(x)
    if not torch.equal(_rng_state(x.device), before):
        raise ModelError(
            "full-network sampling: the backbone's layers before its first dropout module "
            "drew random numbers, so they cannot run once for all T samples; make that "
            "randomness a torch.nn dropout module, or use query.sampling = 'head'"
        )
    return h


class TopK:
    """The k highest scores seen so far, merged batch by batch (bounded memory).

    Ties are broken by the lower position, as a stable sort of all scores would.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.scores = np.zeros(0, np.float64)
        self.index = np.zeros(0, np.int64)

    def update(self, scores: np.ndarray, index: np.ndarray) -> None:
        s = np.concatenate([self.scores, scores.astype(np.float64)])
        i = np.concatenate([self.index, index.astype(np.int64)])
        order = np.lexsort((i, -s))[: self.k]
        self.scores, self.index = s[order], i[order]


def _amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def batch_seed(seed: int, batch: int) -> int:
    """The RNG seed of one global batch: the same batch gets the same dropout masks whichever
    process scores it, so sharded scoring reproduces single-process scoring."""
    return (seed * 1_000_003 + batch) % (2**63)


def _ready_for_sampling(
    model: MCModel, mode: str, device: torch.device, precision: str
) -> torch.dtype | None:
    """Put ``model`` in MC mode (channels_last on CUDA) for ``mode`` sampling; returns the
    autocast dtype (None: full precision). ValueError for full-network sampling without
    dropout in the backbone."""
    if mode == "full" and not model.backbone_is_stochastic():
        raise ValueError(
            "full-network sampling needs dropout inside the backbone (model.backbone_dropout > 0)"
        )
    set_mc_mode(model)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return _amp_dtype(device, precision)


@torch.no_grad()
def score_batches(
    model: MCModel,
    ds: ImageDataset,
    T: int,
    batches: Sequence[int],
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    desc: str = "scoring",
    progress: bool = True,
    mode: str = "head",
    precision: str = "bf16",
    max_batch_items: int = 4096,
    sink: Callable[[np.ndarray, np.ndarray, np.ndarray], None],
) -> dict[Path, str]:
    """Score the global batches ``batches`` (batch ``b`` = items ``b*batch_size`` onwards).

    For every scored chunk, ``sink(rows [B], probs [B, T, C], features [B, D])`` is called
    with float32 arrays. Returns ``{path: reason}`` for unreadable files.
    """
    amp = _ready_for_sampling(model, mode, device, precision)
    cuda = device.type == "cuda"
    n = len(ds)
    index = [list(range(b * batch_size, min((b + 1) * batch_size, n))) for b in batches]
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=index, num_workers=num_workers, pin_memory=cuda
    )
    skipped: dict[Path, str] = {}
    step = batch_size

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if mode == "full":
                return full_samples(model, x, T, max_batch_items)
            f = model.features(x)
            return head_samples(model, f, T, model.scorer), f.float()

    with _seeded(seed, device):
        for b, (x, idx, reasons) in zip(
            batches,
            tqdm(
                loader, desc=desc, unit="batch", leave=False, disable=not progress or len(index) < 2
            ),
        ):
            torch.manual_seed(batch_seed(seed, b))
            ok = torch.tensor([r == "" for r in reasons], dtype=torch.bool)
            for j, r in zip(idx.tolist(), reasons):
                if r:
                    skipped[ds.paths[j]] = r
            if not ok.any():
                continue
            x, idx = x[ok], idx[ok]
            if cuda:
                x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
            step = _sink_in_chunks(run, x, idx, step, cuda, sink)
    return skipped


def _sink_in_chunks(
    run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    idx: torch.Tensor,
    step: int,
    cuda: bool,
    sink: Callable[[np.ndarray, np.ndarray, np.ndarray], None],
) -> int:
    """Score ``x [B, ...]`` in chunks of ``step`` images and pass each to ``sink``; on running
    out of memory, halve ``step`` and retry that chunk. Returns the step that worked, which
    the next batch starts from."""
    i = 0
    while i < len(x):
        try:
            p, f = run(x[i : i + step])
        except RuntimeError as e:
            if not _is_oom(e) or step == 1:
                raise
            step = max(1, step // 2)
            if cuda:
                torch.cuda.empty_cache()
            warnings.warn(
                f"out of memory while scoring; batch size halved to {step}",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        sink(idx[i : i + step].numpy(), p.float().cpu().numpy(), f.float().cpu().numpy())
        i += step
    return step


def _npy_bytes(shape: tuple[int, ...], dtype: type = np.float16) -> int:
    """Size of a ``.npy`` file of ``shape`` (header included; the header is at most 4 KiB)."""
    return int(np.prod(shape)) * np.dtype(dtype).itemsize + 4096


def _size(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 10e6 else f"{n / 1e6:.2f} MB"


def check_free_space(folder: Path, needed: int, reclaimed: Sequence[Path] = ()) -> None:
    """Raise :class:`~medal.errors.WorkspaceError` unless ``folder``'s file system has
    ``needed`` bytes free (counting the files in ``reclaimed``, about to be overwritten).

    Memory-mapped score files that cannot grow on a full disk kill the process with SIGBUS,
    with no message; this check names the folder and the sizes instead. ``folder`` need
    not exist yet (its nearest existing parent is asked)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    free += sum(p.stat().st_size for p in reclaimed if p.is_file())
    if free < needed:
        raise WorkspaceError(
            f"no space left on {folder}: {_size(needed)} needed, "
            f"{_size(free)} free; free some space or move the workspace"
        )


class ScoreFile:
    """A float16 ``.npy`` file of ``shape`` being written a chunk of rows at a time:
    ``f[rows] = values`` writes with ``pwrite``, one call per run of consecutive rows. Not a
    writable memory map, whose written pages stay in the process's resident memory (the
    pool's ``[N, D]`` features, 154 MB at 80,000 images with D = 960); written pages here go
    to the operating system's page cache. Its blocks are reserved on disk up front
    (``posix_fallocate``), so a disk that fills meanwhile gives an error here instead of a
    failed write later."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.path, self.shape = path, shape
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * 2
        with open(path, "wb") as f:
            header = {"descr": "<f2", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(f, header)
            self.offset = f.tell()
            f.truncate(self.offset + shape[0] * self.row_bytes)
        self._fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(self._fd, 0, os.fstat(self._fd).st_size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self.close()
                path.unlink(missing_ok=True)
                raise WorkspaceError(
                    f"no space left on {path.parent}: {_size(_npy_bytes(shape))} needed for "
                    f"{path.name}"
                ) from None
            # a file system that cannot reserve blocks: the free-space check stands
        except AttributeError:  # no posix_fallocate (macOS, Windows)
            pass

    def __setitem__(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write ``values [B, *shape[1:]]`` (cast to float16) at rows ``rows [B]``."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        data = np.ascontiguousarray(np.asarray(values).astype("<f2").reshape(len(rows), -1))
        if not len(rows):
            return
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise IndexError(f"{self.path}: rows outside 0..{self.shape[0] - 1}")
        cut = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(rows)]):
            os.pwrite(self._fd, data[a:b].tobytes(), self.offset + int(rows[a]) * self.row_bytes)

    @classmethod
    def open(cls, path: Path) -> ScoreFile:
        """A finished score file (float16 ``.npy``), opened to :meth:`read` rows from;
        ``ValueError`` when it is not one or is truncated."""
        self = cls.__new__(cls)
        self.path, self._fd = path, -1
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                version, np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran or dtype != np.float16 or not shape:
            raise ValueError(f"{path}: not a score file ({dtype}, shape {shape})")
        self.shape = tuple(shape)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * 2
        if path.stat().st_size < self.offset + shape[0] * self.row_bytes:
            raise ValueError(f"{path}: truncated")
        self._fd = os.open(path, os.O_RDONLY)
        return self

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows [B]`` as float16 ``[B, *shape[1:]]``, one ``pread`` per run of
        consecutive rows."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        out = np.empty((len(rows), *self.shape[1:]), np.float16)
        cut = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(rows)]):
            n = (b - a) * self.row_bytes
            buf = os.pread(self._fd, n, self.offset + int(rows[a]) * self.row_bytes)
            if len(buf) != n:
                raise OSError(f"{self.path}: short read at row {int(rows[a])}")
            out[a:b] = np.frombuffer(buf, "<f2").reshape(b - a, *self.shape[1:])
        return out

    def keep(self, rows: np.ndarray, chunk: int = 4096) -> None:
        """Keep only ``rows [M]`` (in that order), copied ``chunk`` rows at a time into a new
        file that replaces this one; the file is closed afterwards."""
        kept = ScoreFile(
            self.path.with_name("kept-" + self.path.name), (len(rows), *self.shape[1:])
        )
        try:
            for c in range(0, len(rows), chunk):
                kept[np.arange(c, min(c + chunk, len(rows)))] = self.read(rows[c : c + chunk])
        finally:
            kept.close()
            self.close()
        kept.path.replace(self.path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()


def n_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


class ScoreStore:
    """The stored MC-dropout scores of one query, in one folder
    (:meth:`~medal.workspace.Workspace.scores_dir`), keyed by image id; the only owner of
    their format::

        probs.npy      [N, T, C] float16  one row per scored image (N = M: the readable
                                          ones; scores of older versions also kept zero
                                          rows for the unreadable ones)
        features.npy   [N, D] float16     backbone features, same rows
        kept.npy       [M] int64          the rows of the M readable images
        ids.npy        [M] str            their image ids (with ``ids``)
        meta.json      what the scores depend on (model, T, sampling, preprocessing);
                       written last: a folder with it is complete

    Scores are written a chunk of rows at a time into temporary files (``*.tmp.npy``,
    :class:`ScoreFile`) reserved on disk up front, renamed into place by :meth:`commit`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def allocate(self, n: int, T: int, C: int, D: int) -> tuple[ScoreFile, ScoreFile]:
        """Float16 files written a chunk of rows at a time (:class:`ScoreFile`) for
        probabilities ``[n, T, C]`` and features ``[n, D]``;
        :class:`~medal.errors.WorkspaceError` if the disk cannot hold them."""
        shapes = {"probs": (n, T, C), "features": (n, D)}
        check_free_space(
            self.folder,
            sum(_npy_bytes(s) for s in shapes.values()),
            reclaimed=[self.folder / f"{k}.tmp.npy" for k in shapes],
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        probs = None
        try:
            probs = ScoreFile(self.folder / "probs.tmp.npy", shapes["probs"])
            feats = ScoreFile(self.folder / "features.tmp.npy", shapes["features"])
        except WorkspaceError:
            if probs is not None:
                probs.close()
            (self.folder / "probs.tmp.npy").unlink(missing_ok=True)
            raise
        return probs, feats

    def commit(
        self, kept: np.ndarray, ids: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Put the written arrays in place with ``kept [M]``, their rows of the readable
        images (and the image ids of all N rows, of which those of the kept rows are
        stored); returns read-only memory maps of
        probabilities ``[N, T, C]`` and features ``[N, D]``. The files from :meth:`allocate`
        must have been closed."""
        for name in ("probs", "features"):
            (self.folder / f"{name}.tmp.npy").replace(self.folder / f"{name}.npy")
        np.save(self.folder / "kept.npy", kept)
        if ids is not None:
            np.save(self.folder / "ids.npy", np.array([ids[int(k)] for k in kept]))
        return (
            np.load(self.folder / "probs.npy", mmap_mode="r"),
            np.load(self.folder / "features.npy", mmap_mode="r"),
        )

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Mark the scores complete, stating what they depend on (JSON-serialisable)."""
        (self.folder / "meta.json").write_text(json.dumps(meta))

    def read(self, meta: dict[str, Any]) -> tuple[dict[str, int], ScoreFile, ScoreFile] | None:
        """``({image id: row}, probs [N, T, C], features [N, D])`` (files to
        :meth:`ScoreFile.read` rows from) when the stored scores are complete and were made
        under ``meta``; ``None`` otherwise."""
        try:
            if json.loads((self.folder / "meta.json").read_text()) != json.loads(json.dumps(meta)):
                return None
            ids = np.load(self.folder / "ids.npy")
            kept = np.load(self.folder / "kept.npy")
            probs = ScoreFile.open(self.folder / "probs.npy")
            feats = ScoreFile.open(self.folder / "features.npy")
        except (OSError, ValueError):
            return None
        return {str(i): int(r) for i, r in zip(ids, kept)}, probs, feats


class ScoreCollector:
    """Receives scored chunks into score files (:class:`ScoreFile`; in-memory arrays without
    ``out_dir``) and a streaming top-K.

    ``ScoreCollector(n, T, C, D, out_dir, top_k, ids=...)`` is a ``sink`` for
    :func:`score_batches` (``sink(rows [B], probs [B, T, C], features [B, D])``, rows into the
    n images, whose image ids are ``ids``); :attr:`ok` marks the rows received so far (e.g.
    reused from stored scores, :meth:`reuse`) and :meth:`result` gives the :class:`MCResult`
    of the readable ones. With ``out_dir``, the arrays are stored there by a
    :class:`ScoreStore`."""

    def __init__(
        self,
        n: int,
        T: int,
        C: int,
        D: int,
        out_dir: Path | None,
        top_k: tuple[Callable[[np.ndarray], np.ndarray], int] | None,
        *,
        ids: Sequence[str] | None = None,
    ) -> None:
        self.store = None if out_dir is None else ScoreStore(out_dir)
        self.ids = None if ids is None else list(ids)
        self.probs: np.ndarray | ScoreFile
        self.feats: np.ndarray | ScoreFile
        if self.store is not None:
            self.probs, self.feats = self.store.allocate(n, T, C, D)
        else:
            self.probs = np.zeros((n, T, C), np.float32)
            self.feats = np.zeros((n, D), np.float32)
        self.ok = np.zeros(n, dtype=bool)
        self.score_fn = top_k[0] if top_k else None
        self.best = TopK(top_k[1]) if top_k else None

    def __call__(self, rows: np.ndarray, probs: np.ndarray, feats: np.ndarray) -> None:
        self.probs[rows] = probs
        self.feats[rows] = feats
        self.ok[rows] = True
        if self.best is not None and self.score_fn is not None:
            self.best.update(self.score_fn(probs), rows)

    def reuse(self, stores: Sequence[ScoreStore], meta: dict[str, Any]) -> int:
        """Take the scores of this collector's images (by id) from the first of ``stores``
        made under ``meta`` (the same model and settings, e.g. a round handed back
        unlabelled). Returns how many images it took."""
        assert self.ids is not None, "reuse needs the image ids"
        for store in stores:
            stored = store.read(meta)
            if stored is None:
                continue
            row_of, probs, feats = stored
            pairs = [(j, row_of[i]) for j, i in enumerate(self.ids) if i in row_of]
            for c in range(0, len(pairs), 4096):
                chunk = np.array(pairs[c : c + 4096], dtype=np.int64)
                self(
                    chunk[:, 0],
                    probs.read(chunk[:, 1]).astype(np.float32),
                    feats.read(chunk[:, 1]).astype(np.float32),
                )
            return len(pairs)
        return 0

    def result(self, skipped: dict[Path, str], meta: dict[str, Any] | None = None) -> MCResult:
        """The readable images' scores; with a store, they are committed there first (and
        marked complete with ``meta``, when given)."""
        kept = np.flatnonzero(self.ok)
        ids = None if self.ids is None else np.array([self.ids[int(k)] for k in kept])
        if self.store is not None:
            # the files keep the readable rows only, so nothing gathers them in memory
            for f in (self.probs, self.feats):
                if isinstance(f, ScoreFile) and len(kept) < len(self.ok):
                    f.keep(kept)
                elif isinstance(f, ScoreFile):
                    f.close()
            del self.probs, self.feats
            probs, feats = self.store.commit(
                np.arange(len(kept)), None if ids is None else ids.tolist()
            )
            if meta is not None:
                self.store.write_meta(meta)
        else:
            probs, feats = cast(np.ndarray, self.probs), cast(np.ndarray, self.feats)
            if len(kept) < len(self.ok):
                probs, feats = probs[kept], feats[kept]
        out = MCResult(probs, feats, kept, skipped, ids=ids)
        if self.best is not None:
            # positions in the dataset -> positions among the kept rows
            out.top_index = np.searchsorted(kept, self.best.index)
            out.top_scores = self.best.scores
        return out


def mc_predict(
    model: MCModel,
    ds: ImageDataset,
    T: int,
    *,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    seed: int = 0,
    desc: str = "scoring",
    progress: bool = True,
    mode: str = "head",
    precision: str = "bf16",
    max_batch_items: int = 4096,
    out_dir: Path | None = None,
    top_k: tuple[Callable[[np.ndarray], np.ndarray], int] | None = None,
) -> MCResult:
    """Stream a dataset through the model: T MC-dropout samples per readable image.

    ``mode``: ``"head"`` (backbone once, head sampled T times, vectorised) or ``"full"``
    (T stochastic passes of the whole network, batched). With ``out_dir``, probabilities
    ``[M, T, C]`` and features ``[M, D]`` are written to float16 ``.npy`` files there and
    returned as memory maps, so memory stays bounded whatever the pool size. With
    ``top_k=(score_fn, k)``, the k best images by ``score_fn`` are also kept incrementally.
    On CUDA out-of-memory the batch is halved (with a warning) and the step retried.
    Dropout masks are seeded per batch (:func:`batch_seed`).
    """
    sink = ScoreCollector(len(ds), T, model.num_classes, model.feature_dim, out_dir, top_k)
    skipped = score_batches(
        model,
        ds,
        T,
        range(n_batches(len(ds), batch_size)),
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        desc=desc,
        progress=progress,
        mode=mode,
        precision=precision,
        max_batch_items=max_batch_items,
        sink=sink,
    )
    return sink.result(skipped)


class _seeded:
    """Seed the global torch RNG for the block and restore it afterwards."""

    def __init__(self, seed: int, device: torch.device) -> None:
        devices = [device] if device.type == "cuda" else []
        self._fork = torch.random.fork_rng(devices=devices)
        self.seed = seed

    def __enter__(self) -> None:
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)
