"""The label book of one round folder: the images its manifest lists and the labels file the
labelling page writes (:mod:`medal.serve` is the web page around it).

Each decision rewrites the labels file atomically (temporary file, fsync, ``os.replace``): a
stopped server or a closed browser loses nothing, and reopening resumes from the file. Rows and
columns the page does not own (an ``annotator`` column, rows typed in a spreadsheet) are kept.

Concurrency: every save re-reads the labels file and rewrites it while holding an OS lock
(``flock`` on ``.labels.csv.lock`` beside it; :func:`medal.roundfolder.labels_lock`), so
several servers (processes) and tabs on one round folder lose no decision; the OS drops a killed
server's lock. Each answer carries the file's version; a tab whose view is stale is told so and
gets all labels. Readers with ``--annotator NAME`` write ``labels_NAME.csv`` each.

Ingested rounds: once the workspace's ledger says the round was ingested (asked on every save
and state request, so also when ``medal ingest`` runs while the page is open) saves are refused
(:class:`RoundIngested`): a change would not reach the ledger.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any


from ..errors import DataError, LabellingError, MedalError
from .ingest import round_number
from ..roundfolder import (
    LABELS,
    MANIFEST,
    PREVIEWS,
    annotator_file,
    create_lock_file,
    labels_lock,
    lock_file,
    manifest_classes,
    neutralise,
    read_manifest,
    unneutralise,
    valid_annotator,
)
from ..ledger import round_ingest_state
from ..scan import column_indices, iter_csv, short
from ..workspace import UNSURE, ledger_file

MAX_COMMENT = 2000
"""Longest comment kept (characters); ingest refuses cells over 128 KiB."""
_FRAME_IN_NAME = re.compile(r"_f(\d+)\.[A-Za-z0-9]+$")


def check_annotator(name: str) -> str:
    """``name`` if it can be part of ``labels_<name>.csv``; else a :class:`LabellingError`."""
    if not valid_annotator(name):
        raise LabellingError(
            f"annotator name {short(name)} is not allowed; use 1-64 letters, "
            f"digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class RoundImage:
    """One image of the round, as manifest.csv lists it."""

    file: str
    rank: int
    frame: int | None
    """The frame the image is (``image.frame = "all"`` exports name it ``..._f<k>``)."""
    score: str
    predicted: str
    probs: dict[str, str]


class RoundIngested(LabellingError):
    """A save refused because the round was already ingested (the page turns read-only)."""


class RoundBook:
    """The images of one round folder and the labels file the page writes.

    ``classes`` (a config's) must match the ``p_<class>`` columns of manifest.csv (a blind
    export has none: its class subfolders); without them the classes are read from there.
    ``annotator`` selects ``labels_<annotator>.csv`` instead of ``labels.csv``. ``workspace``
    (default: the folder's own, when the folder is ``<workspace>/labelling/round-NNN``) is where
    the ledger tells whether the round was ingested.

    Every save is a read-modify-write of the labels file on disk under :meth:`locked`, an OS
    lock (``flock``) on ``.<labels file>.lock`` beside it, so any number of servers (processes)
    and tabs on one folder never lose each other's decisions; the OS drops the lock of a killed
    process. :attr:`version` names the file's content, so a page learns when its view is stale.
    """

    def __init__(
        self,
        folder: str | Path,
        classes: Sequence[str] | None = None,
        annotator: str | None = None,
        workspace: str | Path | None = None,
    ) -> None:
        folder = Path(folder).absolute()
        if not folder.is_dir():
            raise LabellingError(f"round folder not found: {folder}")
        self.round = round_number(folder)
        self.folder = folder
        self.annotator = None if annotator is None else check_annotator(annotator)
        self.labels_path = folder / (LABELS if annotator is None else annotator_file(annotator))
        self.images, found = self._read_manifest()
        if not found:  # a blind export's manifest has no p_<class> columns: its class folders
            found = sorted(
                p.name
                for p in folder.iterdir()
                if p.is_dir() and not p.is_symlink() and p.name != PREVIEWS
            )
        if classes is not None:
            if found and sorted(c.lower() for c in found) != sorted(c.lower() for c in classes):
                raise LabellingError(
                    f"{folder}: exported with classes {', '.join(found)}, but "
                    f"the config has {', '.join(classes)}; use the config "
                    f"of the workspace that exported this round"
                )
            found = list(classes)
        if len(found) < 2:
            raise LabellingError(
                f"{folder / MANIFEST}: no p_<class> columns or class folders "
                f"to take the classes from; pass the workspace's config "
                f"(-c CONFIG)"
            )
        self.classes = list(found)
        self.allowed = {c.lower(): c for c in self.classes} | {UNSURE: UNSURE}
        self.by_file = {im.file: im for im in self.images}
        self.lock_path = lock_file(self.labels_path)
        create_lock_file(self.labels_path)  # so that an ingest meanwhile waits for saves
        # the workspace whose ledger says whether this round was ingested: the config's, else
        # the one the folder sits in (<workspace>/labelling/round-NNN)
        if workspace is None and folder.parent.name == "labelling":
            workspace = folder.parent.parent
        self.ledger_path = None if workspace is None else ledger_file(Path(workspace))
        self._lock = threading.Lock()
        self._check_labels_file()

    # --- reading --------------------------------------------------------------------------
    def _regular_file(self, path: Path) -> bool:
        """``path`` is a regular file inside the round folder (a link may not lead out)."""
        try:
            path.resolve().relative_to(self.folder.resolve())
        except (ValueError, OSError, RuntimeError):
            return False
        return path.is_file()

    def _read_manifest(self) -> tuple[list[RoundImage], list[str]]:
        path = self.folder / MANIFEST
        if not self._regular_file(path):
            raise LabellingError(
                f"{path}: not found (or not a regular file in the round "
                f"folder); is {self.folder} a folder exported by medal query?"
            )
        header, rows = read_manifest(path)
        classes = manifest_classes(header)
        images: list[RoundImage] = []
        for n, row in rows:
            name = row["file"]
            if PurePosixPath(name.replace("\\", "/")).name != name or name in (".", ".."):
                raise LabellingError(
                    f"{path} line {n}: file {short(name)} is not a plain file "
                    f"name in the round folder"
                )
            rank = row.get("rank", "")
            m = _FRAME_IN_NAME.search(name)
            images.append(
                RoundImage(
                    name,
                    int(rank) if rank.isdigit() else len(images) + 1,
                    int(m.group(1)) if m else None,
                    row.get("score", ""),
                    unneutralise(row.get("predicted", "")),
                    {c: row.get(f"p_{c.lower()}", "") for c in classes},
                )
            )
        if not images:
            raise LabellingError(f"{path}: lists no images")
        return sorted(images, key=lambda im: im.rank), classes

    def _check_labels_file(self) -> None:
        p = self.labels_path
        if (p.exists() or p.is_symlink()) and not self._regular_file(p):
            raise LabellingError(
                f"{p}: is a link out of the round folder, a folder or not a "
                f"regular file; the page writes only a plain {p.name}"
            )
        self._read_rows()  # refuses a file without 'file' and 'label' columns

    def _read_rows(self) -> tuple[list[str], list[list[str]]]:
        """The labels file as ``(header, rows)``; a missing file is an empty one."""
        p = self.labels_path
        if not p.exists():
            return ["file", "label", "comment"], []
        try:
            rows = [row for _, row in iter_csv(p)]
        except OSError as e:
            raise LabellingError(f"{p}: cannot be read: {e.strerror or e}") from None
        except DataError as e:
            raise LabellingError(str(e)) from None
        if not rows:
            return ["file", "label", "comment"], []
        header = [h.strip() for h in rows[0]]
        lower = [h.lower() for h in header]
        if "file" not in lower or "label" not in lower:
            raise LabellingError(
                f"{p} line 1: the header must have columns 'file' and 'label' "
                f"(got {short(', '.join(map(repr, rows[0])))}); fix or remove "
                f"the file"
            )
        _, repeated = column_indices(header, ("file", "label", "comment", "annotator"))
        if repeated is not None:  # which column holds the label would be a guess, as in ingest
            raise LabellingError(f"{p} line 1: {repeated}")
        return header, rows[1:]

    @staticmethod
    def _key(cell: str) -> str:
        return PurePosixPath(cell.strip().replace("\\", "/")).name

    def labels(self) -> dict[str, dict[str, str]]:
        """``{file: {"label": ..., "comment": ...}}`` for every image of the round, as the labels
        file says now (``label`` is the class name as configured, ``unsure``, ``""``, or the
        text found when it is not an allowed label)."""
        return self._labels_of(*self._read_rows())

    def _labels_of(self, header: list[str], rows: list[list[str]]) -> dict[str, dict[str, str]]:
        lower = [h.lower() for h in header]
        fi, li = lower.index("file"), lower.index("label")
        ci = lower.index("comment") if "comment" in lower else None
        out = {im.file: {"label": "", "comment": ""} for im in self.images}
        seen: set[str] = set()
        for row in rows:
            name = self._key(row[fi]) if fi < len(row) else ""
            if name not in out or name in seen:
                continue  # not an image of the round, or a repeated row (ingest reports both)
            seen.add(name)
            raw = row[li].strip() if li < len(row) else ""
            comment = row[ci] if ci is not None and ci < len(row) else ""
            out[name] = {"label": self.allowed.get(raw.lower(), raw), "comment": comment}
        return out

    def version(self) -> str:
        """A name for the labels file's current content (``"0"``: no file yet): it changes with
        every save, whichever server or tab made it."""
        try:
            return hashlib.sha256(self.labels_path.read_bytes()).hexdigest()[:16]
        except FileNotFoundError:
            return "0"
        except OSError as e:
            raise LabellingError(f"{self.labels_path}: cannot be read: {e.strerror or e}") from None

    def ingested(self) -> str | None:
        """Why the page is read-only: the round was ingested (the workspace's ledger says so,
        asked afresh on every call), else ``None``. A ledger whose round lists other files
        is not this folder's workspace and is ignored."""
        if self.ledger_path is None:
            return None
        try:
            state = round_ingest_state(self.ledger_path, self.round)
        except MedalError as e:
            raise LabellingError(
                f"cannot tell whether round {self.round:03d} was ingested: {e}"
            ) from None
        if state is None or state[0] is None or state[1] != set(self.by_file):
            return None
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(state[0]))
        return (
            f"round {self.round:03d} was ingested on {when}; this page is read-only (a "
            f"change made now would not reach the ledger)"
        )

    # --- writing --------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, *, to_write: bool = True) -> Iterator[None]:
        """Hold the labels file's lock (:func:`labels_lock`) for this process's threads and
        for other processes."""
        with self._lock, labels_lock(self.labels_path, to_write=to_write):
            yield

    def set(
        self, file: str, *, label: str | None = None, comment: str | None = None
    ) -> dict[str, str]:
        """Record one decision and rewrite the labels file atomically; returns the image's
        entry as read back. ``label``: a class (any case), ``unsure`` or ``""`` (clear: the
        image returns to the pool); ``None`` keeps it. ``comment``: ``None`` keeps it."""
        saved = self.save(file, label=label, comment=comment)
        return {"label": saved["label"], "comment": saved["comment"]}

    def save(
        self,
        file: str,
        *,
        label: str | None = None,
        comment: str | None = None,
        seen: str | None = None,
    ) -> dict[str, Any]:
        """:meth:`set`, for the page: ``{file, label, comment, version}``, the version after
        the save. ``seen``: the version the page last knew; when another save came in between
        (another tab or server), the answer also has ``stale: true`` and all ``labels``.
        Refused once the round was ingested (:meth:`ingested`)."""
        if file not in self.by_file:
            raise LabellingError(f"{short(file)} is not an image of round {self.round:03d}")
        if label is not None:
            canonical = self.allowed.get(label.strip().lower())
            if label.strip() and canonical is None:
                raise LabellingError(
                    f"label {short(label)} is not allowed; allowed: "
                    f"{', '.join([*self.classes, UNSURE])} (or empty)"
                )
            label = canonical or ""
        if comment is not None:
            comment = neutralise(" ".join(comment.split())[:MAX_COMMENT])
        with self.locked():
            why = self.ingested()
            if why is not None:
                raise RoundIngested(why)
            before = self.version()
            header, rows = self._updated(file, label, comment)
            self._write([header, *rows])
            out: dict[str, Any] = {
                "file": file,
                **self._labels_of(header, rows)[file],
                "version": self.version(),
            }
            if seen is not None and seen != before:
                out |= {"stale": True, "labels": self._labels_of(header, rows)}
        return out

    def _updated(
        self, file: str, label: str | None, comment: str | None
    ) -> tuple[list[str], list[list[str]]]:
        """The labels file as read now, with ``file``'s row changed (every image has a row)."""
        header, rows = self._read_rows()
        lower = [h.lower() for h in header]
        if "comment" not in lower:
            header.append("comment")
            lower.append("comment")
        fi, li, ci = lower.index("file"), lower.index("label"), lower.index("comment")
        width = len(header)
        rows = [r + [""] * (width - len(r)) for r in rows if any(c.strip() for c in r)]
        present = {self._key(r[fi]) for r in rows}
        rows += [
            [im.file if i == fi else "" for i in range(width)]
            for im in self.images
            if im.file not in present
        ]
        for row in rows:
            if self._key(row[fi]) == file:
                if label is not None:
                    row[li] = label
                if comment is not None:
                    row[ci] = comment
                break
        return header, rows

    def _write(self, rows: list[list[str]]) -> None:
        target = self.labels_path
        tmp = self.folder / f".{target.name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise LabellingError(f"{target}: cannot be written: {e.strerror or e}") from None
        try:  # make the rename itself durable (POSIX)
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    # --- what the page receives -------------------------------------------------------------
    def state(self, show_predictions: bool) -> dict[str, Any]:
        """Everything the page needs except pixels. Without ``show_predictions`` the model's
        prediction and score are left out of the response itself (blind labelling)."""
        with self.locked(to_write=False):  # the labels and their version from one file
            labels, version = self.labels(), self.version()
        images = []
        for im in self.images:
            entry: dict[str, Any] = {
                "file": im.file,
                "rank": im.rank,
                "frame": im.frame,
                **labels[im.file],
            }
            if show_predictions:
                entry |= {"score": im.score, "predicted": im.predicted, "probs": im.probs}
            images.append(entry)
        return {
            "round": self.round,
            "folder": self.folder.name,
            "classes": self.classes,
            "unsure": UNSURE,
            "labels_file": self.labels_path.name,
            "annotator": self.annotator,
            "show_predictions": show_predictions,
            "version": version,
            "read_only": self.ingested(),
            "images": images,
        }

    def image_path(self, file: str) -> Path:
        """The file of an image the manifest lists, inside the round folder; anything else is
        refused (the page can read nothing else)."""
        if file not in self.by_file:
            raise LabellingError(f"{short(file)} is not an image of round {self.round:03d}")
        path = self.folder / file
        if not self._regular_file(path):
            raise LabellingError(
                f"{file}: missing, not a regular file, or a link out of the round folder"
            )
        return path
