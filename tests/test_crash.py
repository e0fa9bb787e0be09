"""Crash safety, for real: `medal ingest` and `medal round` are killed with SIGKILL in a
subprocess at many points; after each kill the ledger must be consistent, no label lost or
duplicated, and running the command again must finish the job."""

from __future__ import annotations

import csv
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medal import api
from medal.cli import main
from medal.config import load_config
from medal.workspace import Workspace

from conftest import write_config

ROOT = Path(__file__).parents[1]
# imports first, then says so, so kills land inside the command rather than in `import torch`
DRIVER = (
    "import sys\nfrom medal.cli import main\nprint('imported', flush=True)\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
# 8 kill points per command in the default run; 50 with `-m slow`
POINTS = [8, pytest.param(50, marks=pytest.mark.slow)]


def start(args: list[str]) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert p.stdout.readline().strip() == "imported"
    return p


def timed_run(args: list[str]) -> float:
    p = start(args)
    t0 = time.perf_counter()
    assert p.wait(timeout=300) == 0
    return time.perf_counter() - t0


def kill_after(args: list[str], delay: float) -> int | None:
    p = start(args)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    return p.wait(timeout=60)


def fill(folder: Path) -> int:
    with open(folder / "labels.csv", newline="") as f:
        names = [r["file"] for r in csv.DictReader(f)]
    with open(folder / "labels.csv", "w", newline="") as f:
        f.write(
            "file,label\n"
            + "".join(f"{n},{'normal' if i % 2 else 'pneumonia'}\n" for i, n in enumerate(names))
        )
    return len(names)


def integrity(ws_root: Path) -> None:
    db = sqlite3.connect(ws_root / "ledger.sqlite")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        db.close()


@pytest.fixture
def exported(tmp_path, tiny_data):
    cfg = load_config(write_config(tmp_path))
    api.train(cfg, progress=False)
    folder = api.query(cfg, progress=False).folder
    n = fill(folder)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(cfg.workspace, snapshot)
    return cfg, folder, n, snapshot


@pytest.mark.parametrize("points", POINTS)
def test_ingest_killed_anywhere_loses_and_duplicates_nothing(exported, points):
    cfg, folder, n, snapshot = exported
    args = ["ingest", "-c", str(cfg.path), "-q", str(folder)]
    duration = timed_run(args)
    outcomes = set()
    for k in range(points):
        shutil.rmtree(cfg.workspace)
        shutil.copytree(snapshot, cfg.workspace)
        code = kill_after(args, duration * 1.3 * k / points)
        outcomes.add(code)
        integrity(cfg.workspace)
        with Workspace(cfg) as ws:
            rows = ws.db.labels(1)
            done = ws.db.round(1).ingested_at is not None
        assert (done and len(rows) == n) or (not done and rows == []), (k, done, len(rows))
        assert main(args) == 0  # running it again finishes the job
        with Workspace(cfg) as ws:
            rows = ws.db.labels(1)
            assert ws.db.round(1).ingested_at is not None
        assert len(rows) == n and len({r.image_id for r in rows}) == n
    assert -signal.SIGKILL in outcomes  # at least some kills landed mid-command


@pytest.mark.parametrize("points", POINTS)
def test_round_killed_anywhere_recovers(exported, points):
    cfg, folder, n, snapshot = exported
    assert main(["ingest", "-c", str(cfg.path), "-q", str(folder)]) == 0
    shutil.rmtree(snapshot)
    shutil.copytree(cfg.workspace, snapshot)
    args = ["round", "-c", str(cfg.path), "-q"]
    duration = timed_run(args)
    outcomes = set()
    for k in range(points):
        shutil.rmtree(cfg.workspace)
        shutil.copytree(snapshot, cfg.workspace)
        outcomes.add(kill_after(args, duration * 1.2 * k / points))
        integrity(cfg.workspace)
        with Workspace(cfg) as ws:  # opening recovers an interrupted export
            assert not list(ws.labelling_dir.glob(".round-*"))
            for r in ws.db.rounds():
                sel = ws.db.selections(r.round)
                with open(ws.round_dir(r.round) / "labels.csv", newline="") as f:
                    assert [x["file"] for x in csv.DictReader(f)] == [s.file for s in sel]
            assert len(ws.db.labels(1)) == n  # earlier labels untouched
            models = {m.round for m in ws.db.models()}
            assert models <= {0, 1}
        with Workspace(cfg) as ws:
            finished = ws.db.round(2) is not None
        if not finished:
            assert main(args) == 0  # the round completes when run again
        with Workspace(cfg) as ws:
            rounds = [r.round for r in ws.db.rounds()]
            assert rounds == [1, 2] and ws.round_dir(2).is_dir()
            assert {m.round for m in ws.db.models()} == {0, 1}
            assert len(ws.db.labels(1)) == n
    assert -signal.SIGKILL in outcomes  # at least some kills landed mid-command
