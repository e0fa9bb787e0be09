"""The one owner of medal's on-disk state.

::

    <workspace>/
      ledger.sqlite            images, labels with provenance, rounds, models, metrics
      checkpoints/round-000.pt model trained on the labels of rounds <= 0
                  round-000.partial.pt   resume state of a training in progress
      labelling/round-001/     folders handed to radiologists
                .round-001.tmp/          a round folder being written (export)
                manifests/round-001.csv  full manifest: sources, scores, predictions
      scores/round-001/        the pool's stored MC-dropout scores for round 1
      cache/                   decoded images; cache/representation/ pretrained backbones;
                               cache/features/ a frozen backbone's image features
      features-tuned/<key>/    the features of the last fine-tuned backbone (train.finetune)
      skipped.csv              files that could not be read, and why
      pool-overlap.csv         pool images byte-identical to validation/test images
      .lock                    held while a command changes the workspace

This module is the only one that spells these names: every other module asks a
:class:`Workspace` (or, with only a workspace folder at hand, the functions below).

Source images are only ever read. Model round k is trained on the initial labels plus the
labels ingested from rounds 1..k; querying with model k exports round k+1.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import os
import re
import secrets
import shutil
import sqlite3
import stat
import time
from collections.abc import Sequence
from pathlib import Path


from .config import Config
from .scan import display_path
from .errors import LabellingError, WorkspaceError
from .ledger import Ledger

UNSURE = "unsure"

_ROUND_NAME = re.compile(r"round-(\d+)")
_EXPORT_TMP_NAME = re.compile(r"\.round-(\d+)\.tmp")


def round_name(round_no: int) -> str:
    """The name of round ``round_no``'s folder (and of its checkpoint, scores, manifest copy)."""
    return f"round-{round_no:03d}"


def round_of_folder(folder: Path) -> int:
    """The round number a round folder's name (``round-NNN``) stands for."""
    m = _ROUND_NAME.fullmatch(Path(folder).name)
    if m is None or not m.group(1).isascii():
        raise LabellingError(f"{folder}: not a round folder (expected a name like round-001)")
    return int(m.group(1))


def ledger_file(root: Path) -> Path:
    """The ledger of the workspace at ``root`` (which may not exist yet)."""
    return Path(root) / "ledger.sqlite"


def has_ledger(root: Path) -> bool:
    """Whether a workspace with a ledger exists at ``root`` (a command ran there); a ledger
    path that is something else (a folder) is a :class:`WorkspaceError`."""
    path = ledger_file(root)
    if path.exists() and not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file"
        raise WorkspaceError(
            f"{path} is {what}; expected the workspace's SQLite ledger file "
            f"(move it away, or choose another workspace)"
        )
    return path.is_file()


def cache_dir(root: Path) -> Path:
    """The decode cache of the workspace at ``root`` (``image.cache``); readable by every
    torchrun rank without opening the workspace."""
    return Path(root) / "cache"


def kept_manifest(root: Path, round_no: int) -> Path:
    """The full manifest of a round (source paths, scores, predictions, probabilities) that
    the workspace keeps; the round folder's own lacks some of it (blind, de-identified)."""
    return Path(root) / "labelling" / "manifests" / f"{round_name(round_no)}.csv"


def frame_id(file_id: str, frame: int) -> str:
    """Id of one frame of a multi-frame file (``image.frame = "all"``)."""
    return f"{file_id}#f{frame}"


def file_id_of(image_id: str) -> str:
    """The content hash of the file an image (or frame) id belongs to."""
    return image_id.split("#", 1)[0]


def frame_of(image_id: str) -> int | None:
    return int(image_id.rsplit("#f", 1)[1]) if "#f" in image_id else None


NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""A write failed for lack of room: a full disk, a full quota, or a file size limit."""
_SQLITE_FULL, _SQLITE_IOERR = 13, 10  # result codes (the low byte of extended codes)
_TORCH_WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def no_space_message(exc: BaseException, root: Path, written: Sequence[Path] = ()) -> str | None:
    """``"no space left on <folder>: ..."`` when ``exc`` (or an exception it was raised from)
    is a write that failed for lack of room, else ``None``.

    ``written``: files whose write failed, when known (e.g. removed checkpoint temporaries),
    named in the message. SQLite errors name the ledger: SQLite reports ENOSPC as "database
    or disk is full" and other failed writes (a file size limit, EFBIG) as "disk I/O error";
    the message gives the free space, so a failing disk that is not full can be told apart.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            target = (
                Path(os.fsdecode(e.filename)) if e.filename else (written[0] if written else root)
            )
            return _no_space_line(target, e.strerror or str(e))
        if isinstance(e, sqlite3.Error):
            code = getattr(e, "sqlite_errorcode", None)
            text = str(e)
            if (code is not None and code & 0xFF in (_SQLITE_FULL, _SQLITE_IOERR)) or text in (
                "database or disk is full",
                "disk I/O error",
            ):
                return _no_space_line(ledger_file(root), f"SQLite: {text}")
        if isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILED):
            target = written[0] if written else root / "checkpoints"
            text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", " ".join(str(e).split()))
            return _no_space_line(target, f"torch.save: {text[:160]}")
        e = e.__cause__ or e.__context__
    return None


def _no_space_line(target: Path, cause: str) -> str:
    folder = target if target.is_dir() else target.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free"
    except OSError:
        free = "free space unknown"
    name = "" if target == folder else f"writing {target.name.removesuffix('.tmp')} failed: "
    return (
        f"no space left on {display_path(folder)}: {name}{cause} ({free}); free some "
        f"space (or move the workspace) and run the command again"
    )


class Workspace:
    """Open with ``with Workspace(cfg) as ws:``; ``lock=True`` makes the command exclusive."""

    def __init__(self, cfg: Config, *, lock: bool = True) -> None:
        self.cfg = cfg
        self.root = cfg.workspace
        self._want_lock = lock
        self._lock_fd: int | None = None
        self.ledger: Ledger | None = None
        self.copies: dict[str, list[str]] = {}
        """``{path: every path with the same content}`` for files found more than once by the
        last :func:`medal.sources.sync` (a decode failure found on one copy is listed for
        each)."""

    # --- paths ----------------------------------------------------------------------------
    @property
    def ledger_path(self) -> Path:
        return ledger_file(self.root)

    @property
    def labelling_dir(self) -> Path:
        return self.root / "labelling"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint_path(self, model_round: int) -> Path:
        """Where model round ``model_round``'s weights are. Always derived from the workspace
        (the ledger keeps the path relative to it), so a moved or copied workspace loads its
        own checkpoints."""
        return self.checkpoints_dir / f"{round_name(model_round)}.pt"

    def checkpoint_name(self, model_round: int) -> str:
        """Model round ``model_round``'s checkpoint relative to the workspace (as the ledger
        records it)."""
        return self.checkpoint_path(model_round).relative_to(self.root).as_posix()

    def training_state_path(self, model_round: int) -> Path:
        """The resume state of model round ``model_round``'s training while it runs."""
        return self.checkpoint_path(model_round).with_suffix(".partial.pt")

    @property
    def cache_dir(self) -> Path:
        return cache_dir(self.root)

    def representation_path(self, key: str) -> Path:
        """A cached self-supervised backbone; under ``cache/`` so simulation runs, whose
        workspaces share one cache folder, share it too."""
        return self.cache_dir / "representation" / f"{key}.pt"

    def feature_cache_path(self, key: str) -> Path:
        """The folder of a frozen backbone's image features (:class:`medal.features.FeatureStore`);
        under ``cache/`` for the same reason as :meth:`representation_path`."""
        return self.cache_dir / "features" / key

    def tuned_feature_path(self, key: str) -> Path:
        """The folder of a fine-tuned backbone's image features (``train.finetune``): in the
        workspace, not the shared cache, since no other project has that backbone."""
        return self.root / "features-tuned" / key

    def drop_other_tuned_features(self, key: str) -> list[Path]:
        """Delete every fine-tuned backbone's feature folder but ``key``'s (an earlier
        round's backbone, never used again; features are recomputed if needed). Returns the
        folders deleted."""
        root = self.root / "features-tuned"
        gone = [p for p in sorted(root.glob("*")) if p.is_dir() and p.name != key]
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
        return gone

    @property
    def tensorboard_root(self) -> Path:
        """The project's TensorBoard run (``train.tensorboard``; ``tensorboard --logdir`` it)."""
        return self.root / "tensorboard"

    def round_dir(self, round_no: int) -> Path:
        return self.labelling_dir / round_name(round_no)

    def export_tmp_dir(self, round_no: int) -> Path:
        """The folder an export of round ``round_no`` is written under before it is renamed to
        :meth:`round_dir` (what :meth:`_recover` finishes or undoes after a crash)."""
        return self.labelling_dir / f".{round_name(round_no)}.tmp"

    def kept_manifest_path(self, round_no: int) -> Path:
        return kept_manifest(self.root, round_no)

    def scores_dir(self, round_no: int) -> Path:
        """Where the pool's MC-dropout scores of the query for round ``round_no`` are stored."""
        return self.root / "scores" / round_name(round_no)

    def stored_scores(self) -> list[Path]:
        """Every :meth:`scores_dir` with a finished set of scores (``meta.json``), newest
        round first."""
        return sorted(
            (m.parent for m in (self.root / "scores").glob("round-*/meta.json")), reverse=True
        )

    @property
    def pool_overlap_csv(self) -> Path:
        return self.root / "pool-overlap.csv"

    # --- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> Workspace:
        self._make_root()
        if self._want_lock:
            self._acquire_lock()
        try:
            has_ledger(self.root)  # refuses a folder in the ledger's place
            try:
                self.ledger = Ledger(self.ledger_path)
            except sqlite3.Error as e:
                raise WorkspaceError(
                    no_space_message(e, self.root)
                    or self._cannot(f"cannot open the ledger {self.ledger_path.name}", e)
                ) from None
            if self._want_lock:
                self._recover()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: object = None, exc: object = None, tb: object = None) -> None:
        """Close the ledger and release the lock. A command that failed has its half-written
        checkpoints (``checkpoints/*.tmp``) removed first; a failure to write for lack of space
        (a full disk or quota, a file size limit, SQLite's "database or disk is full" /
        "disk I/O error", torch.save's "unexpected pos") becomes one
        :class:`WorkspaceError` line: "no space left on <folder>: ...".
        """
        full = None
        if isinstance(exc, BaseException):
            written = self._remove_partial_writes()
            full = no_space_message(exc, self.root, written)
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        if full is not None and isinstance(exc, BaseException):
            raise WorkspaceError(full) from exc

    def _remove_partial_writes(self) -> list[Path]:
        """Remove the temporary files a checkpoint write leaves when it fails (they are only
        ever written under the lock); returns the files removed."""
        removed = []
        for tmp in sorted(self.checkpoints_dir.glob("*.tmp")):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
        return removed

    def _make_root(self) -> None:
        """Create the workspace folder; a file in the way or a read-only parent is one line
        naming the folder and the cause."""
        root = self.root
        blocker = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
        if blocker == root:
            raise WorkspaceError(f"workspace {root} exists and is not a folder")
        if blocker is not None:
            raise WorkspaceError(
                f"cannot create workspace {root}: {blocker} is a file, not a folder"
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WorkspaceError(f"cannot create workspace {root}: {e.strerror or e}") from None

    def _cannot(self, what: str, e: BaseException) -> str:
        """One line for an OS or SQLite error on the workspace folder."""
        cause = getattr(e, "strerror", None) or str(e)
        if not os.access(self.root, os.W_OK):
            return (
                f"workspace {self.root} is read-only ({what}: {cause}); make the folder "
                f"writable or choose another workspace"
            )
        return f"workspace {self.root}: {what}: {cause}"

    LOCK_WAIT = 1.0
    """Seconds a refused command waits for the holder to write its pid into ``.lock``."""

    def _open_lock(self) -> int:
        """Open ``.lock`` without following a link, so that writing the pid into it can never
        overwrite another file; refuse a link or anything but a plain file of one name."""
        path = self.root / ".lock"
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP or path.is_symlink():
                raise WorkspaceError(
                    f"{path} is a symbolic link (to {os.readlink(path)}); medal writes its "
                    f"pid into .lock and never through a link: remove the link"
                ) from None
            raise WorkspaceError(self._cannot("cannot create the lock file .lock", e)) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            what = (
                "is not a regular file"
                if not stat.S_ISREG(st.st_mode)
                else f"is a hard link ({st.st_nlink} names for one file)"
            )
            raise WorkspaceError(
                f"{path} {what}; medal writes its pid into .lock, which must "
                f"be a plain file of its own: remove it"
            )
        return fd

    def _acquire_lock(self) -> None:
        fd = self._open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = self._lock_holder(fd)
            finally:
                os.close(fd)
            raise WorkspaceError(
                f"workspace {self.root} is in use by another medal command (pid {holder}); "
                f"wait for it to finish and run this command again"
            ) from None
        # One write of a fixed width: a reader never sees the file empty or half-written.
        try:
            os.pwrite(fd, f"{os.getpid():<20}\n".encode(), 0)
            os.ftruncate(fd, 21)
        except OSError:  # the lock is held; only the pid note for others is missing
            pass
        self._lock_fd = fd

    def _lock_holder(self, fd: int) -> str:
        """The pid holding the lock on ``fd``'s file: from the kernel's lock table
        (``/proc/locks``, Linux) where it lists the file, else from the pid the holder writes
        into the file right after taking the lock (waited for up to :attr:`LOCK_WAIT` s)."""
        st = os.fstat(fd)
        try:
            with open("/proc/locks", encoding="ascii", errors="replace") as f:
                for line in f:
                    parts = line.split()
                    # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF" (waiters: "1: -> ...")
                    if (
                        len(parts) >= 6
                        and parts[1] == "FLOCK"
                        and parts[5].rsplit(":", 1)[-1] == str(st.st_ino)
                    ):
                        dev = parts[5].rsplit(":", 1)[0].split(":")
                        if (
                            len(dev) == 2
                            and (int(dev[0], 16), int(dev[1], 16))
                            == (os.major(st.st_dev), os.minor(st.st_dev))
                            and parts[4] != "-1"
                        ):
                            return parts[4]
        except (OSError, ValueError):
            pass
        deadline = time.monotonic() + self.LOCK_WAIT
        while True:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            if text.isdigit():
                return text
            if time.monotonic() >= deadline:
                return "unknown"
            time.sleep(0.02)

    def _recover(self) -> None:
        """Finish or undo a round export that a crash interrupted (see labelling.export);
        remove checkpoints a crash left half-written."""
        self._remove_partial_writes()
        if not self.labelling_dir.is_dir():
            return
        recorded = {r.round for r in self.db.rounds()}
        for tmp in self.labelling_dir.glob(".round-*.tmp"):
            m = _EXPORT_TMP_NAME.fullmatch(tmp.name)
            if m is None or not m.group(1).isascii():
                continue
            n = int(m.group(1))
            final = self.round_dir(n)
            if n in recorded and not final.exists():
                tmp.rename(final)
            else:
                shutil.rmtree(tmp)

    @property
    def db(self) -> Ledger:
        if self.ledger is None:
            raise WorkspaceError("workspace is not open; use 'with Workspace(cfg) as ws:'")
        return self.ledger

    def secret(self) -> str:
        """A random per-workspace secret (for de-identification UIDs), created on first use."""
        return self.db.meta_value("secret", secrets.token_hex(32))

    # --- rounds ---------------------------------------------------------------------------
    def ingested_rounds(self) -> int:
        """Highest round whose labels are in (0 when none): the round of the next model."""
        done = [r.round for r in self.db.rounds() if r.ingested_at is not None]
        return max(done, default=0)

    def pending_round(self) -> int | None:
        pend = [r.round for r in self.db.rounds() if r.ingested_at is None]
        return min(pend) if pend else None

    def next_round(self) -> int:
        return max((r.round for r in self.db.rounds()), default=0) + 1

    # --- scanning -------------------------------------------------------------------------

    @property
    def skipped_csv(self) -> Path:
        return self.root / "skipped.csv"

    def record_skipped(self, skipped: dict[str, str], *, prune: bool = False) -> None:
        """Add ``{path: reason}`` to the unreadable files in the ledger and rewrite
        ``skipped.csv`` (atomically) when the list changed. With ``prune``, files that no
        longer exist leave the list first. Paths are stored as :func:`display_path` text; a
        file the last :func:`medal.sources.sync` found byte-identical copies of is listed with
        each copy (the copies share one id, so only one of them was decoded)."""
        before = self.db.skipped()
        merged = {p: r for p, r in before.items() if not prune or os.path.lexists(p)}
        for p, r in skipped.items():
            shown = display_path(p)
            merged |= dict.fromkeys(self.copies.get(shown, [shown]), r)
        if merged == before:
            return
        self.db.set_skipped(merged)
        tmp = self.skipped_csv.with_name("skipped.csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file", "reason"])
            w.writerows(sorted(merged.items()))
        tmp.replace(self.skipped_csv)
