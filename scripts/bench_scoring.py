#!/usr/bin/env python3
"""Scoring throughput: MC dropout paths against one deterministic pass, in one run.

Same model (resnet18, 1-channel 64x64 input, dropout head, 2 classes), same random pool, T
samples per image. Prints images/s and the ratio to the single deterministic pass for:
one deterministic pass, a naive loop of T stochastic passes (of the head-dropout model, and of
the full-dropout model), medal head-only (with the backbone's pooled output as features, and
with multiscale features, medal's default: that model's head sees 960 values instead of 512),
medal full-network (Dropout2d after each ResNet stage; the stem and layer1 run once, the rest
with T replicas per forward call as medal's auto setting picks them), and baal's
ModelWrapper.predict_on_dataset (replicate_in_memory, its default) on the head-dropout and on
the full-dropout model when baal is installed (`pip install baal`; not a medal dependency).
Then the ratios the targets are about: head-only against the single pass, full-network
against baal on the same full-dropout model.

    python scripts/bench_scoring.py [--n 512] [--t 20] [--batch-size 64] [--device cpu] [--repeat 1]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from medal.models import MCModel, add_backbone_dropout, create_model, set_mc_mode
from medal.uncertainty import mc_predict


class TensorPool(torch.utils.data.Dataset):
    """In-memory images shaped like medal's ImageDataset items: ``(x, index, reason)``."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.paths = x, [Path(f"img{i}") for i in range(len(x))]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i, ""


class PairPool(TensorPool):
    """The same images as ``(x, target)`` pairs, the form baal expects."""

    def __getitem__(self, i: int):
        return self.x[i], 0


REPEAT = 1


def timed(fn) -> float:
    """Seconds of ``fn()`` after a warm-up call: the least of ``REPEAT`` runs (``--repeat``;
    on a shared machine the least is the run that other work slowed the least)."""
    fn()  # warm-up (allocator, kernels)
    best = float("inf")
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def single_pass(model, x, bs, device):
    model.eval()
    for i in range(0, len(x), bs):
        model(x[i : i + bs].to(device)).softmax(-1).cpu()


@torch.no_grad()
def naive_loop(model, x, bs, T, device):
    set_mc_mode(model)
    for i in range(0, len(x), bs):
        xb = x[i : i + bs].to(device)
        torch.stack([model(xb).softmax(-1) for _ in range(T)], 1).cpu()


def medal_rows(a, device, x) -> tuple[list[tuple[str, float]], MCModel, MCModel]:
    """Seconds of each path on the pool ``x [N, 1, S, S]``: the single pass, the naive loops,
    medal's head-only (last and multiscale features) and full-network sampling."""
    model = create_model("resnet18", 2, in_channels=1).to(device)
    full = copy.deepcopy(model)
    add_backbone_dropout(full.backbone, 0.1)
    multiscale = create_model("resnet18", 2, in_channels=1, features="multiscale").to(device)
    multiscale.backbone.load_state_dict(model.backbone.state_dict())
    pool = TensorPool(x)

    def scored(m, **kw):
        return lambda: mc_predict(
            m, pool, a.t, device=device, batch_size=a.batch_size, progress=False, **kw
        )

    full_items = 4096 if device.type == "cuda" else a.batch_size  # medal's auto setting
    return (
        [
            (
                "single deterministic pass",
                timed(lambda: single_pass(model, x, a.batch_size, device)),
            ),
            (
                f"naive loop, T={a.t} passes",
                timed(lambda: naive_loop(model, x, a.batch_size, a.t, device)),
            ),
            (
                "naive loop, full-dropout model",
                timed(lambda: naive_loop(full, x, a.batch_size, a.t, device)),
            ),
            ("medal head-only", timed(scored(model))),
            ("medal head-only, multiscale", timed(scored(multiscale))),
            ("medal full-network", timed(scored(full, mode="full", max_batch_items=full_items))),
        ],
        model,
        full,
    )


def baal_rows(a, device, x, models) -> list[tuple[str, float]]:
    """Seconds of baal's ModelWrapper.predict_on_dataset (replicate_in_memory, its default) on
    each of ``models`` ({row name: model}); none without baal."""
    try:
        from baal.bayesian.dropout import patch_module
        from baal.modelwrapper import ModelWrapper, TrainingArgs
    except ImportError:
        print("(baal not installed: its rows are left out; `pip install baal` to compare)")
        return []
    pairs, rows = PairPool(x), []
    for name, m in models.items():
        wrapper = ModelWrapper(
            patch_module(copy.deepcopy(m)),
            TrainingArgs(
                batch_size=a.batch_size,
                workers=0,
                use_cuda=device.type == "cuda",
                replicate_in_memory=True,
                criterion=torch.nn.CrossEntropyLoss(),
            ),
        )
        rows.append(
            (name, timed(lambda w=wrapper: w.predict_on_dataset(pairs, a.t, verbose=False)))
        )
    return rows


def report(a, device, rows: list[tuple[str, float]]) -> None:
    """The table (images/s, ratio to the single pass) and the ratios the targets are about."""
    base = a.n / rows[0][1]
    print(
        f"\nresnet18, 1x{a.size}x{a.size}, dropout head, pool {a.n}, T={a.t}, "
        f"batch {a.batch_size}, {device.type}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, least of {REPEAT} runs"
    )
    print(f"{'path':<30} {'images/s':>10} {'vs single pass':>15}")
    for name, sec in rows:
        print(f"{name:<30} {a.n / sec:>10.1f} {a.n / sec / base:>14.2f}x")
    times = dict(rows)
    head = times["single deterministic pass"] / times["medal head-only"]
    print(f"\nmedal head-only vs single pass: {head:.2f}x")
    for name in ("baal predict_on_dataset", "baal, full-dropout model"):
        if name in times:
            print(f"medal full-network vs {name}: {times[name] / times['medal full-network']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=512, help="pool size (default 512)")
    p.add_argument("--t", type=int, default=20, help="MC samples T (default 20)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per path, least kept")
    a = p.parse_args(argv)
    global REPEAT
    REPEAT = max(1, a.repeat)
    device = torch.device(a.device)
    torch.manual_seed(0)
    x = torch.randn(a.n, 1, a.size, a.size)
    rows, model, full = medal_rows(a, device, x)
    baal = {"baal predict_on_dataset": model, "baal, full-dropout model": full}
    report(a, device, rows + baal_rows(a, device, x, baal))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
