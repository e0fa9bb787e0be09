"""Hostile pool files, workspaces that cannot be written and full disks (issue 13).

Pool entries that cannot be used (names that are not UTF-8, link loops, broken links, pipes,
empty files) are skipped and listed with the reason, every path of them; a workspace that
cannot be created, opened or locked, or a disk without room for the score files, stops the
command with one line naming the folder and the cause (exit code != 0, nothing written).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import write_config
from medal import uncertainty
from medal.cli import main
from medal.config import load_config
from medal.errors import WorkspaceError
from medal.scan import NOT_AN_IMAGE
from medal.workspace import Workspace
from medal.sources import sync

ROOT = Path(__file__).parents[1]


def skipped_csv(ws: Path) -> dict[str, str]:
    with open(ws / "skipped.csv", newline="", encoding="utf-8") as f:
        return {row["file"]: row["reason"] for row in csv.DictReader(f)}


def one_line_error(argv: list[str], capsys, pattern: str) -> str:
    """Run the CLI; assert exit code != 0 and one error line matching ``pattern``."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0, out
    assert "Traceback" not in err and out == ""
    lines = err.rstrip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"medal {argv[0]}: error: "), err
    assert re.search(pattern, err), err
    return err


# --- pool entries that cannot be used --------------------------------------------------------
def test_pool_file_name_not_utf8_is_skipped_and_listed(tmp_path, tiny_data, capsys):
    pool = os.fsencode(tiny_data["root"] / "pool")
    bad = os.path.join(pool, b"bad\xff.png")
    shutil.copyfile(os.path.join(pool, b"png", b"p01.png"), bad)
    cfg = write_config(tmp_path)
    assert main(["train", "-q", "-c", str(cfg)]) == 0
    assert main(["query", "-q", "-c", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    listed = skipped_csv(tmp_path / "ws")
    shown = os.fsdecode(os.path.join(pool, b"bad")) + "\\xff.png"
    assert "not valid UTF-8" in listed[shown]
    assert main(["status", "-c", str(cfg)]) == 0
    assert "bad\\xff.png: the file name is not valid UTF-8" in capsys.readouterr().out


def odd_entries(pool: Path, elsewhere: Path, loops: bool = True) -> dict[str, str]:
    """Pool entries a scan cannot use, ``{name: reason listed}``."""
    odd = pool / "odd"
    odd.mkdir()
    want = {}
    if loops:
        os.symlink("loop.png", odd / "loop.png")  # a link to itself: ELOOP
        os.symlink(odd / "a.png", odd / "b.png")  # a two-link loop
        os.symlink(odd / "b.png", odd / "a.png")
        want |= dict.fromkeys(["loop.png", "a.png", "b.png"], "a symbolic link loop")
    os.symlink(elsewhere / "gone.png", odd / "dangling.png")
    os.mkfifo(odd / "pipe.png")
    (odd / "empty1.png").write_bytes(b"")
    (odd / "empty2.png").write_bytes(b"")  # the same (empty) content: the same id
    os.symlink(pool / "png", odd / "folder")
    (odd / "notes.txt").write_text("not an image: listed as such")
    return want | {
        "notes.txt": NOT_AN_IMAGE,
        "dangling.png": f"a broken symbolic link (to {elsewhere / 'gone.png'})",
        "pipe.png": "not a regular file (a named pipe/FIFO)",
        "empty1.png": "empty file (0 bytes)",
        "empty2.png": "empty file (0 bytes)",
        "folder": "a symbolic link to a folder; links to folders are not followed",
    }


def test_links_pipes_and_empty_files_are_each_listed(tmp_path, tiny_data, capsys):
    want = odd_entries(tiny_data["root"] / "pool", tmp_path)
    cfg = write_config(tmp_path)
    assert main(["train", "-q", "-c", str(cfg)]) == 0
    capsys.readouterr()
    listed = {Path(p).name: r for p, r in skipped_csv(tmp_path / "ws").items()}
    assert listed == want


def check_status_lists(cfg: Path, want: dict[str, str], capsys) -> None:
    assert main(["status", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"{len(want)} unreadable file(s) skipped" in out
    for name, reason in want.items():
        assert f"odd/{name}: {reason}" in out


def test_status_lists_links_pipes_and_empty_files(tmp_path, tiny_data, capsys):
    want = odd_entries(tiny_data["root"] / "pool", tmp_path, loops=False)
    cfg = write_config(tmp_path)
    with Workspace(load_config(cfg)) as ws:
        sync(ws)
    check_status_lists(cfg, want, capsys)


def test_status_lists_link_loops(tmp_path, tiny_data, capsys):
    want = odd_entries(tiny_data["root"] / "pool", tmp_path)
    cfg = write_config(tmp_path)
    with Workspace(load_config(cfg)) as ws:
        sync(ws)
    check_status_lists(cfg, want, capsys)


def test_a_fixed_file_leaves_the_list(tmp_path, tiny_data, capsys):
    pool = tiny_data["root"] / "pool"
    os.symlink(tmp_path / "gone.png", pool / "dangling.png")
    cfg = write_config(tmp_path)
    ws = Workspace(load_config(cfg))
    with ws:
        assert [Path(p).name for p in sync(ws).skipped] == ["dangling.png"]
    (pool / "dangling.png").unlink()
    with ws:
        assert sync(ws).skipped == {}
        assert ws.db.skipped() == {}
    assert skipped_csv(tmp_path / "ws") == {}


# --- workspaces that cannot be created, opened or locked -------------------------------------
def config_with_workspace(tmp_path: Path, workspace: Path | str) -> Path:
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace('workspace = "ws"', f'workspace = "{workspace}"'))
    return cfg


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every file under ``folder`` with its bytes (``.lock`` only by name)."""
    return {
        p.relative_to(folder).as_posix(): "dir"
        if p.is_dir()
        else "lock"
        if p.name == ".lock"
        else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def read_only():
    """Makes a folder read-only even for root: ``chattr +i`` (immutable) as root, else
    ``chmod 555``. Skips where neither stops a write (e.g. a file system without chattr)."""
    undo = []

    def make(folder: Path) -> None:
        if os.geteuid() == 0:
            if (
                shutil.which("chattr") is None
                or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode
                != 0
            ):
                pytest.skip("running as root and 'chattr +i' is not available here")
            undo.append(lambda: subprocess.run(["chattr", "-i", str(folder)], check=True))
        else:
            folder.chmod(0o555)
            undo.append(lambda: folder.chmod(0o755))
        probe = folder / ".probe"
        try:
            probe.write_bytes(b"")
        except OSError:
            return
        probe.unlink()
        pytest.skip(f"could not make {folder} read-only")

    yield make
    for fn in reversed(undo):
        fn()


def test_workspace_below_a_file(tmp_path, tiny_data, capsys):
    (tmp_path / "runs").write_text("a file, not a folder\n")
    cfg = config_with_workspace(tmp_path, "runs/ws")
    one_line_error(
        ["train", "-q", "-c", str(cfg)],
        capsys,
        r"cannot create workspace .*runs/ws: .*runs is a file, not a folder",
    )
    assert (tmp_path / "runs").read_text() == "a file, not a folder\n"


def test_workspace_where_no_folder_can_be_made(tmp_path, tiny_data, capsys):
    cfg = config_with_workspace(tmp_path, "/proc/medal-ws")
    one_line_error(
        ["train", "-q", "-c", str(cfg)], capsys, r"cannot create workspace /proc/medal-ws: "
    )


def test_new_workspace_in_a_read_only_folder(tmp_path, tiny_data, capsys, read_only):
    (tmp_path / "ws").mkdir()
    read_only(tmp_path / "ws")
    cfg = write_config(tmp_path)
    one_line_error(
        ["train", "-q", "-c", str(cfg)],
        capsys,
        r"workspace .*ws is read-only \(cannot create the lock file \.lock: ",
    )
    assert tree(tmp_path / "ws") == {}


@pytest.mark.parametrize("command", ["train", "status"])
def test_existing_workspace_made_read_only(tmp_path, tiny_data, capsys, read_only, command):
    cfg = write_config(tmp_path)
    with Workspace(load_config(cfg)) as ws:
        sync(ws)
    before = tree(tmp_path / "ws")
    read_only(tmp_path / "ws")
    one_line_error(
        [command, "-c", str(cfg)],
        capsys,
        r"workspace .*ws is read-only \(cannot open the ledger ledger\.sqlite: "
        r"unable to open database file\)",
    )
    assert tree(tmp_path / "ws") == before


# --- the lock names its holder -----------------------------------------------------------------
HOLD = textwrap.dedent("""
    import fcntl, os, sys, time
    from pathlib import Path
    ws = Path(sys.argv[1])
    if sys.argv[2] == "workspace":  # a medal command holding the workspace
        from medal.config import load_config
        from medal.workspace import Workspace
        held = Workspace(load_config(Path(sys.argv[3]))).__enter__()
    else:  # the moment between taking the lock and writing the pid into it
        ws.mkdir(exist_ok=True)
        fd = os.open(ws / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if sys.argv[2] == "stale":
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"999999", 0)  # an earlier holder's pid, not yet overwritten
    print("held", flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("how", ["workspace", "empty", "stale"])
def test_lock_message_names_the_holder(tmp_path, tiny_data, capsys, how):
    cfg = write_config(tmp_path)
    ws = tmp_path / "ws"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(ws), how, str(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline() == "held\n"
        one_line_error(
            ["train", "-q", "-c", str(cfg)],
            capsys,
            rf"workspace .*ws is in use by another medal command "
            rf"\(pid {holder.pid}\); wait for it",
        )
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


# --- a full disk ---------------------------------------------------------------------------------
def fake_free(monkeypatch, free: int) -> None:
    real = shutil.disk_usage

    def disk_usage(path):
        u = real(path)
        return type(u)(u.total, u.total - free, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_no_space_for_score_files(tmp_path, tiny_data, capsys, monkeypatch):
    cfg = write_config(tmp_path)
    assert main(["train", "-q", "-c", str(cfg)]) == 0
    capsys.readouterr()
    ws = tmp_path / "ws"
    before = tree(ws)
    fake_free(monkeypatch, 1000)
    one_line_error(
        ["query", "-q", "-c", str(cfg)],
        capsys,
        r"no space left on .*ws/scores/round-001: 0\.\d\d MB needed, 0\.00 MB free",
    )
    assert tree(ws) == before


def test_free_space_check_sizes(tmp_path, monkeypatch):
    fake_free(monkeypatch, 500_000_000)
    out = tmp_path / "scores" / "round-001"
    with pytest.raises(
        WorkspaceError,
        match=rf"no space left on {re.escape(str(out))}: "
        r"1080 MB needed, 500 MB free",
    ):
        # 1M images: probs 1e6 x 20 x 2 and features 1e6 x 500 in float16
        uncertainty.ScoreCollector(1_000_000, 20, 2, 500, out, None)
    assert list(tmp_path.iterdir()) == []
    sink = uncertainty.ScoreCollector(1000, 20, 2, 500, out, None)  # 1.08 MB fits
    assert sink.probs.shape == (1000, 20, 2) and sink.feats.shape == (1000, 500)
    # blocks are reserved on disk (no sparse file to fill later)
    assert os.stat(out / "features.tmp.npy").st_blocks * 512 >= 1000 * 500 * 2


def test_disk_filling_while_reserving(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "scores"
    with pytest.raises(
        WorkspaceError,
        match=rf"no space left on {re.escape(str(out))}: "
        r"\d\.\d\d MB needed for probs\.tmp\.npy",
    ):
        uncertainty.ScoreCollector(1000, 20, 2, 500, out, None)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("where", ["pool", "labelled"])
def test_identical_unreadable_copies_are_each_listed(tmp_path, tiny_data, capsys, where):
    """Two byte-identical corrupt files share one content id; the decode failure is found
    once, but both paths are listed."""
    folder = tiny_data["root"] / ("pool/png" if where == "pool" else "labelled/normal")
    corrupt = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40  # a PNG signature, then nothing decodable
    (folder / "bad1.png").write_bytes(corrupt)
    (folder / "bad2.png").write_bytes(corrupt)
    cfg = write_config(tmp_path)
    assert main(["train", "-q", "-c", str(cfg)]) == 0
    if where == "pool":
        assert main(["query", "-q", "-c", str(cfg)]) == 0
    capsys.readouterr()
    listed = {Path(p).name: r for p, r in skipped_csv(tmp_path / "ws").items()}
    assert set(listed) == {"bad1.png", "bad2.png"}, listed
    assert listed["bad1.png"] == listed["bad2.png"]
    assert main(["status", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "2 unreadable file(s) skipped" in out


# --- a disk that fills while the ledger or a checkpoint is written ---------------------------
FILL = textwrap.dedent("""
    import contextlib, csv, io, json, os, resource, signal, sqlite3, subprocess, sys
    from pathlib import Path
    from medal.cli import main

    how, room, ws, plan = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
    if how == "tmpfs":  # a real, small file system of its own (in a private mount namespace)
        ws.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(ws)], check=True)

    def ledger():
        if not (ws / "ledger.sqlite").exists():
            return {}
        db = sqlite3.connect(ws / "ledger.sqlite")
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        dump = {t: sorted(map(repr, db.execute(f"SELECT * FROM {t}"))) for t in tables}
        db.close()
        return dump

    for step in plan["before"]:
        if step[0] == "fill-labels":  # the radiologist labels every image 'normal'
            path = Path(step[1]) / "labels.csv"
            rows = list(csv.reader(path.open()))
            with path.open("w", newline="") as f:
                csv.writer(f).writerows([rows[0], *[[r[0], "normal"] for r in rows[1:]]])
        else:
            assert main(step) == 0, step
    before = ledger()
    if how == "tmpfs":  # fill the disk, leaving `room` bytes
        with open(ws / "filler", "wb") as f:
            free = os.statvfs(ws).f_bavail * os.statvfs(ws).f_frsize
            f.write(bytes(max(free - room, 0)))
    else:  # writes past `room` bytes of any one file fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, hard))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(plan["command"])
    if how == "tmpfs":
        (ws / "filler").unlink()
    else:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    files = sorted(str(p.relative_to(ws)) for p in ws.rglob("*") if p.name != "filler")
    after = ledger()
    print(json.dumps({"code": code, "stderr": err.getvalue(), "same_ledger": after == before,
                      "models": len(after.get("models", [])), "files": files}))
""")


def tmpfs_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return (
        subprocess.run(
            ["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
            capture_output=True,
        ).returncode
        == 0
    )


@pytest.fixture(params=["tmpfs", "fsize"])
def fill_disk(request, tmp_path):
    """Runs medal commands in a subprocess, then one more on a disk without room; returns what
    it saw. Two stand-ins for a full disk, neither needing root:

    - ``tmpfs``: the workspace is a 16 MB tmpfs mounted in a private user and mount namespace
      (``unshare -Urm``), filled with a file until ``room`` bytes are left; writes fail with
      ENOSPC, as on a full disk. Skipped where unprivileged namespaces are not allowed.
    - ``fsize``: ``RLIMIT_FSIZE`` = ``room`` bytes (SIGXFSZ ignored), so a write past that size
      of any file fails with EFBIG. The same failing ``write`` at the same point as ENOSPC,
      only another errno; SQLite reports it as "disk I/O error" instead of "database or disk
      is full". Works wherever setrlimit does.
    """
    how = request.param
    if how == "tmpfs" and not tmpfs_works():
        pytest.skip("unprivileged user and mount namespaces (unshare -Urm) are not available")

    def run(before: list[list[str]], command: list[str], room: dict[str, int]) -> dict:
        argv = [
            sys.executable,
            "-c",
            FILL,
            how,
            str(room[how]),
            str(tmp_path / "ws"),
            json.dumps({"before": before, "command": command}),
        ]
        if how == "tmpfs":
            argv = ["unshare", "-Urm", *argv]
        p = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=600,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.splitlines()[-1])

    run.how = how
    return run


def check_no_space(seen: dict, command: str) -> None:
    assert seen["code"] == 2, seen
    lines = seen["stderr"].rstrip("\n").splitlines()
    assert len(lines) == 1 and "Traceback" not in seen["stderr"], seen["stderr"]
    assert re.match(rf"medal {command}: error: no space left on \S*ws\b", lines[0]), lines[0]
    assert not [f for f in seen["files"] if f.endswith(".tmp") or ".tmp." in f], seen["files"]


FAST = ["--set", "train.epochs=1", "--set", "train.min_steps=1", "--set", "image.cache=false"]


def test_disk_full_while_writing_the_checkpoint(tiny_data, fill_disk):
    cfg = "medal.toml"
    write_config(tiny_data["root"].parent)
    seen = fill_disk([], ["train", "-q", "-c", cfg, *FAST], {"tmpfs": 250_000, "fsize": 200_000})
    check_no_space(seen, "train")
    assert seen["models"] == 0  # the images train found are recorded; no model
    assert "checkpoints/round-000.pt" not in seen["files"]
    assert re.search(r"writing round-000\.pt failed", seen["stderr"]), seen["stderr"]


def test_disk_full_while_writing_the_ledger(tiny_data, fill_disk):
    cfg = "medal.toml"
    write_config(tiny_data["root"].parent)
    folder = str(tiny_data["root"].parent / "ws" / "labelling" / "round-001")
    seen = fill_disk(
        [
            ["train", "-q", "-c", cfg, *FAST],
            ["query", "-q", "-c", cfg, *FAST],
            ["fill-labels", folder],
        ],
        ["ingest", "-c", cfg, folder],
        {"tmpfs": 0, "fsize": 4096},
    )
    check_no_space(seen, "ingest")
    assert seen["same_ledger"]
    # SQLite says "database or disk is full" or "disk I/O error", depending on the call that
    # failed (and on the errno: EFBIG is always an I/O error to it)
    assert re.search(
        r"writing ledger\.sqlite failed: SQLite: (database or disk is full|disk "
        r"I/O error)",
        seen["stderr"],
    ), seen["stderr"]


# --- memory: refuse what cannot fit instead of being killed -----------------------------------
def test_training_that_cannot_fit_in_memory_is_refused(tmp_path, tiny_data, capsys, monkeypatch):
    """model.image_size = 2048 was killed by the kernel at ~22 GB; with 8 GB available it is
    refused before any image is loaded, naming the keys and sizes that fit."""
    from medal import resources

    monkeypatch.setattr(resources, "available_memory", lambda: 8_000_000_000)
    cfg = write_config(tmp_path)
    one_line_error(
        ["train", "-q", "-c", str(cfg), "--set", "model.image_size=2048"],
        capsys,
        r"not enough memory to train: about \d+\.\d GB needed, 8\.0 GB available "
        r"\(model\.image_size = 2048: 24 images .* train\.batch_size = 8 through "
        r"small_cnn .*\); set model\.image_size = \d+ \(MEDAL_MEMORY_CHECK=off",
    )
    assert not (tmp_path / "ws" / "checkpoints").exists()
    # a batch size that fits is suggested when the batch is what does not fit
    # (24 images: 8 labelled less 0 held out, and the 16 of data.validation)
    monkeypatch.setattr(resources, "available_memory", lambda: 60_000_000_000)
    err = one_line_error(
        [
            "train",
            "-q",
            "-c",
            str(cfg),
            "--set",
            "model.image_size=1024",
            "--set",
            "train.batch_size=128",
        ],
        capsys,
        r"train\.batch_size = \d+ or "
        r"model\.image_size = \d+",
    )
    batch = int(re.search(r"set train\.batch_size = (\d+)", err).group(1))
    monkeypatch.setenv("MEDAL_MEMORY_CHECK", "off")
    assert (
        resources.check_training_memory(
            load_config(cfg, {"model.image_size": 1024, "train.batch_size": 128}),
            32,
            16,
            __import__("torch").device("cpu"),
        )
        is None
    )
    monkeypatch.delenv("MEDAL_MEMORY_CHECK")
    resources.check_training_memory(
        load_config(cfg, {"model.image_size": 1024, "train.batch_size": batch}),
        32,
        16,
        __import__("torch").device("cpu"),
    )  # fits: no error


def test_available_memory_reads_meminfo():
    from medal import resources

    free = resources.available_memory()
    if not Path("/proc/meminfo").exists():
        assert free is None
    else:
        assert free is not None and free > 0
