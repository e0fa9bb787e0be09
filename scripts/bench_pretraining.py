#!/usr/bin/env python3
"""Self-supervised pretraining throughput: one SimCLR step against one supervised step.

Same model and batch, measured in the same run: images/s of medal's SimCLR step (two random
views of each image made batched on the device, both through the backbone and the projection
head, NT-Xent, Adam) and of a plain supervised step (the image once through the same
backbone and a linear head, cross entropy, Adam). A SimCLR step runs the network on twice
the images, so about 2x the supervised step's time is to be expected; more is the cost of
making the views. On CUDA both run with channels_last and bf16 autocast (as pretraining does).

    python scripts/bench_pretraining.py [--model small_cnn] [--size 28] [--batch 256]
        [--channels 1] [--steps 10] [--repeats 3] [--device cpu]

A GPU run: ``--model resnet18 --size 224 --batch 256 --device cuda``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medal.models import available_models, create_model, resolve_device
from medal.representation import SSLSettings, PretrainingRun, plan_steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small_cnn", choices=available_models())
    p.add_argument("--size", type=int, default=28, help="image size in pixels (default 28)")
    p.add_argument("--batch", type=int, default=256, help="images per step (default 256)")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3))
    p.add_argument("--steps", type=int, default=10, help="timed steps of each (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timings of each, alternating; the fastest counts (default 3; robust to a busy "
        "machine)",
    )
    p.add_argument("--device", default="auto", help='"cpu", "cuda", "auto" (default)')
    return p.parse_args(argv)


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``step`` (after ``warmup`` calls; CUDA synchronised)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def simclr_step(args: argparse.Namespace, x: torch.Tensor, device: torch.device) -> Callable:
    """medal's pretraining step (:class:`medal.representation.PretrainingRun`) on ``x``."""
    model = create_model(args.model, 2, in_channels=args.channels)
    settings = SSLSettings(batch_size=args.batch, max_steps=10**9)
    run = PretrainingRun(model.backbone, model.backbone_dim, settings, device)
    run.start(plan_steps(args.batch, settings), progress=False, log=None)
    gen = torch.Generator().manual_seed(0)
    return lambda: run.train_step(x, gen)


def supervised_step(args: argparse.Namespace, x: torch.Tensor, device: torch.device) -> Callable:
    """A plain supervised step of the same backbone with a linear head on the batch ``x``."""
    model = create_model(args.model, 2, in_channels=args.channels)
    net = nn.Sequential(model.backbone, nn.Linear(model.backbone_dim, 2)).to(device).train()
    cuda = device.type == "cuda"
    if cuda:
        net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    y = torch.randint(0, 2, (len(x),), generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # as the training loops do: one sync per step

    return step


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    shape = (args.batch, args.channels, args.size, args.size)
    x = (torch.rand(shape) - 0.5).div(0.25).to(device)  # normalised as medal's inputs
    print(
        f"{args.model}, {args.channels}x{args.size}x{args.size}, batch {args.batch}, "
        f"best of {args.repeats} x {args.steps} steps after {args.warmup}, device {device}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    steps = {"supervised": supervised_step(args, x, device), "simclr": simclr_step(args, x, device)}
    best = dict.fromkeys(steps, float("inf"))
    for r in range(args.repeats):
        for name, step in steps.items():
            warmup = args.warmup if r == 0 else 0
            best[name] = min(best[name], time_steps(step, args.steps, warmup, device))
    results = {}
    for name, seconds in best.items():
        results[name] = args.batch / seconds
        print(f"{name:>10}: {results[name]:10.1f} images/s ({seconds * 1000:.1f} ms per step)")
    ratio = results["supervised"] / results["simclr"]
    print(f"SimCLR step / supervised step: {ratio:.2f}x the time per image (2x: the two views)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
