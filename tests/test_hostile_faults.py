"""Hostile settings, files and faults (issue 26).

Each attack here was once a traceback, a hang, a write through a link or a silent wrong
outcome. Each refusal must give an exit code != 0, ONE error line naming the key or file and
what would be valid, and leave the workspace byte-identical: every file under it is hashed
before and after (links by their target; ``.lock`` by name only, since every command that takes
the lock writes its own pid into it, by design).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_image, save, write_config

from medal.cli import main
from medal.config import load_config
from medal.workspace import Workspace
from medal.sources import sync

ROOT = Path(__file__).parents[1]


def workspace_hashes(ws: Path) -> dict[str, str]:
    """SHA-256 of every file under ``ws``; links by their target, folders by type."""
    out: dict[str, str] = {}
    for p in sorted(ws.rglob("*")):
        key = p.relative_to(ws).as_posix()
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[key] = "dir"
        elif p.name == ".lock":
            out[key] = "lock"
        else:
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(argv: list[str], capsys, ws: Path, pattern: str) -> str:
    """Run the CLI in-process; assert exit code != 0, one error line matching ``pattern``
    and an unchanged workspace; return the line."""
    before = workspace_hashes(ws)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0, out
    assert out == "" and "Traceback" not in err, err
    lines = err.rstrip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"medal {argv[0]}: error: "), err
    assert re.search(pattern, lines[0]), err
    assert workspace_hashes(ws) == before
    return lines[0]


@pytest.fixture
def workspace(tmp_path, tiny_data) -> tuple[Path, Path]:
    """A config and its workspace with a ledger (the pool scanned, nothing trained)."""
    cfg = write_config(tmp_path)
    with Workspace(load_config(cfg)) as ws:
        sync(ws)
    return cfg, tmp_path / "ws"


# --- config values that were tracebacks, hangs or NaN models ----------------------------------
@pytest.mark.parametrize(
    "setting, pattern",
    [
        ("train.lr=inf", r"'train\.lr' must be a finite number, got inf"),
        ("train.lr=nan", r"'train\.lr' must be a finite number, got nan"),
        ("train.weight_decay=inf", r"'train\.weight_decay' must be a finite number"),
        ("train.probe_lr=inf", r"'train\.probe_lr' must be a finite number"),
        ("representation.temperature=inf", r"'representation\.temperature' must be a finite"),
        ("representation.lr=inf", r"'representation\.lr' must be a finite number"),
        ("image.window=[0, inf]", r"'image\.window' must be .*\[center, width\] of finite numbers"),
        ("image.window=[nan, 400]", r"'image\.window' must be .*\[center, width\] of finite"),
        (
            "seed=9223372036854775807",
            r"'seed' must be between 0 and 4294967295 \(2\*\*32 - 1\), "
            r"got 9223372036854775807",
        ),
        ("seed=-1", r"'seed' must be between 0 and 4294967295"),
        ("representation.seed=4294967296", r"'representation\.seed' must be between 0 and "),
        (
            "num_workers=1000000",
            r"'num_workers' must be between 0 and \d+ \(the CPUs this machine "
            r"gives medal.*got 1000000",
        ),
        ('workspace="ws\\u0000x"', r"'workspace' contains a NUL character"),
        ('data.pool="pool\\u0000"', r"'data\.pool' contains a NUL character"),
        ('model.pretrained="w\\u0000.pt"', r"'model\.pretrained' contains a NUL character"),
    ],
)
@pytest.mark.parametrize("command", ["train", "query", "status"])
def test_hostile_setting_is_one_line_naming_the_key(workspace, capsys, setting, pattern, command):
    cfg, ws = workspace
    refused(
        [command, "-q", "-c", str(cfg), "--set", setting], capsys, ws, rf"medal\.toml: {pattern}"
    )


def test_path_through_a_link_loop_is_one_line(workspace, tmp_path, capsys):
    cfg, ws = workspace
    os.symlink("loop", tmp_path / "loop")
    refused(
        ["status", "-c", str(cfg), "--set", 'data.pool="loop/pool"'],
        capsys,
        ws,
        r"'data\.pool': cannot resolve the path 'loop/pool': Symlink loop",
    )


@pytest.mark.parametrize(
    "classes, pattern",
    [
        (["normal", "CONIN$"], r"'CONIN\$' cannot be a class name: a reserved device name"),
        (["normal", "conout$"], r"'conout\$' cannot be a class name: a reserved device name"),
        (["normal", "COM0"], r"'COM0' cannot be a class name: a reserved device name"),
        (["normal", "lpt0.txt"], r"'lpt0\.txt' cannot be a class name: a reserved device name"),
        (
            ["caf\u00e9", "cafe\u0301"],
            r"'classes' has duplicates \(ignoring case and Unicode "
            r"normalisation, NFC/NFD\): 'caf\\xe9', 'cafe\\u0301'",
        ),
        (["Caf\u00e9", "cafe\u0301"], r"'classes' has duplicates"),
        (
            ["normal", "pneu\u202emonia"],
            r"'pneu\\u202emonia' cannot be a class name: contains "
            r"'\\u202e' \(RIGHT-TO-LEFT OVERRIDE\)",
        ),
        (["normal", "pneu\u2066monia"], r"contains '\\u2066' \(LEFT-TO-RIGHT ISOLATE\)"),
        (["normal", "normal\u200b"], r"contains '\\u200b' \(ZERO WIDTH SPACE\)"),
        (["normal", "nor\u200dmal"], r"contains '\\u200d' \(ZERO WIDTH JOINER\)"),
        (["normal", "\ufeffpneumonia"], r"contains '\\ufeff' \(ZERO WIDTH NO-BREAK SPACE\)"),
        (["normal", "a\u2028b"], r"contains '\\u2028' \(LINE SEPARATOR\), a line separator"),
    ],
)
def test_class_names_that_hide_or_alias_are_refused(workspace, capsys, classes, pattern):
    cfg, ws = workspace
    text = cfg.read_text().replace(
        'classes = ["normal", "pneumonia"]', f"classes = {json.dumps(classes)}"
    )
    cfg.write_text(text)
    line = refused(["train", "-q", "-c", str(cfg)], capsys, ws, pattern)
    assert line.isascii()  # the bidi character itself never reaches the terminal


@pytest.mark.parametrize("name", ["COM10", "conin", "pneumonia\u00e9", "\u0645\u0631\u064a\u0636"])
def test_near_miss_class_names_are_kept(tmp_path, name):
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace('"pneumonia"', json.dumps(name)))
    assert load_config(cfg).classes == ("normal", name)


# --- the workspace lock -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "hard link"])
def test_lock_that_is_a_link_is_refused_and_its_target_untouched(workspace, tmp_path, capsys, kind):
    """A ``.lock`` planted as a link to another file made any medal command overwrite that file
    with its pid (and truncate it): the link is refused and the file keeps its bytes."""
    cfg, ws = workspace
    victim = tmp_path / "victim.txt"
    (ws / ".lock").unlink(missing_ok=True)
    if kind == "hard link":
        victim.write_text("precious\n" * 100)
        os.link(victim, ws / ".lock")
        pattern = r"\.lock is a hard link \(2 names for one file\)"
    else:
        if kind == "symlink":
            victim.write_text("precious\n" * 100)
        os.symlink(victim, ws / ".lock")
        pattern = rf"\.lock is a symbolic link \(to {re.escape(str(victim))}\); .*remove the link"
    for command in ("train", "query"):
        refused([command, "-q", "-c", str(cfg)], capsys, ws, rf"{re.escape(str(ws))}/{pattern}")
    if kind == "dangling symlink":
        assert not victim.exists()  # nothing was created through the link either
    else:
        assert victim.read_text() == "precious\n" * 100


def test_lock_that_is_a_folder_is_refused(workspace, capsys):
    cfg, ws = workspace
    (ws / ".lock").unlink(missing_ok=True)
    (ws / ".lock").mkdir()
    refused(["train", "-q", "-c", str(cfg)], capsys, ws, r"\.lock")


# --- output that cannot be written ------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_status_into_a_full_device_is_one_line(workspace, unbuffered):
    """`medal status > /dev/full`: every write fails with ENOSPC (at print when unbuffered, at
    the final flush otherwise); one line on stderr, exit code != 0, no traceback."""
    cfg, ws = workspace
    before = workspace_hashes(ws)
    with open("/dev/full", "w") as full:
        p = subprocess.run(
            [sys.executable, "-m", "medal", "status", "-c", str(cfg)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": unbuffered},
        )
    assert p.returncode != 0
    assert p.stderr.splitlines() == [
        "medal status: error: cannot write the output to /dev/full: No space left on device"
    ]
    assert workspace_hashes(ws) == before


# --- weights files and the ledger that are not what they should be ----------------------------
def weights_file(path: Path, how: str) -> Path:
    """A file in ``model.pretrained`` or a checkpoint's place that medal cannot use."""
    import argparse

    import torch

    if how == "text":  # e.g. model.pretrained = "/etc/passwd"
        path.write_text("root:x:0:0:root:/root:/bin/bash\n")
    elif how == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif how == "pickled object":  # unpickling it would run code: weights_only refuses it
        torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, path)
    elif how == "tensor":
        torch.save(torch.zeros(3), path)
    return path


PROBLEMS = {
    "text": r"is not a PyTorch weights file \(expected a file written by torch\.save: a "
    r"zip archive; this one starts with b'root'\)",
    "truncated": r"is truncated or corrupt \(expected a file written by torch\.save\): "
    r"PytorchStreamReader failed reading zip archive",
    "pickled object": r"holds Python objects other than tensors, which medal does not "
    r"unpickle",
    "tensor": r"holds a Tensor",
}


@pytest.mark.parametrize("how", list(PROBLEMS))
def test_pretrained_weights_that_are_not_weights(workspace, tmp_path, capsys, how):
    cfg, ws = workspace
    bad = weights_file(tmp_path / "weights.bin", how)
    refused(
        ["train", "-q", "-c", str(cfg), "--set", f'model.pretrained="{bad}"'],
        capsys,
        ws,
        rf"model\.pretrained: {re.escape(str(bad))} {PROBLEMS[how]}",
    )


@pytest.fixture
def trained(workspace) -> tuple[Path, Path]:
    """The workspace after one real (short) training: model round 0 and its checkpoint."""
    cfg, ws = workspace
    assert (
        main(
            ["train", "-q", "-c", str(cfg), "--set", "train.epochs=1", "--set", "train.min_steps=1"]
        )
        == 0
    )
    return cfg, ws


def test_corrupt_checkpoints_are_one_line_each(trained, capsys):
    cfg, ws = trained
    checkpoint = ws / "checkpoints" / "round-000.pt"
    good = checkpoint.read_bytes()
    for how, problem in PROBLEMS.items():
        weights_file(checkpoint, how)
        problem = r"holds a Tensor without a state_dict" if how == "tensor" else problem
        refused(
            ["query", "-q", "-c", str(cfg)],
            capsys,
            ws,
            rf"checkpoint {re.escape(str(checkpoint))} {problem}",
        )
    checkpoint.write_bytes(good)
    assert main(["query", "-q", "-c", str(cfg)]) == 0


@pytest.mark.parametrize("command", ["status", "train", "query"])
def test_ledger_that_is_a_folder(workspace, capsys, command):
    cfg, ws = workspace
    (ws / "ledger.sqlite").unlink()
    (ws / "ledger.sqlite").mkdir()
    refused(
        [command, "-q", "-c", str(cfg)],
        capsys,
        ws,
        rf"{re.escape(str(ws))}/ledger\.sqlite is a folder; expected the workspace's SQLite "
        rf"ledger file",
    )


# --- a training that diverges -----------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, pattern",
    [
        (
            ["train.lr=1e30"],
            r"training stopped in epoch 1 of \d+: the loss, weights or outputs became "
            r"nan \(not finite\); train\.lr = 1e\+30 is probably too high",
        ),
        (
            ["train.lr=1e30", 'data.validation=""', "train.validation_fraction=0.0"],  # as reported
            r"training stopped in epoch 1 of \d+: .* train\.lr = 1e\+30",
        ),
        (
            ["train.freeze_backbone=true", "train.probe_lr=1e30"],
            r"training stopped after the head's 300 steps: .* train\.probe_lr = 1e\+30",
        ),
    ],
)
def test_non_finite_training_keeps_the_previous_checkpoint(trained, capsys, settings, pattern):
    """A learning rate that makes the loss NaN used to save a NaN checkpoint and exit 0; the
    next query then died on sqlite3.IntegrityError. Now the training stops with one line, the
    workspace (checkpoint, ledger) is as before, and a query uses the previous model."""
    cfg, ws = trained
    sets = [a for s in settings for a in ("--set", s)]
    refused(
        ["train", "-q", "-c", str(cfg), *sets],
        capsys,
        ws,
        rf"{pattern}.*nothing was saved, the previous checkpoint stays current$",
    )
    assert main(["query", "-q", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"round 001: 6 images chosen by bald .*\(model round 0,", out), out
    with Workspace(load_config(cfg)) as w:
        assert [m.round for m in w.db.models()] == [0]
        assert all(math.isfinite(s.score) for s in w.db.selections(1)), "a NaN score was stored"


def test_diverging_pretraining_caches_no_backbone(workspace, capsys):
    """Self-supervised pretraining whose loss turns non-finite stops with one line naming
    representation.lr, before a backbone is cached (a NaN backbone would poison every round
    after), and the workspace is as it was (the decode cache, which any decode fills, is off
    here so that the comparison covers the rest)."""
    cfg, ws = workspace
    sets = [
        "representation.method=simclr",
        "train.freeze_backbone=true",
        "image.cache=false",
        "representation.epochs=3",
        "representation.lr=1e30",
    ]
    refused(
        ["train", "-q", "-c", str(cfg), *[a for s in sets for a in ("--set", s)]],
        capsys,
        ws,
        r"training stopped in self-supervised pretraining epoch \d of 3: .* "
        r"representation\.lr = 1e\+30 is probably too high",
    )
    assert not list(ws.rglob("*.pt")), "a backbone was cached"


# --- pool files: each one an image or a listed skip -------------------------------------------
def headerless_dicom(path: Path, file_meta: bool) -> Path:
    """A real DICOM image written by pydicom without the 128-byte preamble and "DICM" (and,
    with ``file_meta=False``, without the file meta group either), under a name without a
    suffix, as some archives store them."""
    import numpy as np
    import pydicom

    save(path.with_suffix(".tmp.dcm"), make_image(1, np.random.default_rng(7)), as_dicom=True)
    ds = pydicom.dcmread(path.with_suffix(".tmp.dcm"))
    path.with_suffix(".tmp.dcm").unlink()
    ds.preamble = None
    if not file_meta:
        del ds.file_meta
    ds.save_as(path, enforce_file_format=False, implicit_vr=not file_meta, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    return path


def test_every_pool_file_is_an_image_or_a_listed_skip(tmp_path, tiny_data, capsys):
    pool = tiny_data["root"] / "pool" / "archive"
    pool.mkdir()
    images = [
        headerless_dicom(pool / "1.2.840.113619.2.55.3.1", file_meta=True),
        headerless_dicom(pool / "IM0001", file_meta=False),
    ]
    (pool / "notes.txt").write_text("reader notes, not an image\n")
    (pool / "1.2.840.99").write_bytes(b"\x08\x00\x16\x00" + b"\x00" * 60)  # starts like DICOM
    cfg = write_config(tmp_path)
    assert main(["train", "-q", "-c", str(cfg)]) == 0
    assert main(["query", "-q", "-c", str(cfg)]) == 0  # decodes (scores) every pool image
    capsys.readouterr()
    with Workspace(load_config(cfg)) as ws:
        scanned = {Path(p) for p in ws.db.images_by_path()}
        listed = ws.db.skipped()
    assert set(images) <= scanned and not set(images) & {Path(p) for p in listed}
    assert {Path(p).name: r for p, r in listed.items()} == {
        "notes.txt": "not an image file medal reads (PNG, JPEG, TIFF, BMP by suffix; DICOM by "
        "suffix .dcm/.dicom or by its content)",
        "1.2.840.99": "not a DICOM file (no DICM header and no image in it)",
    }
    root = tiny_data["root"] / "pool"
    every = {p for p in root.rglob("*") if p.is_file()}
    accounted = {p for p in scanned | {Path(p) for p in listed} if root in p.parents}
    assert every == accounted  # nothing left out silently
