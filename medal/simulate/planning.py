"""A simulation's settings, its runs, their start sets and validation: what to run."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import api
from ..acquisition import available_strategies
from ..config import Config
from ..errors import SimulationError
from ..scan import scan_source
from ..workspace import cache_dir
from .oracle import TruthEntry

START_MODES = ("random", "class_balanced")
BACKBONE_MODES = ("per-seed", "shared")

# Config fields that differ between runs by design; every other field must match on resume.
_PER_RUN_KEYS = ("path", "workspace", "seed", "device", "num_workers")
_PER_RUN_DATA = ("labelled", "pool")
_PER_RUN_QUERY = ("strategy",)


@dataclass(frozen=True)
class SimulationSettings:
    """What to simulate. ``start`` is ``random``, ``class_balanced``, ``class:<name>`` (a
    single-class start) or the path of a file list (one path per line, or a CSV with a
    ``file`` column; relative paths resolve against the list's folder)."""

    truth: tuple[Path, ...]
    out: Path
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    rounds: int
    budget: int
    start: str = "random"
    start_size: int = 20
    validation: str = "none"
    """``none``: no labelled validation set; each run holds out ``train.validation_fraction`` of
    the labels it was given (counted as labels). ``config``: the config's ``data.validation``.
    Otherwise the path of a labelled validation set. Labels of a validation set passed this way
    are not counted as labels given."""
    workers: int = 1
    threads: int = 0
    """torch threads per worker process; 0 = the CPU count divided by ``workers``."""
    verbose: bool = True
    backbones: str = "per-seed"
    """With a self-supervised backbone (``representation.method``): ``per-seed`` pretrains one
    backbone per seed (``representation.seed`` = the run's seed), so the seeds' spread and the
    paired intervals include the pretraining's own variation; ``shared`` pretrains one, with
    the config's ``representation.seed`` (default its ``seed``), for every run (faster; the
    intervals then hold for that one backbone only)."""


@dataclass(frozen=True)
class RunSpec:
    """One (strategy, seed) run: its config (workspace, start set, pool, strategy set)."""

    strategy: str
    seed: int
    cfg: Config
    rounds: int
    oracle_log: Path
    verbose: bool


@dataclass
class SimulationResult:
    out: Path
    rows: list[dict[str, Any]]
    summary: str
    plots: list[Path]
    seconds: float
    failures: dict[str, str] = field(default_factory=dict)


def read_truth(sources: Iterable[Path], classes: Sequence[str]) -> list[tuple[Path, str]]:
    """``(resolved file, label)`` for every image of the labelled sources (class folders or
    CSV ``file,label``), sorted by path; the same file listed twice must agree."""
    found: dict[Path, str] = {}
    for src in sources:
        for e in scan_source(Path(src), classes):
            p = e.path.resolve()
            label = e.label or ""
            if found.setdefault(p, label) != label:
                raise SimulationError(f"{p} is labelled both {found[p]!r} and {e.label!r}")
    if not found:
        raise SimulationError("the labelled set for the simulation is empty")
    return sorted(found.items())


def build_pool(out: Path, truth: Sequence[tuple[Path, str]]) -> list[TruthEntry]:
    """Create ``<out>/pool`` (once): a link (or copy) per image of the labelled set.

    The runs' pool is this folder; start-set images are labelled in each run, so they leave
    that run's pool by themselves. Built under a temporary name and renamed, so an interrupted
    build is redone rather than half-used.
    """
    pool = out.resolve() / "pool"
    width = len(str(len(truth)))
    names = [f"{i:0{width}d}_{src.name}" for i, (src, _) in enumerate(truth)]
    if not pool.is_dir():
        tmp = out.resolve() / ".pool.tmp"
        if tmp.exists():
            for p in tmp.iterdir():
                p.unlink()
        tmp.mkdir(parents=True, exist_ok=True)
        for (src, _), name in zip(truth, names):
            try:
                os.symlink(src, tmp / name)
            except OSError:  # file systems without symlinks: copy
                shutil.copyfile(src, tmp / name)
        tmp.rename(pool)
    entries = [TruthEntry(src, label, pool / name) for (src, label), name in zip(truth, names)]
    absent = [e.link for e in entries if not e.link.exists()]
    if absent:
        raise SimulationError(
            f"{pool} does not match the labelled set ({len(absent)} missing, "
            f"e.g. {absent[0]}); use a new output folder"
        )
    return entries


def choose_start(
    entries: Sequence[TruthEntry], mode: str, size: int, seed: int, classes: Sequence[str]
) -> list[TruthEntry]:
    """The start set of one seed (the same for every strategy, so runs compare in pairs)."""
    rng = np.random.default_rng([seed, 20240521])
    if mode == "random":
        if size > len(entries):
            raise SimulationError(
                f"start size {size} is larger than the labelled set ({len(entries)})"
            )
        return [entries[i] for i in sorted(rng.choice(len(entries), size, replace=False))]
    if mode == "class_balanced" or mode.startswith("class:"):
        if mode == "class_balanced":
            want = {
                c: size // len(classes) + (i < size % len(classes)) for i, c in enumerate(classes)
            }
        else:
            name = {c.lower(): c for c in classes}.get(mode[len("class:") :].lower())
            if name is None:
                raise SimulationError(
                    f"start {mode!r}: unknown class; classes: {', '.join(classes)}"
                )
            want = {name: size}
        chosen: list[TruthEntry] = []
        for c, k in want.items():
            of_class = [e for e in entries if e.label == c]
            if k > len(of_class):
                raise SimulationError(
                    f"start set: {k} images of class {c!r} wanted, the "
                    f"labelled set has {len(of_class)}"
                )
            chosen += [of_class[i] for i in sorted(rng.choice(len(of_class), k, replace=False))]
        return sorted(chosen, key=lambda e: str(e.source))
    return _start_from_list(Path(mode), entries)


def _start_from_list(path: Path, entries: Sequence[TruthEntry]) -> list[TruthEntry]:
    if not path.is_file():
        raise SimulationError(
            f"start must be one of {', '.join(START_MODES)}, class:<name> or "
            f"an existing file list; got {str(path)!r}"
        )
    text = path.read_text(encoding="utf-8-sig")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and "file" in [h.strip().lower() for h in lines[0].split(",")]:
        rows = list(csv.DictReader(lines))
        names = [next(v for k, v in r.items() if k.strip().lower() == "file").strip() for r in rows]
    else:
        names = lines
    by_source = {e.source: e for e in entries}
    chosen, unknown = [], []
    for n in names:
        p = Path(n).expanduser()
        p = (p if p.is_absolute() else path.parent / p).resolve()
        (chosen.append(by_source[p]) if p in by_source else unknown.append(n))
    if unknown:
        raise SimulationError(
            f"{path}: {len(unknown)} file(s) are not in the labelled set, e.g. {unknown[0]}"
        )
    if not chosen:
        raise SimulationError(f"{path}: the start list is empty")
    return list({e.source: e for e in chosen}.values())


def with_validation(cfg: Config, validation: str) -> Config:
    """``cfg`` with the validation set a simulation uses (see ``SimulationSettings``)."""
    if validation == "config":
        return cfg
    if validation == "none":
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, validation=None))
    path = Path(validation).expanduser().resolve()
    if not path.exists():
        raise SimulationError(
            f"validation must be none, config or an existing folder or CSV "
            f"of labelled images; got {validation!r}"
        )
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, validation=path))


def describe_validation(cfg: Config, validation: str) -> str:
    """One sentence on the validation set the runs use, for the summary and the console."""
    used = with_validation(cfg, validation).data.validation
    if used is not None:
        return (
            f"labelled validation set {used} (its labels are not counted as labels given; "
            f"it picks the best epoch and is reported)"
        )
    frac = cfg.train.validation_fraction
    text = (
        f"no labelled validation set; each run holds out train.validation_fraction = "
        f"{frac:g} of its start labels for validation, and those labels are counted"
        if frac > 0
        else "none (train.validation_fraction = 0): no model selection"
    )
    if cfg.data.validation is not None:
        text += (
            f" (the config's data.validation, {cfg.data.validation}, is not used; "
            f"--validation config uses it)"
        )
    return text


def describe_backbones(cfg: Config, s: SimulationSettings) -> str:
    """One sentence on the self-supervised backbones the runs start from."""
    if cfg.representation.method == "none":
        return 'Backbone: no self-supervised pretraining (representation.method = "none").'
    if s.backbones == "per-seed":
        return (
            "Backbones: one self-supervised pretraining per seed (representation.seed = "
            "the seed), shared by that seed's strategies; the spread over seeds includes "
            "the pretraining's."
        )
    return (
        f"Backbone: one self-supervised pretraining (representation.seed = "
        f"{api.representation_seed(cfg)}) for every run; the intervals hold for that "
        f"backbone only (--backbones per-seed varies it)."
    )


def _fingerprint(cfg: Config, s: SimulationSettings) -> dict[str, Any]:
    """What must be equal for a rerun to continue the same simulation."""
    d = cfg.to_dict()
    for k in _PER_RUN_KEYS:
        d.pop(k, None)
    for k in _PER_RUN_DATA:
        d["data"].pop(k, None)
    for k in _PER_RUN_QUERY:
        d["query"].pop(k, None)
    d["query"]["budget"] = s.budget
    return {
        "config": d,
        "truth": [str(Path(t).resolve()) for t in s.truth],
        "start": s.start
        if s.start in START_MODES or s.start.startswith("class:")
        else str(Path(s.start).resolve()),
        "start_size": s.start_size,
        "backbones": s.backbones,
    }


def _check_settings(out: Path, fingerprint: dict[str, Any]) -> None:
    path = out / "simulation.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != fingerprint:
            changed = sorted(
                k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k)
            )
            raise SimulationError(
                f"{out} holds a simulation with other settings (differs in: "
                f"{', '.join(changed)}); use another --out or delete it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".simulation.json.tmp"
    tmp.write_text(json.dumps(fingerprint, indent=2), encoding="utf-8")
    tmp.replace(path)


def plan_runs(cfg: Config, s: SimulationSettings) -> tuple[list[RunSpec], list[TruthEntry]]:
    """Prepare the output folder (settings, pool, start sets) and one spec per run."""
    known = available_strategies()
    bad = [x for x in s.strategies if x not in known]
    if bad:
        raise SimulationError(f"unknown strategy {', '.join(bad)}; valid: {', '.join(known)}")
    if not s.strategies or not s.seeds:
        raise SimulationError("at least one strategy and one seed are needed")
    if s.rounds < 0 or s.budget < 1 or s.start_size < 1:
        raise SimulationError("rounds must be >= 0, budget and start size >= 1")
    if s.backbones not in BACKBONE_MODES:
        raise SimulationError(
            f"backbones must be one of {', '.join(BACKBONE_MODES)}, got {s.backbones!r}"
        )
    cfg = with_validation(cfg, s.validation)
    out = s.out.resolve()
    truth = read_truth(s.truth, cfg.classes)
    _check_settings(out, _fingerprint(cfg, s))
    entries = build_pool(out, truth)
    shared_cache = cache_dir(out)  # a workspace-shaped cache the run workspaces share
    specs = []
    for seed in s.seeds:
        start = choose_start(entries, s.start, s.start_size, seed, cfg.classes)
        for strategy in s.strategies:
            run_dir = out / strategy / f"seed-{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            start_csv = run_dir / "start.csv"
            if not start_csv.is_file():
                tmp = run_dir / ".start.csv.tmp"
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    w = csv.writer(f)
                    w.writerow(["file", "label"])
                    w.writerows([str(e.link), e.label] for e in start)
                tmp.replace(start_csv)
            if not cache_dir(run_dir).exists():
                # workspaces keep their caches in <workspace>/cache (decoded images when
                # image.cache is on, pretrained backbones and their features always); pointing
                # each one at the same folder decodes and pretrains once for the whole
                # simulation
                shared_cache.mkdir(exist_ok=True)
                cache_dir(run_dir).symlink_to(shared_cache, target_is_directory=True)
            run_cfg = dataclasses.replace(
                cfg,
                workspace=run_dir,
                seed=seed,
                data=dataclasses.replace(cfg.data, labelled=start_csv, pool=out / "pool"),
                query=dataclasses.replace(cfg.query, strategy=strategy, budget=s.budget),
                representation=dataclasses.replace(
                    cfg.representation,
                    seed=seed if s.backbones == "per-seed" else api.representation_seed(cfg),
                ),
            )
            specs.append(
                RunSpec(strategy, seed, run_cfg, s.rounds, run_dir / "oracle.csv", s.verbose)
            )
    return specs, entries
