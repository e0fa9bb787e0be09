"""``medal`` command line: parses arguments, calls one library function, prints the outcome.

torch is imported only by the commands that need it (through :mod:`medal.api`), so
``medal --version``, ``medal --help`` and ``medal labels serve`` start without it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


def shadowed_package_message() -> str | None:
    """Why ``medal`` is not this package, in one line; None when it is.

    ``python -m medal``, ``python -c`` and scripts put the current folder first on
    ``sys.path``. A folder there named ``medal`` without ``__init__.py`` (the folder holding a
    clone, an empty ``medal/``) then becomes ``medal`` itself, as a namespace package, and an
    editable install's finder still supplies the submodules (this one included): every
    ``from . import`` of the package's own names fails with "ImportError: cannot import name
    ... (unknown location)". The ``medal`` command is not affected (its script's folder comes
    first). A regular (wheel) install is not affected either: a real package wins over a
    namespace folder.
    """
    pkg = sys.modules.get(__package__ or "medal")
    if pkg is None or getattr(pkg, "__file__", None) is not None:
        return None
    found = ", ".join(str(p) for p in getattr(pkg, "__path__", [])) or "?"
    return (
        f"'import medal' found the folder {found}, which is not the medal package (it has "
        f"no __init__.py), because Python looks in the current folder first: run python "
        f"from another folder, or use the 'medal' command (medal itself is in "
        f"{Path(__file__).resolve().parent})"
    )


if (_shadowed := shadowed_package_message()) is not None:
    raise ImportError(_shadowed)

from . import __version__  # noqa: E402  (after the check above, which explains its failure)
from .config import Config, add_overrides_argument, load_config, parse_overrides  # noqa: E402
from .errors import MedalError  # noqa: E402
from .roundfolder import LABELS  # noqa: E402

if TYPE_CHECKING:
    from . import api

EPILOG = """workflow:
  medal train  -c CONFIG            train on the labelled set (round 0)
  medal query  -c CONFIG            score the pool, export labelling/round-001
  medal ingest -c CONFIG FOLDER     record the radiologist's labels from a round folder
  medal round  -c CONFIG            fine-tune on all labels, then export the next round
  medal status -c CONFIG            rounds, label counts and metrics
  medal labels -c CONFIG export -o labels.csv   every label with provenance
  medal labels serve FOLDER         the labelling page for a round folder (local web page)
  medal simulate -c CONFIG --truth DIR --strategies bald,random ...   learning curves

See docs/configuration.md for the config reference."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medal",
        description="Active learning for medical images with MC dropout.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in SUBCOMMANDS:
        p = _add_command(sub, command)
        if command.add_arguments is not None:
            command.add_arguments(p)
    p = sub.add_parser(
        "simulate",
        help=SIMULATE_HELP,
        description=SIMULATE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_simulate_arguments(p)
    return parser


@dataclass(frozen=True)
class Subcommand:
    """One workspace subcommand of ``medal``: its one-line help, its ``--help`` description, the
    arguments it adds to the shared ``-c/--set/-q`` (if any), and whether ``-c`` is required."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    config_required: bool = True


def _add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], command: Subcommand
) -> argparse.ArgumentParser:
    """Add ``command``'s parser to the subparsers ``sub`` with the options every workspace
    command shares: ``-c/--config``, ``--set KEY=VALUE`` and ``-q/--quiet``."""
    p = sub.add_parser(
        command.name,
        help=command.help,
        description=command.description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-c",
        "--config",
        required=command.config_required,
        type=Path,
        help="TOML config file (relative paths in it resolve against its folder)"
        + ("" if command.config_required else "; optional for 'labels serve'"),
    )
    add_overrides_argument(p, "override a config key, e.g. --set query.budget=50 (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def add_ingest_arguments(p: argparse.ArgumentParser) -> None:
    """The argument of ``medal ingest`` besides the config: the returned round folder."""
    p.add_argument("folder", type=Path, help="the round folder, e.g. runs/x/labelling/round-001")


def add_labels_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``medal labels`` besides the config: an action and its options."""
    p.add_argument("action", choices=["export", "unsure", "release", "serve"])
    p.add_argument(
        "ids",
        nargs="*",
        metavar="ID|FOLDER",
        help="image id prefixes (release) or the round folder (serve)",
    )
    p.add_argument("-o", "--output", type=Path, help="CSV to write (export)")
    p.add_argument(
        "--annotator",
        metavar="NAME",
        help="serve: write labels_NAME.csv (several readers) instead of labels.csv",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="serve: address to listen on (default 127.0.0.1: this machine only)",
    )
    p.add_argument("--port", type=int, default=0, help="serve: port (default 0: a free one)")


SUBCOMMANDS = (
    Subcommand(
        "train",
        "train (or fine-tune) the model on all labels so far",
        "Train the model for the current round on every label so far. The first training\n"
        "starts from scratch (or model.pretrained); after an ingest it fine-tunes from the\n"
        "previous round's checkpoint. Prints validation/test metrics.",
    ),
    Subcommand(
        "query",
        "score the pool with MC dropout and export the next round folder",
        "Score every pool image with Monte Carlo dropout, choose query.budget images with\n"
        "query.strategy, and export them to <workspace>/labelling/round-NNN for labelling.",
    ),
    Subcommand(
        "ingest",
        "record the labels returned in a round folder",
        "Validate a returned round folder (labels.csv and/or class subfolders). On any\n"
        "problem, list every problem and record nothing; otherwise record all labels in\n"
        "one transaction. Unlabelled images go back to the pool. Running it twice is safe.\n"
        "To hand a round back unlabelled, leave only the header line in labels.csv (an\n"
        "ingest that would record no label is refused otherwise, naming the other labels\n"
        "files found). Readers' files are labels_<name>.csv (any case).",
        add_ingest_arguments,
    ),
    Subcommand(
        "round",
        "one active-learning round: train (fine-tune), then query",
        "Fine-tune on all labels so far (the same as 'medal train'), then export the next\n"
        "round (the same as 'medal query').",
    ),
    Subcommand(
        "status",
        "show rounds, label counts and metrics per round",
        "Show the workspace: rounds exported and ingested (images labelled; readers: the\n"
        "rows of their labels_<name>.csv files), labels per class and source,\n"
        "metrics of each model round, and files that could not be read.",
    ),
    Subcommand(
        "labels",
        "export every label with provenance; list or release 'unsure' images; "
        "serve the labelling page",
        "labels export -o FILE   every label row (round, source, annotator, time) as CSV\n"
        "labels unsure           images labelled 'unsure' (kept out of the pool)\n"
        "labels release [ID...]  put 'unsure' images back in the pool (all, or by id\n"
        "                        prefix)\n"
        "labels serve FOLDER     a local web page to label one round folder with the\n"
        "                        keyboard; every decision is written to its labels.csv\n"
        "                        (labels_<NAME>.csv with --annotator NAME) at once.\n"
        "                        -c is optional here: without it the classes come from\n"
        "                        the folder's manifest.csv and predictions stay hidden.\n"
        "                        Needs the serve extra: pip install 'medal-al[serve]'",
        add_labels_arguments,
        config_required=False,
    ),
)
"""The workspace subcommands in ``medal --help`` order (``simulate``, with its own options, is
added after them)."""


SIMULATE_HELP = "simulate active learning on a fully labelled set (compare strategies)"
SIMULATE_DESCRIPTION = """\
Hide the labels of a fully labelled set and run active learning on it: for each
strategy and seed, a workspace goes through train -> query -> (a simulated radiologist fills
labels.csv from the hidden labels) -> ingest -> train, for --rounds rounds. Writes results.csv,
learning curves (PNG) and summary.md to --out. Interrupted simulations resume where they
stopped when run again with the same settings.

By default the protocol is the one a team meets: a random start set, no labelled validation set
(each run holds out train.validation_fraction of its labels), and every label the simulated
radiologist gave counted, held-out ones included."""


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``medal simulate`` (here, not in :mod:`medal.simulate`, so that building
    the parser imports no torch)."""
    _add_simulate_inputs(p)
    _add_simulate_protocol(p)
    _add_simulate_output(p)


def _add_simulate_inputs(p: argparse.ArgumentParser) -> None:
    """``medal simulate``'s config, overrides, quietness and the fully labelled set."""
    p.add_argument(
        "-c",
        "--config",
        required=True,
        type=Path,
        help="TOML config file (classes, model, training, validation/test sets)",
    )
    add_overrides_argument(p, "override a config key, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="only print the summary")
    p.add_argument(
        "--truth",
        action="append",
        type=Path,
        required=True,
        metavar="PATH",
        help="the fully labelled set: class subfolders or CSV file,label "
        "(repeatable; the sources are joined)",
    )


def _add_simulate_protocol(p: argparse.ArgumentParser) -> None:
    """``medal simulate``'s experiment design: strategies, seeds, rounds, budget, start set,
    validation set and SimCLR backbones."""
    p.add_argument(
        "--strategies",
        default="bald,entropy,random",
        help="comma-separated strategies (default bald,entropy,random)",
    )
    p.add_argument(
        "--seeds",
        default="0,1,2,3,4",
        help="comma-separated seeds (default 0,1,2,3,4; the summary's 95%% intervals "
        "are over seeds)",
    )
    p.add_argument("--rounds", type=int, default=10, help="labelling rounds (default 10)")
    p.add_argument(
        "--budget",
        type=int,
        default=None,
        help="labels per round (default: query.budget of the config)",
    )
    p.add_argument(
        "--start",
        default="random",
        help="start set: random, class_balanced (drawn knowing the hidden labels), "
        "class:<name> (single class), or a file listing images (default random)",
    )
    p.add_argument(
        "--start-size",
        type=int,
        default=20,
        help="start set size for random/class starts (default 20)",
    )
    p.add_argument(
        "--validation",
        default="none",
        metavar="none|config|PATH",
        help="labelled validation set: none (default: each run holds out "
        "train.validation_fraction of the labels it was given, counted as "
        "labels), config (the config's data.validation) or a folder/CSV; the "
        "labels of a set passed this way are not counted",
    )
    p.add_argument(
        "--backbones",
        choices=("per-seed", "shared"),
        default="per-seed",
        help="with representation.method = simclr: per-seed (default) pretrains one "
        "self-supervised backbone per seed, so the intervals include the "
        "pretraining's variation; shared pretrains one for all runs (faster)",
    )


def _add_simulate_output(p: argparse.ArgumentParser) -> None:
    """``medal simulate``'s output folder and parallelism (workers, threads per worker)."""
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <workspace>-simulation)"
    )
    p.add_argument(
        "--workers", type=int, default=1, help="runs in parallel, one process each (default 1)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per worker (default: CPU count / workers)",
    )


class OutputError(MedalError):
    """Standard output cannot be written (a full disk, ``> /dev/full``, an I/O error)."""


class _GuardedStdout:
    """``sys.stdout`` whose write errors (other than a closed pipe) become
    :class:`OutputError`, so they end as one line instead of a traceback."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _failed(self, e: OSError) -> OutputError:
        try:
            where = os.readlink(f"/proc/self/fd/{self._stream.fileno()}")
        except (AttributeError, OSError, ValueError):  # not Linux, or no file descriptor
            where = "standard output"
        _silence_stdout(self._stream)  # the unwritten rest must not fail again at exit
        return OutputError(f"cannot write the output to {where}: {e.strerror or e}")

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise self._failed(e) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise self._failed(e) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _silence_stdout(stream: Any) -> None:
    """Point ``stream``'s file descriptor at devnull (the Python docs' advice for a closed
    pipe), so the flush at exit has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # stdout without a file descriptor
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    real_stdout, sys.stdout = sys.stdout, _GuardedStdout(sys.stdout)
    try:
        return _run(args)
    finally:
        if isinstance(sys.stdout, _GuardedStdout):
            sys.stdout = real_stdout


def _run(args: argparse.Namespace) -> int:
    try:
        try:
            cfg = (
                None
                if args.config is None  # only 'labels serve' runs without one
                else load_config(args.config, parse_overrides(args.overrides))
            )
            code = COMMANDS[args.command](cfg, args)
            sys.stdout.flush()  # a closed pipe (medal status | head) shows here, not at exit
            return code
        except MedalError as e:
            if _is_main():
                print(f"medal {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            dist = sys.modules.get("medal.distributed")  # loaded only by commands that use it
            if dist is not None:
                dist.shutdown()
    except BrokenPipeError:
        # The reader of stdout went away (`medal train ... | head`). As the Python docs advise
        # ("Note on SIGPIPE"): point stdout at devnull so the flush at exit cannot fail again.
        _silence_stdout(sys.stdout)
        return 1


def _is_main() -> bool:
    """Rank 0 under torchrun (or no torchrun), without importing torch for it."""
    dist = sys.modules.get("medal.distributed")
    return dist.is_main() if dist is not None else os.environ.get("RANK", "0") == "0"


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except (ValueError, RuntimeError, OSError):  # elsewhere, or a link loop
        return str(p)


def _fmt(v: float | None) -> str:
    from .metrics import show_metric

    return show_metric(v)


def _print_train(r: api.TrainReport) -> None:
    counts = ", ".join(f"{c} {n}" for c, n in r.class_counts.items())
    start = (
        f"fine-tuned from round {r.warm_start_from}"
        if r.warm_start_from is not None
        else "trained from scratch"
    )
    print(
        f"model round {r.model_round}: {start} on {r.n_labels} labels ({counts}); "
        f"{r.epochs} epochs (best {r.best_epoch}) in {r.seconds:.1f} s"
    )
    for split, m in r.metrics.items():
        print(
            f"  {split:<10} accuracy {_fmt(m['accuracy'])}  balanced accuracy "
            f"{_fmt(m['balanced_accuracy'])}  AUROC {_fmt(m['auroc'])}  (n={int(m['n'])})"
        )
    for note in r.notes:
        print(f"  note: {note}")
    print(f"  checkpoint: {_rel(r.checkpoint)}")
    if r.skipped:
        print(f"  {len(r.skipped)} unreadable file(s) skipped; see 'medal status'")


def _print_query(r: api.QueryReport, cfg: Config) -> None:
    print(
        f"round {r.round:03d}: {r.n_selected} images chosen by {r.strategy} from a pool of "
        f"{r.pool_size} (model round {r.model_round}, {r.seconds:.1f} s)"
    )
    if r.reused:
        print(f"  {r.reused} images' scores reused (same model and settings as an earlier query)")
    if r.skipped:
        print(f"  {len(r.skipped)} unreadable file(s) skipped; see 'medal status'")
    for note in r.notes:
        print(f"  note: {note}")
    print(f"labelling folder: {_rel(r.folder)}")
    c = f"-c {_rel(cfg.path)}"
    print(
        f"next: label the images on the labelling page:\n  medal labels serve {c} "
        f"{_rel(r.folder)}\n  (or fill {_rel(r.folder / LABELS)}, or sort the images "
        f"into its class folders), then\n  medal ingest {c} {_rel(r.folder)}"
    )


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    from . import api

    r = api.train(cfg, progress=not args.quiet)
    if r is not None:  # None on torchrun ranks other than 0
        _print_train(r)
    return 0


def cmd_query(cfg: Config, args: argparse.Namespace) -> int:
    from . import api

    r = api.query(cfg, progress=not args.quiet)
    if r is not None:
        _print_query(r, cfg)
    return 0


def cmd_ingest(cfg: Config, args: argparse.Namespace) -> int:
    from . import api

    r = api.ingest(cfg, args.folder)
    if r.already_ingested:
        print(f"round {r.round:03d} was already ingested with these labels; nothing changed")
        return 0
    counts = ", ".join(f"{c} {n}" for c, n in sorted(r.labelled.items())) or "none"
    print(
        f"round {r.round:03d}: recorded {sum(r.labelled.values())} labels ({counts}); "
        f"{r.returned_to_pool} unlabelled image(s) returned to the pool"
    )
    for a, b, n, kappa in r.agreement:
        k = "n/a" if math.isnan(kappa) else f"{kappa:.3f}"
        print(f"  agreement {a} vs {b}: Cohen's kappa {k} on {n} image(s)")
    if r.adjudicated:
        print(f"  {r.adjudicated} disagreement(s) settled by the labels in labels.csv/folders")
    print(f"next: medal round -c {_rel(cfg.path)}")
    return 0


def cmd_labels(cfg: Config | None, args: argparse.Namespace) -> int:
    if args.action == "serve":
        return _serve(cfg, args)
    if cfg is None:
        raise MedalError(f"labels {args.action} needs the config: -c CONFIG")
    from . import api

    if args.action == "export":
        if args.output is None:
            raise MedalError("labels export needs -o FILE")
        n = api.export_labels(cfg, args.output)
        print(f"wrote {n} label rows to {args.output}")
    elif args.action == "unsure":
        rows = api.unsure_images(cfg)
        for image_id, path in rows:
            print(f"{image_id[:12]}  {path}")
        print(
            f"{len(rows)} image(s) labelled unsure; 'medal labels release' returns them to the pool"
        )
    else:
        n = api.release_unsure(cfg, args.ids or None)
        print(f"{n} image(s) returned to the pool")
    return 0


def _serve(cfg: Config | None, args: argparse.Namespace) -> int:
    from . import serve

    if len(args.ids) != 1:
        raise MedalError(
            "labels serve needs exactly one round folder, e.g. "
            "medal labels serve runs/x/labelling/round-001"
        )
    server = serve.serve(
        Path(args.ids[0]), cfg, annotator=args.annotator, host=args.host, port=args.port
    )
    book = server.book
    print(
        f"labelling page for {_rel(book.folder)} ({len(book.images)} images; writes "
        f"{book.labels_path.name}):"
    )
    print(f"  {server.url}", flush=True)
    if not server.local_only:
        print(
            f"  note: listening on {args.host}, so other machines can reach it (the token "
            f"is still required)"
        )
    ingested = book.ingested()
    if ingested is not None:
        print(f"  note: {ingested}", flush=True)
    print(
        "open the address in a browser; Ctrl-C stops the server (every decision is already saved)",
        flush=True,
    )
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    print(f"stopped; the decisions are in {_rel(book.labels_path)}")
    return 0


def cmd_round(cfg: Config, args: argparse.Namespace) -> int:
    from . import api

    r = api.run_round(cfg, progress=not args.quiet)
    if r is not None:
        _print_train(r.train)
        _print_query(r.query, cfg)
    return 0


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    from . import api

    s = api.status(cfg)
    print(f"workspace: {_rel(s.workspace)}")
    labels = ", ".join(f"{c} {n}" for c, n in s.label_counts.items())
    sources = ", ".join(f"{k} {n}" for k, n in sorted(s.labels_by_source.items()))
    print(f"labels: {sum(s.label_counts.values())} ({labels}); by source: {sources or 'none'}")
    if s.rounds:
        print("\nround  strategy     exported  labelled  readers  pool    model  state")
        for r in s.rounds:
            state = "ingested" if r["ingested"] else "awaiting labels"
            model = r["model_round"] if r["model_round"] >= 0 else "–"  # zero-label round
            print(
                f"{r['round']:>5}  {r['strategy']:<11}  {r['exported']:>8}  {r['labelled']:>8}"
                f"  {r['reader_labels'] or '–':>7}  {r['pool_size']:>6}  {model:>5}  {state}"
            )
    else:
        print("\nno rounds exported yet")
    if s.models:
        splits = sorted({sp for m in s.metrics.values() for sp in m})
        head = "".join(f"  {sp[:4]}:acc  {sp[:4]}:bacc  {sp[:4]}:auroc" for sp in splits)
        print(f"\nmodel  labels  epochs  train s{head}")
        for m in s.models:
            met = s.metrics.get(m["round"], {})
            cells = "".join(
                f"  {_fmt(met.get(sp, {}).get('accuracy')):>8}"
                f"  {_fmt(met.get(sp, {}).get('balanced_accuracy')):>9}"
                f"  {_fmt(met.get(sp, {}).get('auroc')):>10}"
                for sp in splits
            )
            print(
                f"{m['round']:>5}  {m['n_labels']:>6}  {m['epochs']:>6}  "
                f"{m['train_seconds']:>7.1f}{cells}"
            )
        for note in s.notes:
            print(f"  note: {note}")
    if s.skipped:
        print(f"\n{len(s.skipped)} unreadable file(s) skipped:")
        for p, reason in list(s.skipped.items())[:20]:
            print(f"  {_rel(Path(p))}: {reason}")
        if len(s.skipped) > 20:
            print(f"  ... and {len(s.skipped) - 20} more")
        print(f"  (all of them: {_rel(s.skipped_csv or s.workspace)})")
    return 0


# Each command takes the loaded config (None only for 'labels serve' without -c, which
# cmd_labels handles) and the parsed arguments, and returns the exit code.
COMMANDS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "train": cmd_train,
    "query": cmd_query,
    "ingest": cmd_ingest,
    "round": cmd_round,
    "status": cmd_status,
    "labels": cmd_labels,
}


def _simulate(cfg: Config, args: argparse.Namespace) -> int:
    from . import simulate

    return simulate.command(cfg, args)


COMMANDS["simulate"] = _simulate
