"""Ingest: validate everything in a returned round folder, then record every label in one
transaction (all or nothing)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from sklearn.metrics import cohen_kappa_score

from ..errors import DataError, LabellingError
from ..faults import crash_point
from ..ledger import LabelRecord, RoundRecord, Selection
from ..scan import (
    MAX_LISTED_PROBLEMS,
    column_indices,
    extra_cells_problem,
    file_sha256,
    iter_csv,
    short,
)
from ..workspace import UNSURE, Workspace
from ..workspace import round_of_folder as round_number
from ..roundfolder import (
    IGNORED_FILES,
    LABELS,
    PREVIEWS,
    all_labels_locked,
    is_medal_file,
    near_reader_file,
    reader_of,
)


@dataclass
class IngestResult:
    round: int
    labelled: dict[str, int] = field(default_factory=dict)
    """Labels recorded per class (``unsure`` included)."""
    returned_to_pool: int = 0
    already_ingested: bool = False
    agreement: list[tuple[str, str, int, float]] = field(default_factory=list)
    """(annotator, annotator, images both labelled, Cohen's kappa) for multi-annotator rounds."""
    adjudicated: int = 0
    """Images whose final label (labels.csv or a class folder) settles a disagreement between
    readers or differs from a reader's label (recorded with source ``adjudicated``)."""


@dataclass(frozen=True)
class _Answer:
    label: str
    source: str
    origin: str
    annotator: str | None
    comment: str | None = None


def ingest_round(ws: Workspace, folder: Path) -> IngestResult:
    """Validate everything in a returned round folder, then record all labels in one transaction.

    On any problem, raises :class:`LabellingError` listing every problem and writes nothing.
    """
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise LabellingError(f"labelling folder not found: {folder}")
    round_no = round_number(folder)
    rec = ws.db.round(round_no)
    if rec is None:
        raise LabellingError(
            f"{folder}: round {round_no} was never exported from workspace {ws.root}"
        )
    selections = {s.file: s for s in ws.db.selections(round_no)}
    # a labelling page's saves wait while the folder is read and recorded (and are refused
    # after, the round being ingested), so none slips in between
    with all_labels_locked(folder):
        return _ingest_locked(ws, folder, round_no, rec, selections)


def _ingest_locked(
    ws: Workspace, folder: Path, round_no: int, rec: RoundRecord, selections: dict[str, Selection]
) -> IngestResult:
    read = read_answers(folder, list(ws.cfg.classes), selections)
    crash_point("ingest.labels_read")
    answers, problems = read.answers, read.problems
    # every image file ingest relies on is checked, whichever source gave its label: the copy
    # named in a CSV (where it still is at the top) and every entry of a class folder
    named = {n for n, a in answers.items() if a.source != "folder"}
    named |= {n for per in read.by_annotator.values() for n in per}
    for name in sorted(named):
        problems += _check_unchanged(folder, name, selections[name].sha256)
    for name, rel in sorted(read.in_folders.items()):
        problems += _check_unchanged(folder, rel, selections[name].sha256)
    if read.nothing_recorded is not None and rec.ingested_at is None:
        problems.append(read.nothing_recorded)
    if problems:
        raise LabellingError(
            f"{folder}: {problems.total} problem(s); nothing was recorded", problems.listed()
        )
    result = IngestResult(round_no, agreement=read.agreement, adjudicated=read.adjudicated)
    for a in answers.values():
        result.labelled[a.label] = result.labelled.get(a.label, 0) + 1
    result.returned_to_pool = len(selections) - len(answers)
    if rec.ingested_at is not None:
        _check_same_as_recorded(ws, folder, round_no, selections, answers)
        result.already_ingested = True
        return result
    when = time.time()

    def record(n: str, a: _Answer) -> LabelRecord:
        i = selections[n].image_id
        return LabelRecord(i, a.label, round_no, a.source, a.annotator, a.origin, when, a.comment)

    rows = [record(n, a) for per in read.by_annotator.values() for n, a in sorted(per.items())]
    # the final label of each image goes last, so it is the image's current label
    rows += [record(n, a) for n, a in sorted(answers.items())]
    ws.db.record_ingest(round_no, rows, when)
    crash_point("ingest.committed")
    return result


ADJUDICATED = "adjudicated"
"""The ledger source of a final label (from labels.csv or a class folder; its origin says
which) that differs from a reader's label in ``labels_<name>.csv``."""
FINAL_SOURCES = (LABELS, "folder", "consensus", ADJUDICATED)


def _check_same_as_recorded(
    ws: Workspace,
    folder: Path,
    round_no: int,
    selections: dict[str, Selection],
    answers: dict[str, _Answer],
) -> None:
    """An ingested round's folder must still say what was recorded; else a
    :class:`LabellingError` lists each change."""
    before = {r.image_id: r.label for r in ws.db.labels(round_no) if r.source in FINAL_SOURCES}
    now = {selections[n].image_id: a.label for n, a in answers.items()}
    if before == now:
        return
    diff = [
        f"{s.file}: recorded {before.get(s.image_id)!r}, folder now says {now.get(s.image_id)!r}"
        for s in selections.values()
        if before.get(s.image_id) != now.get(s.image_id)
    ]
    why = (
        " (it was handed back unlabelled, so its images went back to the pool: a later "
        "query can export them again for these labels)"
        if not before
        else ""
    )
    raise LabellingError(
        f"{folder}: round {round_no} was already ingested and its labels "
        f"have changed since{why}; nothing was recorded",
        diff,
    )


class Problems(list[str]):
    """Problems found in a round folder: the first :data:`MAX_LISTED_PROBLEMS` are kept, the
    rest only counted (a 50 MB labels.csv of wrong rows gives a short message)."""

    def __init__(self) -> None:
        super().__init__()
        self.more = 0

    def append(self, problem: str) -> None:
        if len(self) < MAX_LISTED_PROBLEMS:
            super().append(problem)
        else:
            self.more += 1

    def extend(self, problems) -> None:
        for p in problems:
            self.append(p)

    def __iadd__(self, problems):  # type: ignore[misc]
        self.extend(problems)
        return self

    @property
    def total(self) -> int:
        return len(self) + self.more

    def listed(self) -> list[str]:
        return [*self, *([f"... and {self.more} more"] if self.more else [])]


@dataclass
class Answers:
    answers: dict[str, _Answer]
    """The final label of each labelled file."""
    problems: Problems
    by_annotator: dict[str, dict[str, _Answer]] = field(default_factory=dict)
    """Labels from each ``labels_<annotator>.csv``."""
    agreement: list[tuple[str, str, int, float]] = field(default_factory=list)
    """(annotator, annotator, images both labelled, Cohen's kappa) per pair."""
    adjudicated: int = 0
    in_folders: dict[str, str] = field(default_factory=dict)
    """Exported file name -> its path (relative) in a class folder, for every such file."""
    nothing_recorded: str | None = None
    """Why recording no label at all would not be the deliberate hand-back of the round
    (``None`` when there are labels, or when it is)."""


# what a spreadsheet may have saved labels.csv as, listed when labels.csv is missing
_SPREADSHEET_SUFFIXES = (".csv", ".tsv", ".txt", ".xlsx", ".xls", ".ods", ".numbers")


def _inside(path: Path, folder: Path) -> bool:
    """``path`` (followed through links) lies inside ``folder``."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError, RuntimeError):  # outside, or a link loop
        return False


def _labels_file_problem(path: Path, folder: Path) -> str | None:
    """Why a labels file cannot be read safely (checked before anything is read from it)."""
    if not _inside(path, folder):
        return (
            f"{path.name}: is a link to a file outside the round folder; put the labels "
            f"file itself in the folder"
        )
    if path.is_dir():
        return f"{path.name}: is a folder, not a file; save the labels as {path.name}"
    if not path.is_file():
        return f"{path.name}: is not a regular file"
    return None


def _label_like(folder: Path, read: set[str]) -> list[str]:
    """Files in ``folder`` (not sub-folders, not hidden: ``._labels.csv`` is macOS metadata)
    that may hold labels but are not among the files read: named ``label…`` or with a
    spreadsheet's suffix (manifest.csv and README.txt aside)."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name not in read
        and not p.name.startswith(".")
        and not p.is_dir()
        and (
            p.name.lower().startswith("label")
            or (p.suffix.lower() in _SPREADSHEET_SUFFIXES and not is_medal_file(p.name))
        )
    )


def _missing_labels_problem(folder: Path) -> str:
    found = _label_like(folder, set())
    what = f"found {', '.join(found)}" if found else "found no other labels file"
    return (
        f"{LABELS} not found in {folder}; {what}. Save the labels as {LABELS} (CSV), or, "
        f"to hand the round back unlabelled, leave only the header line in {LABELS}"
    )


def _near_miss_problems(folder: Path) -> list[str]:
    """A file named almost like a reader's labels file is refused, never skipped: its labels
    would be lost without a word."""
    out = []
    for p in sorted(folder.iterdir()):
        near = near_reader_file(p.name)
        if near is None or p.is_dir():
            continue
        want, is_csv = near
        how = f"rename it {want}" if is_csv else f"save it as CSV: {want}"
        out.append(
            f"{p.name}: looks like a reader's labels file but is not read (a reader's "
            f"file is named labels_<name>.csv); {how}, or move it out of the round folder"
        )
    return out


def _nothing_recorded_problem(
    folder: Path, csv_rows: int | None, readers: list[str], read: set[str]
) -> str | None:
    """Why an ingest that would record no label is refused; ``None`` when it is the deliberate
    hand-back: a ``labels.csv`` with only its header and no other labels file in the folder.
    ``csv_rows``: data rows in labels.csv, ``-1`` without a header, ``None`` without the file.
    """
    found = _label_like(folder, read)
    if csv_rows == 0 and not found:
        return None
    what = {
        None: f"{LABELS} not found",
        -1: f"{LABELS} is empty",
        0: f"{LABELS} has only its header",
    }.get(csv_rows, f"{LABELS} has {csv_rows} row(s) and no label in them")
    if readers:
        what += f", and {', '.join(readers)} give(s) no label"
    others = f"found {', '.join(found)}" if found else "found no other labels file"
    move = " and move the other files out of the round folder" if found else ""
    return (
        f"nothing to record: {what}; {others}. Save the labels in {LABELS} (CSV), or, to "
        f"hand the round back unlabelled, leave only the header line in {LABELS}{move}"
    )


def read_answers(folder: Path, classes: list[str], selections: dict[str, Selection]) -> Answers:
    """Labels from ``labels.csv``, ``labels_<annotator>.csv`` files (any case) and the class
    subfolders, and every problem found.

    A labels file is read only if it is a regular file inside the folder (not a link leading
    out of it). A file named almost like a reader's file (``labels-bob.csv``) is a problem.
    A round closes empty only by a ``labels.csv`` with just its header and no other labels
    file in the folder (see :attr:`Answers.nothing_recorded`).
    """
    allowed = {c.lower(): c for c in classes} | {UNSURE: UNSURE}
    allowed_text = ", ".join([*classes, UNSURE])
    problems = Problems()
    from_csv: dict[str, _Answer] = {}
    csv_path = folder / LABELS
    has_csv = csv_path.exists() or csv_path.is_symlink()
    csv_rows: int | None = None
    if has_csv:
        problem = _labels_file_problem(csv_path, folder)
        if problem is not None:
            problems.append(problem)
        else:
            from_csv, csv_rows = _read_labels_csv(
                csv_path, allowed, allowed_text, selections, problems
            )
    by_annotator = _read_reader_files(folder, allowed, allowed_text, selections, problems)
    read = {LABELS, *(f for f, _ in by_annotator.values())}
    problems += _near_miss_problems(folder)
    from_dirs = _read_class_folders(folder, allowed, allowed_text, selections, problems)
    if not has_csv and not from_dirs and not by_annotator:
        problems.append(_missing_labels_problem(folder))
    answers = dict(from_csv)
    for name, a in from_dirs.items():
        c = from_csv.get(name)
        if c is not None and c.label != a.label:
            problems.append(
                f"{name}: {c.origin} says {c.label!r} but the file is in folder "
                f"{a.origin.split('/')[0]}/ ({a.label!r})"
            )
        elif c is None:
            answers[name] = a
    out = Answers(
        answers,
        problems,
        {n: got for n, (_, got) in by_annotator.items()},
        in_folders={n: a.origin for n, a in from_dirs.items()},
    )
    if by_annotator:
        _combine_annotators(out, sorted(selections))
    if not answers and not any(out.by_annotator.values()) and not problems:
        out.nothing_recorded = _nothing_recorded_problem(
            folder, csv_rows, sorted(f for f, _ in by_annotator.values()), read
        )
    return out


def _read_reader_files(
    folder: Path,
    allowed: dict[str, str],
    allowed_text: str,
    selections: dict[str, Selection],
    problems: Problems,
) -> dict[str, tuple[str, dict[str, _Answer]]]:
    """``{reader: (file name, labels)}`` from every ``labels_<reader>.csv`` (the name in any
    case); problems are appended to ``problems``."""
    out: dict[str, tuple[str, dict[str, _Answer]]] = {}
    seen: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        name = reader_of(path.name)
        if name is None:
            continue
        problem = _labels_file_problem(path, folder)
        if problem is not None:
            problems.append(problem)
            continue
        if name.lower() in seen:
            problems.append(
                f"{path.name}: a second labels file for reader {name!r} (the other "
                f"is {seen[name.lower()]}); keep one"
            )
            continue
        seen[name.lower()] = path.name
        got, _ = _read_labels_csv(
            path, allowed, allowed_text, selections, problems, default_annotator=name
        )
        out[name] = (
            path.name,
            {
                n: _Answer(a.label, path.name, a.origin, a.annotator or name, a.comment)
                for n, a in got.items()
            },
        )
    return out


def _read_class_folders(
    folder: Path,
    allowed: dict[str, str],
    allowed_text: str,
    selections: dict[str, Selection],
    problems: Problems,
) -> dict[str, _Answer]:
    """Labels from the images moved into class subfolders; problems are appended to
    ``problems``."""
    from_dirs: dict[str, _Answer] = {}
    for sub in sorted(
        p
        for p in folder.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and p.name != PREVIEWS
        and p.name != LABELS
        and reader_of(p.name) is None
    ):
        files = [
            p
            for p in sorted(sub.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name.lower() not in IGNORED_FILES
        ]
        label = allowed.get(sub.name.lower())
        if label is None:
            if files:
                problems.append(f"{sub.name}/: not a label folder; allowed: {allowed_text}")
            continue
        for p in files:
            rel = p.relative_to(folder).as_posix()
            if p.name not in selections:
                problems.append(f"{rel}: not an image exported in this round")
            elif p.name in from_dirs:
                problems.append(
                    f"{p.name}: found in two label folders ({from_dirs[p.name].origin} and {rel})"
                )
            else:
                from_dirs[p.name] = _Answer(label, "folder", rel, None)
    return from_dirs


def _combine_annotators(out: Answers, files: list[str]) -> None:
    """Consensus where annotators agree; labels.csv / folders adjudicate disagreements (and a
    final label that differs from even one reader's is marked adjudicated, never silently
    preferred); any disagreement left is a problem. Fills ``out.agreement``."""
    names = sorted(out.by_annotator)
    for a, b in itertools.combinations(names, 2):
        both = [f for f in files if f in out.by_annotator[a] and f in out.by_annotator[b]]
        ya = [out.by_annotator[a][f].label for f in both]
        yb = [out.by_annotator[b][f].label for f in both]
        if not both:
            kappa = float("nan")
        elif len(set(ya) | set(yb)) == 1:
            kappa = 1.0  # one label used by both: perfect agreement (kappa undefined)
        else:
            kappa = float(cohen_kappa_score(ya, yb))
        out.agreement.append((a, b, len(both), kappa))
    for f in files:
        given = {n: out.by_annotator[n][f].label for n in names if f in out.by_annotator[n]}
        if not given:
            continue
        final = out.answers.get(f)
        if final is not None:  # an explicit final label (labels.csv or a class folder)
            if set(given.values()) != {final.label}:  # readers disagree, or it overrides them
                out.adjudicated += 1
                out.answers[f] = replace(final, source=ADJUDICATED)
            continue
        if len(set(given.values())) == 1:
            label = next(iter(given.values()))
            out.answers[f] = _Answer(label, "consensus", ",".join(sorted(given)), None)
        else:
            votes = ", ".join(f"{n}: {lab}" for n, lab in given.items())
            out.problems.append(
                f"{f}: annotators disagree ({votes}); write the adjudicated "
                f"label for it in labels.csv"
            )


def _row_problem(cell: str, label_cell: str, selections: dict[str, Selection]) -> str | None:
    """What is wrong with a labels-file row's file cell (or its cells running over lines)."""
    name = cell.replace("\\", "/")
    pp = PurePosixPath(name)
    if "\n" in cell or "\n" in label_cell:
        return 'a cell runs over several lines; a stray quote (") opens a cell that is never closed'
    if not name:
        return "empty file name"
    if pp.is_absolute() or ".." in pp.parts or (len(name) > 1 and name[1] == ":"):
        return f"file {short(cell)} points outside the round folder"
    if pp.name not in selections:
        return f"{short(cell)} is not an image exported in this round"
    return None


def _header_columns(path: Path, header: list[str], problems: Problems) -> dict[str, int] | None:
    """Where a labels file's header has its columns; ``None`` (and a problem appended) when
    'file' or 'label' is missing or a known column appears twice."""
    cols, dup = column_indices(header, ("file", "label", "annotator", "comment"))
    if dup is not None:
        problems.append(f"{path.name} line 1: {dup}")
        return None
    if "file" not in cols or "label" not in cols:
        problems.append(
            f"{path.name} line 1: the header must have columns 'file' and "
            f"'label' (got {short(', '.join(map(repr, header)))})"
        )
        return None
    return cols


def _cell(row: list[str], i: int | None) -> str:
    """Column ``i`` of a CSV row, stripped; empty for a missing column or a short row."""
    return row[i].strip() if i is not None and i < len(row) else ""


def _read_labels_csv(
    path: Path,
    allowed: dict[str, str],
    allowed_text: str,
    selections: dict[str, Selection],
    problems: Problems,
    default_annotator: str | None = None,
) -> tuple[dict[str, _Answer], int]:
    """Labels from one labels file, read as a stream (UTF-8 with or without BOM, UTF-16 with
    BOM or Windows-1252; ``,`` ``;`` or tab), and its number of data rows that are not blank
    (``-1``: not even a header); problems are appended to ``problems``."""
    out: dict[str, _Answer] = {}
    lines: dict[str, int] = {}
    count = -1
    rows = iter_csv(path)
    try:
        first = next(rows, None)
        if first is None:
            return out, count
        count = 0
        cols = _header_columns(path, first[1], problems)
        if cols is None:
            return out, count
        fi, li = cols["file"], cols["label"]
        ai, ci = cols.get("annotator"), cols.get("comment")
        for n, row in rows:
            if not any(c.strip() for c in row):
                continue
            count += 1
            extra = extra_cells_problem(row, len(first[1]))
            if extra is not None:
                problems.append(f"{path.name} line {n}: {extra}")
                continue
            cell, label_cell = _cell(row, fi), _cell(row, li)
            where = f"{path.name} line {n}"
            pp = PurePosixPath(cell.replace("\\", "/"))
            problem = _row_problem(cell, label_cell, selections)
            if problem is not None:
                problems.append(f"{where}: {problem}")
                continue
            if pp.name in lines:
                problems.append(f"{where}: {_listed_again(pp.name, lines[pp.name])}")
                out.pop(pp.name, None)
                continue
            lines[pp.name] = n
            if not label_cell:
                continue
            label = allowed.get(label_cell.lower())
            if label is None:
                problems.append(f"{where}: {_not_allowed(label_cell, pp.name, allowed_text)}")
                continue
            annotator, comment = _cell(row, ai) or None, _cell(row, ci) or None
            out[pp.name] = _Answer(
                label, path.name, f"{path.name}:{n}", annotator or default_annotator, comment
            )
    except (DataError, OSError) as e:
        problems.append(_unreadable(path, e))
    return out, count


def _listed_again(name: str, first_line: int) -> str:
    """The problem of another row for the image ``name``, first listed on ``first_line`` (then
    neither row counts)."""
    return f"{name} is listed again (first on line {first_line}); keep one row per image"


def _not_allowed(label_cell: str, name: str, allowed_text: str) -> str:
    """The problem of a label cell that is none of the allowed labels (``allowed_text``)."""
    return (
        f"label {short(label_cell)} for {name} is not "
        f"allowed; allowed: {allowed_text} (or leave it empty)"
    )


def _unreadable(path: Path, e: DataError | OSError) -> str:
    """The problem of a labels file whose reading stopped: an unreadable encoding or a cell over
    the field limit (:class:`DataError`, its message without the full path), or an I/O error."""
    if isinstance(e, DataError):
        msg = str(e)
        return f"{path.name}: {msg[len(str(path)) + 2 :]}" if msg.startswith(f"{path}: ") else msg
    return f"{path.name}: cannot be read: {e.strerror or e}"


def _check_unchanged(folder: Path, rel: str, sha256: str) -> list[str]:
    """The returned file ``folder/rel`` must be the exported one: inside the round folder (a
    link may not lead out of it) and with the exported bytes. A file that is gone is fine (a
    CSV label does not need the copy)."""
    p = folder / rel
    if not (p.is_symlink() or p.exists()):
        return []
    if not _inside(p, folder):
        return [f"{rel}: is a link to a file outside the round folder; put the exported image back"]
    if not p.is_file():
        return [f"{rel}: is not a regular file; put the exported image back"]
    try:
        if file_sha256(p) == sha256:
            return []
    except OSError as e:
        return [f"{rel}: cannot be read ({e.strerror or e}); put the exported image back"]
    return [f"{rel}: the image file changed since it was exported; put the original copy back"]
