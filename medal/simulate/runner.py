"""Running a simulation: one run's rounds, the pretraining before them, the workers."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .. import api
from ..config import Config
from ..errors import DataError, MedalError, SimulationError
from ..workspace import Workspace, has_ledger
from .oracle import Oracle, Truth, TruthEntry, round_manifest
from .planning import (
    RunSpec,
    SimulationResult,
    SimulationSettings,
    describe_backbones,
    describe_validation,
    plan_runs,
)
from .records import format_metric, label_counts, record_pretraining_seconds, record_seconds
from .report import collect_rows, plot_curves, summarise, write_results
from ..sources import sync


def _ledger_state(cfg: Config) -> tuple[set[int], dict[int, dict[str, Any]]]:
    """Model rounds trained and exported rounds (by number) recorded in a run's ledger."""
    if not has_ledger(cfg.workspace):
        return set(), {}
    st = api.status(cfg)
    return {m["round"] for m in st.models}, {r["round"]: r for r in st.rounds}


def _pool_is_empty(cfg: Config) -> bool:
    with Workspace(cfg) as ws:
        return not sync(ws).pool


def run_one(spec: RunSpec, oracle: Oracle) -> int:
    """Bring one run up to ``spec.rounds`` labelling rounds; returns the model rounds trained
    now (0 when it was already complete). Finished steps, read from the ledger, are skipped."""
    cfg, name = spec.cfg, f"{spec.strategy} seed {spec.seed}"
    with Workspace(cfg):  # finishes or undoes an export that an interruption cut short
        pass
    trained, rounds = _ledger_state(cfg)
    done = 0
    if 0 not in trained:
        _train_round(spec, name, time.perf_counter(), None)
        done += 1
    for round_no in range(1, spec.rounds + 1):
        if round_no in trained:
            continue
        rec = rounds.get(round_no)
        t0: float | None = None
        query_seconds = None
        if rec is None:
            try:
                t0 = time.perf_counter()
                q = api.query(cfg, progress=False)
                if q is None:
                    raise SimulationError(f"[{name}] the query gave no report")
                folder = q.folder
                query_seconds = time.perf_counter() - t0
            except DataError:
                if _pool_is_empty(cfg):
                    if spec.verbose:
                        print(
                            f"[{name}] the pool is exhausted after round {round_no - 1}", flush=True
                        )
                    break
                raise
        else:
            folder = Path(rec["folder"])
        if rec is None or not rec["ingested"]:
            oracle.label_round(folder, round_manifest(cfg.workspace, folder))
            api.ingest(cfg, folder)
        _train_round(spec, name, t0, query_seconds)
        done += 1
    return done


def _train_round(spec: RunSpec, name: str, t0: float | None, query_seconds: float | None) -> None:
    """Train this round's model of the run ``name`` and record its times; ``t0``: when the
    round started (None: it was resumed, so its time is unknown), ``query_seconds``: its query's
    time (None: round 0 or unknown)."""
    cfg = spec.cfg
    r = api.train(cfg, progress=False)
    if r is None:  # only ranks other than 0 get None; a simulation is one process
        raise SimulationError(f"[{name}] training gave no report")
    round_seconds = None if t0 is None else time.perf_counter() - t0
    record_seconds(cfg.workspace, r.model_round, query_seconds, round_seconds)
    if spec.verbose:
        m = r.metrics.get("test") or r.metrics.get("validation") or {}
        given, holdout = label_counts(cfg, [r.model_round])
        print(
            f"[{name}] model round {r.model_round}: {given[r.model_round]} labels given "
            f"({r.n_labels} in training, {holdout} held out for validation), "
            f"AUROC {format_metric(m.get('auroc'))}, "
            f"accuracy {format_metric(m.get('accuracy'))} (training {r.seconds:.1f} s"
            + ("" if round_seconds is None else f", whole round {round_seconds:.1f} s")
            + ")",
            flush=True,
        )


def pretrain_backbones(
    specs: Sequence[RunSpec], s: SimulationSettings, threads: int
) -> dict[str, float]:
    """Pretrain (or find in the shared cache) every self-supervised backbone the runs start
    from, before any run starts, so that two workers never pretrain the same one: one per
    ``representation.seed`` among the runs, in parallel over ``s.workers`` processes.

    Returns the seconds each backbone's pretraining took, as first measured in this output
    folder (kept in ``pretraining_seconds.json``, so a resumed simulation still reports the
    pretraining it once paid for, not the cache load)."""
    first: dict[int, RunSpec] = {}
    for spec in specs:
        if spec.cfg.representation.method != "none":
            first.setdefault(api.representation_seed(spec.cfg), spec)
    todo = [(f"backbone seed {k}", spec.cfg) for k, spec in sorted(first.items())]
    measured: dict[str, float] = {}
    if s.workers <= 1 or len(todo) <= 1:
        for name, cfg in todo:
            t0 = time.perf_counter()
            line = api.pretrain_representation(cfg, progress=s.verbose)
            measured[name] = time.perf_counter() - t0
            if s.verbose:
                print(f"{name}: {line}", flush=True)
    else:
        with ProcessPoolExecutor(
            max_workers=min(s.workers, len(todo)), mp_context=get_context("spawn")
        ) as ex:
            futures = {ex.submit(_pretrain_in_worker, cfg, threads): name for name, cfg in todo}
            for fut in as_completed(futures):
                line, measured[futures[fut]] = fut.result()
                if s.verbose:
                    print(f"{futures[fut]}: {line}", flush=True)
    return record_pretraining_seconds(s.out.resolve() / "pretraining_seconds.json", measured)


def _pretrain_in_worker(cfg: Config, threads: int) -> tuple[str, float]:
    """Process-pool entry point: one backbone's pretraining, and its seconds."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    line = api.pretrain_representation(cfg, progress=False)
    return line, time.perf_counter() - t0


def _run_in_worker(spec: RunSpec, entries: list[TruthEntry], threads: int) -> tuple[str, int]:
    """Process-pool entry point: one run with its own oracle over the shared truth."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    oracle = Oracle(Truth(entries).lookup, spec.oracle_log)
    return f"{spec.strategy}/seed-{spec.seed}", run_one(spec, oracle)


def _failed(failures: dict[str, str], run: str, e: Exception, verbose: bool) -> None:
    """Record a run that raised; the simulation goes on with the other runs."""
    failures[run] = f"{type(e).__name__}: {e}" if not isinstance(e, MedalError) else str(e)
    print(f"[{run}] failed: {failures[run]}", file=sys.stderr, flush=True)
    if verbose and not isinstance(e, MedalError):
        traceback.print_exception(e, file=sys.stderr)


def run_progress(done: int, total: int, elapsed: float, name: str) -> str:
    """``run 3 of 10 finished (bald/seed-2); 2.5 min so far, about 5.8 min left``: the time left
    is the mean time per finished run so far times the runs still to go."""
    left = elapsed / done * (total - done)
    tail = f", about {left / 60:.1f} min left" if done < total else ""
    return f"run {done} of {total} finished ({name}); {elapsed / 60:.1f} min so far{tail}"


def simulate(cfg: Config, s: SimulationSettings) -> SimulationResult:
    """Run (or resume) every (strategy, seed) run, then write results, curves and summary."""
    t0 = time.perf_counter()
    specs, entries = plan_runs(cfg, s)
    failures: dict[str, str] = {}
    threads = s.threads or max(1, (os.cpu_count() or 1) // max(1, s.workers))
    pretraining = pretrain_backbones(specs, s, threads)
    if s.workers <= 1:
        import torch

        if s.threads > 0:
            torch.set_num_threads(s.threads)
        truth = Truth(entries)
        for k, spec in enumerate(specs, 1):
            name = f"{spec.strategy}/seed-{spec.seed}"
            try:
                run_one(spec, Oracle(truth.lookup, spec.oracle_log))
            except Exception as e:  # one failed run must not lose the others' results
                _failed(failures, name, e, s.verbose)
            if s.verbose:
                print(run_progress(k, len(specs), time.perf_counter() - t0, name), flush=True)
    else:
        with ProcessPoolExecutor(max_workers=s.workers, mp_context=get_context("spawn")) as ex:
            futures = {
                ex.submit(
                    _run_in_worker, spec, entries, threads
                ): f"{spec.strategy}/seed-{spec.seed}"
                for spec in specs
            }
            for k, fut in enumerate(as_completed(futures), 1):
                try:
                    fut.result()
                except Exception as e:
                    _failed(failures, futures[fut], e, s.verbose)
                if s.verbose:
                    print(
                        run_progress(k, len(specs), time.perf_counter() - t0, futures[fut]),
                        flush=True,
                    )
    out = s.out.resolve()
    rows = collect_rows(specs)
    write_results(out / "results.csv", rows)
    plots = plot_curves(rows, out) if rows else []
    summary = summarise(rows, pretraining) if rows else "no results yet\n"
    seconds = time.perf_counter() - t0
    header = (
        f"# Simulation summary\n\n{len(s.strategies)} strategies × {len(s.seeds)} seeds "
        f"({', '.join(map(str, s.seeds))}), {s.rounds} rounds of {s.budget} labels, "
        f"start: {s.start} ({s.start_size} labels unless a list).\n"
        f"Validation: {describe_validation(cfg, s.validation)}.\n"
        f"{describe_backbones(cfg, s)}\n\n"
    )
    if failures:
        header += (
            f"**{len(failures)} run(s) failed** and are missing or cut short here: "
            f"{', '.join(sorted(failures))}.\n\n"
        )
    (out / "summary.md").write_text(header + summary, encoding="utf-8")
    return SimulationResult(out, rows, header + summary, plots, seconds, failures)
