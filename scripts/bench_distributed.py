#!/usr/bin/env python3
"""Pool-scoring throughput with 1 and 2 processes under torchrun (gloo on CPU, NCCL on GPUs).

Builds a synthetic PNG pool and a workspace with a trained model in a temporary folder, then
times `medal query` (MC dropout scoring of the whole pool + export) run directly and under
`torchrun --standalone --nproc-per-node 2`, each on a fresh copy of the workspace, and prints
images/s and the speed-up. The decode cache is filled first, so the timing is the scoring.

    python scripts/bench_distributed.py [--n 4000] [--size 64] [--model resnet18] [--t 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medal import api
from medal.config import load_config

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """workspace = "ws"
classes = ["a", "b"]
[data]
labelled = "labelled"
pool = "pool"
[model]
name = "{model}"
image_size = {size}
[train]
epochs = 1
min_steps = 1
freeze_backbone = false  # this benchmark times whole-network training across processes
[representation]
method = "none"
[query]
budget = 10
mc_samples = {t}
batch_size = 64
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--t", type=int, default=20)
    p.add_argument("--procs", type=int, default=2)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for c in "ab":
            (root / "labelled" / c).mkdir(parents=True, exist_ok=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (a.size, a.size), np.uint8)).save(
                    root / "labelled" / c / f"{i}.png"
                )
        (root / "pool").mkdir()
        for i in range(a.n):
            Image.fromarray(rng.integers(0, 255, (a.size, a.size), np.uint8)).save(
                root / "pool" / f"{i:06d}.png"
            )
        cfg_path = root / "bench.toml"
        cfg_path.write_text(CONFIG.format(model=a.model, size=a.size, t=a.t))
        cfg = load_config(cfg_path)
        api.train(cfg, progress=False)
        warm = api.query(cfg, progress=False)  # fills the decode cache; not timed
        if warm is None:  # only a non-zero torchrun rank gets None; this runs as one process
            raise SystemExit("the warm-up query exported nothing")
        shutil.rmtree(warm.folder)
        shutil.rmtree(root / "ws" / "scores")
        from medal.workspace import Workspace

        with Workspace(cfg) as ws, ws.db.transaction() as db:
            db.execute("DELETE FROM selections")
            db.execute("DELETE FROM rounds")
        snapshot = root / "snapshot"
        shutil.copytree(root / "ws", snapshot)
        env = dict(os.environ)
        rows = []
        for procs in (1, a.procs):
            shutil.rmtree(root / "ws")
            shutil.copytree(snapshot, root / "ws")
            if procs == 1:
                cmd = [sys.executable, "-m", "medal", "query", "-c", str(cfg_path), "-q"]
            else:
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc-per-node={procs}",
                    "-m",
                    "medal",
                    "query",
                    "-c",
                    str(cfg_path),
                    "-q",
                ]
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // procs))
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
            rows.append((procs, time.perf_counter() - t0))
    print(
        f"\n{a.model}, 1x{a.size}x{a.size}, pool {a.n}, T={a.t}, {os.cpu_count()} CPUs "
        f"(wall time of the whole `medal query` command, process start included)"
    )
    print(f"{'processes':>9} {'seconds':>8} {'images/s':>9} {'speed-up':>9}")
    for procs, sec in rows:
        print(f"{procs:>9} {sec:>8.1f} {a.n / sec:>9.1f} {rows[0][1] / sec:>8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
