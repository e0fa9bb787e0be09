"""The hidden truth of a simulation and the oracle that plays the radiologist."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import SimulationError
from ..roundfolder import MANIFEST, has_sources, labels_files, manifest_sources, write_labels
from ..workspace import kept_manifest, round_of_folder


@dataclass(frozen=True)
class TruthEntry:
    """One image of the fully labelled set: the original file, its label, its pool link."""

    source: Path
    label: str
    link: Path


class Truth:
    """The hidden labels of the fully labelled set, keyed by the pool path a run sees."""

    def __init__(self, entries: Sequence[TruthEntry]) -> None:
        self.entries = list(entries)
        self._by_link = {str(e.link): e.label for e in self.entries}

    def lookup(self, source_path: str) -> str:
        """The label of the pool image at ``source_path`` (as written in a round manifest)."""
        try:
            return self._by_link[str(Path(source_path))]
        except KeyError:
            raise SimulationError(
                f"the oracle was asked about {source_path}, which is not in "
                f"the simulation's labelled set"
            ) from None


class Oracle:
    """A simulated radiologist that answers for the images exported in a round, and only those.

    It holds nothing but ``lookup``; it calls it once per row of the round's manifest.
    ``log`` (optional) is a CSV file where each question and answer is appended.
    """

    def __init__(self, lookup: Callable[[str], str], log: Path | None = None) -> None:
        self._lookup = lookup
        self._log = log

    def label_round(self, folder: Path, manifest: Path) -> int:
        """Fill ``folder/labels.csv`` from the hidden truth of the images listed in ``manifest``.

        Returns the number of labelled rows. Rewriting is idempotent, so a round whose ingest
        was interrupted can be answered again.
        """
        source = manifest_sources(manifest)
        files = labels_files(folder)
        missing = sorted(set(files) - set(source))
        if missing:
            raise SimulationError(f"{manifest}: no source path for {', '.join(missing)}")
        answers = [(name, self._lookup(source[name])) for name in files]
        write_labels(folder, answers)
        if self._log is not None:
            new = not self._log.is_file()
            with open(self._log, "a", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["round_folder", "file", "source_path", "label"])
                w.writerows([folder.name, n, source[n], lab] for n, lab in answers)
        return len(answers)


def round_manifest(ws_root: Path, folder: Path) -> Path:
    """The manifest with source paths for a round folder (kept in the workspace when the
    round was de-identified)."""
    in_folder = folder / MANIFEST
    if has_sources(in_folder):
        return in_folder
    kept = kept_manifest(ws_root, round_of_folder(folder))
    if not kept.is_file():
        raise SimulationError(f"{folder}: the manifest has no source paths and {kept} is missing")
    return kept
