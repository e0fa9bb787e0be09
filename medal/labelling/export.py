"""Export: a round folder for radiologists, built aside and renamed into place.

A round folder::

    round-001/
      README.txt             instructions for the radiologist
      labels.csv             file,label  (fill the label column)
      manifest.csv           file, image id, source path, rank (+ score, prediction and
                             probabilities with ``labelling.show_predictions = true``)
      001_3fa2c4e1b07d.dcm   copies of the chosen images (originals are never touched)
      previews/ index.html   the gallery (``labelling.previews``; :mod:`.gallery`)
      normal/  pneumonia/    alternative to the CSV: move each image into its class folder

Blind labelling (``labelling.show_predictions = false``, the default): no file in the round
folder shows the model's prediction, probabilities or score. The full manifest (source paths,
scores, predictions, probabilities) is always kept in the workspace,
``labelling/manifests/round-NNN.csv``, and the ledger holds the same per selection.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..scan import file_sha256
from ..deid import deidentify_file
from ..errors import DataError, ImageReadError, LabellingError
from ..faults import crash_point
from ..io import load_image, sniff_format
from ..ledger import RoundRecord, Selection
from ..sources import Item
from ..workspace import UNSURE, Workspace, file_id_of
from ..roundfolder import (
    GALLERY,
    LABELS,
    MANIFEST,
    PREVIEWS,
    README,
    create_lock_file,
    neutralise,
    write_csv,
    write_manifests,
)
from .gallery import gallery_html


@dataclass(frozen=True)
class Candidate:
    """One image chosen for labelling."""

    item: Item
    score: float
    probs: np.ndarray
    """``[C]`` MC-averaged class probabilities."""


def export_round(
    ws: Workspace,
    round_no: int,
    chosen: Sequence[Candidate],
    *,
    strategy: str,
    model_round: int,
    pool_size: int,
    score_seconds: float,
) -> Path:
    """Write ``labelling/round-NNN/`` and record the round in the ledger.

    The folder is built under a temporary name, the ledger row is committed, then the folder is
    renamed into place. An export that fails removes what it wrote and records nothing; one
    interrupted (killed) is finished or undone when the workspace opens next.
    """
    cfg = ws.cfg
    final = ws.round_dir(round_no)
    if final.exists():
        raise LabellingError(f"{final} already exists; refusing to overwrite a labelling folder")
    tmp = ws.export_tmp_dir(round_no)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    manifest_copy = ws.kept_manifest_path(round_no)
    try:
        selections = _write_round(ws, round_no, chosen, tmp, manifest_copy)
        crash_point("export.folder_written")
        ws.db.record_round(
            RoundRecord(
                round_no,
                strategy,
                len(selections),
                cfg.query.mc_samples,
                model_round,
                pool_size,
                str(final),
                time.time(),
                None,
                score_seconds,
            ),
            selections,
        )
    except BaseException:
        # Nothing is recorded: remove what was written, so an export that fails (a file
        # de-identification cannot handle, a full disk, Ctrl-C) leaves no trace.
        shutil.rmtree(tmp, ignore_errors=True)
        manifest_copy.unlink(missing_ok=True)
        try:
            manifest_copy.parent.rmdir()  # only if this export made it (empty)
        except OSError:
            pass
        raise
    crash_point("export.recorded")
    tmp.rename(final)
    crash_point("export.renamed")
    return final


def _write_round(
    ws: Workspace, round_no: int, chosen: Sequence[Candidate], tmp: Path, manifest_copy: Path
) -> list[Selection]:
    """Fill the temporary round folder ``tmp`` (and ``manifest_copy``, the full manifest kept in
    the workspace); returns the selections to record."""
    cfg = ws.cfg
    classes = list(cfg.classes)
    secret = ws.secret() if cfg.labelling.deidentify else None
    width = max(3, len(str(len(chosen))))
    selections, manifest, gallery = [], [], []
    for rank, c in enumerate(chosen, start=1):
        src = c.item.path
        is_dicom = sniff_format(src) == "dicom"
        name = _export_name(c.item, rank, width, export_suffix(src, is_dicom))
        exported_sha = _export_file(src, tmp / name, file_id_of(c.item.id), secret, is_dicom)
        crash_point("export.image_copied")
        preview = (
            _preview(src, tmp / PREVIEWS / f"{Path(name).stem}.png", cfg, c.item.frame)
            if cfg.labelling.previews
            else None
        )
        # a zero-label first round has no model: no prediction, no probabilities
        pred = classes[int(np.argmax(c.probs))] if len(c.probs) else ""
        probs = tuple(_six_significant_digits(p) for p in c.probs)
        selections.append(
            Selection(round_no, c.item.id, rank, name, float(c.score), pred, probs, exported_sha)
        )
        manifest.append(_manifest_row(name, rank, c, pred, len(classes)))
        gallery.append((rank, name, preview, float(c.score), pred, c.probs))
    write_csv(tmp / LABELS, ["file", "label"], [[s.file, ""] for s in selections])
    create_lock_file(tmp / LABELS)
    write_manifests(
        tmp / MANIFEST,
        manifest_copy,
        classes,
        manifest,
        sources=secret is None,
        predictions=cfg.labelling.show_predictions,
    )
    for name in classes:
        (tmp / name).mkdir()
    (tmp / README).write_text(
        _readme(
            round_no,
            classes,
            len(selections),
            _serve_command(ws, round_no),
            sources=secret is None,
            predictions=cfg.labelling.show_predictions,
        ),
        encoding="utf-8",
    )
    if cfg.labelling.previews:
        (tmp / GALLERY).write_text(
            gallery_html(
                round_no, classes, gallery, show_predictions=cfg.labelling.show_predictions
            ),
            encoding="utf-8",
        )
    return selections


def _export_name(item: Item, rank: int, width: int, ext: str) -> str:
    """The exported file's name: its rank (zero-padded to ``width``), the first 12 characters of
    its image id, its frame (of a multi-frame image) and the suffix ``ext``."""
    frame = item.frame
    return f"{rank:0{width}d}_{item.id[:12]}{'' if frame is None else f'_f{frame}'}{ext}"


def _export_file(src: Path, dst: Path, file_id: str, secret: str | None, is_dicom: bool) -> str:
    """Copy ``src`` to ``dst`` (a DICOM de-identified when there is a ``secret``) and return the
    SHA-256 of the copy; raises :class:`DataError` when ``src`` no longer has the content
    ``file_id`` it was scanned with (it changed while medal was reading it)."""
    if secret is not None and is_dicom:
        deidentify_file(src, dst, secret)
        unchanged = file_sha256(src) == file_id
        exported_sha = file_sha256(dst)
    else:
        shutil.copyfile(src, dst)
        exported_sha = file_sha256(dst)
        unchanged = exported_sha == file_id
    if not unchanged:
        raise DataError(
            f"{src}: the file changed while medal was reading it; run the command again"
        )
    return exported_sha


def _manifest_row(name: str, rank: int, c: Candidate, pred: str, n_classes: int) -> list[object]:
    """The full manifest's row of the exported file ``name``: file, image id, source path, rank,
    score, prediction and one probability per class (empty without a model)."""
    return [
        name,
        c.item.id,
        neutralise(str(c.item.path)),
        rank,
        f"{c.score:.6g}",
        neutralise(pred),
        *([f"{p:.4f}" for p in c.probs] if len(c.probs) else [""] * n_classes),
    ]


# Pillow's format name -> the suffix an exported copy gets
_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}


def export_suffix(src: Path, is_dicom: bool) -> str:
    """The suffix of an exported copy, from the image's detected format (``.dcm``, ``.png``,
    ``.jpg``, ``.tif``, ``.bmp``), never copied from the source's name: a source may be named
    ``x.<img src=x onerror=alert(1)>`` (a DICOM found by its magic) or misnamed."""
    if is_dicom:
        return ".dcm"
    try:
        with Image.open(src) as im:
            fmt = im.format or ""
    except (OSError, ValueError, Image.DecompressionBombError):
        fmt = ""
    if fmt in _SUFFIXES:
        return _SUFFIXES[fmt]
    return f".{fmt.lower()}" if fmt.isascii() and fmt.isalnum() else ".img"


def _preview(src: Path, dst: Path, cfg, frame: int | None = None) -> str | None:
    """PNG of the image as the model saw it (windowed, before resizing); relative path."""
    which: str | int = (
        frame if frame is not None else ("middle" if cfg.image.frame == "all" else cfg.image.frame)
    )
    try:
        img = load_image(
            src, window=cfg.image.window, frame=which, min_size=2 * cfg.labelling.preview_size
        )
    except ImageReadError:
        return None
    pil = Image.fromarray(np.round(img * 255).astype(np.uint8))
    pil.thumbnail((cfg.labelling.preview_size, cfg.labelling.preview_size))
    dst.parent.mkdir(parents=True, exist_ok=True)
    pil.save(dst)
    return f"{PREVIEWS}/{dst.name}"


def _six_significant_digits(x: float) -> float:
    return float(f"{float(x):.6g}")


def _serve_command(ws: Workspace, round_no: int) -> str:
    """The command that opens the labelling page of round ``round_no`` (with the config when
    the page is to show the model's predictions: without one it is blind)."""
    config = f' -c "{ws.cfg.path}"' if ws.cfg.labelling.show_predictions else ""
    return f'medal labels serve{config} "{ws.round_dir(round_no)}"'


def _readme(
    round_no: int, classes: list[str], n: int, serve: str, *, sources: bool, predictions: bool
) -> str:
    allowed = "\n".join(f"    {c}" for c in classes)
    listed = "each image's source file and rank" if sources else "each image's rank"
    if predictions:
        shown = f"""manifest.csv lists {listed}, and the model's current prediction,
class probabilities and uncertainty score; index.html shows them too
(labelling.show_predictions = true)."""
    else:
        shown = f"""Blind labelling (labelling.show_predictions = false): no file in this
folder shows the model's prediction, its class probabilities or its
uncertainty score, so that they cannot sway your reading. The images
are numbered from the one the model is least sure about; the number says
nothing about which class the model expects.
manifest.csv lists {listed}."""
    return f"""medal labelling round {round_no:03d}
{"=" * 28}

This folder holds {n} images chosen because the model is least sure about them.
The files are copies; the originals are untouched.

How to label (any way works; do not rename the image files):

  A) In your browser: run

       {serve}

     and open the address it prints (a page on this computer only; each
     decision is saved to labels.csv at once). Needs the serve extra:
     pip install 'medal-al[serve]'. If this folder was copied elsewhere,
     give its path there instead.

  B) Open labels.csv in a spreadsheet and type one label per row in the
     "label" column. Leave a row empty if you cannot decide; that image
     goes back to the pool for a later round. You may also write "{UNSURE}".

  C) Or move each image file into the subfolder named after its class.

Allowed labels (upper/lower case does not matter):
{allowed}
    {UNSURE}   (take the image out of the pool; it will not be asked again)

Optional columns in labels.csv: "annotator" (your name) and "comment".

{shown}

When you are done, hand the folder back; medal checks it before recording anything.
"""
