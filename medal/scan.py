"""Files on disk -> samples: sorted scans of image folders and label CSVs, content ids.

Folder layouts (scans are recursive and sorted, so every run sees the same order)::

    labelled/                 pool/                    labels.csv
      normal/a.png              2024/x.dcm               file,label
      pneumonia/b.dcm           2024/y.png               imgs/a.png,normal
                                                         imgs/b.dcm,pneumonia

A labelled source is either a folder with one subfolder per class or a CSV with columns
``file,label`` (files relative to the CSV's folder). Images are identified by the SHA-256 of
their bytes, so a file moved or renamed keeps its identity and its labels. Nothing here
decodes pixels (that is :mod:`medal.data`'s), and torch is not imported.
"""

from __future__ import annotations

import codecs
import csv
import errno
import hashlib
import itertools
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import DataError
from .io import sniff_format


@dataclass(frozen=True)
class FileEntry:
    """One image file found by a scan; ``label`` is set for labelled sources only."""

    path: Path
    label: str | None = None
    origin: str | None = None
    """Where the label came from, e.g. ``labels.csv:12`` or the class folder."""


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes: the stable image id."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def display_path(path: Path | str) -> str:
    """``path`` as text that can always be stored and printed: bytes of a file name that are
    not valid UTF-8 are shown as ``\\xNN`` escapes (``bad\\xff.png``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _not_a_file(path: Path, mode: int) -> str:
    """Why a folder entry that is not a regular file is not scanned (one line)."""
    if stat.S_ISFIFO(mode):
        return "not a regular file (a named pipe/FIFO)"
    if stat.S_ISSOCK(mode):
        return "not a regular file (a socket)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "not a regular file (a device)"
    return "not a regular file"


NOT_AN_IMAGE = (
    "not an image file medal reads (PNG, JPEG, TIFF, BMP by suffix; DICOM by "
    "suffix .dcm/.dicom or by its content)"
)


def _classify(path: Path) -> tuple[bool, str | None]:
    """``(is an image to scan, reason to report)`` for one folder entry. A folder is neither
    scanned nor reported; every file is one or the other (a file that is not an image is
    reported as such). One ``lstat`` (and a ``stat`` for links); a pipe or device is never
    opened."""
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            try:
                st = path.stat()
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return False, "a symbolic link loop"
                if e.errno == errno.ENOENT:
                    return False, (f"a broken symbolic link (to {display_path(os.readlink(path))})")
                raise
            if stat.S_ISDIR(st.st_mode):
                return False, "a symbolic link to a folder; links to folders are not followed"
    except OSError as e:
        return False, f"cannot be read: {e.strerror or e}"
    if stat.S_ISDIR(st.st_mode):
        return False, None
    if not stat.S_ISREG(st.st_mode):
        return False, _not_a_file(path, st.st_mode)
    if sniff_format(path) is None:
        return False, NOT_AN_IMAGE
    try:
        os.fsencode(path.name).decode("utf-8")
    except UnicodeDecodeError:
        return False, "the file name is not valid UTF-8; rename the file"
    if st.st_size == 0:
        return False, "empty file (0 bytes)"
    return True, None


def scan_folder(root: Path, skipped: dict[Path, str] | None = None) -> list[Path]:
    """Every image file under ``root`` (recursive, sorted; hidden files and folders skipped).

    Entries that cannot be used are left out and, with ``skipped``, added to it with the
    reason: broken links and link loops, links to folders (not followed), named pipes,
    sockets and devices (never opened, so a pipe cannot block the scan), files that are not
    images medal reads, image files that are empty or whose name is not valid UTF-8 (it could
    not be stored in the ledger).
    Every path is listed, even when several share the same (e.g. empty) content.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        image, reason = _classify(p)
        if image:
            out.append(p)
        elif reason is not None and skipped is not None:
            skipped[p] = reason
    return out


def scan_source(
    source: Path,
    classes: Sequence[str] | None,
    skipped: dict[Path, str] | None = None,
    *,
    empty_ok: bool = False,
) -> list[FileEntry]:
    """Scan a pool folder (``classes=None``) or a labelled folder/CSV (labels checked).

    ``skipped`` collects the files of a folder scan that cannot be used, with the reason
    (see :func:`scan_folder`). A labelled folder whose class subfolders hold no image is an
    error unless ``empty_ok`` (then: no entries; a new project's ``labelled/<class>/``)."""
    source = Path(source)
    if classes is None:
        return [FileEntry(p) for p in scan_folder(source, skipped)]
    if source.is_file():
        return _read_label_csv(source, classes)
    if not source.is_dir():
        raise DataError(
            f"labelled source not found: {source} (expected a folder with one "
            f"subfolder per class, or a CSV with columns file,label)"
        )
    by_lower = {c.lower(): c for c in classes}
    entries: list[FileEntry] = []
    unknown = []
    for sub in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cls = by_lower.get(sub.name.lower())
        if cls is None:
            unknown.append(sub.name)
            continue
        entries += [FileEntry(p, cls, str(sub)) for p in scan_folder(sub, skipped)]
    if unknown:
        raise DataError(
            f"{source}: subfolder(s) {', '.join(map(repr, unknown))} are not classes; "
            f"allowed: {', '.join(classes)}"
        )
    if not entries and not empty_ok:
        raise DataError(f"{source}: no images found in class subfolders ({', '.join(classes)})")
    return entries


MAX_LISTED_PROBLEMS = 50
"""Problems listed one per line in an error message; the rest are counted."""

CSV_ENCODINGS = "UTF-8 (with or without BOM), UTF-16 with BOM, or Windows-1252"
"""The text encodings medal reads CSV files in (what spreadsheets write)."""


def csv_encoding(path: Path) -> str:
    """The codec to read a CSV with: ``"utf-8-sig"`` (UTF-8, with or without BOM),
    ``"utf-16"`` (a UTF-16 BOM, e.g. Excel's "Unicode Text") or ``"cp1252"`` (not valid
    UTF-8 anywhere: Excel's plain "CSV" on Windows). UTF-8 is tried first, on the whole file,
    read in blocks, never whole.

    Raises :class:`DataError` for UTF-32, for UTF-16 without a BOM (NUL bytes), which cannot
    be told apart from binary data, and for a file that mixes encodings (valid UTF-8 on some
    lines, bytes that are not UTF-8 on others): read as Windows-1252 its UTF-8 text would turn
    into other characters (``café`` into ``cafÃ©``) without a word, so the line is named.
    """
    with open(path, "rb") as f:
        head = f.read(4)
        if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
            raise DataError(f"{path}: the file is UTF-32 text; save it as {CSV_ENCODINGS}")
        if head.startswith(codecs.BOM_UTF8):
            return "utf-8-sig"
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return "utf-16"
        f.seek(0)
        first = f.read(4096)
        if b"\x00" in first:
            raise DataError(
                f"{path}: the file has NUL bytes (UTF-16 without a byte-order "
                f"mark, or not text); save it as {CSV_ENCODINGS}"
            )
        f.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            while block := f.read(1 << 20):
                decoder.decode(block)
            decoder.decode(b"", final=True)
            return "utf-8-sig"
        except UnicodeDecodeError:
            f.seek(0)
            bad_line, utf8_line = _utf8_check(f)  # a second pass only for text that is not UTF-8
    if utf8_line is None:
        return "cp1252"
    raise DataError(
        f"{path}: line {bad_line}: not UTF-8 text, though line {utf8_line} is: the "
        f"file mixes text encodings; save it again as UTF-8"
    )


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as surrogateescape gives
_UTF8_MULTIBYTE = re.compile("[^\x00-\x7f\udc80-\udcff]")


def _utf8_check(f: BinaryIO) -> tuple[int | None, int | None]:
    """``(first line with bytes that are not UTF-8, first line with a UTF-8 character beyond
    ASCII)``, ``None`` where there is none, reading ``f`` in blocks."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    bad = good = None
    line = 1
    while True:
        block = f.read(1 << 20)
        text = decoder.decode(block, final=not block)
        if bad is None and (m := _NOT_UTF8.search(text)):
            bad = line + text.count("\n", 0, m.start())
        if good is None and (m := _UTF8_MULTIBYTE.search(text)):
            good = line + text.count("\n", 0, m.start())
        if (bad is not None and good is not None) or not block:
            return bad, good
        line += text.count("\n")


def iter_csv(path: Path, delimiters: str = ",;\t") -> Iterator[tuple[int, list[str]]]:
    """Rows of a CSV with the line each starts on, read as a stream.

    The encoding comes from :func:`csv_encoding`; the delimiter is the one of ``delimiters``
    the first line holds most of (``;`` and tab are what spreadsheets write in some locales).
    A field longer than ``csv.field_size_limit()`` (128 KiB; usually a stray quote that opens a
    cell never closed) raises :class:`DataError` naming the line.
    """
    encoding = csv_encoding(path)
    with open(path, newline="", encoding=encoding, errors="replace") as f:
        first = f.readline()
        delim = max(delimiters, key=first.count) if first else delimiters[0]
        reader = csv.reader(itertools.chain([first], f), delimiter=delim)
        line = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                reason = str(e)
                if "field larger than field limit" in reason:
                    reason = (
                        f"a cell is longer than {csv.field_size_limit() // 1024} KiB; "
                        f'usually a stray quote (") opens a cell that is never closed'
                    )
                raise DataError(f"{path}: line {line}: cannot read the CSV: {reason}") from None
            yield line, row
            line = reader.line_num + 1


def column_indices(
    header: Sequence[str], names: Sequence[str]
) -> tuple[dict[str, int], str | None]:
    """Index of each of ``names`` found in a CSV ``header`` (compared stripped and without case),
    and the problem when one of them appears more than once (``file,label,label``: which
    column holds the label would be a guess), naming the columns by number."""
    seen: dict[str, list[int]] = {}
    for i, cell in enumerate(header):
        seen.setdefault(cell.strip().lower(), []).append(i)
    for name in names:
        at = seen.get(name, [])
        if len(at) > 1:
            where = " and ".join(str(i + 1) for i in at)
            return {}, (
                f"column {name!r} appears {len(at)} times (columns {where}); keep one "
                f"{name!r} column"
            )
    return {n: seen[n][0] for n in names if n in seen}, None


def extra_cells_problem(row: Sequence[str], width: int) -> str | None:
    """Why a CSV row with more non-empty cells than its header's ``width`` columns is refused
    (the extra cells would be lost; usually a comma in a cell that is not in double quotes).
    Extra cells that are empty (what spreadsheets often write) lose nothing."""
    extra = [c for c in row[width:] if c.strip()]
    if not extra:
        return None
    return (
        f"{len(row)} cells but the header has {width} columns (extra: "
        f"{short(','.join(row[width:]))}); put a cell that holds a comma in double quotes"
    )


def short(text: str, limit: int = 80) -> str:
    """``repr`` of ``text`` for an error message, cut to about ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


def _read_label_csv(path: Path, classes: Sequence[str]) -> list[FileEntry]:
    by_lower = {c.lower(): c for c in classes}
    problems: list[str] = []
    more = 0
    entries = []
    rows = iter_csv(path)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path}: empty CSV; expected a header 'file,label'")
    cols, dup = column_indices(first[1], ("file", "label"))
    if dup is not None:
        raise DataError(f"{path}: line 1: {dup}")
    if "file" not in cols or "label" not in cols:
        raise DataError(
            f"{path}: line 1: header must contain columns 'file' and 'label', "
            f"got {short(','.join(first[1]))}"
        )
    fi, li = cols["file"], cols["label"]
    for n, row in rows:
        if not any(c.strip() for c in row):
            continue
        problem = None
        extra = extra_cells_problem(row, len(first[1]))
        if extra is not None:
            problem = f"{path}: line {n}: {extra}"
        elif len(row) <= max(fi, li):
            problem = f"{path}: line {n}: too few columns"
        else:
            name, label = row[fi].strip(), row[li].strip()
            cls = by_lower.get(label.lower())
            p = Path(name)
            p = p if p.is_absolute() else path.parent / p
            if "\n" in name or "\n" in label:
                problem = (
                    f"{path}: line {n}: a cell runs over several lines; a stray quote "
                    f'(") opens a cell that is never closed'
                )
            elif cls is None:
                problem = (
                    f"{path}: line {n}: label {short(label)} is not one of {', '.join(classes)}"
                )
            elif not p.is_file():
                problem = f"{path}: line {n}: file not found: {short(str(p), 200)}"
            else:
                entries.append(FileEntry(p, cls, f"{path.name}:{n}"))
        if problem is not None:
            if len(problems) < MAX_LISTED_PROBLEMS:
                problems.append(problem)
            else:
                more += 1
    if problems:
        listed = problems + ([f"... and {more} more"] if more else [])
        raise DataError(
            f"{path}: {len(problems) + more} problem(s):\n" + "\n".join(f"  - {p}" for p in listed)
        )
    return entries
