"""The measurements and tables of the benchmark scripts (``scripts/bench_representation.py``,
``scripts/bench_simulation.py``), on a bundled data set's official splits:

- :func:`measure`: what the self-supervised representation buys. The backbone is pretrained
  on the train images without labels (or loaded from the cache, ``api.ensure_backbone``, the
  step ``medal train``/``query`` run themselves); the zero-label start (TypiClust picks
  ``first`` images in that embedding, exactly as ``medal query`` picks a project's first round,
  and the frozen-backbone head, ``train.fit_probe``, trains on them) is compared with ``first``
  and ``2 * first`` images drawn at random, per seed; and the full-label ceiling is medal's
  training on every train label (:func:`ceiling_model`: the probe with the head's choice and
  the whole-network companion, which apply once the labels cover half the images).
  :func:`report` prints it.
- :func:`label_efficiency_table`: a simulation's results.csv as one table per seed, with the
  paired differences to random (and to a baseline simulation) and 95% t intervals.

Paths are passed in (the checkout's root: ``configs/``, ``data/``, ``runs/``).
"""

from __future__ import annotations

import csv
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import acquisition, api
from .config import Config, load_config
from .data import load_all
from .medmnist import prepare_bundled
from .metrics import classification_metrics
from .scan import scan_source
from .simulate import Curves, curve_area, read_curves, t_interval_or_nan
from .models import MCModel
from .train import backbone_features, fit, fit_probe, predict_deterministic, predict_pair

PROBE: dict[str, object] = {
    "device": "cpu",
    "representation.method": "simclr",
    "train.freeze_backbone": True,
    "model.hidden": 0,
    "train.validation_fraction": 0.0,
}
"""Frozen self-supervised backbone, linear head, no hold-out (the head's schedule is fixed)."""


def truth(images: Path, classes: tuple[str, ...]) -> list[tuple[Path, str]]:
    """The official train split with its labels: the labelled start folder + pool_truth.csv
    (both always carry a label)."""
    found: dict[Path, str] = {}
    for src in (images / "labelled", images / "pool_truth.csv"):
        for e in scan_source(src, classes):
            if e.label is not None:
                found[e.path.resolve()] = e.label
    return sorted(found.items())


def auroc(model: torch.nn.Module, x_test: torch.Tensor, y_test: np.ndarray, k: int) -> float:
    """Test AUROC (macro one-vs-rest for ``k`` > 2) of ``model`` on ``x_test`` ``[N, C, H, W]``
    with labels ``y_test`` ``[N]``."""
    return classification_metrics(
        y_test, predict_deterministic(model, x_test, torch.device("cpu")), k
    )["auroc"]


def ceiling_model(cfg: Config, path: Path | None, x: torch.Tensor, y: np.ndarray) -> MCModel:
    """medal's training (:func:`medal.train.fit`, seed 0) on every train label, images ``x [N,
    C, H, W]`` and classes ``y [N]``, from the backbone at ``path``: with no pool left the
    labels cover every image, so the head's choice and the whole-network companion apply as
    ``train.head_choice`` and ``train.companion`` say."""
    net = api.start_model(cfg, None, backbone=path)
    fit(net, x, y, cfg, epochs=cfg.train.epochs, device=torch.device("cpu"), progress=False)
    return net


def ceiling_auroc(
    cfg: Config,
    path: Path | None,
    x: torch.Tensor,
    y: np.ndarray,
    x_test: torch.Tensor,
    y_test: np.ndarray,
) -> float:
    """Test AUROC on ``x_test``, ``y_test`` of :func:`ceiling_model`'s model, predicting as
    medal does (with its companion, where it has one)."""
    model = ceiling_model(cfg, path, x, y)
    p = predict_pair(model, x_test, torch.device("cpu"))
    return classification_metrics(y_test, p, len(cfg.classes))["auroc"]


@dataclass
class Measured:
    """Test AUROC per start and seed, the full-label ceiling, and the seconds spent."""

    dataset: str
    seeds: list[int]
    table: dict[str, list[float]]
    ceiling: list[float]
    """Per seed's backbone (one value when the seeds share one)."""
    n_train: int
    n_test: int
    seconds_pretrain: float
    seconds_eval: float

    def diff(self, a: str, b: str) -> tuple[float, float, float]:
        """Mean paired difference ``a - b`` over seeds with its 95% t interval."""
        return t_interval_or_nan(np.array(self.table[a]) - np.array(self.table[b]))


def _train_config(
    root: Path, dataset: str, images: Path, out: Path, overrides: dict[str, object] | None
) -> tuple[Config, list[tuple[Path, str]]]:
    """The bundled config with :data:`PROBE` and ``overrides``, its labelled set the whole
    train split (written to ``out/train.csv``) and its workspace ``out`` (``model.name =
    "auto"`` resolved for it); and that split."""
    over = {**PROBE, **(overrides or {})}
    base = load_config(root / "configs" / f"{dataset}.toml", over)
    rows = truth(images, base.classes)
    labelled_csv = out / "train.csv"
    with open(labelled_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerows([str(p), lab] for p, lab in rows)
    cfg = dataclasses.replace(
        base,
        workspace=out,
        data=dataclasses.replace(base.data, labelled=labelled_csv, pool=None, validation=None),
    )
    return api.resolve_model(cfg), rows  # model.name = "auto": the backbone for this split


def _backbones(cfg: Config, seeds: list[int], backbones: str, progress: bool) -> dict[int, Path]:
    """The pretrained backbone's file per seed (``per-seed``) or for the config's
    representation seed (``shared``)."""
    backbone: dict[int, Path] = {}
    for seed in seeds if backbones == "per-seed" else [api.representation_seed(cfg)]:
        line, backbone[seed] = api.ensure_backbone(
            dataclasses.replace(
                cfg, representation=dataclasses.replace(cfg.representation, seed=seed)
            ),
            progress=progress,
        )
        if progress:
            print(f"backbone seed {seed}: {line}", flush=True)
    return backbone


def _load(cfg: Config, paths: list[Path]) -> tuple[torch.Tensor, np.ndarray]:
    """The images ``[N, C, H, W]`` as the model sees them and the indices of ``paths`` kept."""
    m = cfg.model
    x, kept, _ = load_all(
        paths,
        channels=m.channels,
        size=m.image_size,
        window=cfg.image.window,
        frame=cfg.image.frame,
    )
    return x, kept


def _splits(
    cfg: Config, images: Path, rows: list[tuple[Path, str]]
) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """The train split ``rows`` and the official test split (``images/test``) as the model sees
    them: images ``[N, C, H, W]`` and class indices ``[N]`` of the files that decode."""
    y_all = np.array([cfg.classes.index(lab) for _, lab in rows])
    x, kept = _load(cfg, [p for p, _ in rows])
    test = list(scan_source(images / "test", cfg.classes))
    x_test, kept_t = _load(cfg, [e.path for e in test])
    y_test = np.array([cfg.classes.index(e.label) for e in test])[kept_t]
    return x, y_all[kept], x_test, y_test


def measure(
    dataset: str,
    seeds: list[int],
    *,
    root: Path,
    first: int = 20,
    overrides: dict[str, object] | None = None,
    out: Path | None = None,
    progress: bool = True,
    backbones: str = "per-seed",
) -> Measured:
    """Pretrain (or load) the backbone for ``dataset``'s train split and measure the zero-label
    start and the full-label ceiling of the frozen-backbone head, per seed. ``root`` is the
    checkout (``data/<dataset>`` is prepared there when missing; ``configs/<dataset>.toml``;
    ``out`` defaults to ``runs/bench-representation-<dataset>``). ``backbones``: ``per-seed``
    pretrains one backbone per seed (``representation.seed`` = the seed, as ``medal simulate
    --backbones per-seed`` does), ``shared`` one with the config's seed."""
    images = prepare_bundled(root / "data", dataset)
    out = (out or root / "runs" / f"bench-representation-{dataset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg, rows = _train_config(root, dataset, images, out, overrides)
    t0 = time.perf_counter()
    backbone = _backbones(cfg, seeds, backbones, progress)
    t_pre = time.perf_counter() - t0
    k = len(cfg.classes)
    x, y, x_test, y_test = _splits(cfg, images, rows)

    def probe(path: Path, idx: np.ndarray, seed: int) -> float:
        net = api.start_model(cfg, None, backbone=path)
        fit_probe(net, x[idx], y[idx], cfg, device=torch.device("cpu"), seed=seed, progress=False)
        return auroc(net, x_test, y_test, k)

    table: dict[str, list[float]] = {
        f"typiclust {first}": [],
        f"random {first}": [],
        f"random {2 * first}": [],
    }
    t1 = time.perf_counter()
    feats: dict[Path, np.ndarray] = {}
    for seed in seeds:
        path = backbone.get(seed) or next(iter(backbone.values()))
        if path not in feats:
            feats[path] = backbone_features(
                api.start_model(cfg, None, backbone=path), x, torch.device("cpu")
            ).numpy()
        rng = np.random.default_rng(seed * 1000 + 1)  # as medal query seeds round 1
        table[f"typiclust {first}"].append(
            probe(path, acquisition.typiclust(feats[path], first, rng=rng), seed)
        )
        draw = np.random.default_rng(seed)
        table[f"random {first}"].append(
            probe(path, draw.choice(len(y), first, replace=False), seed)
        )
        table[f"random {2 * first}"].append(
            probe(path, draw.choice(len(y), 2 * first, replace=False), seed)
        )
    ceiling = [ceiling_auroc(cfg, p, x, y, x_test, y_test) for p in backbone.values()]
    return Measured(
        dataset, seeds, table, ceiling, len(y), len(y_test), t_pre, time.perf_counter() - t1
    )


def report(r: Measured) -> str:
    """:func:`measure`'s table: test AUROC per start and seed with the mean, the paired
    difference TypiClust ``first`` minus random ``2 * first``, the ceiling, the seconds."""
    first = next(iter(r.table)).split()[-1]
    lines = [
        f"{r.dataset}: {r.n_train} train images (labels hidden), {r.n_test} test images; "
        f"test AUROC of the frozen-backbone linear head",
        f"{'start':<14}" + "".join(f"{'seed ' + str(s):>9}" for s in r.seeds) + f"{'mean':>9}",
    ]
    for name, vals in r.table.items():
        lines.append(f"{name:<14}" + "".join(f"{v:9.3f}" for v in vals) + f"{np.mean(vals):9.3f}")
    m, lo, hi = r.diff(f"typiclust {first}", f"random {2 * int(first)}")
    lines.append(
        f"typiclust {first} minus random {2 * int(first)}: {m:+.3f} [{lo:+.3f}, "
        f"{hi:+.3f}] (95% t interval over {len(r.seeds)} seeds)"
    )
    each = (
        f" (per seed's backbone: {', '.join(f'{c:.3f}' for c in r.ceiling)})"
        if len(r.ceiling) > 1
        else ""
    )
    lines.append(
        f"full-label ceiling of medal's training (all {r.n_train} train labels; the head's "
        f"choice and the whole-network companion as configured): {np.mean(r.ceiling):.3f}{each}"
    )
    lines.append(
        f"wall time: pretraining or cache load {r.seconds_pretrain:.0f} s, "
        f"evaluation {r.seconds_eval:.0f} s"
    )
    return "\n".join(lines)


def _row(name: str, vals: list[float], fmt: str = "9.3f") -> str:
    """One line of :func:`label_efficiency_table`: the name, a value per seed, their mean."""
    return f"{name:<34}" + "".join(f"{v:{fmt}}" for v in vals) + f"{np.mean(vals):{fmt}}"


def _against_baseline(
    cs: Curves,
    seeds: list[int],
    lo: float,
    hi: float,
    baseline: str,
) -> list[str]:
    """The lines comparing each strategy of ``cs`` with the ``baseline`` simulation's strategy
    on their common seeds: labels to reach its final AUROC, the area difference."""
    lines: list[str] = []
    base = read_curves(baseline, "auroc")
    common = [k for k in seeds if k in base]
    if not common:
        return lines
    target = float(np.mean([base[k][1][-1] for k in common]))
    at = int(np.median([base[k][0][-1] for k in common]))
    lines.append(_row(f"baseline: AUROC at {at} labels", [base[k][1][-1] for k in common]))
    for s, c in cs.items():
        reach = []
        for k in common:
            hit = c[k][0][c[k][1] >= target]
            reach.append(float(hit[0]) if len(hit) else float("nan"))
        lines.append(_row(f"{s}: labels to reach {target:.3f}", reach, "9.0f"))
        blo, bhi = max(lo, min(base[k][0][0] for k in common)), hi
        d = np.array([curve_area(*c[k], blo, bhi) - curve_area(*base[k], blo, bhi) for k in common])
        m, a, b = t_interval_or_nan(d)
        lines.append(_row(f"{s} - baseline: area", list(d), "+9.4f"))
        lines.append(
            f"{'':<34}mean {m:+.4f}, 95% interval [{a:+.4f}, {b:+.4f}]; "
            f"positive in {int((d > 0).sum())} of {len(d)}"
        )
    return lines


def label_efficiency_table(results_csv: Path, strategies: list[str], baseline: str | None) -> str:
    """One table of the simulation in ``results_csv``: per seed, each strategy's final test
    AUROC and area under the learning curve; paired differences to random (and, when
    ``baseline`` names another simulation, ``RESULTS.csv[+MORE.csv]:STRATEGY``, the labels each
    strategy needs to reach that one's final AUROC and the area difference) with 95% t
    intervals."""
    cs = {s: read_curves(f"{results_csv}:{s}", "auroc") for s in strategies}
    seeds = sorted(set.intersection(*(set(c) for c in cs.values())))
    lo = max(c[s][0][0] for c in cs.values() for s in seeds)
    hi = min(c[s][0][-1] for c in cs.values() for s in seeds)
    lines = [f"{'':<34}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds) + f"{'mean':>9}"]
    for s, c in cs.items():
        lines.append(
            _row(f"{s}: AUROC at {int(c[seeds[0]][0][-1])} labels", [c[k][1][-1] for k in seeds])
        )
        area = [curve_area(*c[k], lo, hi) for k in seeds]
        lines.append(_row(f"{s}: area {lo:.0f}-{hi:.0f} labels", area, "9.4f"))
    if "random" in cs:
        for s in cs:
            if s == "random":
                continue
            d = np.array(
                [
                    curve_area(*cs[s][k], lo, hi) - curve_area(*cs["random"][k], lo, hi)
                    for k in seeds
                ]
            )
            m, a, b = t_interval_or_nan(d)
            lines.append(_row(f"{s} - random: area", list(d), "+9.4f"))
            lines.append(f"{'':<34}mean {m:+.4f}, 95% interval [{a:+.4f}, {b:+.4f}]")
    if baseline:
        lines += _against_baseline(cs, seeds, lo, hi, baseline)
    return "\n".join(lines)
