"""One query: plan -> score -> select, then the round folder is exported.

* **plan** (rank 0, :func:`plan`): read the workspace and decide what to score and how: the
  pool positions that no earlier query with this model scored, the sampling path, the stored
  scores' key, and how the round will be chosen (:data:`How`). A project without a label or
  a model yet is planned, scored, selected and exported by rank 0 alone (zero-label
  TypiClust, :func:`zero_label_query`).
* **score** (every rank, :func:`score_pool`): MC-dropout samples of this rank's share of the
  pool, head-only from cached frozen-backbone features or through the network, merged on
  rank 0 (with the streaming top-k) into an :class:`~medal.uncertainty.MCResult`.
* **select** (rank 0, :func:`select`): the one function that decides which pool images make
  the round, for every case: the streaming top-k, a cold start in the feature space, the
  configured strategy (:func:`medal.acquisition.select`) and zero-label TypiClust.

One code path for one process or many (:mod:`medal.distributed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from . import acquisition, distributed
from .config import Config, full_sampling
from .errors import DataError, WorkspaceError
from .faults import crash_point
from .features import stream_features
from .inputs import (
    image_dataset,
    load_items,
    for_checkpoint,
    for_images,
    model_from,
    record_skipped,
    frozen_feature_store,
    pretrained_backbone,
    round_seed,
    start_model,
)
from .labelling.export import Candidate, export_round
from .ledger import ModelRecord
from .models import MCModel, read_pretrained, set_mc_mode
from .posterior import ensemble_members, posterior_samples, samples_per_image, samples_scored
from .resources import check_query_memory
from .sources import Item, Snapshot, sync
from .uncertainty import (
    MCResult,
    ScoreCollector,
    ScoreStore,
    batch_seed,
    mc_predict_tensors,
    mixed,
    n_batches,
    score_batches,
)
from .workspace import Workspace

How = Literal["zero-label", "cold-start", "top-k", "strategy"]
"""How a round is chosen: TypiClust without any model; a cold start in the feature space
while a class has no label (``query.cold_start``); the streaming top-k of a per-image score;
the strategy's own selection (:func:`medal.acquisition.select`)."""

Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]
"""A scored chunk: pool positions ``[B]``, probabilities ``[B, T, C]``, features ``[B, D]``."""

Sink = Callable[[np.ndarray, np.ndarray, np.ndarray], None]
"""Receives scored chunks: ``sink(pool positions [B], probs [B, T, C], features [B, D])``."""


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


@dataclass(frozen=True)
class QueryPlan:
    """What rank 0 decides before every rank scores (sent to every rank)."""

    pool: list[Item]
    round_no: int
    """The round to export."""
    model_round: int
    checkpoint: Path
    todo: np.ndarray
    """Positions in ``pool`` of the images no earlier query scored with this model."""
    mode: str
    """The sampling path: ``"head"`` or ``"full"``."""
    max_items: int
    how: How
    missing: tuple[str, ...] = ()
    """The classes without a label yet (a cold start names them)."""


@dataclass
class MainPart:
    """Rank 0's own part of the plan (not sent to the other ranks)."""

    ws: Workspace
    snap: Snapshot
    model: MCModel
    sink: ScoreCollector
    """Collects every rank's scored chunks, the reused ones first."""
    key: dict[str, Any]
    """What the scores depend on, stored with them (JSON)."""
    reused: int


@dataclass(frozen=True)
class Scored:
    """The scored pool :func:`select` chooses from: its M readable images."""

    ids: np.ndarray
    """``[M]`` str image ids, row by row."""
    features: np.ndarray
    """``[M, D]`` backbone features (float16 memory map or float32)."""
    probs: np.ndarray | None
    """``[M, T, C]`` MC-dropout probabilities; ``None`` when no model exists yet."""
    top: tuple[np.ndarray, np.ndarray] | None = None
    """The streaming top-k: rows ``[k]`` and their scores ``[k]``, best first."""
    labelled_features: np.ndarray | None = None
    """``[L, D]`` float32 features of the labelled images (cold start, strategies that
    declare ``needs_labelled_features``)."""
    skipped: dict[Path, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Picks:
    """What :func:`select` decided."""

    rows: np.ndarray
    """``[k]`` rows into :class:`Scored`, best first."""
    scores: np.ndarray
    """``[k]`` the score reported with each pick."""
    strategy: str
    """As recorded with the round (e.g. ``"bald"``, ``"bald:cold-start-typiclust"``)."""
    notes: list[str] = field(default_factory=list)


def query(cfg: Config, *, progress: bool = True) -> QueryReport | None:
    """Score the pool with MC dropout and export the chosen images as the next round folder
    (:func:`medal.api.query`); rank 0 returns the report, the other ranks ``None``."""
    if cfg.model.pretrained is not None:  # a bad file is refused before anything is written
        read_pretrained(cfg.model.pretrained)
    device = distributed.setup(cfg.device)
    with distributed.main_only(lambda: Workspace(cfg)) as ws:
        planner = _Planner(ws, cfg, device, progress)
        planned = distributed.on_main(planner)
        if isinstance(planned, QueryReport):  # a zero-label first round, exported by rank 0
            return planned if distributed.on_rank0(ws) else None
        t0 = time.perf_counter()
        main = planner.main
        model = main.model if distributed.on_rank0(main) else model_from(cfg, planned.checkpoint)
        model.to(device)
        seed = round_seed(cfg, planned.round_no)
        chunks: list[Chunk] = []

        def keep(rows: np.ndarray, probs: np.ndarray, feats: np.ndarray) -> None:
            chunks.append((rows, probs, feats))

        sink = main.sink if distributed.on_rank0(main) else keep
        shown = progress and distributed.is_main()
        skipped = score_pool(ws, cfg, model, planned, device, seed, shown, sink)
        gathered = distributed.gather((chunks, skipped))
        report = None
        if distributed.on_rank0(main):
            scored = _merge(cfg, main, planned, gathered, device, seed)
            picks = select(cfg, planned.how, scored, seed, planned.missing)
            round_no, model_round = planned.round_no, planned.model_round
            report = _export(main.ws, main.snap, scored, picks, round_no, model_round, t0)
            report.reused = main.reused
        distributed.barrier()
        return report


class _Planner:
    """:func:`plan` for :func:`distributed.on_main`: the plan goes to every rank, rank 0's own
    part stays in :attr:`main` (``None`` on the other ranks)."""

    def __init__(
        self, ws: Workspace | None, cfg: Config, device: torch.device, progress: bool
    ) -> None:
        self.ws, self.cfg, self.device, self.progress = ws, cfg, device, progress
        self.main: MainPart | None = None

    def __call__(self) -> QueryPlan | QueryReport:
        if not distributed.on_rank0(self.ws):
            raise RuntimeError("only rank 0 plans a query")
        planned = plan(self.ws, self.cfg, self.device, self.progress)
        if isinstance(planned, QueryReport):
            return planned
        shared, self.main = planned
        return shared


def plan(
    ws: Workspace, cfg: Config, device: torch.device, progress: bool
) -> tuple[QueryPlan, MainPart] | QueryReport:
    """Rank 0: what to score, with which model and sampling path, and how to choose; a
    zero-label first round is chosen and exported here (:func:`zero_label_query`)."""
    q = cfg.query
    refuse_pending(ws)
    snap = sync(ws)
    zero_label = not snap.labelled and not ws.db.models()
    if zero_label:
        cfg = for_images(cfg, snap)
    elif cfg.model.name == "auto":  # the backbone of the model that scores
        cfg = for_checkpoint(cfg, ws.checkpoint_path(current_model_record(ws).round))
    top_k = not zero_label and _how(cfg, snap)[0] == "top-k"  # only k scores held
    check_query_memory(
        cfg, len(snap.pool), len(snap.labelled), device, zero_label=zero_label, top_k=top_k
    )
    if zero_label:
        return zero_label_query(ws, cfg, snap, device, progress)
    rec = current_model_record(ws)
    model = model_from(cfg, ws.checkpoint_path(rec.round))
    if not snap.pool:
        raise DataError(empty_pool(cfg))
    round_no = ws.next_round()
    mode, max_items = _sampling(cfg, device)
    how, missing = _how(cfg, snap)
    top = acquisition.get_strategy(q.strategy).streaming_score(q.balance)
    sink = ScoreCollector(
        len(snap.pool),
        samples_scored(q, model),
        model.num_classes,
        model.feature_dim,
        ws.scores_dir(round_no),
        None if top is None or how != "top-k" else (top, q.budget),
        ids=[it.id for it in snap.pool],
    )
    key = _scores_key(cfg, rec, mode, samples_scored(q, model))
    reused = sink.reuse([ScoreStore(f) for f in ws.stored_scores()], key)
    shared = QueryPlan(
        snap.pool,
        round_no,
        rec.round,
        ws.checkpoint_path(rec.round),
        np.flatnonzero(~sink.ok),
        mode,
        max_items,
        how,
        missing,
    )
    return shared, MainPart(ws, snap, model, sink, key, reused)


def _how(cfg: Config, snap: Snapshot) -> tuple[How, tuple[str, ...]]:
    """How a round with a model is chosen, and the classes without a label yet."""
    q = cfg.query
    declared = acquisition.get_strategy(q.strategy)
    missing = tuple(c for c in cfg.classes if not any(it.label == c for it in snap.labelled))
    if q.cold_start != "off" and missing and declared.uses_model:
        # uncertainty from a model that never saw a class keeps asking about the classes it
        # knows; spread the round over the feature space instead until every class is seen
        return "cold-start", missing
    if declared.streaming_score(q.balance) is not None:
        return "top-k", missing
    return "strategy", missing


def _needs_labelled_features(cfg: Config, how: How) -> bool:
    needs = acquisition.get_strategy(cfg.query.strategy).needs_labelled_features
    return how == "cold-start" or (how == "strategy" and needs)


def _scores_key(cfg: Config, model_rec: ModelRecord, mode: str, T: int) -> dict[str, Any]:
    """What scores depend on: the model (checkpoint and when it was written), T (``T``: the
    samples stored, when they are not ``query.mc_samples``), the sampling path and the
    preprocessing."""
    return {
        "checkpoint": model_rec.checkpoint,
        "created_at": model_rec.created_at,
        "mc_samples": cfg.query.mc_samples,
        **({"samples": T} if T != samples_per_image(cfg.query) else {}),
        "mode": mode,
        "preprocess": [cfg.model.channels, cfg.model.image_size, cfg.image.window, cfg.image.frame],
        **({"ensemble_size": cfg.query.ensemble_size} if ensemble_members(cfg.query) else {}),
    }


def _sampling(cfg: Config, device: torch.device) -> tuple[str, int]:
    q = cfg.query
    mode = "full" if full_sampling(cfg) else "head"
    return mode, q.max_batch_items or (4096 if device.type == "cuda" else q.batch_size)


def refuse_pending(ws: Workspace) -> None:
    """Refuse to start while an exported round has not been ingested."""
    pending = ws.pending_round()
    if pending is not None:
        raise WorkspaceError(
            f"round {pending:03d} ({ws.round_dir(pending)}) has not been ingested yet; run "
            f"'medal ingest' on it first (an empty labels.csv returns its images to the pool)"
        )


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
    return model_from(cfg, ws.checkpoint_path(rec.round)), rec.round


def empty_pool(cfg: Config) -> str:
    if cfg.data.pool is None:
        return "no pool: set data.pool to the folder of unlabelled images to choose from"
    return f"the pool is empty: every image in {cfg.data.pool} is labelled or out for labelling"


def no_labels(cfg: Config) -> str:
    if cfg.data.labelled is None:
        return "no labelled images yet (data.labelled is not set, and no round was ingested)"
    return f"no labelled images found in {cfg.data.labelled}"


def score_pool(
    ws: Workspace | None,
    cfg: Config,
    model: MCModel,
    plan: QueryPlan,
    device: torch.device,
    seed: int,
    progress: bool,
    sink: Sink,
) -> dict[Path, str]:
    """Score this rank's share of the images still to score; ``sink(pool positions, probs
    [B, T, C], features [B, D])``. Returns the unreadable files."""
    q, todo = cfg.query, plan.todo
    items = [plan.pool[i] for i in todo]

    def to_pool(rows: np.ndarray, p: np.ndarray, f: np.ndarray) -> None:
        sink(todo[rows], p, f)

    if cfg.train.freeze_backbone and plan.mode == "head":
        # features from the workspace's cache, only the head sampled: rank 0 does it alone
        if not distributed.on_rank0(ws):
            return {}
        return _score_frozen(ws, cfg, model, items, device, seed, progress, sink=to_pool)
    sub = image_dataset(cfg, items)
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
    sink: Sink,
) -> dict[Path, str]:
    """Head-only MC scoring under a frozen backbone: every image's features come from the
    workspace's feature store (the images not in it are decoded and passed through the
    backbone once, then stored), read a batch of ``query.batch_size`` at a time, and only the
    head is sampled (or, ``query.posterior = "ensemble"``, the K ensemble heads give the
    samples: :func:`posterior_samples`): memory holds one batch of features, whatever the
    pool size. A whole-network companion's samples of the pool (:func:`_companion_scores`) are
    averaged in sample by sample, or with ``query.companion_samples = "mixture"`` appended
    (2T samples); ``"head"`` leaves it out of the scores. ``sink(rows, probs [B, T, C],
    features [B, D])`` as for :func:`score_batches`;
    returns the unreadable files."""
    q, dim = cfg.query, model.feature_dim
    store, found, skipped = frozen_feature_store(ws, cfg, model, items, device)
    rows = np.flatnonzero(found)
    comp = None
    if model.companion is not None and q.companion_samples != "head":
        comp, lost = _companion_scores(cfg, model.companion, items, rows, device, seed, progress)
        skipped |= lost
        rows = rows[~np.isnan(comp[:, 0, 0])]
        comp = comp[~np.isnan(comp[:, 0, 0])]
    set_mc_mode(model)
    for b in tqdm(
        range(n_batches(len(rows), q.batch_size)),
        desc="scoring (head only)",
        unit="batch",
        leave=False,
        disable=not progress,
    ):
        r = rows[b * q.batch_size : (b + 1) * q.batch_size]
        feats = store.read([items[i].id for i in r], dim)  # one batch, never [N, D]
        torch.manual_seed(batch_seed(seed, b))
        f = torch.from_numpy(feats).to(device)
        probs = posterior_samples(model, f, q).float()
        if comp is not None:
            c = torch.from_numpy(comp[b * q.batch_size : b * q.batch_size + len(r)])
            mixture = q.companion_samples == "mixture"
            probs = torch.cat([probs, c.to(probs.device)], 1) if mixture else mixed(probs, c)
        sink(r, probs.cpu().numpy(), feats)
    return skipped


def _companion_scores(
    cfg: Config,
    comp: MCModel,
    items: list[Item],
    rows: np.ndarray,
    device: torch.device,
    seed: int,
    progress: bool,
) -> tuple[np.ndarray, dict[Path, str]]:
    """The whole-network companion's samples ``[len(rows), T, C]`` of ``items[rows]`` (the
    images decoded again, one backbone pass each, its head sampled; T as the head's), NaN
    where an image could not be read this time, and those files with the reason."""
    q = cfg.query
    sub = image_dataset(cfg, [items[i] for i in rows])
    out = np.full((len(rows), samples_per_image(q), comp.num_classes), np.nan, np.float32)

    def keep(r: np.ndarray, p: np.ndarray, _f: np.ndarray) -> None:
        out[r] = p

    lost = score_batches(
        comp,
        sub,
        samples_per_image(q),
        range(n_batches(len(sub), q.batch_size)),
        device=device,
        batch_size=q.batch_size,
        num_workers=cfg.num_workers,
        seed=seed + 1,  # masks of their own, not the head's
        desc="scoring (whole-network companion)",
        progress=progress,
        precision=q.precision,
        sink=keep,
    )
    return out, lost


def _merge(
    cfg: Config,
    main: MainPart,
    plan: QueryPlan,
    gathered: list[tuple[list[Chunk], dict[Path, str]]] | None,
    device: torch.device,
    seed: int,
) -> Scored:
    """Rank 0: every rank's scored chunks (``gathered``, in rank order) into the collector,
    which stores them, and the labelled images' features where the selection needs them."""
    if gathered is None:
        raise RuntimeError("only rank 0 merges the ranks' scores")
    skipped: dict[Path, str] = {}
    for rank_chunks, rank_skipped in gathered:
        for rows, probs, feats in rank_chunks:
            main.sink(rows, probs, feats)
        skipped |= rank_skipped
    mc: MCResult = main.sink.result(skipped, meta=main.key)
    if mc.ids is None:  # the query's scorer is always given the pool's ids
        raise ValueError("the pool's scores carry no image ids")
    labelled = None
    if _needs_labelled_features(cfg, plan.how):
        xl, _, _, _ = load_items(cfg, main.snap.labelled)
        _, labelled = mc_predict_tensors(main.model, xl, 2, device=device, seed=seed)
    top = None
    if mc.top_index is not None and mc.top_scores is not None:
        top = (mc.top_index, mc.top_scores)
    return Scored(mc.ids, mc.features, mc.probs, top, labelled, mc.skipped)


# query.cold_start -> (selection in the feature space, how the query's note describes it)
_COLD_START: dict[str, tuple[Callable[..., np.ndarray], str]] = {
    "typiclust": (acquisition.typiclust, "typicality and coverage (TypiClust)"),
    "diversity": (acquisition.k_center_greedy, "k-center diversity"),
}


def select(
    cfg: Config, how: How, scored: Scored, seed: int, missing: tuple[str, ...] = ()
) -> Picks:
    """The one place a round's images are decided: rows of ``scored`` best first, the score
    reported with each, the strategy as recorded, and a note where the choice is not the
    configured strategy's. ``seed`` seeds every random choice (:func:`round_seed`)."""
    q = cfg.query
    rng = np.random.default_rng(seed)
    if how == "zero-label":
        features = np.asarray(scored.features, np.float32)
        idx = acquisition.typiclust(features, q.budget, rng=rng)
        typical = (
            acquisition.typicality(features[idx], k=len(idx) - 1)
            if len(idx) > 1
            else np.ones(len(idx))
        )
        return Picks(idx, typical, "typiclust:zero-label")
    if scored.probs is None:
        raise ValueError(f"a {how} selection needs the pool's MC-dropout probabilities")
    if how == "cold-start":
        pick, described = _COLD_START[q.cold_start]
        idx = pick(
            np.asarray(scored.features, np.float32),
            q.budget,
            rng=rng,
            labelled_features=scored.labelled_features,
        )
        note = (
            f"no label yet for {', '.join(missing)}: chosen by {described} in the feature "
            f"space instead of {q.strategy} until every class has a label (query.cold_start)"
        )
        scores = acquisition.bald(np.asarray(scored.probs[idx], np.float32))
        return Picks(idx, scores, f"{q.strategy}:cold-start-{q.cold_start}", [note])
    if how == "top-k":
        if scored.top is None:
            raise ValueError("a top-k selection needs the streaming top-k of the scores")
        return Picks(scored.top[0], scored.top[1], q.strategy)
    idx, scores = acquisition.select(
        q.strategy,
        np.asarray(scored.probs, np.float32),
        q.budget,
        rng=rng,
        features=np.asarray(scored.features, np.float32),
        labelled_features=scored.labelled_features,
        balance=q.balance,
    )
    return Picks(idx, scores, q.strategy)


def zero_label_query(
    ws: Workspace, cfg: Config, snap: Snapshot, device: torch.device, progress: bool
) -> QueryReport:
    """The first round of a project without a single label: TypiClust (typical, diverse
    images) in the self-supervised embedding of the pool; no classifier exists yet. Rank 0
    plans, scores (embeds the pool), selects and exports it alone."""
    if cfg.representation.method == "none":
        raise WorkspaceError(
            f"{no_labels(cfg)} and no model yet: either give a few "
            f'labelled images, or set representation.method = "simclr" so that medal can '
            f"choose the first round from the pool alone"
        )
    if not snap.pool:
        raise DataError(empty_pool(cfg))
    t0 = time.perf_counter()
    model = start_model(cfg, None, backbone=pretrained_backbone(ws, cfg, snap, device, progress)[1])
    model.to(device)
    features, rows, bad = stream_features(
        model, image_dataset(cfg, snap.pool), device, num_workers=cfg.num_workers
    )
    kept = [snap.pool[j] for j in rows]
    skipped = {snap.pool[j].path: r for j, r in bad.items()}
    round_no = ws.next_round()
    scored = Scored(np.array([it.id for it in kept]), features, None, skipped=skipped)
    picks = select(cfg, "zero-label", scored, round_seed(cfg, round_no))
    return _export(ws, snap, scored, picks, round_no, -1, t0)


def _export(
    ws: Workspace,
    snap: Snapshot,
    scored: Scored,
    picks: Picks,
    round_no: int,
    model_round: int,
    t0: float,
) -> QueryReport:
    """Export the picks as round ``round_no`` (``model_round`` -1: no model) and record the
    unreadable files; ``t0`` is when the query's scoring began."""
    seconds = time.perf_counter() - t0
    by_id = {it.id: it for it in snap.pool}
    chosen = [
        Candidate(
            by_id[str(scored.ids[i])],
            float(s),
            np.zeros(0, np.float32)
            if scored.probs is None
            else np.asarray(scored.probs[i], np.float32).mean(0),
        )
        for i, s in zip(picks.rows, picks.scores)
    ]
    crash_point("query.scored")
    folder = export_round(
        ws,
        round_no,
        chosen,
        strategy=picks.strategy,
        model_round=model_round,
        pool_size=len(scored.ids),
        score_seconds=seconds,
    )
    record_skipped(ws, scored.skipped)
    return QueryReport(
        round_no,
        folder,
        len(chosen),
        len(scored.ids),
        picks.strategy,
        model_round,
        seconds,
        scored.skipped,
        notes=[*snap.notes, *picks.notes],
    )
