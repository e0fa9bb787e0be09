#!/usr/bin/env python3
"""Full-label ceiling of three ways to train, on a bundled dataset's official train split (or a
random cut of it) with every label given, test AUROC on the official test split:

* ``frozen``: SimCLR backbone pretrained on the pool (its images, no labels), frozen, linear
  dropout head (``train.fit_probe``): the defaults until Run X2 (``train.head_choice`` and
  ``train.companion`` are pinned "off" for every arm but ``cvc``);
* ``cvc``: today's defaults: ``frozen`` with the head chosen by cross-validation and the
  whole-network companion averaged in (at the ceiling the labels cover every image, so both
  apply);
* ``lpft``: the same probe, then the whole network fine-tuned (``train.finetune = "always"``,
  :mod:`medal.finetune`);
* ``auto``: the probe, fine-tuned as ``lpft`` only once every class has
  ``train.finetune_min_per_class`` labels (``train.finetune = "auto"``);
* ``mix``: the ``frozen`` and ``whole`` models trained apart, their probabilities averaged;
  ``auto-mix``: ``mix`` once every class has ``train.finetune_min_per_class`` labels, before
  that ``frozen``; ``mix100``: ``mix`` once 100 images are labelled in all, before that
  ``frozen`` (Run M1's switching rule);
* ``whole``: whole-network training from random weights, the defaults before 0.2
  (``representation.method = "none"``, ``model.hidden = 128``, 20 % of the labels held out,
  stratified, to choose the best epoch: the honest protocol has no other validation set).

Images come straight from the bundled ``.npz`` (28x28, scaled to [0, 1] and normalised as
medal's loader does), so nothing needs preparing. One backbone is pretrained per seed on that
seed's pool and cached in ``--out``. Every (seed, arm) appends a row to ``--out/results.csv``
(resumable) with the git commit; the table at the end gives each arm's mean and the paired
differences with 95 % t intervals over seeds.

    python scripts/bench_finetune.py --dataset pneumoniamnist --pool 500 --out RUNS/pn500
    python scripts/bench_finetune.py --dataset retinamnist --out RUNS/retina
    python scripts/bench_finetune.py --pool 500 --curve 20:320:30 --arms frozen,auto,whole \
        --out RUNS/pn500          # learning curves with random picks: RUNS/pn500/curve.csv

docs/experiments-lpft.md records every run of it and the rule each was judged by.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import log_loss
from sklearn.model_selection import train_test_split

from medal import api
from medal.config import Config, TrainConfig, add_overrides_argument, load_config, parse_overrides
from medal.finetune import finetune_decision
from medal.inputs import for_count, with_backbone
from medal.data import NORMALISE_MEAN, NORMALISE_STD
from medal.metrics import classification_metrics
from medal.models import MCModel
from medal.representation import pretrain_and_cache
from medal.simulate import t_interval_or_nan as interval
from medal.train import build_model, fit, predict_deterministic, predict_pair

ROOT = Path(__file__).resolve().parents[1]
MIX_MIN_LABELS = 100
"""``mix100``: labelled images (all classes together) from which the whole network joins."""

ARMS = (
    "frozen",
    "lpft",
    "auto",
    "whole",
    "lpft-lr3",
    "lpft-lr1",
    "auto-lr3",
    "auto-lr1",
    "lpft-lr1-bn",
    "lpft-lr1-e30",
    "auto-lr1-bn",
    "auto-lr1-e30",
    "mix",
    "auto-mix",
    "mix100",
    "mix100cv",
    "cvc",
)
COMMON = {
    "device": "cpu",
    "representation.method": "simclr",
    "model.hidden": 0,
    "train.freeze_backbone": True,
    "train.validation_fraction": 0.0,
    # the arms below were defined before these became default (Run X2); "cvc" has them
    "train.head_choice": "off",
    "train.companion": "off",
}
WHOLE = {"representation.method": "none", "model.hidden": 128, "train.freeze_backbone": False}
# Each arm's settings over COMMON. ``-lr3``/``-lr1``: the backbone's fine-tuning learning rate at
# 0.3x / 1x the head's (train.finetune_lr_scale; the default is 0.1); ``-bn``: BatchNorm
# statistics updated by the labelled batches; ``-e30``: 30 fine-tuning epochs instead of 10.
ARM_SETTINGS: dict[str, dict[str, object]] = {
    "frozen": {},
    "lpft": {"train.finetune": "always"},
    "auto": {"train.finetune": "auto"},
    "whole": WHOLE,
    "mix": {},  # frozen and whole trained apart, their probabilities averaged (arm_probs)
    "auto-mix": {},  # mix once every class has train.finetune_min_per_class labels, else frozen
    "mix100": {},  # mix once MIX_MIN_LABELS images are labelled in all, else frozen
    "mix100cv": {},  # mix100 with the whole network's weight chosen on its hold-out (cv_mix)
    # today's defaults: the head chosen by cross-validation and the whole-network companion,
    # both once the labels cover half the images (at the ceiling they cover all: Run X1's cvc)
    "cvc": {"train.head_choice": "auto", "train.companion": "auto"},
    **{
        f"{mode}-lr{tag}": {"train.finetune": rule, "train.finetune_lr_scale": scale}
        for mode, rule in (("lpft", "always"), ("auto", "auto"))
        for tag, scale in (("3", 0.3), ("1", 1.0))
    },
    **{
        f"{mode}-lr1-{tag}": {"train.finetune": rule, "train.finetune_lr_scale": 1.0, **extra}
        for mode, rule in (("lpft", "always"), ("auto", "auto"))
        for tag, extra in (
            ("bn", {"train.finetune_batchnorm": "update"}),
            ("e30", {"train.epochs": 30}),
        )
    },
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=("pneumoniamnist", "retinamnist"), default="pneumoniamnist")
    p.add_argument(
        "--pool",
        type=int,
        default=0,
        help="cut the train split to this many images, drawn per seed (0: all)",
    )
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument(
        "--arms", default="frozen,lpft,auto,whole", help=f"comma-separated, of {', '.join(ARMS)}"
    )
    add_overrides_argument(p, "config overrides for every arm (TOML values)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--curve",
        metavar="START:STOP:STEP",
        default=None,
        help="learning curve with random picks instead of the ceiling "
        "(e.g. 20:320:30); rows go to --out/curve.csv",
    )
    return p


def arrays(dataset: str, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """``(x [N, C, 28, 28] normalised, y [N])`` of an official split."""
    d = np.load(ROOT / "data" / dataset / f"{dataset}.npz")
    img = torch.from_numpy(d[f"{split}_images"].astype(np.float32) / 255.0)
    img = img.unsqueeze(1) if img.ndim == 3 else img.permute(0, 3, 1, 2)
    return ((img - NORMALISE_MEAN) / NORMALISE_STD).contiguous(), d[f"{split}_labels"].ravel()


def backbone(cfg: Config, x: torch.Tensor, path: Path) -> Path:
    """The seed's SimCLR backbone on ``x`` (cached at ``path``), as ``medal train`` makes it."""
    if not path.is_file():
        model = api.start_model(cfg, None)
        pretrain_and_cache(
            path,
            model.backbone,
            model.backbone_dim,
            x,
            api.ssl_settings(cfg),
            device=torch.device("cpu"),
            progress=False,
        )
    return path


def whole_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``(train, held out)`` of ``y``: the 20 % the ``whole`` arm holds out to choose its
    best epoch (stratified when every class has two labels or more)."""
    strat = (
        y
        if np.bincount(y).min(initial=len(y)) >= 2 and len(set(y.tolist())) == len(np.bincount(y))
        else None
    )
    tr, va = train_test_split(np.arange(len(y)), test_size=0.2, stratify=strat, random_state=seed)
    return tr, va


def run_arm(arm: str, cfg: Config, x: torch.Tensor, y: np.ndarray, bb: Path, seed: int) -> MCModel:
    """Train one arm on every label of the pool ``x``, ``y``; returns the model."""
    cpu = torch.device("cpu")
    if arm == "whole":
        torch.manual_seed(seed)
        model = build_model(cfg)
        tr, va = whole_split(y, seed)
        fit(
            model,
            x[tr],
            y[tr],
            cfg,
            epochs=cfg.train.epochs,
            device=cpu,
            x_val=x[va],
            y_val=y[va],
            seed=seed,
            progress=False,
        )
        return model
    model = api.start_model(cfg, None, backbone=bb)
    fit(model, x, y, cfg, epochs=cfg.train.epochs, device=cpu, seed=seed, progress=False)
    return model


def arm_probs(
    arm: str,
    cfg: Config,
    conf: Path,
    over: dict[str, object],
    x: torch.Tensor,
    y: np.ndarray,
    bb: Path,
    seed: int,
    *sets: torch.Tensor,
) -> list[np.ndarray]:
    """Class probabilities ``[N, C]`` of one arm's model on each of ``sets``. ``mix``: the mean
    of the ``frozen`` and ``whole`` arms' probabilities (two models trained as those arms)."""
    cpu = torch.device("cpu")
    if arm == "auto-mix":  # the frozen head until finetune_decision's label counts are met
        go, _ = finetune_decision(dataclasses.replace(cfg, train=replace_train(cfg)), y)
        arm = "mix" if go else "frozen"
    if arm in ("mix100", "mix100cv"):
        if len(y) < MIX_MIN_LABELS:
            arm = "frozen"
        elif arm == "mix100cv":
            return cv_mix(cfg, conf, over, x, y, bb, seed, *sets)
        else:
            arm = "mix"
    if arm != "mix":
        model = run_arm(arm, cfg, x, y, bb, seed)
        return [model_probs(model, xs) for xs in sets]
    parts = []
    for part in ("frozen", "whole"):
        c = dataclasses.replace(
            load_config(conf, {**COMMON, **ARM_SETTINGS[part], **over}), seed=seed
        )
        c = resolved_as(c, cfg)
        model = run_arm(part, c, x, y, bb, seed)
        parts.append([predict_deterministic(model, xs, cpu) for xs in sets])
    return [(a + b) / 2 for a, b in zip(*parts, strict=True)]


def model_probs(model: MCModel, x: torch.Tensor) -> np.ndarray:
    """Probabilities ``[N, C]`` of ``x`` with dropout off, as medal predicts them: a frozen head
    with a whole-network companion (``train.companion``) is the pair's average."""
    return predict_pair(model, x, torch.device("cpu"))


WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""``mix100cv``: the whole network's weights in the average to choose from."""


def cv_mix(
    cfg: Config,
    conf: Path,
    over: dict[str, object],
    x: torch.Tensor,
    y: np.ndarray,
    bb: Path,
    seed: int,
    *sets: torch.Tensor,
) -> list[np.ndarray]:
    """``mix100cv``: ``(1 - w) * frozen + w * whole`` on each of ``sets``, ``w`` of
    :data:`WEIGHTS` with the lowest log loss on the ``whole`` arm's hold-out (ties: nearest
    0.5), where a frozen head trained on the other 80 % stands in for the frozen arm; the
    frozen head that predicts ``sets`` trains on every label, as in ``mix``."""
    cpu = torch.device("cpu")
    cfg_w = dataclasses.replace(load_config(conf, {**COMMON, **WHOLE, **over}), seed=seed)
    cfg_w = resolved_as(cfg_w, cfg)
    whole = run_arm("whole", cfg_w, x, y, bb, seed)
    tr, va = whole_split(y, seed)
    p_f = predict_deterministic(run_arm("frozen", cfg, x[tr], y[tr], bb, seed), x[va], cpu)
    p_w = predict_deterministic(whole, x[va], cpu)
    labels = list(range(len(cfg.classes)))
    losses = [log_loss(y[va], (1 - w) * p_f + w * p_w, labels=labels) for w in WEIGHTS]
    best = min(range(len(WEIGHTS)), key=lambda i: (round(losses[i], 9), abs(WEIGHTS[i] - 0.5)))
    w = WEIGHTS[best]
    print(f"mix100cv: whole-network weight {w} (hold-out log loss {losses[best]:.4f})")
    frozen = run_arm("frozen", cfg, x, y, bb, seed)
    return [
        (1 - w) * predict_deterministic(frozen, xs, cpu) + w * predict_deterministic(whole, xs, cpu)
        for xs in sets
    ]


def resolved_as(c: Config, cfg: Config) -> Config:
    """``c`` with ``model.name = "auto"`` resolved as the arm's ``cfg`` was for its pool (the
    same backbone file); whole-network settings, without pretraining, resolve on their own."""
    if c.model.name != "auto":
        return c
    if c.representation.method == "none":
        return for_count(c, 0)
    return with_backbone(c, cfg.model.name)


def replace_train(cfg: Config) -> TrainConfig:
    """``cfg.train`` with ``finetune = "auto"``: :func:`finetune_decision`'s rule (every
    class has ``train.finetune_min_per_class`` labels) decides when ``auto-mix`` mixes."""
    return dataclasses.replace(cfg.train, finetune="auto")


def commit() -> str:
    r = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "medal", "scripts"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    unknown = sorted(set(a.arms.split(",")) - set(ARMS))
    if unknown:
        parser().error(f"--arms: unknown {', '.join(unknown)}; valid: {', '.join(ARMS)}")
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    over = parse_overrides(a.overrides)
    conf = ROOT / "configs" / f"{a.dataset}.toml"
    x_all, y_all = arrays(a.dataset, "train")
    x_test, y_test = arrays(a.dataset, "test")
    x_val, y_val = arrays(a.dataset, "val")
    results = a.out / ("curve.csv" if a.curve else "results.csv")
    code = commit()  # the code this process imported, not HEAD when a row is written
    done = set()
    if results.is_file():
        with open(results, newline="") as f:
            done = {
                (int(r["seed"]), r["arm"], int(r.get("labels") or r["pool"]))
                for r in csv.DictReader(f)
            }
    for seed in [int(s) for s in a.seeds.split(",")]:
        rng = np.random.default_rng(seed)
        idx = (
            np.sort(rng.choice(len(y_all), a.pool, replace=False))
            if a.pool
            else np.arange(len(y_all))
        )
        x, y = x_all[idx], y_all[idx]
        # model.name = "auto" as medal resolves it for a pretraining on this pool
        base = for_count(
            dataclasses.replace(load_config(conf, {**COMMON, **over}), seed=seed), len(x)
        )
        bb = backbone(base, x, a.out / f"backbone-seed{seed}.pt")
        for n, pick in points(a.curve, len(y), seed):
            for arm in a.arms.split(","):
                if (seed, arm, n) in done:
                    continue
                extra = ARM_SETTINGS[arm]
                cfg = dataclasses.replace(load_config(conf, {**COMMON, **extra, **over}), seed=seed)
                cfg = for_count(cfg, len(x))
                t0 = time.perf_counter()
                probs = arm_probs(arm, cfg, conf, over, x[pick], y[pick], bb, seed, x_test, x_val)
                auc, val_auc = (
                    classification_metrics(yy, pp, len(cfg.classes))["auroc"]
                    for pp, yy in zip(probs, (y_test, y_val), strict=True)
                )
                row = {
                    "dataset": a.dataset,
                    "pool": len(y),
                    "seed": seed,
                    "arm": arm,
                    **({"labels": n} if a.curve else {}),
                    "test_auroc": f"{auc:.4f}",
                    "val_auroc": f"{val_auc:.4f}",
                    "seconds": f"{time.perf_counter() - t0:.0f}",
                    "commit": code,
                    "overrides": ";".join(a.overrides),
                }
                new = not results.is_file()
                with open(results, "a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(row))
                    if new:
                        w.writeheader()
                    w.writerow(row)
                print(row, flush=True)
    print(curve_summary(results) if a.curve else summary(results))
    return 0


def points(curve: str | None, n_pool: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """``[(labels, pool positions)]``: every pool label (the ceiling), or with ``curve`` =
    ``START:STOP:STEP`` the first ``labels`` of one random order of the pool per seed (random
    picks: each point's set contains the previous one, as rounds add labels)."""
    if not curve:
        return [(n_pool, np.arange(n_pool))]
    start, stop, step = (int(v) for v in curve.split(":"))
    order = np.random.default_rng(1000 + seed).permutation(n_pool)
    return [(n, order[:n]) for n in range(start, min(stop, n_pool) + 1, step)]


def summary(results: Path) -> str:
    """Each arm's per-seed AUROC and mean, on the test split and (rows that have it) the
    official val split; paired differences of every fine-tuning arm to frozen and whole."""
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    lines = []
    for split in ("test", "val"):
        col = f"{split}_auroc"
        by = {(r["arm"], int(r["seed"])): float(r[col]) for r in rows if r.get(col)}
        if not by:
            continue
        arms = [a for a in ARMS if any(k[0] == a for k in by)]
        seeds = sorted({s for _, s in by})
        lines.append(f"{split} AUROC")
        lines.append(
            f"{'arm':<9}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds) + f"{'mean':>9}"
        )
        for arm in arms:
            v = [by.get((arm, s), float("nan")) for s in seeds]
            lines.append(f"{arm:<9}" + "".join(f"{x:9.4f}" for x in v) + f"{np.nanmean(v):9.4f}")
        for arm in [a for a in arms if a.startswith(("lpft", "auto", "mix"))]:
            for other in ("frozen", "whole"):
                both = [s for s in seeds if (arm, s) in by and (other, s) in by]
                if len(both) >= 2:
                    m, lo, hi = interval(np.array([by[arm, s] - by[other, s] for s in both]))
                    lines.append(
                        f"{split}: {arm} - {other}: {m:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                        f"(95% t interval, {len(both)} seeds)"
                    )
    return "\n".join(lines)


def curve_summary(results: Path) -> str:
    """Per arm: mean AUROC at each label count, the area (trapezoid mean over the points) per
    seed, and the paired area differences auto - frozen and auto - whole (95 % t)."""
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    by = {(r["arm"], int(r["seed"]), int(r["labels"])): float(r["test_auroc"]) for r in rows}
    arms = [a for a in ARMS if any(k[0] == a for k in by)]
    seeds = sorted({k[1] for k in by})
    ns = sorted({k[2] for k in by})
    lines = [f"{'arm':<8}" + "".join(f"{n:>7}" for n in ns)]
    area: dict[str, dict[int, float]] = {}
    for arm in arms:
        lines.append(
            f"{arm:<8}"
            + "".join(
                f"{np.mean([by[arm, s, n] for s in seeds if (arm, s, n) in by]):7.3f}"
                if any((arm, s, n) in by for s in seeds)
                else f"{'':>7}"
                for n in ns
            )
        )
        area[arm] = {
            s: float(np.trapezoid([by[arm, s, n] for n in ns], ns) / (ns[-1] - ns[0]))
            for s in seeds
            if all((arm, s, n) in by for n in ns)
        }
        if area[arm]:
            lines.append(
                f"  area {arm}: "
                + ", ".join(f"{v:.3f}" for v in area[arm].values())
                + f"; mean {np.mean(list(area[arm].values())):.3f}"
            )
    auto = [a for a in arms if a.startswith(("auto", "lpft", "mix"))]
    for a, b in [*((x, y) for x in auto for y in ("frozen", "whole")), ("frozen", "whole")]:
        both = sorted(set(area.get(a, {})) & set(area.get(b, {})))
        if len(both) >= 2:
            m, lo, hi = interval(np.array([area[a][s] - area[b][s] for s in both]))
            lines.append(
                f"area {a} - {b}: {m:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                f"(95% t interval, {len(both)} seeds)"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
