"""Check an installed medal wheel from outside the checkout (run by ``.ci/run wheel``).

Run it with the Python of a fresh virtual environment into which only the built wheel (and its
dependencies) was installed, from a folder outside the checkout::

    cd "$(mktemp -d)" && /tmp/venv/bin/python /path/to/scripts/wheel_smoke.py \\
        --checkout /path/to/checkout --sdist /path/to/dist/medal_al-X.tar.gz

It checks, and exits non-zero with the reason on the first failure:

1. ``medal`` is imported from the environment's site-packages, not from a checkout;
2. every file git tracks under ``medal/`` in the checkout was installed (so package data that
   pyproject does not declare fails here) and the non-Python ones read back identically through
   ``importlib.resources``; the sdist holds them too, with pyproject, README and CHANGELOG;
3. ``medal --version`` (and ``python -m medal --version``) print the package metadata's version,
   which equals ``medal.__version__``; ``medal --help`` lists every command;
4. a real round from generated PNG/DICOM images in a temporary folder:
   train -> query -> fill labels.csv from the known classes -> ingest -> status -> round ->
   labels export.

Only the standard library and medal's own dependencies are used.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.resources
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

DIST = "medal-al"
CLASSES = ("normal", "abnormal")
COMMANDS = ("train", "query", "ingest", "round", "status", "labels", "simulate")


class SmokeError(Exception):
    pass


def check(ok: bool, message: str) -> None:
    if not ok:
        raise SmokeError(message)


def step(title: str) -> None:
    print(f"[wheel smoke] {title}", flush=True)


def medal_exe() -> str:
    exe = Path(sys.executable).parent / "medal"
    check(exe.is_file(), f"the 'medal' command is not installed next to {sys.executable}")
    return str(exe)


def run(*args: str, cwd: Path | None = None) -> str:
    """Run a command, echo it, return stdout; fail with its output on a non-zero exit."""
    t = time.perf_counter()
    r = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=600)
    shown = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(args))
    print(f"  $ {shown}  ({time.perf_counter() - t:.1f} s, exit {r.returncode})", flush=True)
    if r.returncode != 0:
        raise SmokeError(
            f"{shown} exited {r.returncode}\n--- stdout ---\n{r.stdout}--- stderr ---\n{r.stderr}"
        )
    return r.stdout


# 1. where medal comes from ----------------------------------------------------------------------


def check_import_location(checkout: Path | None) -> None:
    step("import location")
    import medal

    where = Path(medal.__file__).resolve().parent
    print(f"  medal {medal.__version__} imported from {where}")
    prefix = Path(sys.prefix).resolve()
    check(
        prefix in where.parents,
        f"medal was imported from {where}, not from this environment ({prefix}): "
        f"run from a folder outside the checkout, without PYTHONPATH",
    )
    if checkout is not None:
        check(
            checkout.resolve() not in where.parents,
            f"medal was imported from the checkout ({where})",
        )
    check(not (Path.cwd() / "medal").exists(), f"{Path.cwd()} holds a medal/ folder")


# 2. installed files and package data ------------------------------------------------------------


def tracked_package_files(checkout: Path) -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(checkout), "ls-files", "--", "medal"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    files = [line for line in out.splitlines() if line and "__pycache__" not in line]
    check(bool(files), f"git ls-files found no files under {checkout}/medal")
    return files


def check_installed_files(checkout: Path) -> None:
    step("installed files and package data")
    tracked = tracked_package_files(checkout)
    installed = {str(p).replace(os.sep, "/") for p in importlib.metadata.files(DIST) or []}
    missing = [f for f in tracked if f not in installed]
    check(
        not missing,
        "files tracked under medal/ but missing from the installed wheel "
        "(a subpackage belongs in pyproject's [tool.setuptools.packages.find], a data file "
        "in [tool.setuptools.package-data]):\n  " + "\n  ".join(missing),
    )
    data = [f for f in tracked if not f.endswith(".py")]
    root = importlib.resources.files("medal")
    for rel in data:
        res = root.joinpath(*rel.split("/")[1:])
        check(res.is_file(), f"importlib.resources cannot find {rel}")
        check(
            res.read_bytes() == (checkout / rel).read_bytes(),
            f"{rel} differs between the wheel and the checkout",
        )
    print(
        f"  {len(tracked)} tracked files installed ({len(data)} package data files read "
        f"back through importlib.resources)"
    )


def check_sdist(sdist: Path, checkout: Path) -> None:
    step(f"sdist {sdist.name}")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = tracked_package_files(checkout) + ["pyproject.toml", "README.md", "CHANGELOG.md"]
    missing = [f for f in needed if f not in names]
    check(not missing, "missing from the sdist:\n  " + "\n  ".join(missing))
    print(f"  {len(names)} entries; the {len(needed)} needed ones are there")


# 3. version and help ----------------------------------------------------------------------------


def check_version_and_help() -> None:
    step("version and help")
    import medal

    meta = importlib.metadata.version(DIST)
    check(
        meta == medal.__version__,
        f"package metadata says {meta}, medal.__version__ says {medal.__version__}",
    )
    exe = medal_exe()
    for args in ([exe, "--version"], [sys.executable, "-m", "medal", "--version"]):
        out = run(*args).strip()
        check(
            out == f"medal {meta}",
            f"{' '.join(args[-2:])} printed {out!r}, expected 'medal {meta}'",
        )
    print(f"  version {meta}")
    out = run(exe, "--help")
    for cmd in COMMANDS:
        check(cmd in out, f"'medal --help' does not mention {cmd!r}")


# 4. one real round ------------------------------------------------------------------------------


def make_images(root: Path) -> dict[str, str]:
    """Tiny separable images: labelled 3/class PNG, validation 2/class PNG, pool 8 PNG + 2 DICOM.

    Returns the pool truth {file name: class}.
    """
    import numpy as np
    from PIL import Image

    from medal.dicomwrite import write_dicom

    rng = np.random.default_rng(0)

    def image(c: int) -> np.ndarray:
        img = rng.normal(110, 20, (16, 16))
        img[4:12, 4:12] += -60 if c == 0 else 90
        return np.clip(img, 0, 255).astype(np.uint8)

    for split, n in (("labelled", 3), ("validation", 2)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(image(c)).save(root / split / name / f"{split[0]}{i}.png")
    (root / "pool").mkdir()
    truth = {}
    for i in range(10):
        c = i % 2
        if i < 8:
            name = f"p{i:02d}.png"
            Image.fromarray(image(c)).save(root / "pool" / name)
        else:
            name = f"p{i:02d}.dcm"
            write_dicom(
                root / "pool" / name,
                image(c).astype(np.uint16) * 16,
                bits_stored=12,
                intercept=-1024,
                window=(1016.5, 4081.0),
            )
        truth[name] = CLASSES[c]
    return truth


CONFIG = """\
workspace = "ws"
classes = ["normal", "abnormal"]
seed = 0

[data]
labelled = "data/labelled"
validation = "data/validation"
pool = "data/pool"

[model]
name = "small_cnn"
image_size = 16
hidden = 16

[train]
epochs = 1
min_steps = 5
batch_size = 4

[query]
strategy = "bald"
budget = 4
mc_samples = 4
"""


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def check_round(work: Path) -> None:
    step(f"end-to-end round in {work}")
    truth = make_images(work / "data")
    cfg = work / "medal.toml"
    cfg.write_text(CONFIG, encoding="utf-8")
    exe = medal_exe()
    c = ["-c", str(cfg), "-q"]

    out = run(exe, "train", *c, cwd=work)
    check("model round 0" in out, f"unexpected train output:\n{out}")
    out = run(exe, "query", *c, cwd=work)
    folder = work / "ws" / "labelling" / "round-001"
    check(folder.is_dir(), f"query did not export {folder}:\n{out}")
    for name in ("labels.csv", "manifest.csv", "README.txt", "index.html"):
        check((folder / name).is_file(), f"the round folder has no {name}")
    manifest = read_csv(folder / "manifest.csv")
    check(len(manifest) == 4, f"expected 4 exported images, manifest has {len(manifest)}")

    labels = []
    for row in manifest:
        source = Path(row["source_path"]).name
        check(source in truth, f"exported {source} is not a pool image")
        check((folder / row["file"]).is_file(), f"exported copy {row['file']} is missing")
        labels.append((row["file"], truth[source]))
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerows(labels)

    out = run(exe, "ingest", "-c", str(cfg), str(folder), cwd=work)
    check("recorded 4 labels" in out, f"unexpected ingest output:\n{out}")
    out = run(exe, "status", "-c", str(cfg), cwd=work)
    check("labels: 10 " in out and "ingested" in out, f"unexpected status output:\n{out}")
    print("  " + out.strip().replace("\n", "\n  "))

    out = run(exe, "round", *c, cwd=work)
    check(
        "fine-tuned from round 0" in out and (work / "ws/labelling/round-002").is_dir(),
        f"unexpected round output:\n{out}",
    )
    export = work / "all_labels.csv"
    run(exe, "labels", "-c", str(cfg), "export", "-o", str(export), cwd=work)
    rows = read_csv(export)
    check(len(rows) == 10, f"labels export wrote {len(rows)} rows, expected 10")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--checkout",
        type=Path,
        help="the git checkout the wheel was built from (for the file checks)",
    )
    ap.add_argument("--sdist", type=Path, help="the built sdist to check")
    ap.add_argument("--keep", action="store_true", help="keep the temporary round folder")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    try:
        check_import_location(args.checkout)
        if args.checkout is not None:
            check_installed_files(args.checkout)
            if args.sdist is not None:
                check_sdist(args.sdist, args.checkout)
        check_version_and_help()
        if args.keep:
            check_round(Path(tempfile.mkdtemp(prefix="medal-smoke-")))
        else:
            with tempfile.TemporaryDirectory(prefix="medal-smoke-") as d:
                check_round(Path(d))
    except SmokeError as e:
        print(f"[wheel smoke] FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # an import error or crash in medal itself is a failure too
        import traceback

        traceback.print_exc()
        print(f"[wheel smoke] FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"[wheel smoke] OK in {time.perf_counter() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
