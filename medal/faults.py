"""Named crash points: fault injection for the crash-safety tests.

``crash_point(name)`` kills its own process with SIGKILL when the environment variable
``MEDAL_CRASH_AT`` names that point, and otherwise does nothing (one environment lookup).
The commands that change on-disk state call it at the moments a power cut would hurt most;
``tests/test_crash.py`` runs the real command once per point and checks that the workspace
recovers. :data:`INGEST_POINTS` and :data:`ROUND_POINTS` are the one list of points, in the
order a command reaches them::

    MEDAL_CRASH_AT=ledger.ingest_before_commit medal ingest -c medal.toml ws/labelling/round-001
"""

from __future__ import annotations

import os
import signal

ENV = "MEDAL_CRASH_AT"

INGEST_POINTS: tuple[str, ...] = (
    "ingest.labels_read",  # the folder is read and checked; nothing written yet
    "ledger.ingest_before_commit",  # labels and ingest time written, not committed
    "ingest.committed",  # the transaction is committed; the command has not returned
)
"""Where ``medal ingest`` can be killed."""

ROUND_POINTS: tuple[str, ...] = (
    "train.checkpoint_saved",  # checkpoint file written, model not in the ledger
    "ledger.model_before_commit",  # the model's row written, not committed
    "train.model_recorded",  # the model is committed; the query has not started
    "query.scored",  # the pool is scored and the images chosen; nothing exported
    "export.image_copied",  # the first image is copied into the temporary round folder
    "export.folder_written",  # the temporary round folder is complete, nothing recorded
    "ledger.round_before_commit",  # the round and its selections written, not committed
    "export.recorded",  # the round is committed; its folder still has the temporary name
    "export.renamed",  # the round folder is in place; the command has not returned
)
"""Where ``medal round`` (train, then query and export) can be killed."""

STORE_POINTS: tuple[str, ...] = (
    "poolstore.filling",  # a pool store's temporary folder holds a partly written images.npy
)
"""Where filling a pretraining pool store (:mod:`medal.poolstore`) can be killed."""

POINTS: tuple[str, ...] = INGEST_POINTS + ROUND_POINTS + STORE_POINTS


def crash_point(name: str) -> None:
    """SIGKILL this process if ``$MEDAL_CRASH_AT`` is ``name``; nothing when it is unset.

    Raises ``ValueError`` when ``$MEDAL_CRASH_AT`` is set to a name that is not in
    :data:`POINTS`, or when ``name`` itself is not (a point renamed in one place only).
    """
    armed = os.environ.get(ENV)
    if armed is None:
        return
    for what, value in ((f"${ENV}", armed), ("crash_point()", name)):
        if value not in POINTS:
            raise ValueError(
                f"{what}: {value!r} is not a crash point; valid: {', '.join(POINTS)} "
                f"(medal/faults.py)"
            )
    if armed == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
