"""The labelling page: a local web page for one exported round folder.

``medal labels serve ROUND_FOLDER`` shows the round's images one at a time and writes every
decision straight into the folder's labels file, so the folder stays the contract between medal
and the radiologist::

    round-001/
      manifest.csv           which images, in rank order (read; never written)
      labels.csv             file,label[,comment]: written by the page (or labels_<name>.csv
                             with --annotator NAME), exactly the format ``medal ingest`` reads
      001_3fa2c4e1b07d.dcm   the images the page shows (only files listed in manifest.csv)

Each decision rewrites the labels file atomically (temporary file, fsync, ``os.replace``): a
stopped server or a closed browser loses nothing, and reopening resumes from the file. Rows and
columns the page does not own (an ``annotator`` column, rows typed in a spreadsheet) are kept.

Concurrency: every save re-reads the labels file and rewrites it while holding an OS lock
(``flock`` on ``.labels.csv.lock`` beside it), so several servers (processes) and tabs on one
round folder lose no decision; the OS drops a killed server's lock. Each answer carries the
file's version; a tab whose view is stale is told so and gets all labels (the page also polls).
Readers with ``--annotator NAME`` write ``labels_NAME.csv`` each, independently.

Ingested rounds: once the workspace's ledger says the round was ingested (asked on every save
and state request, so also when ``medal ingest`` runs while the page is open) saves are refused
(409) and the page turns read-only: a change would not reach the ledger.

The page counts a decision, and moves on, only after the server confirmed it; an unsaved one is
marked NOT SAVED and retried.

Safety: the server binds 127.0.0.1 unless told otherwise; every request must carry the random
token printed in the address (as Jupyter does), else it gets 403; it reads only files that
manifest.csv lists, inside the round folder; the page loads nothing from the internet (the
HTML, CSS and JavaScript are one packaged file, and a Content-Security-Policy forbids anything
else).

Pixels: the browser receives full-depth values (DICOM: the modality values after the modality
LUT, e.g. Hounsfield units, as float32; other images: their stored values) and applies the
window, inversion, zoom and pan itself on a canvas; the 8-bit previews are not used.

The web stack (the ``serve`` extra) is Starlette with uvicorn: a maintained, small ASGI toolkit
and server; the page needs no template engine or ORM.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import secrets
import shlex
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .errors import DataError, ImageReadError, LabellingError, MedalError
from .io import load_image, read_dicom_frame, sniff_format
from .labelling import round_number
from .roundfolder import (LABELS, MANIFEST, PREVIEWS, annotator_file, create_lock_file,
                          labels_lock, lock_file, manifest_classes, neutralise, read_manifest,
                          unneutralise, valid_annotator)
from .ledger import round_ingest_state
from .scan import iter_csv, short
from .workspace import UNSURE, ledger_file

INSTALL_HINT = "pip install 'medal-al[serve]'"
MAX_COMMENT = 2000
MAX_BODY = 64 * 1024
"""Largest ``POST /api/label`` body (bytes): a file name, a label and a comment fit easily."""
"""Longest comment kept (characters); ingest refuses cells over 128 KiB."""
_FRAME_IN_NAME = re.compile(r"_f(\d+)\.[A-Za-z0-9]+$")
# Projection radiography has no calibrated units: its presets come from the image's histogram.
PROJECTION_MODALITIES = ("CR", "DX", "DR", "RG", "MG", "RF", "XA", "IO", "PX")
CT_PRESETS = (("lung", -600.0, 1500.0), ("mediastinum", 50.0, 350.0), ("bone", 400.0, 1800.0),
              ("brain", 40.0, 80.0), ("abdomen", 50.0, 400.0))
"""CT presets: (name, center, width) in Hounsfield units."""


def check_annotator(name: str) -> str:
    """``name`` if it can be part of ``labels_<name>.csv``; else a :class:`LabellingError`."""
    if not valid_annotator(name):
        raise LabellingError(f"annotator name {short(name)} is not allowed; use 1-64 letters, "
                             f"digits, '_', '-' or '.', starting with a letter or digit")
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

    def __init__(self, folder: str | Path, classes: Sequence[str] | None = None,
                 annotator: str | None = None, workspace: str | Path | None = None) -> None:
        folder = Path(folder).absolute()
        if not folder.is_dir():
            raise LabellingError(f"round folder not found: {folder}")
        self.round = round_number(folder)
        self.folder = folder
        self.annotator = None if annotator is None else check_annotator(annotator)
        self.labels_path = folder / (LABELS if annotator is None else annotator_file(annotator))
        self.images, found = self._read_manifest()
        if not found:  # a blind export's manifest has no p_<class> columns: its class folders
            found = sorted(p.name for p in folder.iterdir()
                           if p.is_dir() and not p.is_symlink() and p.name != PREVIEWS)
        if classes is not None:
            if found and sorted(c.lower() for c in found) != sorted(c.lower() for c in classes):
                raise LabellingError(f"{folder}: exported with classes {', '.join(found)}, but "
                                     f"the config has {', '.join(classes)}; use the config "
                                     f"of the workspace that exported this round")
            found = list(classes)
        if len(found) < 2:
            raise LabellingError(f"{folder / MANIFEST}: no p_<class> columns or class folders "
                                 f"to take the classes from; pass the workspace's config "
                                 f"(-c CONFIG)")
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
            raise LabellingError(f"{path}: not found (or not a regular file in the round "
                                 f"folder); is {self.folder} a folder exported by medal query?")
        header, rows = read_manifest(path)
        classes = manifest_classes(header)
        images: list[RoundImage] = []
        for n, row in rows:
            name = row["file"]
            if PurePosixPath(name.replace("\\", "/")).name != name or name in (".", ".."):
                raise LabellingError(f"{path} line {n}: file {short(name)} is not a plain file "
                                     f"name in the round folder")
            rank = row.get("rank", "")
            m = _FRAME_IN_NAME.search(name)
            images.append(RoundImage(
                name, int(rank) if rank.isdigit() else len(images) + 1,
                int(m.group(1)) if m else None, row.get("score", ""),
                unneutralise(row.get("predicted", "")),
                {c: row.get(f"p_{c.lower()}", "") for c in classes}))
        if not images:
            raise LabellingError(f"{path}: lists no images")
        return sorted(images, key=lambda im: im.rank), classes

    def _check_labels_file(self) -> None:
        p = self.labels_path
        if (p.exists() or p.is_symlink()) and not self._regular_file(p):
            raise LabellingError(f"{p}: is a link out of the round folder, a folder or not a "
                                 f"regular file; the page writes only a plain {p.name}")
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
            raise LabellingError(f"{p} line 1: the header must have columns 'file' and 'label' "
                                 f"(got {short(', '.join(map(repr, rows[0])))}); fix or remove "
                                 f"the file")
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
            raise LabellingError(f"{self.labels_path}: cannot be read: {e.strerror or e}") \
                from None

    def ingested(self) -> str | None:
        """Why the page is read-only: the round was ingested (the workspace's ledger says so,
        asked afresh on every call), else ``None``. A ledger whose round lists other files
        is not this folder's workspace and is ignored."""
        if self.ledger_path is None:
            return None
        try:
            state = round_ingest_state(self.ledger_path, self.round)
        except MedalError as e:
            raise LabellingError(f"cannot tell whether round {self.round:03d} was ingested: "
                                 f"{e}") from None
        if state is None or state[0] is None or state[1] != set(self.by_file):
            return None
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(state[0]))
        return (f"round {self.round:03d} was ingested on {when}; this page is read-only (a "
                f"change made now would not reach the ledger)")

    # --- writing --------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, *, to_write: bool = True) -> Iterator[None]:
        """Hold the labels file's lock (:func:`labels_lock`) for this process's threads and
        for other processes."""
        with self._lock, labels_lock(self.labels_path, to_write=to_write):
            yield

    def set(self, file: str, *, label: str | None = None,
            comment: str | None = None) -> dict[str, str]:
        """Record one decision and rewrite the labels file atomically; returns the image's
        entry as read back. ``label``: a class (any case), ``unsure`` or ``""`` (clear: the
        image returns to the pool); ``None`` keeps it. ``comment``: ``None`` keeps it."""
        saved = self.save(file, label=label, comment=comment)
        return {"label": saved["label"], "comment": saved["comment"]}

    def save(self, file: str, *, label: str | None = None, comment: str | None = None,
             seen: str | None = None) -> dict[str, Any]:
        """:meth:`set`, for the page: ``{file, label, comment, version}``, the version after
        the save. ``seen``: the version the page last knew; when another save came in between
        (another tab or server), the answer also has ``stale: true`` and all ``labels``.
        Refused once the round was ingested (:meth:`ingested`)."""
        if file not in self.by_file:
            raise LabellingError(f"{short(file)} is not an image of round {self.round:03d}")
        if label is not None:
            canonical = self.allowed.get(label.strip().lower())
            if label.strip() and canonical is None:
                raise LabellingError(f"label {short(label)} is not allowed; allowed: "
                                     f"{', '.join([*self.classes, UNSURE])} (or empty)")
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
            out: dict[str, Any] = {"file": file, **self._labels_of(header, rows)[file],
                                   "version": self.version()}
            if seen is not None and seen != before:
                out |= {"stale": True, "labels": self._labels_of(header, rows)}
        return out

    def _updated(self, file: str, label: str | None, comment: str | None
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
        rows += [[im.file if i == fi else "" for i in range(width)]
                 for im in self.images if im.file not in present]
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
            entry: dict[str, Any] = {"file": im.file, "rank": im.rank, "frame": im.frame,
                                     **labels[im.file]}
            if show_predictions:
                entry |= {"score": im.score, "predicted": im.predicted, "probs": im.probs}
            images.append(entry)
        return {"round": self.round, "folder": self.folder.name, "classes": self.classes,
                "unsure": UNSURE, "labels_file": self.labels_path.name,
                "annotator": self.annotator, "show_predictions": show_predictions,
                "version": version, "read_only": self.ingested(), "images": images}

    def image_path(self, file: str) -> Path:
        """The file of an image the manifest lists, inside the round folder; anything else is
        refused (the page can read nothing else)."""
        if file not in self.by_file:
            raise LabellingError(f"{short(file)} is not an image of round {self.round:03d}")
        path = self.folder / file
        if not self._regular_file(path):
            raise LabellingError(f"{file}: missing, not a regular file, or a link out of the "
                                 f"round folder")
        return path


# --- pixels ---------------------------------------------------------------------------------
def read_pixels(path: Path, frame: int | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Full-depth values of one frame for the page, and what the page needs to show them.

    Grey DICOM: the modality values (modality LUT applied: rescale or LUT sequence, e.g.
    Hounsfield units), from :func:`medal.io.read_dicom_frame`, with the
    file's window (its first VOI window; a VOI LUT sequence is given as the window spanning
    the LUT's input range), photometric interpretation and modality. Colour DICOM and other
    files: :func:`medal.io.load_image` scaled back to their bit depth (255 or 65535).
    Returns ``(meta, values [H, W] or [H, W, 3] float32)``.
    """
    meta: dict[str, Any] = {"frames": 1, "frame": 0, "modality": "", "photometric": "",
                            "window": None, "units": ""}
    if sniff_format(path) == "dicom":
        f = read_dicom_frame(path, frame)
        meta |= {"frames": f.frames, "frame": f.index, "photometric": f.photometric,
                 "modality": f.modality}
        values = f.values
        if values is not None:
            meta["window"] = None if f.window is None else list(f.window)
            if f.modality == "CT" and f.rescaled:
                meta["units"] = "HU"
        else:  # colour, palette, or anything the grey path does not take
            values = load_image(path, frame=f.index).astype(np.float64) * 255.0
            meta["window"] = [127.5, 255.0]
    else:
        values, top = _pillow_values(path)
        meta["window"] = [top / 2.0, top]
    values = np.ascontiguousarray(values, dtype=np.float32)
    finite = values[np.isfinite(values)]
    qs = (0.5, 1, 5, 30, 40, 50, 60, 70, 95, 99, 99.5)
    pct = np.percentile(finite, qs) if finite.size else np.zeros(len(qs))
    meta |= {"height": int(values.shape[0]), "width": int(values.shape[1]),
             "channels": 1 if values.ndim == 2 else int(values.shape[2]),
             "min": float(finite.min()) if finite.size else 0.0,
             "max": float(finite.max()) if finite.size else 0.0,
             "percentiles": {f"{q:g}": float(v) for q, v in zip(qs, pct)}}
    meta["presets"] = window_presets(meta)
    return meta, values


def window_presets(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Window presets ``{name, center, width}`` for one image; the first is the default view.

    The file's own window first; CT: lung, mediastinum, bone, brain, abdomen in Hounsfield
    units; projection radiographs (CR, DX, MG ...): lung, mediastinum and bone windows taken
    from the image's histogram (their values have no calibrated unit), mirrored for
    MONOCHROME1; every image: its full range and the 1-99 % range.
    """
    p = meta["percentiles"]
    out: list[tuple[str, float, float]] = []

    def span(name: str, lo: float, hi: float) -> None:
        out.append((name, (lo + hi) / 2.0, max(hi - lo, 1e-6)))

    if meta["window"]:
        out.append(("file", *meta["window"]))
    if meta["modality"] == "CT":
        out += CT_PRESETS
    elif meta["modality"] in PROJECTION_MODALITIES and meta["channels"] == 1:
        # dark on screen (air-filled lung) is low values in MONOCHROME2, high in MONOCHROME1
        mono1 = meta["photometric"] == "MONOCHROME1"
        spans: tuple[tuple[str, float, float], ...] = (
            ("lung", 1, 60), ("mediastinum", 30, 95), ("bone", 50, 99.5))
        for name, lo, hi in spans:
            if mono1:
                lo, hi = 100 - hi, 100 - lo
            span(name, p[f"{lo:g}"], p[f"{hi:g}"])
    span("full range", meta["min"], meta["max"])
    span("1-99 %", p["1"], p["99"])
    return [{"name": n, "center": float(c), "width": float(w)} for n, c, w in out]


def _pillow_values(path: Path) -> tuple[np.ndarray, float]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            top = 65535.0 if im.mode.startswith("I") else 255.0
    except OSError as e:
        raise ImageReadError(path, f"cannot read image: {e}") from None
    return np.rint(load_image(path).astype(np.float64) * top), top


def encode_pixels(meta: dict[str, Any], values: np.ndarray) -> bytes:
    """One response body: 4-byte little-endian JSON length, the JSON ``meta`` (padded with
    spaces to a multiple of 4 bytes), then the values as little-endian float32."""
    head = json.dumps(meta).encode()
    head += b" " * (-(len(head) + 4) % 4)
    return len(head).to_bytes(4, "little") + head + values.astype("<f4").tobytes()


# --- the server -----------------------------------------------------------------------------
def page_html() -> str:
    """The page: one packaged file with its CSS and JavaScript inline (nothing from the web)."""
    return (resources.files("medal") / "static" / "labelling.html").read_text(encoding="utf-8")


def _require_stack() -> tuple[Any, Any]:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MedalError(f"the labelling page needs the serve extra ({e.name} is missing): "
                         f"{INSTALL_HINT}") from None
    return starlette, uvicorn


def ingest_command(folder: Path, config: Path | None) -> str:
    """The command that ingests ``folder``, as the page's done banner shows it (``-c CONFIG``
    with the config's real path when the server was given one)."""
    cfg = shlex.quote(str(Path(config).absolute())) if config is not None else "CONFIG"
    return f"medal ingest -c {cfg} {shlex.quote(str(folder))}"


def build_app(book: RoundBook, token: str, *, show_predictions: bool = False,
              config: Path | None = None) -> Any:
    """The ASGI app for ``book``; every request needs ``token`` (query ``?token=`` or header
    ``X-Medal-Token``), else 403. ``config``: the config file the server was started with."""
    _require_stack()
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    html = page_html()
    command = ingest_command(book.folder, config)

    def headers(nonce: str | None = None) -> dict[str, str]:
        script = f"'nonce-{nonce}'" if nonce else "'none'"
        return {"Content-Security-Policy":
                f"default-src 'none'; script-src {script}; style-src 'unsafe-inline'; "
                f"connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                f"form-action 'none'; frame-ancestors 'none'",
                "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer"}

    async def index(request: Request) -> Response:
        nonce = secrets.token_urlsafe(16)
        return Response(html.replace("__NONCE__", nonce), media_type="text/html",
                        headers=headers(nonce))

    def error(e: MedalError, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=status, headers=headers())

    def state(request: Request) -> Response:  # sync: Starlette runs it in a thread
        try:
            return JSONResponse({**book.state(show_predictions), "ingest_command": command},
                                headers=headers())
        except MedalError as e:
            return error(e, 409)

    async def label(request: Request) -> Response:
        try:
            body = decision(await request.body())
        except MedalError as e:
            return error(e)
        from starlette.concurrency import run_in_threadpool

        try:
            saved = await run_in_threadpool(book.save, body["file"], label=body.get("label"),
                                            comment=body.get("comment"),
                                            seen=body.get("version"))
        except RoundIngested as e:
            return error(e, 409)
        except MedalError as e:
            return error(e)
        return JSONResponse(saved, headers=headers())

    def pixels(request: Request) -> Response:
        frame = request.query_params.get("frame")
        try:
            path = book.image_path(request.query_params.get("file", ""))
            if frame is not None and not frame.isdigit():
                raise MedalError(f"frame must be a number, got {short(frame)}")
            meta, values = read_pixels(path, None if frame is None else int(frame))
        except ImageReadError as e:
            return error(MedalError(e.reason), 422)
        except MedalError as e:
            return error(e, 404)
        return Response(encode_pixels(meta, values), media_type="application/octet-stream",
                        headers=headers())

    app = Starlette(routes=[Route("/", index), Route("/api/state", state),
                            Route("/api/label", label, methods=["POST"]),
                            Route("/api/pixels", pixels)])
    return TokenGate(app, token)


def decision(raw: bytes) -> dict[str, Any]:
    """The body of ``POST /api/label``: a JSON object ``{file, label?, comment?, version?}`` of
    strings; anything else is a :class:`MedalError` with a one-line reason."""
    if len(raw) > MAX_BODY:
        raise MedalError(f"the request body is {len(raw)} bytes; at most {MAX_BODY} are taken")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else "not JSON"
        raise MedalError(f"the request body is {what}; expected {{file, label?, comment?}}") \
            from None
    if (not isinstance(body, dict) or not isinstance(body.get("file"), str)
            or not all(isinstance(body.get(k), (str, type(None)))
                       for k in ("label", "comment", "version"))):
        raise MedalError("expected {file, label?, comment?, version?} as strings")
    return body


class TokenGate:
    """ASGI middleware: a request without the right token gets 403 and reaches nothing."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self._allowed(scope):
            body = b"403: this page needs the token from the address medal printed\n"
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "websocket":  # the page uses none
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: dict) -> bool:
        from urllib.parse import parse_qs

        given = [v for k, v in scope.get("headers", []) if k == b"x-medal-token"]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given += [v.encode() for v in query.get("token", [])]
        return any(secrets.compare_digest(g, self.token) for g in given)


class LabellingServer:
    """The labelling page for one round folder, bound to ``host:port`` (``port=0``: a free
    one). :attr:`url` (with the token) is known before :meth:`run` serves."""

    def __init__(self, folder: str | Path, *, classes: Sequence[str] | None = None,
                 annotator: str | None = None, show_predictions: bool = False,
                 host: str = "127.0.0.1", port: int = 0, workspace: Path | None = None,
                 config: Path | None = None) -> None:
        _, self._uvicorn = _require_stack()
        self.book = RoundBook(folder, classes, annotator, workspace)
        self.token = secrets.token_urlsafe(24)
        self.app = build_app(self.book, self.token, show_predictions=show_predictions,
                             config=config)
        self.host = host
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            self.socket = socket.socket(family, socket.SOCK_STREAM)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(128)  # connections wait in the queue until run() serves them
        except OSError as e:
            raise MedalError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.port = int(self.socket.getsockname()[1])
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/?token={self.token}"
        self._server: Any = None

    @property
    def local_only(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")

    def run(self) -> None:
        """Serve until interrupted (Ctrl-C); every decision is already on disk."""
        config = self._uvicorn.Config(self.app, log_level="warning", access_log=False,
                                      lifespan="off")
        self._server = self._uvicorn.Server(config)
        self._server.run(sockets=[self.socket])

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True


def serve(folder: str | Path, cfg: Any = None, *, annotator: str | None = None,
          host: str = "127.0.0.1", port: int = 0) -> LabellingServer:
    """A :class:`LabellingServer` for ``folder``; ``cfg`` (optional) gives the classes and
    ``labelling.show_predictions``, and its workspace's ledger tells whether the round was
    ingested (without it: the workspace the folder sits in, if any). Call ``.run()`` to
    serve."""
    return LabellingServer(folder, classes=None if cfg is None else cfg.classes,
                           annotator=annotator,
                           show_predictions=bool(cfg is not None
                                                 and cfg.labelling.show_predictions),
                           host=host, port=port,
                           workspace=None if cfg is None else cfg.workspace,
                           config=None if cfg is None else cfg.path)
