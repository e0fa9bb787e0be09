"""Round folders for radiologists, in three modules:

- :mod:`.export`: the round folder (copies, ``labels.csv``, manifest, README), recorded in the
  ledger and renamed into place;
- :mod:`.gallery`: the self-contained preview page of a round;
- :mod:`.ingest`: a returned folder validated as a whole, then recorded in one transaction.

The names below are re-exported for ``from medal.labelling import ...``; the round folder's
format itself (file names, CSV layouts, neutralising) is :mod:`medal.roundfolder`'s.
"""

from __future__ import annotations

from ..roundfolder import LABELS, PREVIEWS, neutralise
from .export import Candidate, export_round, export_suffix
from .gallery import gallery_html
from .ingest import (
    FINAL_SOURCES,
    IGNORED_FILES,
    Answers,
    IngestResult,
    Problems,
    ingest_round,
    read_answers,
    round_number,
)

__all__ = [
    "LABELS",
    "PREVIEWS",
    "Candidate",
    "export_round",
    "export_suffix",
    "neutralise",
    "gallery_html",
    "FINAL_SOURCES",
    "IGNORED_FILES",
    "Answers",
    "IngestResult",
    "Problems",
    "ingest_round",
    "read_answers",
    "round_number",
]
