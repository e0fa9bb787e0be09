"""The Python API: one function per CLI command. Each opens the workspace, does one step and
returns a small report object; nothing here prints except progress bars."""

from __future__ import annotations

import csv
import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from . import acquisition
from .config import Config
from .data import ImageDataset, load_all
from .errors import DataError, ModelError, WorkspaceError
from .features import FeatureCache, backbone_key
from .labelling.export import Candidate, export_round
from .labelling.ingest import FINAL_SOURCES, IngestResult, ingest_round
from .models import MCModel, read_pretrained, resolve_device, set_mc_mode
from .representation import SSLSettings, StepPlan, load_cached, pretrain_and_cache
from .representation import cache_key as ssl_cache_key
from .resources import check_pretraining_memory, check_query_memory, check_training_memory
from .metrics import classification_metrics
from .fitting import FitResult
from .train import backbone_features, build_model, fit, load_checkpoint, save_checkpoint
from . import distributed
from .uncertainty import (
    MCResult,
    ScoreCollector,
    ScoreStore,
    batch_seed,
    head_samples,
    mc_predict_tensors,
    n_batches,
    score_batches,
)
from .ledger import LabelRecord, ModelRecord
from .sources import Item, Snapshot, sync
from .workspace import UNSURE, Workspace, cache_dir, has_ledger


@dataclass
class TrainReport:
    model_round: int
    checkpoint: Path
    n_labels: int
    class_counts: dict[str, int]
    warm_start_from: int | None
    epochs: int
    best_epoch: int
    seconds: float
    metrics: dict[str, dict[str, float]]
    skipped: dict[Path, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class QueryReport:
    round: int
    folder: Path
    n_selected: int
    pool_size: int
    strategy: str
    model_round: int
    seconds: float
    skipped: dict[Path, str] = field(default_factory=dict)
    reused: int = 0
    """Pool images whose scores from an earlier query with the same model were reused."""
    notes: list[str] = field(default_factory=list)


@dataclass
class RoundReport:
    train: TrainReport
    query: QueryReport


def _labels_to_index(items: list[Item], classes: tuple[str, ...]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[str(it.label)] for it in items], dtype=np.int64)


def _cache_dir(cfg: Config) -> Path | None:
    return cache_dir(cfg.workspace) if cfg.image.cache else None


def _dataset(cfg: Config, items: list[Item]) -> ImageDataset:
    cache = _cache_dir(cfg)
    return ImageDataset(
        [it.path for it in items],
        channels=cfg.model.channels,
        size=cfg.model.image_size,
        window=cfg.image.window,
        frame=cfg.image.frame,
        ids=[it.id for it in items] if cache else None,
        cache_dir=cache,
        frames=[it.frame for it in items],
    )


def _load(cfg: Config, items: list[Item]) -> tuple[Any, np.ndarray, list[Item], dict[Path, str]]:
    cache = _cache_dir(cfg)
    x, kept, skipped = load_all(
        [it.path for it in items],
        channels=cfg.model.channels,
        size=cfg.model.image_size,
        window=cfg.image.window,
        frame=cfg.image.frame,
        num_workers=cfg.num_workers,
        ids=[it.id for it in items] if cache else None,
        cache_dir=cache,
        frames=[it.frame for it in items],
    )
    kept_items = [items[i] for i in kept]
    y = (
        _labels_to_index(kept_items, cfg.classes)
        if kept_items and kept_items[0].label
        else np.zeros(0, np.int64)
    )
    return x, y, kept_items, skipped


def _record_skipped(ws: Workspace, skipped: dict[Path, str]) -> None:
    """Remember unreadable files in the ledger and in ``<workspace>/skipped.csv`` (with every
    byte-identical copy of each)."""
    if skipped:
        ws.record_skipped({str(p): r for p, r in skipped.items()})


def train(cfg: Config, *, progress: bool = True) -> TrainReport | None:
    """Train the model for the current round on every label so far.

    Round 0 trains from scratch (or from ``model.pretrained``); later rounds fine-tune from the
    previous round's checkpoint. One code path for one process or many: rank 0 plans (reads
    the workspace, pretrains a self-supervised backbone once), every rank trains (under
    torchrun with DistributedDataParallel), rank 0 evaluates and records; other ranks return
    ``None``.
    """
    if cfg.train.tensorboard:  # a missing package is said before training, not after
        from . import tensorboard_log

        tensorboard_log.require()
    if cfg.model.pretrained is not None:  # a bad file is refused before anything is written
        read_pretrained(cfg.model.pretrained)
    device = distributed.setup(cfg.device)
    with distributed.main_only(lambda: Workspace(cfg)) as ws:
        plan = distributed.on_main(
            lambda: _plan_training(cast(Workspace, ws), cfg, device, progress)
        )
        x, y, items, skipped = _load(cfg, plan.labelled)
        if len(items) == 0:
            raise DataError("none of the labelled images could be read; see 'medal status'")
        xv, yv, _, sk_v = _load(cfg, plan.validation)
        xt, yt, _, sk_t = _load(cfg, plan.test)
        skipped |= sk_v | sk_t
        model = start_model(cfg, plan.parent_checkpoint, plan.backbone)
        seed = round_seed(cfg, plan.model_round)
        tb = _tensorboard_round(ws, cfg, plan.model_round)
        unlabelled = None
        if (
            ws is not None
            and cfg.train.freeze_backbone
            and cfg.train.semi_supervised != "none"
            and plan.pool
        ):
            model.to(device)
            f, found, _ = frozen_features(ws, cfg, model, plan.pool, device)
            unlabelled = torch.from_numpy(f[found])
        result = fit(
            model,
            x,
            y,
            cfg,
            epochs=training_epochs(cfg, plan.parent),
            device=device,
            x_val=xv if len(xv) else None,
            y_val=yv if len(yv) else None,
            seed=seed,
            progress=progress and ws is not None,
            state_path=plan.state_path,
            distributed=distributed.is_distributed(),
            unlabelled=unlabelled,
            log=None if tb is None else tb.row,
        )
        report = None
        if ws is not None:
            result.notes[:0] = plan.notes
            report = _finish_training(
                ws,
                cfg,
                model,
                device,
                seed,
                plan.model_round,
                plan.parent,
                items,
                result,
                (xv, yv),
                (xt, yt),
                skipped,
            )
        if tb is not None and report is not None:  # after the ledger: the round is kept
            tb.round_metrics(report.n_labels, report.model_round, report.metrics, report.best_epoch)
            tb.close()
        distributed.barrier()
        return report


def _tensorboard_round(ws: Workspace | None, cfg: Config, model_round: int) -> Any:
    """Rank 0's TensorBoard event file of this model round (``train.tensorboard``), or None."""
    if ws is None or not cfg.train.tensorboard:
        return None
    from . import tensorboard_log

    return tensorboard_log.round_part(ws.tensorboard_root, model_round)


@dataclass(frozen=True)
class _TrainPlan:
    """What rank 0 decides before every rank trains."""

    labelled: list[Item]
    validation: list[Item]
    test: list[Item]
    model_round: int
    parent: int | None
    parent_checkpoint: Path | None
    backbone: Path | None
    """The cached self-supervised backbone to start from, if any."""
    state_path: Path | None
    """Resume state of an interrupted training (one process only)."""
    notes: list[str]
    pool: list[Item] = field(default_factory=list)
    """The unlabelled pool (for semi-supervised training of a frozen backbone's head)."""


def _plan_training(ws: Workspace, cfg: Config, device: torch.device, progress: bool) -> _TrainPlan:
    snap = sync(ws)
    if not snap.labelled:
        raise DataError(_no_labels(cfg))
    check_training_memory(
        cfg,
        len(snap.labelled) + len(snap.validation) + len(snap.test),
        max(len(snap.validation), len(snap.test)),
        device,
    )
    model_round = ws.ingested_rounds()
    parent = parent_round(ws, cfg, model_round)
    notes, backbone = list(snap.notes), None
    if parent is None and cfg.representation.method != "none":
        note, backbone = pretrained_backbone(ws, cfg, snap, device, progress)
        notes.append(note)
    return _TrainPlan(
        snap.labelled,
        snap.validation,
        snap.test,
        model_round,
        parent,
        None if parent is None else ws.checkpoint_path(parent),
        backbone,
        None if distributed.is_distributed() else ws.training_state_path(model_round),
        notes,
        list(snap.pool),
    )


def round_seed(cfg: Config, round_no: int) -> int:
    """The seed of a round's randomness: of model round ``round_no``'s training and evaluation,
    or of the query that exports round ``round_no`` (scoring, selection)."""
    return cfg.seed * 1000 + round_no


def training_epochs(cfg: Config, parent: int | None) -> int:
    """Epochs of a training: ``train.fine_tune_epochs`` (default ``train.epochs``) when it
    fine-tunes from model round ``parent``, ``train.epochs`` from fresh weights."""
    if parent is None:
        return cfg.train.epochs
    return cfg.train.fine_tune_epochs or cfg.train.epochs


def pretrain_representation(cfg: Config, *, progress: bool = True) -> str:
    """Make sure the self-supervised backbone for this workspace's images is in the cache
    (pretraining it if needed) without training anything else; returns the report line."""
    return ensure_backbone(cfg, progress=progress)[0]


def ensure_backbone(cfg: Config, *, progress: bool = True) -> tuple[str, Path]:
    """:func:`pretrain_representation`, also returning the cached backbone's file."""
    with Workspace(cfg) as ws:
        return pretrained_backbone(ws, cfg, sync(ws), resolve_device(cfg.device), progress)


def representation_seed(cfg: Config) -> int:
    """The pretraining's seed: ``representation.seed``, by default the project's ``seed``."""
    r = cfg.representation.seed
    return cfg.seed if r is None else r


def pretrained_backbone(
    ws: Workspace, cfg: Config, snap: Snapshot, device: torch.device, progress: bool
) -> tuple[str, Path]:
    """Load (or first train and cache) the self-supervised backbone for this workspace's
    images: the pool, the labelled images and an automatic hold-out; never the given
    validation or test sets. Returns a line for the training report and the cache file."""
    path, items, settings = _backbone_job(ws, cfg, snap)
    t0 = time.perf_counter()
    # initial weights as `medal train` with this seed builds them: the same backbone either way
    model = start_model(dataclasses.replace(cfg, seed=settings.seed), None)
    if load_cached(path, model.backbone):
        return f"self-supervised backbone loaded from the cache ({_short(path)})", path
    check_pretraining_memory(cfg, len(items), device)

    def run(log: Callable[[float, int], None] | None = None) -> StepPlan:
        return pretrain_and_cache(
            path,
            model.backbone,
            model.backbone_dim,
            _dataset(cfg, items),  # streamed: read batch by batch through the decode cache
            settings,
            device=device,
            num_workers=cfg.num_workers,
            progress=progress,
            log=log,
        )

    if cfg.train.tensorboard:  # the pretraining loss per step, written as it trains
        from . import tensorboard_log

        with tensorboard_log.pretraining_part(ws.tensorboard_root) as tb:
            plan = run(log=tb.pretraining_loss)
    else:
        plan = run()
    return (
        f"self-supervised backbone pretrained on {plan.images} images in "
        f"{time.perf_counter() - t0:.0f} s, cached for later rounds"
    ), path


def _backbone_job(
    ws: Workspace, cfg: Config, snap: Snapshot
) -> tuple[Path, list[Item], SSLSettings]:
    """The cache file of this workspace's self-supervised backbone, the images it learns from
    and its settings."""
    r = cfg.representation
    items = [*snap.pool, *snap.labelled]
    if cfg.data.validation is None:
        items += snap.validation
    keys = ("epochs", "batch_size", "temperature", "lr", "min_steps", "max_steps")
    settings = SSLSettings(seed=representation_seed(cfg), **{k: getattr(r, k) for k in keys})
    key = ssl_cache_key(
        [it.id for it in items],
        {
            "size": cfg.model.image_size,
            "channels": cfg.model.channels,
            "window": cfg.image.window,
            "frame": cfg.image.frame,
        },
        {"name": cfg.model.name, "pretrained": cfg.model.pretrained},
        settings,
    )
    return ws.representation_path(key), items, settings


def pretrain_on_every_rank(
    ws: Workspace | None, cfg: Config, device: torch.device, progress: bool
) -> None:
    """Under torchrun, before rank 0 plans a first training (``ws`` on rank 0, ``None`` on the
    others): when its self-supervised backbone is not cached yet, every rank pretrains it on
    a shard of every batch (:func:`medal.representation.pretrain`) and rank 0 caches it, so
    that :func:`pretrained_backbone` then loads it. Nothing with one process, without
    ``representation.method``, without labels or when the round fine-tunes."""
    if not distributed.is_distributed() or cfg.representation.method == "none":
        return

    def job() -> tuple[Path, list[Item], SSLSettings] | None:
        w = cast(Workspace, ws)
        snap = sync(w)
        if not snap.labelled or parent_round(w, cfg, w.ingested_rounds()) is not None:
            return None  # the plan says what is missing, or no backbone is needed
        found = _backbone_job(w, cfg, snap)
        if found[0].is_file():
            return None
        check_pretraining_memory(cfg, len(found[1]), device)
        return found

    todo = distributed.on_main(job)
    if todo is None:
        return
    path, items, settings = todo
    model = start_model(dataclasses.replace(cfg, seed=settings.seed), None)
    pretrain_and_cache(
        path,
        model.backbone,
        model.backbone_dim,
        _dataset(cfg, items),
        settings,
        device=device,
        num_workers=cfg.num_workers,
        progress=progress,
        ranks=distributed.ranks(),
    )


def _short(p: Path) -> str:
    return f"{p.parent.name}/{p.name[:12]}…"


def _finish_training(
    ws: Workspace,
    cfg: Config,
    model: MCModel,
    device: torch.device,
    seed: int,
    model_round: int,
    parent: int | None,
    items: list[Item],
    result: FitResult,
    val: tuple[Any, np.ndarray],
    test: tuple[Any, np.ndarray],
    skipped: dict[Path, str],
) -> TrainReport:
    """MC-averaged metrics on validation and test, the checkpoint and the ledger row."""
    metrics = {}
    for split, (xs, ys) in (("validation", val), ("test", test)):
        if len(xs):
            probs, _ = mc_predict_tensors(
                model,
                xs,
                cfg.query.mc_samples,
                device=device,
                batch_size=cfg.query.batch_size,
                seed=seed,
            )
            metrics[split] = classification_metrics(
                ys, probs.mean(1), len(cfg.classes), cfg.classes
            )
    path = ws.checkpoint_path(model_round)
    save_checkpoint(path, model, cfg, model_round)
    ws.db.record_model(
        model_round,
        ws.checkpoint_name(model_round),
        parent,
        len(items),
        result.epochs,
        result.seconds,
        metrics,
    )
    _record_skipped(ws, skipped)
    counts = Counter(it.label for it in items)
    return TrainReport(
        model_round,
        path,
        len(items),
        {c: counts.get(c, 0) for c in cfg.classes},
        parent,
        result.epochs,
        result.best_epoch,
        result.seconds,
        metrics,
        skipped,
        [*result.notes, *metric_notes(metrics, cfg.classes)],
    )


def metric_notes(metrics: dict[str, dict[str, float]], classes: tuple[str, ...]) -> list[str]:
    """One line per split that lacks a class or has an undefined metric (shown as "–")."""
    notes = []
    for split, m in metrics.items():
        absent = [c for c in classes if sum(m.get(f"confusion/{c}/{d}", 0.0) for d in classes) == 0]
        undefined = sorted(k for k, v in m.items() if not np.isfinite(v))
        if absent:
            notes.append(
                f"{split} set has no {', '.join(absent)} image; {len(undefined)} "
                f"metric(s) undefined there (AUROC needs every class), shown as '–'"
            )
        elif undefined:
            notes.append(
                f"{split}: {len(undefined)} metric(s) undefined, shown as '–' "
                f"({', '.join(undefined[:3])}{', ...' if len(undefined) > 3 else ''})"
            )
    return notes


def parent_round(ws: Workspace, cfg: Config, model_round: int) -> int | None:
    """The model round whose best checkpoint model round ``model_round``'s training starts
    from: under ``warm_start`` the latest earlier one; ``None`` (fresh weights) under
    ``retrain`` or when there is none."""
    if cfg.train.round_start != "warm_start":
        return None
    return max((m.round for m in ws.db.models() if m.round < model_round), default=None)


def start_model(
    cfg: Config, parent_checkpoint: Path | None, backbone: Path | None = None
) -> MCModel:
    """The weights a training starts from: fresh (``model.pretrained`` when given), seeded so
    every round starts alike, then the parent's checkpoint or a cached self-supervised
    ``backbone`` when given."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    if parent_checkpoint is not None:
        load_checkpoint(parent_checkpoint, model, cfg.classes, cfg.model.name, cfg.model.channels)
    if backbone is not None and not load_cached(backbone, model.backbone):
        raise ModelError(f"cannot read the self-supervised backbone {backbone}")
    return model


def initial_model(ws: Workspace, cfg: Config, model_round: int) -> tuple[MCModel, int | None]:
    """The weights model round ``model_round``'s training starts from, and the model round
    they come from (:func:`parent_round`, :func:`start_model`)."""
    parent = parent_round(ws, cfg, model_round)
    return start_model(cfg, None if parent is None else ws.checkpoint_path(parent)), parent


def current_model_record(ws: Workspace) -> ModelRecord:
    """The newest model that has seen every ingested label (rounds handed back empty do not
    need a new model); error if there is none."""
    needed = max(
        (r.round for r in ws.db.rounds() if r.ingested_at is not None and ws.db.labels(r.round)),
        default=0,
    )
    fit = [m for m in ws.db.models() if m.round >= needed]
    if not fit:
        hint = "medal train" if needed == 0 else "medal train (or medal round)"
        raise WorkspaceError(
            f"no model trained on the labels of round {needed} yet; run {hint} first"
        )
    return fit[-1]


def load_round_model(ws: Workspace, cfg: Config) -> tuple[MCModel, int]:
    """The model to score the pool with, and its model round."""
    rec = current_model_record(ws)
    return _model_from(cfg, ws.checkpoint_path(rec.round)), rec.round


def _model_from(cfg: Config, checkpoint: Path) -> MCModel:
    model = build_model(cfg)
    load_checkpoint(checkpoint, model, cfg.classes, cfg.model.name, cfg.model.channels)
    return model


def _refuse_pending(ws: Workspace) -> None:
    pending = ws.pending_round()
    if pending is not None:
        raise WorkspaceError(
            f"round {pending:03d} ({ws.round_dir(pending)}) has not been ingested yet; run "
            f"'medal ingest' on it first (an empty labels.csv returns its images to the pool)"
        )


def query(cfg: Config, *, progress: bool = True) -> QueryReport | None:
    """Score the pool with MC dropout and export the chosen images as the next round folder.

    One code path for one process or many: rank 0 plans (reads the workspace, reuses stored
    scores), every rank scores its share of the pool's batches, rank 0 merges them into the
    same selection and export a single process makes; other ranks return ``None``.
    """
    if cfg.model.pretrained is not None:  # a bad file is refused before anything is written
        read_pretrained(cfg.model.pretrained)
    device = distributed.setup(cfg.device)
    state: dict[str, Any] = {}  # rank 0's: the snapshot, the score collector, ...
    with distributed.main_only(lambda: Workspace(cfg)) as ws:
        plan = distributed.on_main(
            lambda: _plan_query(cast(Workspace, ws), cfg, device, progress, state)
        )
        if isinstance(plan, QueryReport):  # a zero-label first round, exported by rank 0
            return plan if ws is not None else None
        t0 = time.perf_counter()
        model = state["model"] if ws is not None else _model_from(cfg, plan.checkpoint)
        model.to(device)
        seed = round_seed(cfg, plan.round_no)
        chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        keep = state["sink"] if ws is not None else (lambda rows, p, f: chunks.append((rows, p, f)))
        skipped = _score_pool(ws, cfg, model, plan, device, seed, progress and ws is not None, keep)
        gathered = distributed.gather((chunks, skipped))
        report = None
        if ws is not None:
            report = _finish_query(ws, cfg, state, plan, gathered, model, device, seed, t0)
        distributed.barrier()
        return report


@dataclass(frozen=True)
class _QueryPlan:
    """What rank 0 decides before every rank scores."""

    pool: list[Item]
    round_no: int
    """The round to export."""
    model_round: int
    checkpoint: Path
    todo: np.ndarray
    """Positions in ``pool`` of the images no earlier query scored with this model."""
    mode: str
    max_items: int


def _plan_query(
    ws: Workspace, cfg: Config, device: torch.device, progress: bool, state: dict[str, Any]
) -> _QueryPlan | QueryReport:
    q = cfg.query
    _refuse_pending(ws)
    snap = sync(ws)
    zero_label = not snap.labelled and not ws.db.models()
    check_query_memory(cfg, len(snap.pool), len(snap.labelled), device, zero_label=zero_label)
    if zero_label:
        return _zero_label_query(ws, cfg, snap, device, progress)
    rec = current_model_record(ws)
    model = _model_from(cfg, ws.checkpoint_path(rec.round))
    if not snap.pool:
        raise DataError(_empty_pool(cfg))
    round_no = ws.next_round()
    mode, max_items = _sampling(cfg, device)
    top = acquisition.get_strategy(q.strategy).streaming_score(q.balance)
    sink = ScoreCollector(
        len(snap.pool),
        q.mc_samples,
        model.num_classes,
        model.feature_dim,
        ws.scores_dir(round_no),
        None if top is None else (top, q.budget),
        ids=[it.id for it in snap.pool],
    )
    key = _scores_key(cfg, rec, mode)
    state.update(
        snap=snap,
        sink=sink,
        key=key,
        model=model,
        reused=sink.reuse([ScoreStore(f) for f in ws.stored_scores()], key),
    )
    return _QueryPlan(
        snap.pool,
        round_no,
        rec.round,
        ws.checkpoint_path(rec.round),
        np.flatnonzero(~sink.ok),
        mode,
        max_items,
    )


def _score_pool(
    ws: Workspace | None,
    cfg: Config,
    model: MCModel,
    plan: _QueryPlan,
    device: torch.device,
    seed: int,
    progress: bool,
    sink: Any,
) -> dict[Path, str]:
    """Score this rank's share of the images still to score; ``sink(pool positions, probs
    [B, T, C], features [B, D])``. Returns the unreadable files."""
    q, todo = cfg.query, plan.todo
    items = [plan.pool[i] for i in todo]

    def to_pool(rows: np.ndarray, p: np.ndarray, f: np.ndarray) -> None:
        sink(todo[rows], p, f)

    if cfg.train.freeze_backbone and plan.mode == "head":
        # features from the workspace's cache, only the head sampled: rank 0 does it alone
        return (
            {}
            if ws is None
            else _score_frozen(ws, cfg, model, items, device, seed, progress, sink=to_pool)
        )
    sub = _dataset(cfg, items)
    total = n_batches(len(sub), q.batch_size)
    mine = distributed.my_share(total)
    return score_batches(
        model,
        sub,
        q.mc_samples,
        mine,
        device=device,
        batch_size=q.batch_size,
        num_workers=cfg.num_workers,
        seed=seed,
        progress=progress,
        desc=f"scoring {len(sub)} images"
        if len(mine) == total
        else f"scoring {len(mine)} of {total} batches",
        mode=plan.mode,
        precision=q.precision,
        max_batch_items=plan.max_items,
        sink=to_pool,
    )


def _finish_query(
    ws: Workspace,
    cfg: Config,
    state: dict[str, Any],
    plan: _QueryPlan,
    gathered: Any,
    model: MCModel,
    device: torch.device,
    seed: int,
    t0: float,
) -> QueryReport:
    """Rank 0: merge every rank's scores, store them, select and export the round."""
    sink = state["sink"]
    skipped: dict[Path, str] = {}
    for rank_chunks, rank_skipped in gathered:
        for rows, probs, feats in rank_chunks:
            sink(rows, probs, feats)
        skipped |= rank_skipped
    mc = sink.result(skipped, meta=state["key"])
    report = _select_and_export(
        ws, cfg, state["snap"], mc, model, device, plan.round_no, plan.model_round, seed, t0
    )
    report.reused = state["reused"]
    report.notes[:0] = state["snap"].notes
    return report


@torch.no_grad()
def frozen_features(
    ws: Workspace, cfg: Config, model: MCModel, items: list[Item], device: torch.device
) -> tuple[np.ndarray, np.ndarray, dict[Path, str]]:
    """Backbone features of ``items`` under a frozen backbone, from the workspace's feature
    cache; the images not in it are decoded, passed through the backbone once and cached.
    Returns ``(features [N, D] float32, found [N] bool, {path: reason} unreadable)``."""
    # "last" features keep the key they had before model.features existed
    key = backbone_key(
        model.backbone,
        [cfg.model.channels, cfg.model.image_size, cfg.image.window, cfg.image.frame]
        + ([f"stages={model.stages}"] if model.stages else []),
    )
    cache = FeatureCache(ws.feature_cache_path(key))
    ids = [it.id for it in items]
    feats, found = cache.lookup(ids, model.feature_dim)
    skipped: dict[Path, str] = {}
    missing = np.flatnonzero(~found)
    if len(missing):
        x, _, kept_items, skipped = _load(cfg, [items[i] for i in missing])
        new = backbone_features(model, x, device).numpy()
        row = {it.id: r for r, it in enumerate(kept_items)}
        have = np.array([ids[i] in row for i in missing], bool)
        feats[missing[have]] = new[[row[ids[i]] for i in missing[have]]]
        found[missing[have]] = True
        cache.add([it.id for it in kept_items], new)
    return feats, found, skipped


@torch.no_grad()
def _score_frozen(
    ws: Workspace,
    cfg: Config,
    model: MCModel,
    items: list[Item],
    device: torch.device,
    seed: int,
    progress: bool,
    *,
    sink: Any,
) -> dict[Path, str]:
    """Head-only MC scoring under a frozen backbone: every image's features come from the
    workspace's feature cache (the images not in it are decoded and passed through the
    backbone once, then cached), and only the head is sampled. ``sink(rows, probs [B, T, C],
    features [B, D])`` as for :func:`score_batches`; returns the unreadable files."""
    q = cfg.query
    feats, found, skipped = frozen_features(ws, cfg, model, items, device)
    rows = np.flatnonzero(found)
    set_mc_mode(model)
    for b in tqdm(
        range(n_batches(len(rows), q.batch_size)),
        desc="scoring (head only)",
        unit="batch",
        leave=False,
        disable=not progress,
    ):
        r = rows[b * q.batch_size : (b + 1) * q.batch_size]
        torch.manual_seed(batch_seed(seed, b))
        f = torch.from_numpy(feats[r]).to(device)
        sink(r, head_samples(model, f, q.mc_samples).float().cpu().numpy(), feats[r])
    return skipped


def _empty_pool(cfg: Config) -> str:
    if cfg.data.pool is None:
        return "no pool: set data.pool to the folder of unlabelled images to choose from"
    return f"the pool is empty: every image in {cfg.data.pool} is labelled or out for labelling"


def _no_labels(cfg: Config) -> str:
    if cfg.data.labelled is None:
        return "no labelled images yet (data.labelled is not set, and no round was ingested)"
    return f"no labelled images found in {cfg.data.labelled}"


def _zero_label_query(
    ws: Workspace, cfg: Config, snap: Snapshot, device: torch.device, progress: bool
) -> QueryReport:
    """The first round of a project without a single label: TypiClust (typical, diverse
    images) in the self-supervised embedding of the pool; no classifier exists yet."""
    if cfg.representation.method == "none":
        raise WorkspaceError(
            f"{_no_labels(cfg)} and no model yet: either give a few "
            f'labelled images, or set representation.method = "simclr" so that medal can '
            f"choose the first round from the pool alone"
        )
    if not snap.pool:
        raise DataError(_empty_pool(cfg))
    t0 = time.perf_counter()
    model = start_model(cfg, None, backbone=pretrained_backbone(ws, cfg, snap, device, progress)[1])
    x, _, kept, skipped = _load(cfg, snap.pool)
    features = backbone_features(model, x, device).numpy()
    round_no = ws.next_round()
    rng = np.random.default_rng(round_seed(cfg, round_no))
    idx = acquisition.typiclust(features, cfg.query.budget, rng=rng)
    typical = (
        acquisition.typicality(features[idx], k=len(idx) - 1) if len(idx) > 1 else np.ones(len(idx))
    )
    no_model = np.zeros(0, np.float32)
    chosen = [Candidate(kept[int(i)], float(t), no_model) for i, t in zip(idx, typical)]
    strategy = "typiclust:zero-label"
    folder = export_round(
        ws,
        round_no,
        chosen,
        strategy=strategy,
        model_round=-1,
        pool_size=len(kept),
        score_seconds=time.perf_counter() - t0,
    )
    _record_skipped(ws, skipped)
    return QueryReport(
        round_no,
        folder,
        len(chosen),
        len(kept),
        strategy,
        -1,
        time.perf_counter() - t0,
        skipped,
        notes=list(snap.notes),
    )


def _scores_key(cfg: Config, model_rec: ModelRecord, mode: str) -> dict[str, Any]:
    """What scores depend on: the model (checkpoint and when it was written), T, the
    sampling path and the preprocessing."""
    return {
        "checkpoint": model_rec.checkpoint,
        "created_at": model_rec.created_at,
        "mc_samples": cfg.query.mc_samples,
        "mode": mode,
        "preprocess": [cfg.model.channels, cfg.model.image_size, cfg.image.window, cfg.image.frame],
    }


def _sampling(cfg: Config, device: torch.device) -> tuple[str, int]:
    q = cfg.query
    mode = (
        q.sampling
        if q.sampling != "auto"
        else ("full" if cfg.model.backbone_dropout > 0 else "head")
    )
    return mode, q.max_batch_items or (4096 if device.type == "cuda" else q.batch_size)


# query.cold_start -> (selection in the feature space, how the query's note describes it)
_COLD_START: dict[str, tuple[Callable[..., np.ndarray], str]] = {
    "typiclust": (acquisition.typiclust, "typicality and coverage (TypiClust)"),
    "diversity": (acquisition.k_center_greedy, "k-center diversity"),
}


def _select_and_export(
    ws: Workspace,
    cfg: Config,
    snap: Snapshot,
    mc: MCResult,
    model: MCModel,
    device: torch.device,
    round_no: int,
    model_round: int,
    seed: int,
    t0: float,
) -> QueryReport:
    q = cfg.query
    strategy = q.strategy
    declared = acquisition.get_strategy(q.strategy)
    missing = [c for c in cfg.classes if not any(it.label == c for it in snap.labelled)]
    notes: list[str] = []
    if q.cold_start != "off" and missing and declared.uses_model:
        # uncertainty from a model that never saw a class keeps asking about the classes it
        # knows; spread the round over the feature space instead until every class is seen
        xl, _, _, _ = _load(cfg, snap.labelled)
        _, labelled_features = mc_predict_tensors(model, xl, 2, device=device, seed=seed)
        pick, how = _COLD_START[q.cold_start]
        idx = pick(
            np.asarray(mc.features, np.float32),
            q.budget,
            rng=np.random.default_rng(seed),
            labelled_features=labelled_features,
        )
        scores = acquisition.bald(np.asarray(mc.probs[idx], np.float32))
        strategy = f"{q.strategy}:cold-start-{q.cold_start}"
        notes.append(
            f"no label yet for {', '.join(missing)}: chosen by {how} in the feature "
            f"space instead of {q.strategy} until every class has a label "
            f"(query.cold_start)"
        )
    elif mc.top_index is not None and mc.top_scores is not None:
        idx, scores = mc.top_index, mc.top_scores
    else:
        labelled_features = None
        if declared.needs_labelled_features:
            xl, _, _, _ = _load(cfg, snap.labelled)
            _, labelled_features = mc_predict_tensors(model, xl, 2, device=device, seed=seed)
        rng = np.random.default_rng(seed)
        idx, scores = acquisition.select(
            q.strategy,
            np.asarray(mc.probs, np.float32),
            q.budget,
            rng=rng,
            features=np.asarray(mc.features, np.float32),
            labelled_features=labelled_features,
            balance=q.balance,
        )
    seconds = time.perf_counter() - t0
    by_id = {it.id: it for it in snap.pool}
    if mc.ids is None:  # the query's scorer is always given the pool's ids
        raise ValueError("the pool's scores carry no image ids")
    ids = mc.ids
    chosen = [
        Candidate(by_id[str(ids[i])], float(s), np.asarray(mc.probs[i], np.float32).mean(0))
        for i, s in zip(idx, scores)
    ]
    folder = export_round(
        ws,
        round_no,
        chosen,
        strategy=strategy,
        model_round=model_round,
        pool_size=len(mc.kept),
        score_seconds=seconds,
    )
    _record_skipped(ws, mc.skipped)
    return QueryReport(
        round_no,
        folder,
        len(chosen),
        len(mc.kept),
        strategy,
        model_round,
        seconds,
        mc.skipped,
        notes=notes,
    )


def ingest(cfg: Config, folder: str | Path) -> IngestResult:
    """Validate a returned round folder and record its labels (all or nothing)."""
    with Workspace(cfg) as ws:
        return ingest_round(ws, Path(folder))


def run_round(cfg: Config, *, progress: bool = True) -> RoundReport | None:
    """Train (fine-tuning after the first round) and query: one active-learning round."""

    def check() -> None:
        with Workspace(cfg) as ws:  # refuse before spending time on training
            _refuse_pending(ws)

    distributed.setup(cfg.device)
    distributed.on_main(check)
    t = train(cfg, progress=progress)
    q = query(cfg, progress=progress)
    return RoundReport(t, q) if t is not None and q is not None else None


def export_labels(cfg: Config, out: str | Path) -> int:
    """Write every label row with its provenance to a CSV; returns the number of rows."""
    import datetime as dt

    from .roundfolder import neutralise

    with Workspace(cfg, lock=False) as ws:
        rows = ws.db.labels()
        paths = {r.id: r.path for r in ws.db.images_by_path().values()}
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "image_id",
                "path",
                "label",
                "round",
                "source",
                "annotator",
                "origin",
                "time",
                "comment",
            ]
        )
        for r in rows:
            when = dt.datetime.fromtimestamp(r.created_at, dt.timezone.utc).isoformat()
            w.writerow(
                [
                    r.image_id,
                    neutralise(paths.get(r.image_id, "")),
                    neutralise(r.label or "(released)"),
                    r.round,
                    r.source,
                    neutralise(r.annotator or ""),
                    neutralise(r.origin or ""),
                    when,
                    neutralise(r.comment or ""),
                ]
            )
    tmp.replace(out)
    return len(rows)


def unsure_images(cfg: Config) -> list[tuple[str, str]]:
    """``(image id, path)`` of images whose current label is ``unsure`` (out of the pool)."""
    with Workspace(cfg, lock=False) as ws:
        paths = {r.id: r.path for r in ws.db.images_by_path().values()}
        return sorted(
            (i, paths.get(i, "")) for i, lab in ws.db.current_labels().items() if lab == UNSURE
        )


def release_unsure(cfg: Config, image_ids: list[str] | None = None) -> int:
    """Return ``unsure`` images to the pool (all, or those whose id starts with one of
    ``image_ids``); the ``unsure`` rows stay in the ledger as history."""
    with Workspace(cfg) as ws:
        unsure = [i for i, lab in ws.db.current_labels().items() if lab == UNSURE]
        if image_ids is not None:
            wanted = [i for i in unsure if any(i.startswith(p) for p in image_ids)]
            unknown = [p for p in image_ids if not any(i.startswith(p) for i in unsure)]
            if unknown:
                raise DataError(
                    f"not an unsure image id (see 'medal labels unsure'): {', '.join(unknown)}"
                )
            unsure = wanted
        when = time.time()
        ws.db.add_labels(
            [
                LabelRecord(
                    i, "", ws.ingested_rounds(), "release", None, "medal labels release", when
                )
                for i in unsure
            ]
        )
        return len(unsure)


@dataclass
class Status:
    workspace: Path
    rounds: list[dict[str, Any]]
    label_counts: dict[str, int]
    labels_by_source: dict[str, int]
    models: list[dict[str, Any]]
    metrics: dict[int, dict[str, dict[str, float]]]
    skipped: dict[str, str]
    notes: list[str] = field(default_factory=list)
    skipped_csv: Path | None = None
    """The workspace's list of unreadable files (all of ``skipped``)."""


def status(cfg: Config) -> Status:
    """Rounds, label counts and metrics per model round, read from the ledger."""
    if not has_ledger(cfg.workspace):
        raise WorkspaceError(f"no workspace at {cfg.workspace} yet; run 'medal train' first")
    with Workspace(cfg, lock=False) as ws:
        db = ws.db
        current = db.current_labels()
        counts = Counter(current.values())
        by_source: Counter[str] = Counter()
        latest: dict[str, str] = {}
        for rec in db.labels():
            latest[rec.image_id] = rec.source
        by_source.update(latest.values())
        metrics = db.metrics()
        latest_model = max(metrics, default=None)
        latest_metrics = {} if latest_model is None else metrics.get(latest_model, {})
        notes = [
            f"model round {latest_model}: {n}" for n in metric_notes(latest_metrics, cfg.classes)
        ]
        rounds = []
        counts_by_round = db.round_label_counts(FINAL_SOURCES)
        for r in db.rounds():
            images, readers = counts_by_round.get(r.round, (0, 0))
            rounds.append(
                {
                    "round": r.round,
                    "strategy": r.strategy,
                    "exported": r.budget,
                    "labelled": images,
                    "reader_labels": readers,
                    "model_round": r.model_round,
                    "pool_size": r.pool_size,
                    "folder": r.folder,
                    "ingested": r.ingested_at is not None,
                    "score_seconds": r.score_seconds,
                }
            )
        return Status(
            cfg.workspace,
            rounds,
            {
                c: counts.get(c, 0)
                for c in [*cfg.classes, "unsure"]
                if c in cfg.classes or counts.get(c)
            },
            dict(by_source),
            [asdict(m) for m in db.models()],
            metrics,
            db.skipped(),
            notes,
            ws.skipped_csv,
        )
