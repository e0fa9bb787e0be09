"""The Python API: one function per CLI command. Each opens the workspace, does one step and
returns a small report object; nothing here prints except progress bars."""

from __future__ import annotations

import dataclasses

import csv
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from . import distributed
from .config import Config
from .errors import DataError, WorkspaceError
from .faults import crash_point
from .fitting import FitResult, class_prior_note
from .inputs import (
    load_items,
    auto_note,
    backbone_job,
    for_checkpoint,
    for_images,
    with_backbone,
    pretrain_items,
    record_skipped,
    frozen_features,
    pretrained_backbone,
    representation_seed,
    round_seed,
    ssl_settings,
    start_model,
)
from .labelling.ingest import FINAL_SOURCES, IngestResult, ingest_round
from .ledger import LabelRecord
from .metrics import classification_metrics
from .models import MCModel, read_pretrained, resolve_device
from .query import (
    QueryReport,
    load_round_model,
    no_labels,
    query,
    refuse_pending,
)
from .representation import SSLSettings
from .resources import check_pretraining_memory, check_training_memory
from .sources import Item, Snapshot, sync
from .train import fit, save_checkpoint
from .uncertainty import mc_predict_tensors
from .workspace import UNSURE, Workspace, has_ledger

if TYPE_CHECKING:
    from .tensorboard_log import RunPart

__all__ = [
    # the commands
    "train",
    "query",
    "ingest",
    "run_round",
    "status",
    "export_labels",
    "unsure_images",
    "release_unsure",
    "pretrain_representation",
    "ensure_backbone",
    "resolve_model",
    # their reports
    "TrainReport",
    "QueryReport",
    "RoundReport",
    "Status",
    # what the simulation, scripts and tests use
    "frozen_features",
    "initial_model",
    "load_round_model",
    "metric_notes",
    "parent_round",
    "pretrained_backbone",
    "representation_seed",
    "round_seed",
    "ssl_settings",
    "start_model",
    "training_epochs",
]


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
class RoundReport:
    train: TrainReport
    query: QueryReport


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
        pretrain_on_every_rank(ws, cfg, device, progress)  # torchrun: all ranks pretrain
        plan = distributed.on_main(
            lambda: _plan_training(cast(Workspace, ws), cfg, device, progress)
        )
        cfg = with_backbone(cfg, plan.model_name)  # model.name = "auto" as rank 0 resolved it
        data = _TrainData.load(cfg, plan)
        model = start_model(cfg, plan.parent_checkpoint, plan.backbone)
        seed = round_seed(cfg, plan.model_round)
        tb = _tensorboard_round(ws, cfg, plan.model_round)
        result = fit(
            model,
            data.x,
            data.y,
            cfg,
            epochs=training_epochs(cfg, plan.parent),
            device=device,
            x_val=data.val[0] if len(data.val[0]) else None,
            y_val=data.val[1] if len(data.val[1]) else None,
            seed=seed,
            progress=progress and distributed.is_main(),
            state_path=plan.state_path,
            distributed=distributed.is_distributed(),
            unlabelled=_unlabelled_features(ws, cfg, model, plan, device),
            log=None if tb is None else tb.row,
            pool_size=len(plan.pool),
        )
        report = None
        if distributed.on_rank0(ws):
            result.notes[:0] = plan.notes
            report = _finish_training(ws, cfg, model, device, seed, plan, data, result)
        if tb is not None and report is not None:  # after the ledger: the round is kept
            tb.round_metrics(report.n_labels, report.model_round, report.metrics, report.best_epoch)
            tb.close()
        distributed.barrier()
        return report


def _unlabelled_features(
    ws: Workspace | None, cfg: Config, model: MCModel, plan: _TrainPlan, device: torch.device
) -> torch.Tensor | None:
    """Rank 0's frozen-backbone features ``[U, D]`` of the readable pool images, for
    semi-supervised training of the head (``train.semi_supervised``); otherwise ``None``."""
    if not (
        distributed.on_rank0(ws)
        and cfg.train.freeze_backbone
        and cfg.train.semi_supervised != "none"
        and plan.pool
    ):
        return None
    model.to(device)
    f, found, _ = frozen_features(ws, cfg, model, plan.pool, device)
    return torch.from_numpy(f[found])


def _tensorboard_round(ws: Workspace | None, cfg: Config, model_round: int) -> RunPart | None:
    """Rank 0's TensorBoard event file of this model round (``train.tensorboard``), or None."""
    if not distributed.on_rank0(ws) or not cfg.train.tensorboard:
        return None
    from . import tensorboard_log

    return tensorboard_log.round_part(ws.tensorboard_root, model_round)


@dataclass(frozen=True)
class _TrainData:
    """The decoded images of a training: labelled ``x [N, C, S, S]`` with class indices
    ``y [N]``, validation and test ``(x, y)`` (possibly empty), the readable labelled items
    and every unreadable file."""

    x: torch.Tensor
    y: np.ndarray
    items: list[Item]
    val: tuple[torch.Tensor, np.ndarray]
    test: tuple[torch.Tensor, np.ndarray]
    skipped: dict[Path, str]

    @staticmethod
    def load(cfg: Config, plan: _TrainPlan) -> _TrainData:
        x, y, items, skipped = load_items(cfg, plan.labelled)
        if len(items) == 0:
            raise DataError("none of the labelled images could be read; see 'medal status'")
        xv, yv, _, sk_v = load_items(cfg, plan.validation)
        xt, yt, _, sk_t = load_items(cfg, plan.test)
        return _TrainData(x, y, items, (xv, yv), (xt, yt), skipped | sk_v | sk_t)


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
    model_name: str
    """The backbone trained (``model.name = "auto"`` resolved: :func:`resolve_model`)."""
    pool: list[Item] = field(default_factory=list)
    """The unlabelled pool (for semi-supervised training of a frozen backbone's head, and
    ``train.head_choice_min_coverage`` and ``train.companion_min_coverage``)."""


def _plan_training(ws: Workspace, cfg: Config, device: torch.device, progress: bool) -> _TrainPlan:
    snap = sync(ws)
    if not snap.labelled:
        raise DataError(no_labels(cfg))
    model_round = ws.ingested_rounds()
    parent = parent_round(ws, cfg, model_round)
    notes = list(snap.notes)
    if cfg.model.name == "auto":
        resolved = _resolved(ws, cfg, parent, snap)
        notes.append(auto_note(cfg, snap, parent, resolved.model.name))
        cfg = resolved
    check_training_memory(
        cfg,
        len(snap.labelled) + len(snap.validation) + len(snap.test),
        max(len(snap.validation), len(snap.test)),
        device,
    )
    prior_note = class_prior_note(cfg, [it.label for it in snap.labelled if it.label is not None])
    if prior_note is not None:
        notes.append(prior_note)
    backbone = None
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
        cfg.model.name,
        list(snap.pool),
    )


def _resolved(
    ws: Workspace, cfg: Config, parent: int | None, snap: Snapshot | None = None
) -> Config:
    """``cfg`` with ``model.name = "auto"`` resolved: the parent checkpoint's backbone when the
    training starts from one, else the one for the images of ``snap`` (read when ``None``)."""
    if cfg.model.name != "auto":
        return cfg
    if parent is not None:
        return for_checkpoint(cfg, ws.checkpoint_path(parent))
    return for_images(cfg, sync(ws) if snap is None else snap)


def resolve_model(cfg: Config) -> Config:
    """``cfg`` with ``model.name = "auto"`` replaced by the backbone the workspace's next training
    uses: the latest model's (later rounds keep it), or the one for its images
    (:func:`medal.inputs.auto_backbone`) before the first training. Other configs unchanged."""
    if cfg.model.name != "auto":
        return cfg
    with Workspace(cfg) as ws:
        return _resolved(ws, cfg, parent_round(ws, cfg, ws.ingested_rounds()))


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

    def job() -> tuple[Path, list[Item], SSLSettings, Config] | None:
        w = cast(Workspace, ws)
        snap = sync(w)
        if not snap.labelled or parent_round(w, cfg, w.ingested_rounds()) is not None:
            return None  # the plan says what is missing, or no backbone is needed
        resolved = for_images(cfg, snap)
        found = backbone_job(w, resolved, snap)
        if found[0].is_file():
            return None
        check_pretraining_memory(resolved, len(found[1]), device)
        return (*found, resolved)

    todo = distributed.on_main(job)
    if todo is None:
        return
    path, items, settings, cfg = todo
    model = start_model(dataclasses.replace(cfg, seed=settings.seed), None)
    pretrain_items(cfg, model, path, items, settings, device, progress, ranks=distributed.ranks())


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


def _finish_training(
    ws: Workspace,
    cfg: Config,
    model: MCModel,
    device: torch.device,
    seed: int,
    plan: _TrainPlan,
    data: _TrainData,
    result: FitResult,
) -> TrainReport:
    """MC-averaged metrics on validation and test, the checkpoint and the ledger row."""
    model_round, parent, items, skipped = plan.model_round, plan.parent, data.items, data.skipped
    metrics = {}
    for split, (xs, ys) in (("validation", data.val), ("test", data.test)):
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
    crash_point("train.checkpoint_saved")
    ws.db.record_model(
        model_round,
        ws.checkpoint_name(model_round),
        parent,
        len(items),
        result.epochs,
        result.seconds,
        metrics,
    )
    crash_point("train.model_recorded")
    record_skipped(ws, skipped)
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


def initial_model(ws: Workspace, cfg: Config, model_round: int) -> tuple[MCModel, int | None]:
    """The weights model round ``model_round``'s training starts from, and the model round
    they come from (:func:`parent_round`, :func:`start_model`)."""
    parent = parent_round(ws, cfg, model_round)
    cfg = _resolved(ws, cfg, parent)
    return start_model(cfg, None if parent is None else ws.checkpoint_path(parent)), parent


def ingest(cfg: Config, folder: str | Path) -> IngestResult:
    """Validate a returned round folder and record its labels (all or nothing)."""
    with Workspace(cfg) as ws:
        return ingest_round(ws, Path(folder))


def run_round(cfg: Config, *, progress: bool = True) -> RoundReport | None:
    """Train (fine-tuning after the first round) and query: one active-learning round."""

    def check() -> None:
        with Workspace(cfg) as ws:  # refuse before spending time on training
            refuse_pending(ws)

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
