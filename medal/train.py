"""Training between rounds, evaluation metrics and checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .companion import build_companion, companion_decision, companion_spec, holdout_split
from .config import Config, TrainConfig, head_choice_on
from .errors import ModelError
from .fitting import Augmenter, FitResult, check_finite, loss_weights
from .headchoice import HeadChoice, choose_head
from .metrics import classification_metrics, defined_monitor, monitor_value, show_metric
from .models import MCModel, Standardize, StochasticHead, model_from_config, read_weights
from .posterior import bootstrap_rows, ensemble_members

TrainingLog = Callable[[dict[str, float], int], None]
"""Receives history rows (``loss``, ``val_<metric>``) and their step while a model trains."""


def build_model(cfg: Config) -> MCModel:
    """The configured model, its ``model.pretrained`` backbone loaded, with the ensemble's
    extra heads under ``query.posterior = "ensemble"``."""
    return model_from_config(cfg, members=ensemble_members(cfg.query))


def _fingerprint(y: np.ndarray, x: torch.Tensor, cfg: Config, epochs: int, seed: int) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(y).tobytes())
    h.update(x[:, :, ::4, ::4].contiguous().numpy().tobytes())
    h.update(json.dumps([dataclasses.asdict(cfg.train), epochs, seed], default=str).encode())
    return h.hexdigest()


def fit(
    model: MCModel,
    x: torch.Tensor,
    y: np.ndarray,
    cfg: Config,
    *,
    epochs: int,
    device: torch.device,
    x_val: torch.Tensor | None = None,
    y_val: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = True,
    state_path: Path | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    distributed: bool = False,
    state_every_s: float = 30.0,
    unlabelled: torch.Tensor | None = None,
    log: TrainingLog | None = None,
    pool_size: int = 0,
) -> FitResult:
    """Train ``model`` on ``x [N, C, S, S]``, ``y [N]`` (class indices): a frozen backbone by
    :func:`fit_probe` then :func:`_after_probe` (LP-FT, ensemble heads, companion; ``pool_size``:
    the unlabelled images, for the coverage conditions), else by :func:`_fit_network`."""
    if len(x) == 0:
        raise ModelError("no labelled images to train on")
    if cfg.train.freeze_backbone:
        probe = fit_probe(
            model,
            x,
            y,
            cfg,
            device=device,
            x_val=x_val,
            y_val=y_val,
            seed=seed,
            progress=progress,
            unlabelled=unlabelled,
            log=log,
            pool_size=pool_size,
        )
        return _after_probe(
            model, x, y, cfg, probe, pool_size, device=device, seed=seed, progress=progress
        )
    val = (x_val, y_val) if x_val is not None and y_val is not None and len(x_val) else None
    return _fit_network(
        model,
        x,
        y,
        cfg,
        epochs=epochs,
        device=device,
        val=val,
        seed=seed,
        progress=progress,
        state_path=state_path,
        on_epoch_end=on_epoch_end,
        distributed=distributed,
        state_every_s=state_every_s,
        log=log,
    )


def _after_probe(
    model: MCModel,
    x: torch.Tensor,
    y: np.ndarray,
    cfg: Config,
    probe: FitResult,
    pool_size: int = 0,
    *,
    device: torch.device,
    seed: int,
    progress: bool,
) -> FitResult:
    """After the frozen-backbone probe of ``x [N, C, S, S]``, ``y [N]``: LP-FT as
    ``train.finetune`` decides (:func:`medal.finetune.after_probe`; its result is returned),
    then the ensemble's heads, if the model has any (:func:`fit_members`), then the
    whole-network companion as ``train.companion`` decides (:func:`fit_companion`, with the
    ``pool_size`` unlabelled images for ``train.companion_min_coverage``; its note and seconds
    join the result)."""
    from .finetune import after_probe  # imports this module

    result = after_probe(model, x, y, cfg, probe, device=device, seed=seed, progress=progress)
    fit_members(model, x, y, cfg, device=device, seed=seed, progress=progress)
    note, seconds = fit_companion(
        model, x, y, cfg, device=device, seed=seed, progress=progress, pool_size=pool_size
    )
    if note:
        result.notes.append(note)
    result.seconds += seconds
    return result


def _fit_network(
    model: MCModel,
    x: torch.Tensor,
    y: np.ndarray,
    cfg: Config,
    *,
    epochs: int,
    device: torch.device,
    val: tuple[torch.Tensor, np.ndarray] | None,
    seed: int,
    progress: bool,
    state_path: Path | None,
    on_epoch_end: Callable[[int], None] | None,
    distributed: bool,
    state_every_s: float,
    log: TrainingLog | None,
) -> FitResult:
    """:func:`fit` of the whole network: an epoch loop (:meth:`_Epochs.train`, validation
    :func:`evaluate` on ``val``), its decisions a :class:`_Run`. The best epoch by
    ``train.monitor`` is kept (ties: lower training loss; no ``val``: the last); epochs are
    raised to at least ``train.min_steps`` steps; ``train.patience`` stops early. The state is
    saved to ``state_path`` at an epoch's end when ``state_every_s`` have passed, and a
    training with the same data and settings resumes from it. ``distributed``: DDP under
    torchrun; every rank draws the same batches and trains on its share of each."""
    t0 = time.perf_counter()
    tc = cfg.train
    epochs = max(epochs, math.ceil(tc.min_steps / math.ceil(len(x) / tc.batch_size)))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device)
    fingerprint = _fingerprint(y, x, cfg, epochs, seed) if state_path else ""
    notes: list[str] = []
    ep = _Epochs.start(model, x, y, cfg, gen, device, distributed)
    run = _start_run(state_path, fingerprint, model, ep.opt, gen, epochs, notes, progress)
    if log is not None:  # a resumed run's earlier epochs
        for done in run.history:
            log(done, int(done["epoch"]))
    last_save = time.perf_counter()
    for epoch in _epoch_bar(run.epoch, epochs, progress):
        if tc.patience and run.since_best >= tc.patience:
            break
        row = ep.train(epoch, epochs, progress)
        line = f"epoch {epoch}/{epochs}: loss {row['loss']:.4f}"
        if val is not None and (epoch % tc.validate_every == 0 or epoch == epochs):
            m = evaluate(model, *val, device, len(cfg.classes), cfg.classes)
            line += run.validated(model, m, row, epoch, tc, notes, progress)
        run.history.append(row)
        if log is not None:
            log(row, epoch)
        run.epoch = epoch
        if progress:
            tqdm.write(line)
        if state_path is not None and time.perf_counter() - last_save >= state_every_s:
            last_save = time.perf_counter()
            _save_state(state_path, run.state(fingerprint, model, ep.opt, gen))
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    if state_path is not None:
        state_path.unlink(missing_ok=True)
    return run.finish(model, epochs, time.perf_counter() - t0, notes)


def _epoch_bar(done: int, epochs: int, progress: bool) -> tqdm[int]:
    """Epochs ``done + 1 .. epochs`` with a progress bar that starts at ``done`` of ``epochs``."""
    return tqdm(
        range(done + 1, epochs + 1),
        desc="training",
        unit="epoch",
        disable=not progress,
        leave=False,
        initial=done,
        total=epochs,
    )


@dataclass
class _Epochs:
    """What every epoch of one :func:`_fit_network` uses: the images ``x [N, C, S, S]``, their
    labels ``yt [N]`` and sampling weights ``sample_w [N]``, the model (``net``: the model in
    DistributedDataParallel, or the model itself), the optimiser, loss and augmentation, the
    generator that orders the images and this process's ``shard`` (rank, world size)."""

    model: MCModel
    net: nn.Module
    opt: torch.optim.Optimizer
    loss_fn: nn.Module
    x: torch.Tensor
    yt: torch.Tensor
    sample_w: torch.Tensor
    gen: torch.Generator
    aug: Augmenter | None
    shard: tuple[int, int]
    device: torch.device
    tc: TrainConfig

    @classmethod
    def start(
        cls,
        model: MCModel,
        x: torch.Tensor,
        y: np.ndarray,
        cfg: Config,
        gen: torch.Generator,
        device: torch.device,
        distributed: bool,
    ) -> _Epochs:
        """A new AdamW optimiser, the loss and weights of ``y [N]``, the augmentation (with
        ``train.augment``) and, ``distributed``, the model wrapped for torchrun."""
        tc = cfg.train
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        loss_fn, yt, sample_w = _loss_and_weights(y, cfg, device)
        aug = Augmenter(x.shape[-1], tc.hflip) if tc.augment else None
        net, shard = _wrap(model, device) if distributed else (model, (0, 1))
        return cls(model, net, opt, loss_fn, x, yt, sample_w, gen, aug, shard, device, tc)

    def train(self, epoch: int, epochs: int, progress: bool) -> dict[str, float]:
        """Train epoch ``epoch`` of ``epochs`` (images in a new order: shuffled, or drawn by
        ``sample_w`` with ``train.balance = "sampler"``); its history row (epoch, loss), once
        the loss, the weights and the outputs are checked finite."""
        n = len(self.x)
        perm = (
            torch.multinomial(self.sample_w, n, replacement=True, generator=self.gen)
            if self.tc.balance == "sampler"
            else torch.randperm(n, generator=self.gen)
        )
        loss = train_one_epoch(
            self.net,
            self.opt,
            self.loss_fn,
            self.x,
            self.yt,
            perm,
            batch_size=self.tc.batch_size,
            device=self.device,
            aug=self.aug,
            shard=self.shard,
            desc=f"epoch {epoch}",
            progress=progress,
        )
        for value in (loss, _health(self.model, self.x, self.device)):  # before validating NaN
            check_finite(value, f"in epoch {epoch} of {epochs}", "train.lr", self.tc.lr)
        return {"epoch": float(epoch), "loss": loss}


def _health(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """A sum that is NaN or infinite when any weight or buffer (batch-norm statistics) of
    ``model`` is, or any of its outputs on (up to 8 of) ``x``: weights can stay finite and
    still overflow in the forward pass (then every input does; 8 keep the check cheap)."""
    with torch.no_grad():
        total = sum(
            float(t.double().sum()) for t in model.state_dict().values() if t.is_floating_point()
        )
    return total + float(predict_deterministic(model, x[:8], device).sum())


def _loss_and_weights(
    y: np.ndarray, cfg: Config, device: torch.device
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The loss (class-weighted with ``train.balance = "loss"``), ``y [N]`` as a long tensor and
    each image's sampling weight ``[N]`` (inverse class frequency, or inverse
    ``train.class_prior``, for ``"sampler"``)."""
    weight = loss_weights(y, cfg).to(device) if cfg.train.balance == "loss" else None
    yt = torch.as_tensor(y, dtype=torch.long)
    if cfg.class_prior() is None:
        sample_w = (1.0 / torch.bincount(yt, minlength=len(cfg.classes)).clamp(min=1).float())[yt]
    else:
        sample_w = loss_weights(y, cfg)[yt]
    return nn.CrossEntropyLoss(weight=weight), yt, sample_w


def _start_run(
    state_path: Path | None,
    fingerprint: str,
    model: MCModel,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    epochs: int,
    notes: list[str],
    progress: bool,
) -> _Run:
    """A new run, or the interrupted one saved at ``state_path`` when its fingerprint (same
    data, settings, epochs and seed) matches; a state that cannot be read is set aside."""
    st = _read_state(state_path, notes, progress) if state_path is not None else None
    if st is None or st.get("fingerprint") != fingerprint:
        return _Run(best_epoch=epochs)
    run = _Run.resume(st, model, opt, gen)
    if progress:
        tqdm.write(f"resuming interrupted training at epoch {run.epoch + 1}/{epochs}")
    return run


def _wrap(model: MCModel, device: torch.device) -> tuple[nn.Module, tuple[int, int]]:
    """``model`` in DistributedDataParallel, and this process's (rank, world size)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    net = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    return net, (dist.get_rank(), dist.get_world_size())


def train_one_epoch(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: nn.Module,
    x: torch.Tensor,
    yt: torch.Tensor,
    perm: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    aug: Augmenter | None,
    shard: tuple[int, int] = (0, 1),
    desc: str = "epoch",
    progress: bool = True,
) -> float:
    """One pass over ``x [N, C, S, S]``, ``yt [N]`` in the order ``perm``; the mean loss.

    ``shard`` = (rank, world size): under torchrun each rank trains on its share of every
    batch, and the loss returned is over every rank's images (the same on each rank, which
    keeps their decisions identical)."""
    rank, world = shard
    net.train()
    total, seen = 0.0, 0
    for i in tqdm(
        range(0, len(perm), batch_size),
        desc=desc,
        unit="batch",
        leave=False,
        disable=not progress or math.ceil(len(perm) / batch_size) < 20,
    ):
        idx = perm[i : i + batch_size]
        if world > 1:  # this rank's share (a batch smaller than the world is repeated)
            idx = idx[rank::world] if len(idx) >= world else idx
        xb = x[idx]
        if aug is not None:
            xb = aug(xb)
        xb, yb = xb.to(device), yt[idx].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(net(xb).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor([total, float(seen)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, seen = float(t[0]), int(t[1])
    return total / seen


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: np.ndarray,
    device: torch.device,
    n_classes: int,
    classes: Sequence[str] | None = None,
) -> dict[str, float]:
    """Validation metrics of the deterministic model (dropout off) on ``x``, ``y``; per-class
    metrics named by ``classes`` (as the round's reported metrics are) when given."""
    return classification_metrics(y, predict_deterministic(model, x, device), n_classes, classes)


@dataclass
class _Run:
    """What a training has decided so far: the best epoch and its weights, the epochs since,
    the history. Saved with the optimiser and RNG states so an interrupted training resumes."""

    best_epoch: int
    best_state: dict[str, torch.Tensor] | None = None
    best_key: tuple[float, float] | None = None
    since_best: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 0
    """The last finished epoch."""
    monitor: str | None = None
    """Decided on the first validation (its labels are fixed); not saved."""

    def validated(
        self,
        model: nn.Module,
        m: dict[str, float],
        row: dict[str, float],
        epoch: int,
        tc: Any,
        notes: list[str],
        progress: bool,
    ) -> str:
        """Record an epoch's validation metrics ``m`` (in ``row``, and as the best epoch if it
        is); returns the text for the epoch's line."""
        row.update({f"val_{k}": v for k, v in m.items()})
        if self.monitor is None:
            self.monitor, note = defined_monitor(m, tc.monitor)
            if note is not None:
                notes.append(note)
                if progress:
                    tqdm.write(note)
        key = (monitor_value(m, self.monitor), -row["loss"])
        line = (
            f"  val loss {m['loss']:.4f} bal.acc {m['balanced_accuracy']:.3f} "
            f"AUROC {show_metric(m['auroc'])}"
        )
        if self.best_key is None or key > self.best_key:
            self.best_key, self.best_epoch, self.since_best = key, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return line + "  *"
        self.since_best += tc.validate_every
        return line

    def finish(self, model: nn.Module, epochs: int, seconds: float, notes: list[str]) -> FitResult:
        """The training's result, once the best epoch's weights (if any epoch was validated)
        are loaded into ``model``."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        return FitResult(
            epochs=epochs,
            best_epoch=self.best_epoch,
            history=self.history,
            seconds=seconds,
            notes=notes,
        )

    def state(
        self, fingerprint: str, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator
    ) -> dict[str, Any]:
        return {
            "fingerprint": fingerprint,
            "epoch": self.epoch,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "best_state": self.best_state,
            "best_epoch": self.best_epoch,
            "best_key": list(self.best_key) if self.best_key else None,
            "since_best": self.since_best,
            "history": self.history,
        }

    @classmethod
    def resume(
        cls, st: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator
    ) -> _Run:
        """Restore a saved state (:meth:`state`) into the model, optimiser and RNGs."""
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        return cls(
            best_epoch=st["best_epoch"],
            best_state=st["best_state"],
            best_key=tuple(st["best_key"]) if st["best_key"] is not None else None,
            since_best=st["since_best"],
            history=list(st["history"]),
            epoch=st["epoch"],
        )


def fit_probe(
    model: MCModel,
    x: torch.Tensor,
    y: np.ndarray,
    cfg: Config,
    *,
    device: torch.device,
    x_val: torch.Tensor | None = None,
    y_val: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = True,
    unlabelled: torch.Tensor | None = None,
    log: TrainingLog | None = None,
    pool_size: int = 0,
) -> FitResult:
    """Train only ``model.head`` on the fixed backbone features of ``x [N, C, S, S]``, ``y [N]``.

    All N feature vectors form one batch; ``train.probe_steps`` AdamW steps with a cosine
    learning rate from ``train.probe_lr``, dropout on. A fixed schedule selects nothing on a
    validation set, so a tiny hold-out cannot mislead it; the validation metrics (if any) are
    reported for the final head. A linear head (``model.hidden = 0``) first takes its feature
    standardisation from these N images. Milliseconds to seconds, so nothing is resumed.

    ``train.semi_supervised = "pseudo_label"`` with ``unlabelled`` (the pool's features
    ``[M, D]``): self-training (Lee 2013). After the supervised schedule, the pool images the
    head predicts with probability >= ``train.pseudo_threshold`` get that class as a label,
    and the schedule runs once more on the labelled loss plus the mean loss on those.
    ``log(row, step)`` receives the loss of every optimiser step as it is made, then the final
    row (with the validation metrics) at the last step. ``pool_size``: the unlabelled images,
    for ``train.head_choice_min_coverage``.
    """
    t0 = time.perf_counter()
    tc = cfg.train
    model.to(device)
    f = backbone_features(model, x, device).to(device)
    was = model.head  # the previous round's head under a warm start
    choice = _choose_head(model, f, y, cfg, seed, pool_size)
    head = model.head
    yt, loss_fn = _fit_head(head, f, y, cfg, seed, progress, log)
    step, note = tc.probe_steps, ""
    if tc.semi_supervised == "pseudo_label" and unlabelled is not None and len(unlabelled):
        step, note = _pseudo_label_schedule(
            head, f, yt, loss_fn, unlabelled.to(device).float(), cfg, progress, log
        )
    _fit_scorer(model, was, f, y, cfg, seed)
    row = _probe_row(model, f, yt, loss_fn, cfg, device, x_val, y_val)
    if log is not None:
        log({k: v for k, v in row.items() if k.startswith("val_")}, step)
    if progress:
        tqdm.write(
            f"head trained on {len(x)} images' features: {tc.probe_steps} steps{note}, "
            f"loss {row['loss']:.4f}" + (f"; {choice.note()}" if choice else "")
        )
    return FitResult(
        epochs=1,
        best_epoch=1,
        history=[row],
        seconds=time.perf_counter() - t0,
        notes=[choice.note()] if choice else [],
    )


def _choose_head(
    model: MCModel, f: torch.Tensor, y: np.ndarray, cfg: Config, seed: int, pool_size: int = 0
) -> HeadChoice | None:
    """Give ``model`` the head ``train.head_choice`` chooses for features ``f [N, D]`` and
    labels ``y [N]`` (:func:`medal.headchoice.choose_head`), else the configured one
    (``model.hidden``): a fresh head, seeded with ``seed``, when the width changes (a warm
    start keeps the parent's head when it is the one chosen, and a linear head chosen after a
    hidden layer goes on from the parent's linear scorer). Returns the choice, if made."""

    def fit_head(head: nn.Module, fk: torch.Tensor, yk: np.ndarray) -> None:
        _fit_head(head, fk, yk, cfg, seed, progress=False)

    choice = choose_head(f, y, cfg, seed, fit_head, pool_size)
    hidden = cfg.model.hidden if choice is None else choice.hidden
    if model.head_hidden != hidden:
        scorer = model.scorer
        torch.manual_seed(seed)
        model.set_head_width(hidden)
        if hidden == 0 and scorer is not None:
            model.head = scorer  # the previous round's linear head goes on, as without a choice
    return choice


def _fit_scorer(
    model: MCModel, was: StochasticHead, f: torch.Tensor, y: np.ndarray, cfg: Config, seed: int
) -> None:
    """``model.scorer``: with a chosen hidden-layer head and ``query.head_choice_samples =
    "linear"``, the linear head whose samples the query scores, trained on features ``f [N, D]``
    and labels ``y [N]`` by the probe's supervised schedule, starting as today's linear head
    would: from the previous round's linear head (``was``, the head the choice replaced, or the
    previous scorer), else fresh (seeded with ``seed``). None otherwise."""
    q = cfg.query
    if model.head_hidden == 0 or not head_choice_on(cfg) or q.head_choice_samples != "linear":
        model.scorer = None
        return
    start: StochasticHead
    if isinstance(was, StochasticHead) and isinstance(was[0], Standardize):
        start = was
    elif model.scorer is not None:
        start = model.scorer
    else:
        torch.manual_seed(seed)
        start = model.new_head(0)
    _fit_head(start, f, y, cfg, seed, progress=False)
    model.scorer = start


def _fit_head(
    head: nn.Module,
    f: torch.Tensor,
    y: np.ndarray,
    cfg: Config,
    seed: int,
    progress: bool,
    log: TrainingLog | None = None,
) -> tuple[torch.Tensor, nn.Module]:
    """The probe's supervised schedule for ``head`` on features ``f [N, D]`` (on the training
    device) with labels ``y [N]``: a linear head's standardisation from ``f``, the global RNG
    seeded with ``seed`` (dropout), class weights unless ``train.balance = "none"``, then
    :func:`_head_schedule`. Returns the labels as a tensor ``[N]`` and the loss."""
    tc = cfg.train
    for m in head.modules():
        if isinstance(m, Standardize):
            m.fit(f)
    torch.manual_seed(seed)
    yt = torch.as_tensor(y, dtype=torch.long, device=f.device)
    weight = loss_weights(y, cfg).to(f.device) if tc.balance != "none" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    _head_schedule(
        head, f, yt, loss_fn, tc.probe_lr, tc.weight_decay, tc.probe_steps, progress, log=log
    )
    return yt, loss_fn


def fit_members(
    model: MCModel,
    x: torch.Tensor,
    y: np.ndarray,
    cfg: Config,
    *,
    device: torch.device,
    seed: int,
    progress: bool = True,
) -> None:
    """Fit the model's ensemble heads (:attr:`~medal.models.MCModel.members`, ``query.posterior
    = "ensemble"``) to ``x [N, C, S, S]``, ``y [N]``: head k (1..K) by :func:`fit_probe`'s
    supervised schedule on the features of the class-stratified bootstrap resample
    :func:`~medal.posterior.bootstrap_rows` draws with seed ``seed + k``, its dropout seeded
    with ``seed + k`` too. The features ``[N, D]`` are computed once, by the model's backbone
    as it is now (fine-tuned, after LP-FT); no pseudo-labels. The main head is left as it is;
    a model without ensemble heads (``query.posterior = "mc_dropout"``) is left alone."""
    if len(model.members) == 0:
        return
    tc = cfg.train
    model.to(device)
    f = backbone_features(model, x, device).to(device)
    losses = []
    for k, member in enumerate(model.members, start=1):
        rows = bootstrap_rows(y, seed + k)
        fk = f[torch.from_numpy(rows).to(device)]
        yt, loss_fn = _fit_head(member, fk, y[rows], cfg, seed + k, progress=False)
        with torch.no_grad():
            losses.append(float(loss_fn(member(fk).float(), yt)))
        for value in (losses[-1], _health(member, fk, device)):
            check_finite(
                value,
                f"after ensemble head {k}'s {tc.probe_steps} steps",
                "train.probe_lr",
                tc.probe_lr,
            )
    if progress:
        tqdm.write(
            f"{len(model.members)} ensemble heads trained on bootstrap resamples of {len(x)} "
            f"images' features: mean loss {np.mean(losses):.4f}"
        )


def fit_companion(
    model: MCModel,
    x: torch.Tensor,
    y: np.ndarray,
    cfg: Config,
    *,
    device: torch.device,
    seed: int,
    progress: bool,
    pool_size: int = 0,
) -> tuple[str, float]:
    """Train the whole-network companion of ``model`` (:mod:`medal.companion`) on
    ``x [N, C, S, S]``, ``y [N]`` when :func:`~medal.companion.companion_decision` says so and
    attach it as ``model.companion`` (else remove any companion the model had); the line for
    the training's notes (empty when off) and the seconds it took. ``pool_size``: the
    unlabelled pool images, for ``train.companion_min_coverage``."""
    model.companion = None
    go, why = companion_decision(cfg, len(y), pool_size)
    if not go:
        return why, 0.0
    if len(y) < 2:
        return f"no companion: it needs 2 labelled images or more, there is {len(y)}", 0.0
    tr, va = holdout_split(y, cfg.train.companion_holdout, seed)
    whole = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, freeze_backbone=False))
    torch.manual_seed(seed)
    comp = build_companion(companion_spec(cfg))
    result = fit(
        comp,
        x[tr],
        y[tr],
        whole,
        epochs=cfg.train.epochs,
        device=device,
        x_val=x[va],
        y_val=y[va],
        seed=seed,
        progress=progress,
    )
    comp.eval()
    model.companion = comp
    line = (
        f"whole-network companion trained ({why}): {len(tr)} images, {len(va)} held out, "
        f"best epoch {result.best_epoch} of {result.epochs}, {result.seconds:.0f} s; "
        f"predictions average it with the frozen head"
    )
    if progress:
        tqdm.write(line)
    return line, result.seconds


def _probe_row(
    model: MCModel,
    f: torch.Tensor,
    yt: torch.Tensor,
    loss_fn: nn.Module,
    cfg: Config,
    device: torch.device,
    x_val: torch.Tensor | None,
    y_val: np.ndarray | None,
) -> dict[str, float]:
    """The history row of a trained head (dropout off): its loss on the features ``f [N, D]``
    and labels ``yt [N]``, checked finite with its weights and outputs, and the metrics of
    ``model`` on ``x_val``, ``y_val`` (``val_<metric>``) when there is a validation set."""
    tc, head = cfg.train, model.head
    head.eval()
    with torch.no_grad():
        row = {"epoch": 1.0, "loss": float(loss_fn(head(f).float(), yt))}
    for value in (row["loss"], _health(head, f, device)):
        check_finite(
            value, f"after the head's {tc.probe_steps} steps", "train.probe_lr", tc.probe_lr
        )
    if x_val is not None and y_val is not None and len(x_val):
        p = predict_deterministic(model, x_val, device)
        row.update(
            {
                f"val_{k}": v
                for k, v in classification_metrics(y_val, p, len(cfg.classes), cfg.classes).items()
            }
        )
    return row


def _pseudo_label_schedule(
    head: nn.Module,
    f: torch.Tensor,
    yt: torch.Tensor,
    loss_fn: nn.Module,
    fu: torch.Tensor,
    cfg: Config,
    progress: bool,
    log: TrainingLog | None,
) -> tuple[int, str]:
    """Self-training after the supervised schedule: the pool features ``fu [M, D]`` the head
    predicts with probability >= ``train.pseudo_threshold`` take that class, and the schedule
    runs once more with them. Returns the steps taken in all and the note for the log line."""
    tc = cfg.train
    step = tc.probe_steps
    with torch.no_grad():
        p = head(fu).float().softmax(-1)
    conf, pseudo = p.max(1)
    keep = conf >= tc.pseudo_threshold
    if keep.any():
        _head_schedule(
            head,
            f,
            yt,
            loss_fn,
            tc.probe_lr,
            tc.weight_decay,
            tc.probe_steps,
            progress,
            extra=(fu[keep], pseudo[keep]),
            log=log,
            first_step=step,
        )
        step += tc.probe_steps
    return step, f", then with {int(keep.sum())} of {len(fu)} pool images pseudo-labelled"


def _head_schedule(
    head: nn.Module,
    f: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    lr: float,
    weight_decay: float,
    steps: int,
    progress: bool,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
    log: TrainingLog | None = None,
    first_step: int = 0,
) -> None:
    """``steps`` full-batch AdamW steps (cosine learning rate, dropout on) of ``head`` on
    features ``f [N, D]`` with labels ``y [N]``; plus, with ``extra = (features [M, D],
    pseudo-labels [M])``, the unweighted mean loss on those. ``log`` gets each step's loss
    (steps numbered from ``first_step + 1``)."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    head.train()
    for i in tqdm(
        range(steps), desc="training the head", unit="step", disable=not progress, leave=False
    ):
        loss = loss_fn(head(f).float(), y)
        if extra is not None:
            loss = loss + F.cross_entropy(head(extra[0]).float(), extra[1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None:
            log({"loss": loss.item()}, first_step + i + 1)
    head.eval()


def _read_state(path: Path, notes: list[str], progress: bool) -> dict[str, Any] | None:
    """The saved state of an interrupted training, or None. One that cannot be read (truncated
    by a full disk, tampered with) is set aside beside it and training starts over."""
    if not path.is_file():
        return None
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(st, dict):
            raise ValueError(f"expected a dict, found {type(st).__name__}")
        return st
    except Exception as e:  # noqa: BLE001 - any unreadable state means starting over
        aside = path.with_name(f"{path.name}.unreadable-{time.time_ns()}")
        path.replace(aside)
        note = (
            f"the saved state of an interrupted training, {path.name}, cannot be read "
            f"({type(e).__name__}); set aside as {aside.name}, training starts over"
        )
        notes.append(note)
        if progress:
            tqdm.write(note)
        return None


def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


@torch.no_grad()
def backbone_features(
    model: MCModel, x: torch.Tensor, device: torch.device, batch_size: int = 512
) -> torch.Tensor:
    """Deterministic backbone features ``x [N, C, S, S]`` -> ``[N, D]`` (on CPU)."""
    model.eval()
    out = [
        model.features(x[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, model.feature_dim)


@torch.no_grad()
def predict_deterministic(
    model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 512
) -> np.ndarray:
    """Dropout off: ``x [N, ...]`` (images for a model, features for a head) -> probabilities
    ``[N, K]``."""
    model.eval()
    out = [
        model(x[i : i + batch_size].to(device)).float().softmax(-1).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def predict_pair(model: MCModel, x: torch.Tensor, device: torch.device) -> np.ndarray:
    """Dropout off: images ``x [N, C, S, S]`` -> probabilities ``[N, K]`` as medal predicts
    them: with a whole-network companion (``train.companion``) the mean of the two models'
    (the model's ``forward`` is the head alone)."""
    p = predict_deterministic(model, x, device)
    comp = model.companion
    return p if comp is None else (p + predict_deterministic(comp, x, device)) / 2


# --- checkpoints ----------------------------------------------------------------------------
def save_checkpoint(
    path: Path, model: MCModel, cfg: Config, round_no: int, extra: dict[str, Any] | None = None
) -> None:
    """Weights + effective config + class names + medal version, written atomically."""
    payload = {
        "state_dict": model.state_dict(),
        "config": cfg.to_dict(),
        "classes": list(cfg.classes),
        "model_name": cfg.model.name,
        "channels": cfg.model.channels,
        "features": model.features_mode,
        "head_hidden": model.head_hidden,
        "medal_version": __version__,
        "round": round_no,
        **({} if model.companion is None else {"companion": model.companion.spec}),
        **({"backbone_tuned": True} if model.backbone_tuned else {}),
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(
    path: Path,
    model: MCModel,
    classes: Sequence[str],
    model_name: str,
    channels: int,
    *,
    fresh_members: bool = False,
) -> dict[str, Any]:
    """Load weights into ``model``; refuse a checkpoint for other classes or architecture.
    Ensemble heads as :func:`_member_state` decides and the whole-network companion as
    :func:`_companion_state` does (``fresh_members``: a warm start, which fits both anew)."""
    if not path.is_file():
        raise ModelError(
            f"checkpoint not found: {path}"
            + (" (it is a folder, not a file)" if path.is_dir() else "")
        )
    ck = read_weights(path, "checkpoint")
    if not isinstance(ck, dict) or not isinstance(ck.get("state_dict"), dict):
        raise ModelError(
            f"checkpoint {path} holds a {type(ck).__name__} without a state_dict; "
            f"expected a checkpoint medal wrote"
        )
    if list(ck.get("classes", [])) != list(classes):
        raise ModelError(
            f"checkpoint {path} was trained for classes {ck.get('classes')}, "
            f"but the config has {list(classes)}"
        )
    if ck.get("model_name") != model_name or ck.get("channels") != channels:
        raise ModelError(
            f"checkpoint {path} is a {ck.get('model_name')} with "
            f"{ck.get('channels')} input channel(s); the config asks for "
            f"{model_name} with {channels}"
        )
    trained = ck.get("features", "last")  # checkpoints from before model.features: "last"
    if trained != model.features_mode:
        raise ModelError(
            f"checkpoint {path} was trained with model.features = {trained!r}, "
            f"the config builds {model.features_mode!r} (another head width); set "
            f'model.features = "{trained}" to go on from this project\'s '
            f'checkpoints (those of medal before 0.2 are "last")'
        )
    hidden = ck.get("head_hidden")  # train.head_choice's choice (absent before it existed)
    if isinstance(hidden, int) and hidden != model.head_hidden:
        model.set_head_width(hidden)
    state = _companion_state(path, ck, _member_state(path, ck["state_dict"], model, fresh_members))
    model.scorer = model.new_head(0) if any(k.startswith("scorer.") for k in state) else None
    model.backbone_tuned = bool(ck.get("backbone_tuned", False))
    if fresh_members:
        state = {k: v for k, v in state.items() if not k.startswith("companion.")}
    else:
        model.companion = None if "companion" not in ck else _built_companion(path, ck["companion"])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())  # torch lists each key on its own line
        raise ModelError(f"checkpoint {path} does not fit the model: {detail[:300]}") from None
    return ck


def _built_companion(path: Path, spec: dict[str, Any]) -> MCModel:
    """The companion a checkpoint's shape ``spec`` describes (its weights not yet loaded)."""
    try:
        return build_companion(spec)
    except (KeyError, TypeError, ValueError, ModelError) as e:
        raise ModelError(
            f"checkpoint {path} is damaged: its companion's weights and shape do not go "
            f"together (shape {spec!r}: {type(e).__name__} {e})"
        ) from None


def _companion_state(
    path: Path, ck: dict[str, Any], state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state``, once its companion weights (``companion.*``) and the companion's shape
    (``ck["companion"]``) are found to go together."""
    has_weights = any(k.startswith("companion.") for k in state)
    spec = ck.get("companion")
    if has_weights != (spec is not None) or (spec is not None and not isinstance(spec, dict)):
        raise ModelError(
            f"checkpoint {path} is damaged: its companion's weights and shape do not go "
            f"together (weights {'present' if has_weights else 'absent'}, shape {spec!r})"
        )
    return state


def _member_state(
    path: Path, state: dict[str, torch.Tensor], model: MCModel, fresh: bool
) -> dict[str, torch.Tensor]:
    """A checkpoint's ``state`` for ``model``, by their ensemble heads (``members.<k>.*``):
    kept when the numbers agree, dropped when the model has none (``query.posterior =
    "mc_dropout"``); otherwise, with ``fresh`` (a warm start, which fits them anew), the
    model's freshly initialised heads replace them, and without it one line says what to do."""
    have = len({k.split(".")[1] for k in state if k.startswith("members.")})
    want = len(model.members)
    if have == want:
        return state
    kept = {k: v for k, v in state.items() if not k.startswith("members.")}
    if want == 0:
        return kept
    if not fresh:
        raise ModelError(
            f"checkpoint {path} holds {have} ensemble heads, the config asks for {want} "
            f'(query.posterior = "ensemble", query.ensemble_size = {want}); run medal train '
            f"with this config to fit them"
        )
    own = {k: v for k, v in model.state_dict().items() if k.startswith("members.")}
    return {**kept, **own}
