"""The labelling page under concurrency and after ingest (issue 26): real server processes
(``python -m medal labels serve``), concurrent saves from threads, a real ``medal ingest``
while a server runs, and a killed process holding the labels file's lock."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from test_serve import REPO, exported, read_labels, request, start_server


def _base_token(url: str) -> tuple[str, str]:
    base, token = url.split("/?token=")
    return base, token


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=60)


def test_two_servers_on_one_round_lose_no_save(tiny_config):
    """Two server processes on one folder, 80 concurrent saves (a label through one server, a
    comment through the other, for each of 40 images): every one is in labels.csv."""
    folder = exported(tiny_config, n=40)
    files = [r["file"] for r in read_labels(folder / "labels.csv")]
    assert len(files) == 40
    a, url_a = start_server(["serve", str(folder)])
    b, url_b = start_server(["serve", str(folder)])
    try:
        (base_a, tok_a), (base_b, tok_b) = _base_token(url_a), _base_token(url_b)
        classes = ("normal", "pneumonia")
        jobs = [(base_a, tok_a, {"file": f, "label": classes[i % 2]}) for i, f in enumerate(files)]
        jobs += [(base_b, tok_b, {"file": f, "comment": f"note {i}"}) for i, f in enumerate(files)]
        jobs = [j for pair in zip(jobs[:40], jobs[40:]) for j in pair]  # interleaved
        with ThreadPoolExecutor(16) as pool:
            answers = list(
                pool.map(lambda j: request(j[0] + "/api/label", token=j[1], body=j[2])[0], jobs)
            )
        assert answers == [200] * 80
    finally:
        _stop(a, b)
    rows = read_labels(folder / "labels.csv")
    assert sorted(r["file"] for r in rows) == sorted(files)  # one row per image, none repeated
    got = {r["file"]: (r["label"], r["comment"]) for r in rows}
    assert got == {f: (classes[i % 2], f"note {i}") for i, f in enumerate(files)}


def test_a_stale_tab_learns_it_and_gets_the_other_tabs_labels(tiny_config):
    """Two tabs of one server (and so of two servers): a save carries the version the tab
    last saw; when another save came in between, the answer says so and brings all labels."""
    folder = exported(tiny_config, n=3)
    files = [r["file"] for r in read_labels(folder / "labels.csv")]
    proc, url = start_server(["serve", str(folder)])
    try:
        base, token = _base_token(url)
        v0 = json.loads(request(base + "/api/state", token=token)[1])["version"]
        # tab 1 and tab 2 both loaded the page at v0
        s, body, _ = request(
            base + "/api/label",
            token=token,
            body={"file": files[0], "label": "normal", "version": v0},
        )
        one = json.loads(body)
        assert s == 200 and "stale" not in one and one["version"] != v0
        s, body, _ = request(
            base + "/api/label",
            token=token,
            body={"file": files[1], "label": "pneumonia", "version": v0},
        )
        two = json.loads(body)
        assert s == 200 and two["stale"] is True
        assert two["labels"][files[0]] == {"label": "normal", "comment": ""}  # tab 1's
        assert two["labels"][files[1]] == {"label": "pneumonia", "comment": ""}
        # tab 1 saves again with the version it knows: it learns of tab 2's save too
        s, body, _ = request(
            base + "/api/label",
            token=token,
            body={"file": files[2], "label": "unsure", "version": one["version"]},
        )
        three = json.loads(body)
        assert three["stale"] is True and three["labels"][files[1]]["label"] == "pneumonia"
        state = json.loads(request(base + "/api/state", token=token)[1])
        assert state["version"] == three["version"]
    finally:
        _stop(proc)
    assert [r["label"] for r in read_labels(folder / "labels.csv")] == [
        "normal",
        "pneumonia",
        "unsure",
    ]


HOLD_LOCK = """
import sys, time
from medal.serve import RoundBook
book = RoundBook(sys.argv[1])
with book.locked():
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_lock_holds_across_processes_and_a_killed_holder_does_not_block(tiny_config):
    folder = exported(tiny_config, n=2)
    files = [r["file"] for r in read_labels(folder / "labels.csv")]
    proc, url = start_server(["serve", str(folder)])
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD_LOCK), str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        base, token = _base_token(url)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                request,
                base + "/api/label",
                token=token,
                body={"file": files[0], "label": "normal"},
            )
            time.sleep(1.0)
            assert not pending.done()  # waits for the other process's save
            assert read_labels(folder / "labels.csv")[0]["label"] == ""
            holder.kill()  # a killed process: the OS drops its lock
            holder.wait(timeout=30)
            assert pending.result(timeout=30)[0] == 200
        assert read_labels(folder / "labels.csv")[0]["label"] == "normal"
    finally:
        holder.kill()
        _stop(proc)


def test_saves_after_ingest_are_refused_and_the_page_says_so(tiny_config):
    """A round ingested while its server runs: the next save answers 409 and changes nothing;
    the state says read-only at once, also for a server started after the ingest."""
    from medal.cli import main

    folder = exported(tiny_config, n=3)
    files = [r["file"] for r in read_labels(folder / "labels.csv")]
    proc, url = start_server(["serve", str(folder)])
    try:
        base, token = _base_token(url)
        state = json.loads(request(base + "/api/state", token=token)[1])
        assert state["read_only"] is None
        assert (
            request(
                base + "/api/label", token=token, body={"file": files[0], "label": "pneumonia"}
            )[0]
            == 200
        )
        assert main(["ingest", "-c", str(tiny_config.path), "-q", str(folder)]) == 0
        before = (folder / "labels.csv").read_bytes()
        for body in ({"file": files[1], "label": "normal"}, {"file": files[0], "comment": "x"}):
            status, answer, _ = request(base + "/api/label", token=token, body=body)
            assert status == 409
            assert "round 001 was ingested on" in json.loads(answer)["error"]
        assert (folder / "labels.csv").read_bytes() == before
        state = json.loads(request(base + "/api/state", token=token)[1])
        assert state["read_only"].startswith("round 001 was ingested on")
    finally:
        _stop(proc)
    # served again, with the config: read-only from the first request, and the terminal says so
    proc, url = start_server(["serve", str(folder), "-c", str(tiny_config.path)])
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("  note: round 001 was ingested on")
        base, token = _base_token(url)
        state = json.loads(request(base + "/api/state", token=token)[1])
        assert "this page is read-only" in state["read_only"]
        assert state["ingest_command"] == f"medal ingest -c {tiny_config.path} {folder}"
        assert (
            request(base + "/api/label", token=token, body={"file": files[2], "label": "normal"})[0]
            == 409
        )
    finally:
        _stop(proc)
    assert (folder / "labels.csv").read_bytes() == before


def test_a_bad_body_is_a_400_with_one_line(tiny_config):
    import urllib.request

    from test_serve import NO_PROXY

    folder = exported(tiny_config, n=2)
    proc, url = start_server(["serve", str(folder)])
    try:
        base, token = _base_token(url)
        for raw, reason in (
            (b"[" * 100_000, "at most 65536 are taken"),
            (b"[" * 30_000, "nested too deeply"),
            (b"{", "not JSON"),
            (b'{"file": 3}', "as strings"),
        ):
            req = urllib.request.Request(
                base + "/api/label",
                data=raw,
                headers={"X-Medal-Token": token, "Content-Type": "application/json"},
            )
            try:
                NO_PROXY.open(req, timeout=30)
                raise AssertionError("accepted")
            except urllib.error.HTTPError as e:
                error = json.loads(e.read())["error"]
                assert e.code == 400 and reason in error and "\n" not in error, (e.code, error)
        assert request(base + "/api/state", token=token)[0] == 200  # still serving
    finally:
        _stop(proc)
    assert Path(folder / "labels.csv").is_file()


def test_ingest_reads_under_the_pages_lock_and_no_save_slips_in_after(
    tiny_config, monkeypatch, capsys
):
    """Ingest reads and records the labels files under the page's lock: while another process
    holds it (a save half-way), `medal ingest` waits (here, for a shortened limit, then stops
    with one line and records nothing) instead of reading a file about to change; once it has
    recorded, a save through the page is refused, so the ledger and labels.csv agree."""
    import medal.roundfolder
    from medal.cli import main
    from medal.roundfolder import write_labels

    folder = exported(tiny_config, n=2)
    files = [r["file"] for r in read_labels(folder / "labels.csv")]
    write_labels(folder, [(f, "pneumonia") for f in files])
    monkeypatch.setattr(medal.roundfolder, "LOCK_TIMEOUT", 1.0)
    ledger = tiny_config.workspace / "ledger.sqlite"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD_LOCK), str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = ledger.read_bytes()
        capsys.readouterr()
        assert main(["ingest", "-c", str(tiny_config.path), "-q", str(folder)]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "labels.csv: locked for over 1 s" in err[0], err
        assert ledger.read_bytes() == before
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert main(["ingest", "-c", str(tiny_config.path), "-q", str(folder)]) == 0
    proc, url = start_server(["serve", str(folder)])
    try:
        base, token = _base_token(url)
        assert (
            request(base + "/api/label", token=token, body={"file": files[0], "label": "normal"})[0]
            == 409
        )
    finally:
        _stop(proc)
