"""Crash safety, for real: `medal ingest` and `medal round` run in a process of their own that
kills itself with SIGKILL at each named crash point (:mod:`medal.faults`, the one list of points);
after each kill the ledger must be consistent, no label lost or duplicated, and running the
command again must finish the job.

Every point must be reached: a point renamed or no longer called lets the command exit
normally, and the test fails."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from medal import api
from medal.cli import main
from medal.config import Config, load_config
from medal.faults import ENV, INGEST_POINTS, POINTS, ROUND_POINTS, crash_point
from medal.workspace import Workspace

from conftest import write_config, write_tiny_data

ROOT = Path(__file__).parents[1]


@dataclass(frozen=True)
class Prepared:
    """A workspace after training and a query whose round-001 folder is filled in
    (``exported``), and the same after ``medal ingest`` (``ingested``); both are copies of
    ``cfg.workspace`` to put back before each kill."""

    cfg: Config
    folder: Path
    n: int
    exported: Path
    ingested: Path


def fill(folder: Path) -> int:
    with open(folder / "labels.csv", newline="") as f:
        names = [r["file"] for r in csv.DictReader(f)]
    with open(folder / "labels.csv", "w", newline="") as f:
        f.write(
            "file,label\n"
            + "".join(f"{n},{'normal' if i % 2 else 'pneumonia'}\n" for i, n in enumerate(names))
        )
    return len(names)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """Trained, queried and labelled once for the module (the tests put the workspace back
    from the copies, so each starts from the same state)."""
    root = tmp_path_factory.mktemp("crash")
    write_tiny_data(root)
    cfg = load_config(write_config(root))
    api.train(cfg, progress=False)
    folder = api.query(cfg, progress=False).folder
    n = fill(folder)
    shutil.copytree(cfg.workspace, root / "exported")
    assert main(["ingest", "-c", str(cfg.path), "-q", str(folder)]) == 0
    shutil.copytree(cfg.workspace, root / "ingested")
    return Prepared(cfg, folder, n, root / "exported", root / "ingested")


def restore(cfg: Config, snapshot: Path) -> None:
    shutil.rmtree(cfg.workspace)
    shutil.copytree(snapshot, cfg.workspace)


# A real process per kill, started quickly: this driver imports medal (torch and all) once,
# then for each request forks a child that runs `medal <args>` with MEDAL_CRASH_AT=<point> in
# a fresh fork (the driver itself never runs torch), its output going to a log file, and
# replies with how the child ended. The import, not the command, is most of a `medal`
# process's time (about 4.5 s of CPU against 0.5 s for `medal round` on the tiny data).
DRIVER = """
import json, os, sys
import medal.api
from medal.cli import main
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ[req["env"]] = req["point"]
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        try:
            code = main(req["args"])
        except BaseException as e:
            print(repr(e), flush=True)
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps([os.WIFSIGNALED(status) and os.WTERMSIG(status), os.WIFEXITED(status)
                      and os.WEXITSTATUS(status)]), flush=True)
"""


@pytest.fixture(scope="module")
def driver() -> Iterator[subprocess.Popen]:
    if not hasattr(os, "fork"):
        pytest.skip("the crash tests fork their medal processes (POSIX only)")
    p = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    yield p
    p.stdin.close()
    p.wait(timeout=60)


def killed_at(driver: subprocess.Popen, point: str, args: list[str], log: Path) -> None:
    """Run ``medal *args`` in a real process armed to SIGKILL itself at ``point``; the
    process must die there (a point never reached lets it finish)."""
    req = {"env": ENV, "point": point, "args": args, "log": str(log)}
    driver.stdin.write(json.dumps(req) + "\n")
    driver.stdin.flush()
    reply = driver.stdout.readline()
    assert reply, f"the crash-test driver ended (exit code {driver.poll()}); see its stderr"
    sig, code = json.loads(reply)
    assert sig == signal.SIGKILL, (
        f"{point} was not reached: exit code {code}\n{log.read_text(errors='replace')}"
    )


def integrity(ws_root: Path) -> None:
    db = sqlite3.connect(ws_root / "ledger.sqlite")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        db.close()


def after(points: tuple[str, ...], point: str, commit: str) -> bool:
    """Whether ``point`` comes after the transaction whose last point is ``commit``."""
    return points.index(point) > points.index(commit)


@pytest.mark.parametrize("point", INGEST_POINTS)
def test_ingest_killed_at_each_point_loses_and_duplicates_nothing(
    prepared, driver, point, tmp_path
):
    cfg, folder, n = prepared.cfg, prepared.folder, prepared.n
    restore(cfg, prepared.exported)
    args = ["ingest", "-c", str(cfg.path), "-q", str(folder)]
    killed_at(driver, point, args, tmp_path / "medal.log")
    integrity(cfg.workspace)
    with Workspace(cfg) as ws:
        rows = ws.db.labels(1)
        done = ws.db.round(1).ingested_at is not None
    assert (done and len(rows) == n) or (not done and rows == []), (done, len(rows))
    assert done == after(INGEST_POINTS, point, "ledger.ingest_before_commit")
    assert main(args) == 0  # running it again finishes the job
    with Workspace(cfg) as ws:
        rows = ws.db.labels(1)
        assert ws.db.round(1).ingested_at is not None
    assert len(rows) == n and len({r.image_id for r in rows}) == n


def check_recovered(ws: Workspace, n: int) -> None:
    """What a workspace opened after a killed round must hold, whatever the point."""
    assert not list(ws.labelling_dir.glob(".round-*"))  # opening finished or undid the export
    for r in ws.db.rounds():
        assert ws.round_dir(r.round).is_dir()
        sel = ws.db.selections(r.round)
        with open(ws.round_dir(r.round) / "labels.csv", newline="") as f:
            assert [x["file"] for x in csv.DictReader(f)] == [s.file for s in sel]
    assert len(ws.db.labels(1)) == n  # earlier labels untouched


@pytest.mark.parametrize("point", ROUND_POINTS)
def test_round_killed_at_each_point_recovers(prepared, driver, point, tmp_path):
    cfg, n = prepared.cfg, prepared.n
    restore(cfg, prepared.ingested)
    args = ["round", "-c", str(cfg.path), "-q"]
    killed_at(driver, point, args, tmp_path / "medal.log")
    integrity(cfg.workspace)
    with Workspace(cfg) as ws:  # opening recovers an interrupted export
        check_recovered(ws, n)
        models = {m.round for m in ws.db.models()}
        finished = ws.db.round(2) is not None
    assert models == ({0, 1} if after(ROUND_POINTS, point, "ledger.model_before_commit") else {0})
    assert finished == after(ROUND_POINTS, point, "ledger.round_before_commit")
    if not finished:
        assert main(args) == 0  # the round completes when run again
    with Workspace(cfg) as ws:
        check_recovered(ws, n)
        assert [r.round for r in ws.db.rounds()] == [1, 2]
        assert {m.round for m in ws.db.models()} == {0, 1}


def test_crash_point_does_nothing_unless_armed_with_its_name(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    for point in POINTS:
        crash_point(point)  # unarmed: returns
    monkeypatch.setenv(ENV, INGEST_POINTS[0])
    crash_point(ROUND_POINTS[0])  # armed for another point: returns


def test_crash_point_refuses_unknown_names(monkeypatch):
    monkeypatch.setenv(ENV, "ledger.befor_commit")
    with pytest.raises(ValueError, match=r"MEDAL_CRASH_AT: 'ledger.befor_commit' .*valid: "):
        crash_point(POINTS[0])
    monkeypatch.setenv(ENV, POINTS[0])
    with pytest.raises(ValueError, match=r"crash_point\(\): 'renamed.point' is not a crash"):
        crash_point("renamed.point")


def test_each_crash_point_is_called_once_in_the_package():
    called = [
        m
        for path in sorted((ROOT / "medal").rglob("*.py"))
        for m in re.findall(r'crash_point\("([^"]+)"\)', path.read_text(encoding="utf-8"))
    ]
    assert sorted(called) == sorted(POINTS)
