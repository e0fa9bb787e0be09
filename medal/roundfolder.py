"""The round folder: medal's contract with radiologists, owned here.

Every file name, CSV layout and cell rule of a round folder is spelled in this module; export,
ingest, the labelling page, the simulated radiologist and the demo call it instead of spelling
them again::

    round-001/
      README.txt             instructions for the reader
      labels.csv             file,label[,comment]: the reader fills the label column
      labels_<name>.csv      the same, one per reader (several readers)
      manifest.csv           which images were exported, in rank order (medal reads it back)
      index.html previews/   the offline gallery
      001_3fa2c4e1b07d.dcm   copies of the chosen images
      normal/ pneumonia/     class folders: the other way to answer

A leaf module: it imports nothing from medal but the error classes (and, when reading, the CSV
reader of :mod:`medal.scan`), so the config, which refuses class names that would collide with
these files, can use it too.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import LabellingError

LABELS = "labels.csv"
"""The labels file of a round folder."""
MANIFEST = "manifest.csv"
"""The list of exported images (rank order) that medal reads back."""
README = "README.txt"
"""The reader's instructions."""
GALLERY = "index.html"
"""The offline gallery page."""
PREVIEWS = "previews"
"""The folder of the gallery's preview images."""
ANNOTATOR_PREFIX = "labels_"
"""A reader's own labels file is ``labels_<name>.csv``."""

MANIFEST_SOURCE_COLUMNS = ("image_id", "source_path")
"""Manifest columns that name the source (left out of a de-identified round's folder)."""
MANIFEST_PREDICTION_COLUMNS = ("score", "predicted")
"""Manifest columns with the model's view (with the ``p_<class>`` columns; left out of a blind
round's folder)."""

_ANNOTATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_FORMULA_START = "=+-@\t\r"


LOCK_TIMEOUT = 20.0
"""Seconds a save or an ingest waits for another process's hold on the same labels file."""

IGNORED_FILES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})
"""Files an operating system leaves in folders (compared in lower case); never labels."""

_READER_FILE = re.compile(r"labels_(.+)\.csv", re.IGNORECASE)
_NEAR_READER_FILE = re.compile(
    r"labels?[-_ ]+([a-z0-9][\w.-]*?)\.(csv|tsv|txt|xlsx?|ods|numbers)", re.IGNORECASE
)


def reader_of(file_name: str) -> str | None:
    """The reader whose labels file ``file_name`` is (``labels_<name>.csv`` in any case:
    ``Labels_bob.CSV`` is bob's), else None."""
    m = _READER_FILE.fullmatch(file_name)
    return None if m is None else m.group(1)


def near_reader_file(file_name: str) -> tuple[str, bool] | None:
    """For a name a reader's labels file was likely meant to have (``labels-bob.csv``,
    ``label_bob.xlsx``) but is not: ``(the name it should have, whether it is a CSV)``."""
    m = _NEAR_READER_FILE.fullmatch(file_name)
    if m is None or reader_of(file_name) is not None:
        return None
    return annotator_file(m.group(1)), m.group(2).lower() == "csv"


def is_medal_file(file_name: str) -> bool:
    """``manifest.csv`` or ``README.txt`` (any case): files medal writes that hold no labels."""
    return file_name.lower() in (MANIFEST, README.lower())


def annotator_file(name: str) -> str:
    """The labels file of reader ``name``: ``labels_<name>.csv``."""
    return f"{ANNOTATOR_PREFIX}{name}.csv"


def valid_annotator(name: str) -> bool:
    """``name`` can be part of ``labels_<name>.csv``: 1-64 letters, digits, ``_ - .``,
    starting with a letter or digit."""
    return _ANNOTATOR.fullmatch(name) is not None


def is_labels_file_name(name: str) -> bool:
    """``labels.csv`` or ``labels_<anything>.csv``, compared without case."""
    low = name.lower()
    return low == LABELS or (low.startswith(ANNOTATOR_PREFIX) and low.endswith(".csv"))


def reserved_name(name: str) -> bool:
    """A name medal writes into every round folder (compared without case, as Windows and
    macOS do), which a class folder must not take."""
    low = name.lower()
    return low in {MANIFEST, GALLERY, README.lower(), PREVIEWS} or is_labels_file_name(name)


def neutralise(cell: str) -> str:
    """Keep a spreadsheet from executing a text cell: a leading ``= + - @`` (or tab, CR) gets a
    quote in front, unless the cell is a number."""
    if cell and cell[0] in _FORMULA_START:
        try:
            float(cell)
            return cell
        except ValueError:
            return "'" + cell
    return cell


def unneutralise(cell: str) -> str:
    """Undo :func:`neutralise` (a cell medal wrote; a reader's own leading quote stays)."""
    if cell.startswith("'") and len(cell) > 1 and cell[1] in _FORMULA_START:
        return cell[1:]
    return cell


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A round-folder CSV as spreadsheets open it (UTF-8, comma, CRLF-free), written in full."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def replace_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """:func:`write_csv` through a temporary file, fsync and rename: a reader of ``path`` sees
    the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_csv(tmp, header, rows)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def manifest_header(classes: Sequence[str]) -> list[str]:
    """The full manifest's columns: ``file, image_id, source_path, rank, score, predicted,
    p_<class>...``."""
    return [
        "file",
        *MANIFEST_SOURCE_COLUMNS,
        "rank",
        *MANIFEST_PREDICTION_COLUMNS,
        *[f"p_{c}" for c in classes],
    ]


def write_manifests(
    in_folder: Path,
    kept: Path,
    classes: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    sources: bool,
    predictions: bool,
) -> None:
    """The full manifest (``rows`` in :func:`manifest_header`'s columns) kept in the workspace
    at ``kept``, and the round folder's ``manifest.csv`` at ``in_folder``: without the source
    columns when the copies are de-identified (``sources`` false), without score, prediction
    and probabilities when labelling is blind (``predictions`` false)."""
    header = manifest_header(classes)
    kept.parent.mkdir(parents=True, exist_ok=True)
    write_csv(kept, header, rows)
    first_prediction = header.index(MANIFEST_PREDICTION_COLUMNS[0])
    columns = [
        i
        for i, h in enumerate(header)
        if (sources or h not in MANIFEST_SOURCE_COLUMNS) and (predictions or i < first_prediction)
    ]
    write_csv(in_folder, [header[i] for i in columns], [[r[i] for i in columns] for r in rows])


def read_manifest(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A manifest as ``(header, [(line, {column: cell})])``: columns compared without case (the
    first of two equal names wins), cells stripped, rows without a file left out. Raises
    :class:`LabellingError` for a file without a ``file`` column."""
    from .scan import iter_csv

    rows = iter_csv(path)
    first = next(rows, None)
    header = [h.strip() for h in first[1]] if first else []
    lower = [h.lower() for h in header]
    if "file" not in lower:
        raise LabellingError(f"{path}: no 'file' column; is this a medal round folder?")
    col = {h: i for i, h in reversed(list(enumerate(lower)))}
    out = []
    for line, row in rows:
        cells = {h: row[i].strip() if i < len(row) else "" for h, i in col.items()}
        if cells["file"]:
            out.append((line, cells))
    return header, out


def manifest_classes(header: Sequence[str]) -> list[str]:
    """The classes of a manifest's ``p_<class>`` columns, in their order (empty when blind)."""
    return [h[2:] for h in header if h.lower().startswith("p_") and len(h) > 2]


def manifest_sources(path: Path) -> dict[str, str]:
    """``{file: source path}`` of a manifest with a ``source_path`` column (as exported: the
    neutralising undone); empty without that column."""
    _, rows = read_manifest(path)
    return {
        cells["file"]: unneutralise(cells["source_path"])
        for _, cells in rows
        if "source_path" in cells
    }


def has_sources(path: Path) -> bool:
    """The manifest at ``path`` names its images' sources (not a de-identified round's)."""
    header, _ = read_manifest(path)
    return "source_path" in (h.lower() for h in header)


def labels_files(folder: Path) -> list[str]:
    """The image files ``labels.csv`` lists, in its order."""
    from .scan import iter_csv

    rows = iter_csv(folder / LABELS)
    first = next(rows, None)
    lower = [h.strip().lower() for h in first[1]] if first else []
    if "file" not in lower:
        raise LabellingError(f"{folder / LABELS}: no 'file' column")
    i = lower.index("file")
    return [row[i].strip() for _, row in rows if i < len(row) and row[i].strip()]


def write_labels(folder: Path, answers: Sequence[tuple[str, str]]) -> None:
    """Replace ``labels.csv`` with ``file,label`` rows (atomically), as a reader who filled it
    in a spreadsheet would leave it."""
    replace_csv(folder / LABELS, ["file", "label"], answers)


def lock_file(labels_path: Path) -> Path:
    """The lock file of a labels file: ``.<name>.lock`` beside it."""
    return labels_path.with_name(f".{labels_path.name}.lock")


def create_lock_file(labels_path: Path) -> bool:
    """Create ``labels_path``'s empty :func:`lock_file` if missing (export, and a page at its
    start, so that a reader such as ingest finds it); False where it cannot be."""
    try:
        os.close(os.open(lock_file(labels_path), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def labels_lock(labels_path: Path, *, to_write: bool = True) -> Iterator[None]:
    """Hold the OS lock (``flock``) on ``labels_path``'s :func:`lock_file` across processes:
    every save of the labels page is a read-modify-write under it, and ingest reads and
    records under it, so no save slips in between. The OS drops the lock of a killed process.
    Waits up to :data:`LOCK_TIMEOUT` seconds, then raises :class:`LabellingError`.

    ``to_write`` (a writer: the page) creates the lock file when missing. A reader (ingest)
    never writes into the folder: it locks the lock file only if there is one, and there is
    one whenever a page serves the folder (:func:`create_lock_file` at its start) and in every
    folder medal exported; without one, or where it cannot be opened, it reads unlocked."""
    path = lock_file(labels_path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if to_write else 0), 0o644)
    except OSError as e:
        if to_write:
            raise LabellingError(
                f"{path}: cannot create the lock file: {e.strerror or e}"
            ) from None
        fd = -1
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabellingError(
                        f"{labels_path}: locked for over {LOCK_TIMEOUT:g} s "
                        f"(another labelling page saving, or medal ingest "
                        f"reading it); try again"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # releases the flock


@contextlib.contextmanager
def all_labels_locked(folder: Path) -> Iterator[None]:
    """Hold :func:`labels_lock` of ``labels.csv`` and of every reader's file in ``folder`` (for
    reading: ingest), taken in name order."""
    names = sorted(
        {
            LABELS,
            *(
                p.name
                for p in folder.iterdir()
                if is_labels_file_name(p.name) and not p.name.startswith(".")
            ),
        }
    )
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(labels_lock(folder / name, to_write=False))
        yield
