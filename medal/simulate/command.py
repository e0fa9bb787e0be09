"""The ``medal simulate`` command (its arguments are parsed in :mod:`medal.cli`)."""

from __future__ import annotations

import argparse
import sys

from ..config import Config
from ..errors import SimulationError
from .planning import SimulationSettings
from .runner import simulate


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def command(cfg: Config, args: argparse.Namespace) -> int:
    """``medal simulate`` with the config already loaded (the CLI's COMMANDS signature)."""
    try:
        seeds = tuple(int(x) for x in _csv_list(args.seeds))
    except ValueError:
        raise SimulationError(f"--seeds expects integers like 0,1,2, got {args.seeds!r}") from None
    settings = SimulationSettings(
        truth=tuple(args.truth),
        out=args.out or cfg.workspace.with_name(cfg.workspace.name + "-simulation"),
        strategies=tuple(_csv_list(args.strategies)),
        seeds=seeds,
        rounds=args.rounds,
        budget=args.budget or cfg.query.budget,
        start=args.start,
        start_size=args.start_size,
        validation=args.validation,
        workers=args.workers,
        threads=args.threads,
        verbose=not args.quiet,
        backbones=args.backbones,
    )
    r = simulate(cfg, settings)
    print(r.summary)
    print(
        f"results: {r.out / 'results.csv'}; curves: "
        f"{', '.join(p.name for p in r.plots) or 'none'}; summary: {r.out / 'summary.md'}"
    )
    print(f"simulation finished in {r.seconds:.0f} s")
    if r.failures:
        print(f"{len(r.failures)} run(s) failed: {', '.join(sorted(r.failures))}", file=sys.stderr)
        return 1
    return 0
