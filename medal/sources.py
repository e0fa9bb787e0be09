"""The data sets of a workspace: what its sources hold right now.

:func:`sync` scans the configured sources (labelled, validation, test, pool), gives every file
its content id (re-hashing only files that changed), registers new images and initial labels
in the ledger, freezes the validation hold-out, and returns a :class:`Snapshot`: the labelled
set, the pool (less images already labelled, out for labelling, or byte-identical to an
evaluation image), the evaluation sets and what was skipped. The files and folders it reads
and writes are the :class:`~medal.workspace.Workspace`'s.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import Config
from .errors import DataError, ImageReadError
from .io import count_frames, sniff_format
from .ledger import ImageRecord, LabelRecord
from .scan import FileEntry, display_path, file_sha256, scan_source
from .workspace import UNSURE, Workspace, frame_id, frame_of


@dataclass(frozen=True)
class Item:
    """An image known to the workspace: content id, current path, label (if any)."""

    id: str
    path: Path
    label: str | None = None

    @property
    def frame(self) -> int | None:
        """The frame of a multi-frame file this item stands for (``image.frame = "all"``)."""
        return frame_of(self.id)


@dataclass
class Snapshot:
    """What the data sources hold right now, keyed by image id."""

    labelled: list[Item] = field(default_factory=list)
    pool: list[Item] = field(default_factory=list)
    validation: list[Item] = field(default_factory=list)
    test: list[Item] = field(default_factory=list)
    pending: int = 0
    """Images exported in a round that has not been ingested yet (out of the pool meanwhile)."""
    notes: list[str] = field(default_factory=list)
    """Things a person should hear once (e.g. pool images that are also evaluation images)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Files the scan left out, ``{path: reason}`` (link loops, pipes, empty files, names
    that are not UTF-8, ...); also recorded in the ledger and ``skipped.csv``."""


def sync(ws: Workspace) -> Snapshot:
    """Scan every data source, register new images and initial labels; return the sets."""
    cfg = ws.cfg
    snap = Snapshot()
    scan = _Scan(ws)
    # a new project's labelled/<class>/ folders are still empty: zero labels, not an error
    initial = scan.items(cfg.data.labelled, True, empty_ok=True)
    # evaluation sets keep byte-identical copies so metrics cover every file listed
    snap.validation = scan.items(cfg.data.validation, True, dedupe=False)
    snap.test = scan.items(cfg.data.test, True, dedupe=False)
    pool = scan.items(cfg.data.pool, False)
    ws.copies = {p: sorted(set(ps)) for ps in scan.found.values() if len(set(ps)) > 1 for p in ps}
    _record_initial_labels(ws, initial)
    snap.skipped = {display_path(p): r for p, r in scan.skipped.items()}
    ws.record_skipped(snap.skipped, prune=True)
    current = ws.db.current_labels()
    _labelled_and_holdout(ws, snap, initial, pool, current)
    held_out = {it.id for it in snap.validation} | {it.id for it in snap.test}
    _note_pool_overlap(ws, snap, pool)
    pending = ws.db.pending_image_ids()
    snap.pending = len(pending)
    snap.pool = [
        it for it in pool if it.id not in current and it.id not in pending and it.id not in held_out
    ]
    return snap


class _Scan:
    """The scans of one :func:`sync`: the ledger's file records read once for all four
    sources, the files left out with their reasons, every path seen per content id."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.known = ws.db.images_by_path()
        self.skipped: dict[Path, str] = {}
        self.found: dict[str, list[str]] = {}  # content id -> every path scanned with it

    def items(
        self, source: Path | None, labelled: bool, dedupe: bool = True, empty_ok: bool = False
    ) -> list[Item]:
        """Scanned files as items; with ``dedupe``, one item per content id."""
        if source is None:
            return []
        seen: dict[str, Item] = {}
        out: list[Item] = []
        scanned = scan_source(
            source, list(self.ws.cfg.classes) if labelled else None, self.skipped, empty_ok=empty_ok
        )
        for image_id, e in identify(self.ws, scanned, self.known, self.skipped):
            self.found.setdefault(image_id, []).append(display_path(e.path))
            prev = seen.get(image_id)
            if prev is not None and labelled and prev.label != e.label:
                raise DataError(
                    f"{source}: the same image is labelled {prev.label!r} "
                    f"({prev.path}) and {e.label!r} ({e.path})"
                )
            if prev is None or not dedupe:
                out.append(Item(image_id, e.path, e.label))
            seen.setdefault(image_id, out[-1])
        return out


def _labelled_and_holdout(
    ws: Workspace, snap: Snapshot, initial: list[Item], pool: list[Item], current: dict[str, str]
) -> None:
    """``snap.labelled`` from the ledger's current labels, less the validation hold-out
    (``train.validation_fraction`` without ``data.validation``: chosen once, frozen in the
    ledger), which becomes ``snap.validation``."""
    cfg = ws.cfg
    paths = {r.id: Path(r.path) for r in ws.db.images_by_path().values()}
    for it in initial:
        paths[it.id] = it.path
    for it in pool:
        paths[it.id] = it.path
    frozen: set[str] = set()
    if cfg.data.validation is None and cfg.train.validation_fraction > 0:
        chosen = ws.db.holdout()
        if chosen is None:
            chosen = _choose_holdout(cfg, initial)
            ws.db.set_holdout(chosen)
        frozen = set(chosen)
        snap.validation = [
            Item(i, paths[i], current[i])
            for i in chosen
            if i in paths and current.get(i) in cfg.classes
        ]
    snap.labelled = sorted(
        (
            Item(i, paths[i], lab)
            for i, lab in current.items()
            if lab != UNSURE and i in paths and i not in frozen
        ),
        key=lambda it: str(it.path),
    )
    if (
        cfg.data.labelled is not None
        and cfg.data.labelled.is_dir()
        and not initial
        and not snap.labelled
    ):
        snap.notes.append(
            f"no labelled image yet: the class folders in "
            f"{display_path(cfg.data.labelled)} are empty, so the project "
            f"starts with zero labels"
        )


def identify(
    ws: Workspace,
    entries: list[FileEntry],
    known: dict[str, ImageRecord] | None = None,
    skipped: dict[Path, str] | None = None,
) -> list[tuple[str, FileEntry]]:
    """Content ids for scanned files; unchanged files (path, size, mtime) are not re-hashed.

    ``known``: the ledger's file records by path, when the caller already read them.
    A file that cannot be read (gone since the scan, no permission) is left out and, with
    ``skipped``, added to it with the reason.
    """
    if known is None:
        known = ws.db.images_by_path()
    out, new = [], []
    for e in entries:
        try:
            st = e.path.stat()
            rec = known.get(str(e.path))
            if rec is not None and rec.size == st.st_size and rec.mtime_ns == st.st_mtime_ns:
                out.append((rec.id, e))
                continue
            image_id = file_sha256(e.path)
        except OSError as err:
            if skipped is None:
                raise
            skipped[e.path] = f"cannot be read: {err.strerror or err}"
            continue
        new.append(
            ImageRecord(
                image_id, str(e.path), st.st_size, st.st_mtime_ns, sniff_format(e.path) or "unknown"
            )
        )
        out.append((image_id, e))
    if new:
        ws.db.upsert_images(new)
    if ws.cfg.image.frame == "all":
        out = _expand_frames(ws, out)
    return out


def _expand_frames(
    ws: Workspace, found: list[tuple[str, FileEntry]]
) -> list[tuple[str, FileEntry]]:
    """Multi-frame DICOM files become one entry per frame (ids ``<sha>#f<k>``)."""
    out, new = [], []
    for image_id, e in found:
        if sniff_format(e.path) != "dicom":
            out.append((image_id, e))
            continue
        ids = ws.db.frame_ids(image_id)
        if not ids:
            try:
                n = count_frames(e.path)
            except ImageReadError:
                n = 1  # unreadable: reported when it is decoded
            if n > 1:
                st = e.path.stat()
                ids = [frame_id(image_id, k) for k in range(n)]
                new += [
                    ImageRecord(i, str(e.path), st.st_size, st.st_mtime_ns, "dicom-frame")
                    for i in ids
                ]
        out += [(i, e) for i in ids] if ids else [(image_id, e)]
    if new:
        ws.db.upsert_images(new)
    return out


def _note_pool_overlap(ws: Workspace, snap: Snapshot, pool: list[Item]) -> None:
    """Pool images byte-identical to a validation or test image never enter the pool
    (labelling one would leak the evaluation set); list them in ``pool-overlap.csv`` and
    add a note the first time the list changes."""
    where = {it.id: "validation" for it in snap.validation}
    where |= {it.id: "test" for it in snap.test}
    rows = sorted((str(it.path), where[it.id]) for it in pool if it.id in where)
    path = ws.pool_overlap_csv
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("file", "also_in"), *rows])
    text = buf.getvalue()
    old = path.read_text(encoding="utf-8") if path.is_file() else "file,also_in\n"
    if text == old:
        return
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    if rows:
        snap.notes.append(
            f"{len(rows)} pool image(s) are byte-identical to validation or "
            f"test images and are left out of the pool (list: {path})"
        )


def _choose_holdout(cfg: Config, initial: list[Item]) -> list[str]:
    """Stratified ``train.validation_fraction`` of the initial labels, frozen in the ledger.

    A class is held out from only when it has three or more labels, and keeps at least two
    in training: the only example(s) of a rare class always stay in training (the
    validation set then lacks that class, and ``medal status`` says so)."""
    frac = cfg.train.validation_fraction
    rng = np.random.default_rng(cfg.seed)
    chosen: list[str] = []
    for c in cfg.classes:
        ids = sorted(it.id for it in initial if it.label == c)
        k = min(max(int(round(len(ids) * frac)), 1), len(ids) - 2) if len(ids) >= 3 else 0
        chosen += list(rng.choice(ids, size=k, replace=False)) if k > 0 else []
    return sorted(str(i) for i in chosen)


def _record_initial_labels(ws: Workspace, initial: list[Item]) -> None:
    latest_initial: dict[str, str] = {}
    has_label = set()
    for rec in ws.db.labels():
        has_label.add(rec.image_id)
        if rec.source == "initial":
            latest_initial[rec.image_id] = rec.label
    now = time.time()
    rows = [
        LabelRecord(it.id, it.label or "", 0, "initial", None, str(it.path), now)
        for it in initial
        if it.id not in has_label or (it.id in latest_initial and latest_initial[it.id] != it.label)
    ]
    if rows:
        ws.db.add_labels(rows)
