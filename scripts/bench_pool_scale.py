"""Peak memory and wall time of `medal train` and `medal query` as the pool grows.

    python scripts/bench_pool_scale.py --sizes 5000,20000 [--out /tmp/medal-pool-scale]

For each size N it makes N distinct 64 x 64 grayscale PNGs (seeded noise with a disc or a
square, the class) and a few labelled images per class (once; reused while the folder
exists), then runs ``medal train`` and ``medal query`` with the defaults but one
pretraining epoch (``--set representation.epochs=1``; change with --set) in a fresh
workspace, each as its own process, and measures its wall time and peak resident memory
(``ru_maxrss`` of that child, from ``os.wait4``). It prints one Markdown table with the
ratios to the first size. ``OMP_NUM_THREADS`` defaults to 1 for the children.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("disc", "square")
SIDE = 64


def image(rng: np.random.Generator, label: int) -> np.ndarray:
    """A 64 x 64 uint8 image: noise, and a bright disc (class 0) or square (class 1) of
    random size and place."""
    img = rng.normal(90, 30, (SIDE, SIDE))
    r = int(rng.integers(8, 20))
    cy, cx = rng.integers(r, SIDE - r, 2)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    if label == 0:
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    else:
        inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    img[inside] += 100
    return np.clip(img, 0, 255).astype(np.uint8)


def make_data(root: Path, n: int, per_class: int, seed: int = 0) -> None:
    """``root/pool`` with ``n`` PNGs and ``root/labelled/<class>`` with ``per_class`` each;
    every image distinct (its own noise). Skipped when ``root/.done`` says they exist."""
    done = root / ".done"
    if done.is_file() and done.read_text() == f"{n} {per_class} {seed}":
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    (root / "pool").mkdir(parents=True)
    for i in range(n):
        sub = root / "pool" / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(image(rng, i % 2)).save(sub / f"{i:06d}.png")
    for c, name in enumerate(CLASSES):
        (root / "labelled" / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(image(rng, c)).save(root / "labelled" / name / f"{i:03d}.png")
    done.write_text(f"{n} {per_class} {seed}")


def write_config(folder: Path, data: Path) -> Path:
    path = folder / "medal.toml"
    path.write_text(
        f"workspace = {json.dumps(str(folder / 'ws'))}\n"
        f"classes = {json.dumps(list(CLASSES))}\n"
        "[data]\n"
        f"labelled = {json.dumps(str(data / 'labelled'))}\n"
        f"pool = {json.dumps(str(data / 'pool'))}\n"
    )
    return path


def run(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``python -m medal *argv``; ``(wall seconds, peak RSS MiB)`` of that process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "medal", *argv], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"medal {argv[0]} failed with exit code {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="5000,20000", help="pool sizes, comma-separated")
    ap.add_argument("--out", type=Path, default=Path("/tmp/medal-pool-scale"))
    ap.add_argument("--per-class", type=int, default=5, help="labelled images per class")
    ap.add_argument(
        "--set",
        action="append",
        default=["representation.epochs=1"],
        help="KEY=VALUE for both commands (default: representation.epochs=1)",
    )
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    sets = [a for s in args.set for a in ("--set", s)]
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        data = args.out / f"data-{n}"
        make_data(data, n, args.per_class)
        run_dir = args.out / f"run-{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        cfg = write_config(run_dir, data)
        train = run(["train", "-q", "-c", str(cfg), *sets], env)
        query = run(["query", "-q", "-c", str(cfg), *sets], env)
        rows.append((n, *train, *query))
        print(
            f"pool {n}: train {train[0]:.0f} s {train[1]:.0f} MiB, "
            f"query {query[0]:.0f} s {query[1]:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
    print("| pool | train s | train peak RSS MiB | query s | query peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|")
    for n, ts, tm, qs, qm in rows:
        print(f"| {n} | {ts:.0f} | {tm:.0f} | {qs:.1f} | {qm:.0f} |")
    n0, _, tm0, qs0, qm0 = rows[0]
    for n, _, tm, qs, qm in rows[1:]:
        print(
            f"\n{n0} -> {n}: train peak RSS +{tm - tm0:.0f} MiB, query peak RSS "
            f"+{qm - qm0:.0f} MiB, query time x{qs / qs0:.2f}"
        )


if __name__ == "__main__":
    main()
