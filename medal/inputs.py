"""What a round's training and its query both start from: the configured images of ledger
items (decoded, cached), the round's seed, the starting weights, the self-supervised backbone
and frozen-backbone features.

:mod:`medal.api` (training) and :mod:`medal.query` (scoring and selection) both import these;
neither imports the other's internals, so the import graph stays one-way
(``api -> query -> inputs``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import Config
from .data import ImageDataset, load_all
from .errors import ModelError
from .features import FeatureStore, backbone_key, iter_features, open_feature_store
from .models import MCModel, read_weights
from .poolstore import stored_images
from .representation import SSLSettings, StepPlan, load_cached, pretrain_and_cache
from .representation import cache_key as ssl_cache_key
from .resources import check_pretraining_memory
from .sources import Item, Snapshot
from .train import build_model, load_checkpoint
from .workspace import Workspace, cache_dir


def _labels_to_index(items: list[Item], classes: tuple[str, ...]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[str(it.label)] for it in items], dtype=np.int64)


def _cache_dir(cfg: Config) -> Path | None:
    return cache_dir(cfg.workspace) if cfg.image.cache else None


def image_dataset(cfg: Config, items: list[Item]) -> ImageDataset:
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


def load_items(
    cfg: Config, items: list[Item]
) -> tuple[torch.Tensor, np.ndarray, list[Item], dict[Path, str]]:
    """Decode ``items`` (through the decode cache when ``image.cache``): ``(x [N, C, S, S],
    y [N] class indices (empty when the items carry no label), the N readable items,
    {path: reason} for the unreadable)``. Holds the whole set: for labelled sets, not pools."""
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


def record_skipped(ws: Workspace, skipped: dict[Path, str]) -> None:
    """Remember unreadable files in the ledger and in ``<workspace>/skipped.csv`` (with every
    byte-identical copy of each)."""
    if skipped:
        ws.record_skipped({str(p): r for p, r in skipped.items()})


def round_seed(cfg: Config, round_no: int) -> int:
    """The seed of a round's randomness: of model round ``round_no``'s training and evaluation,
    or of the query that exports round ``round_no`` (scoring, selection)."""
    return cfg.seed * 1000 + round_no


AUTO_SMALL, AUTO_DEEP = "small_cnn", "small_cnn4"
"""``model.name = "auto"``'s two backbones (:func:`auto_backbone`)."""


def auto_backbone(cfg: Config, n_images: int) -> str:
    """The backbone ``model.name = "auto"`` stands for when the self-supervised pretraining
    sees ``n_images`` images: the deeper one from ``model.auto_min_images`` on, where its
    pretraining has the images to learn from; the smaller one below, and without pretraining
    (whole-network training from random weights)."""
    if cfg.representation.method == "none" or n_images < cfg.model.auto_min_images:
        return AUTO_SMALL
    return AUTO_DEEP


def with_backbone(cfg: Config, name: str) -> Config:
    """``cfg`` with ``model.name`` set to ``name`` (a registered backbone)."""
    if cfg.model.name == name:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=name))


def backbone_items(cfg: Config, snap: Snapshot) -> list[Item]:
    """The images the self-supervised pretraining learns from: the pool, the labelled images and
    an automatic hold-out; never a given validation set or the test set."""
    items = [*snap.pool, *snap.labelled]
    if cfg.data.validation is None:
        items += snap.validation
    return items


def for_count(cfg: Config, n_images: int) -> Config:
    """``cfg`` with ``model.name = "auto"`` resolved for a pretraining on ``n_images`` images
    (:func:`auto_backbone`); any other config as it is."""
    if cfg.model.name != "auto":
        return cfg
    return with_backbone(cfg, auto_backbone(cfg, n_images))


def for_images(cfg: Config, snap: Snapshot) -> Config:
    """:func:`for_count` for a first training on ``snap``'s images (:func:`backbone_items`)."""
    if cfg.model.name != "auto":
        return cfg
    return for_count(cfg, len(backbone_items(cfg, snap)))


def auto_note(cfg: Config, snap: Snapshot, parent: int | None, name: str) -> str:
    """The training report's line on what ``model.name = "auto"`` became, and why."""
    if parent is not None:
        return f'model.name = "auto": {name}, the backbone of model round {parent}'
    if cfg.representation.method == "none":
        return f'model.name = "auto": {name} (no self-supervised pretraining)'
    n, least = len(backbone_items(cfg, snap)), cfg.model.auto_min_images
    return (
        f'model.name = "auto": {name} for {n} pretraining images '
        f"({AUTO_DEEP} from model.auto_min_images = {least} on)"
    )


def for_checkpoint(cfg: Config, checkpoint: Path) -> Config:
    """``cfg`` with ``model.name = "auto"`` resolved to the backbone ``checkpoint`` holds, so a
    project keeps the backbone its first training chose; any other config as it is. A missing
    or unreadable checkpoint is left to :func:`medal.train.load_checkpoint` to name."""
    if cfg.model.name != "auto":
        return cfg
    name = AUTO_SMALL
    if checkpoint.is_file():
        ck = read_weights(checkpoint, "checkpoint")
        name = ck.get("model_name", AUTO_SMALL) if isinstance(ck, dict) else AUTO_SMALL
        if name not in (AUTO_SMALL, AUTO_DEEP):
            raise ModelError(
                f'checkpoint {checkpoint} is a {name}; model.name = "auto" goes on only from '
                f'{AUTO_SMALL} or {AUTO_DEEP} checkpoints: set model.name = "{name}" to go on '
                f"from this project's models"
            )
    return with_backbone(cfg, name)


def start_model(
    cfg: Config, parent_checkpoint: Path | None, backbone: Path | None = None
) -> MCModel:
    """The weights a training starts from: fresh (``model.pretrained`` when given), seeded so
    every round starts alike, then the parent's checkpoint or a cached self-supervised
    ``backbone`` when given. ``model.name = "auto"`` must be resolved first
    (:func:`for_images`), unless the parent's checkpoint says which backbone it is."""
    if parent_checkpoint is not None:
        cfg = for_checkpoint(cfg, parent_checkpoint)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    if parent_checkpoint is not None:
        load_checkpoint(
            parent_checkpoint,
            model,
            cfg.classes,
            cfg.model.name,
            cfg.model.channels,
            fresh_members=True,
        )
    if backbone is not None and not load_cached(backbone, model.backbone):
        raise ModelError(f"cannot read the self-supervised backbone {backbone}")
    return model


def model_from(cfg: Config, checkpoint: Path) -> MCModel:
    """The model ``checkpoint`` holds (``model.name = "auto"``: the backbone it records)."""
    cfg = for_checkpoint(cfg, checkpoint)
    model = build_model(cfg)
    load_checkpoint(checkpoint, model, cfg.classes, cfg.model.name, cfg.model.channels)
    return model


def representation_seed(cfg: Config) -> int:
    """The pretraining's seed: ``representation.seed``, by default the project's ``seed``."""
    r = cfg.representation.seed
    return cfg.seed if r is None else r


def ssl_settings(cfg: Config) -> SSLSettings:
    """The pretraining's settings from ``cfg.representation`` (its seed by
    :func:`representation_seed`): one place, so every caller pretrains as ``medal train`` does."""
    r = cfg.representation
    keys = ("epochs", "batch_size", "temperature", "lr", "min_steps", "max_steps")
    return SSLSettings(seed=representation_seed(cfg), **{k: getattr(r, k) for k in keys})


def pretraining_images(cfg: Config, items: list[Item]) -> torch.utils.data.Dataset:
    """The images pretraining reads every epoch, streamed batch by batch: from their compact
    store under the decode cache (filled once, :func:`medal.poolstore.stored_images`), or
    decoded one at a time with ``image.cache = false``. Item ``i``: ``(x [C, S, S], i, reason)``."""
    return stored_images(
        image_dataset(cfg, items), cache_dir(cfg.workspace), num_workers=cfg.num_workers
    )


def pretrained_backbone(
    ws: Workspace, cfg: Config, snap: Snapshot, device: torch.device, progress: bool
) -> tuple[str, Path]:
    """Load (or first train and cache) the self-supervised backbone for this workspace's
    images: the pool, the labelled images and an automatic hold-out; never the given
    validation or test sets. Returns a line for the training report and the cache file."""
    cfg = for_images(cfg, snap)
    path, items, settings = backbone_job(ws, cfg, snap)
    t0 = time.perf_counter()
    # initial weights as `medal train` with this seed builds them: the same backbone either way
    model = start_model(dataclasses.replace(cfg, seed=settings.seed), None)
    if load_cached(path, model.backbone):
        return f"self-supervised backbone loaded from the cache ({_short(path)})", path
    estimate = check_pretraining_memory(cfg, len(items), device)
    if progress and estimate:
        tqdm.write(f"self-supervised pretraining memory check: {estimate}")

    def run(log: Callable[[float, int], None] | None = None) -> StepPlan:
        return pretrain_items(cfg, model, path, items, settings, device, progress, log=log)

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


def pretrain_items(
    cfg: Config,
    model: MCModel,
    path: Path,
    items: list[Item],
    settings: SSLSettings,
    device: torch.device,
    progress: bool,
    *,
    log: Callable[[float, int], None] | None = None,
    ranks: tuple[int, int] = (0, 1),
) -> StepPlan:
    """Pretrain ``model``'s backbone on ``items``' images (:func:`pretraining_images`) and cache
    it at ``path``; ``log`` and ``ranks`` as for :func:`medal.representation.pretrain`."""
    return pretrain_and_cache(
        path,
        model.backbone,
        model.backbone_dim,
        pretraining_images(cfg, items),
        settings,
        device=device,
        num_workers=cfg.num_workers,
        progress=progress,
        log=log,
        ranks=ranks,
    )


def backbone_job(
    ws: Workspace, cfg: Config, snap: Snapshot
) -> tuple[Path, list[Item], SSLSettings]:
    """The cache file of this workspace's self-supervised backbone, the images it learns from
    (:func:`backbone_items`) and its settings."""
    cfg = for_images(cfg, snap)
    items = backbone_items(cfg, snap)
    settings = ssl_settings(cfg)
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


def _short(p: Path) -> str:
    return f"{p.parent.name}/{p.name[:12]}…"


def feature_key(cfg: Config, model: MCModel) -> str:
    """The key of ``model``'s frozen-backbone features: its backbone's weights, the image
    settings and the feature stages."""
    # "last" features keep the key they had before model.features existed
    return backbone_key(
        model.backbone,
        [cfg.model.channels, cfg.model.image_size, cfg.image.window, cfg.image.frame]
        + ([f"stages={model.stages}"] if model.stages else []),
    )


@torch.no_grad()
def frozen_feature_store(
    ws: Workspace, cfg: Config, model: MCModel, items: list[Item], device: torch.device
) -> tuple[FeatureStore, np.ndarray, dict[Path, str]]:
    """The workspace's store of ``model``'s frozen-backbone features, holding those of every
    readable image of ``items``: the images not in it yet are decoded, passed through the
    backbone a batch at a time and written to it as they come, so memory holds one batch
    whatever the pool size. Returns ``(store, found [N] bool, {path: reason} unreadable)``;
    read the features with ``store.read(ids, model.feature_dim)``."""
    key = feature_key(cfg, model)
    if model.backbone_tuned:  # one round's backbone: its own folder, the last round's dropped
        ws.drop_other_tuned_features(key)
        store = open_feature_store(ws.tuned_feature_path(key))
    else:
        store = open_feature_store(ws.feature_cache_path(key))
    dim = model.feature_dim
    found = store.found([it.id for it in items], dim)
    skipped: dict[Path, str] = {}
    missing = np.flatnonzero(~found)
    if len(missing):
        todo = [items[i] for i in missing]
        with store.writer(dim) as w:
            for new, kept, bad in iter_features(
                model, image_dataset(cfg, todo), device, num_workers=cfg.num_workers
            ):
                skipped |= {todo[j].path: r for j, r in bad.items()}
                w.write([todo[j].id for j in kept], new)
                found[missing[kept]] = True
    return store, found, skipped


def frozen_features(
    ws: Workspace, cfg: Config, model: MCModel, items: list[Item], device: torch.device
) -> tuple[np.ndarray, np.ndarray, dict[Path, str]]:
    """Backbone features of ``items`` under a frozen backbone, from the workspace's feature
    store (:func:`frozen_feature_store`), gathered: ``(features [N, D] float32, found [N]
    bool, {path: reason} unreadable)``. Holds ``[N, D]``: for semi-supervised training, which
    needs every pool feature at once; scoring reads the store a batch at a time instead."""
    store, found, skipped = frozen_feature_store(ws, cfg, model, items, device)
    feats, _ = store.lookup([it.id for it in items], model.feature_dim)
    return feats, found, skipped
