"""Hostile folders and files, driven through the CLI: each is refused with exit code != 0 and
one line naming the file or key, and the workspace (ledger bytes, round folders) is left
byte-identical.

Every attack here was once a traceback or a silent wrong outcome (issue 13).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import write_config


def test_closed_stdout_pipe_ends_quietly(tmp_path, tiny_data):
    """`medal train ... | head`: the reader goes away; no BrokenPipeError traceback."""
    cfg = write_config(tmp_path)
    r, w = os.pipe()
    os.close(r)  # nobody reads stdout
    try:
        p = subprocess.run([sys.executable, "-m", "medal", "train", "-q", "-c", str(cfg),
                            "--set", "train.epochs=1", "--set", "train.min_steps=1"],
                           stdout=w, stderr=subprocess.PIPE, text=True, timeout=300,
                           cwd=Path(__file__).parents[1])
    finally:
        os.close(w)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr
