"""Monte Carlo dropout sampling: images -> per-sample class probabilities ``[N, T, C]``.

Head-only sampling runs the deterministic backbone once per image and samples only the dropout
head, with the features expanded to ``[T * B, D]`` so the T samples are one vectorised call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import ImageDataset, make_loader
from .models import MCModel, set_mc_mode


@dataclass
class MCResult:
    probs: np.ndarray
    """``[M, T, C]`` float32 softmax probabilities of the M readable images."""
    features: np.ndarray
    """``[M, D]`` float32 backbone features (for diversity-based acquisition)."""
    kept: np.ndarray
    """``[M]`` int64: positions of the readable images in the input list."""
    skipped: dict[Path, str] = field(default_factory=dict)
    """Unreadable files and why."""


def head_samples(model: MCModel, feats: torch.Tensor, T: int) -> torch.Tensor:
    """``feats [B, D]`` -> probabilities ``[B, T, C]`` from T dropout samples of the head."""
    B = feats.shape[0]
    expanded = feats.unsqueeze(0).expand(T, B, feats.shape[1]).reshape(T * B, -1)
    logits = model.head(expanded).float().view(T, B, -1)
    return logits.softmax(-1).transpose(0, 1)


@torch.no_grad()
def mc_predict_tensors(model: MCModel, x: torch.Tensor, T: int, *, device: torch.device,
                       batch_size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """In-memory images ``x [N, C, S, S]`` -> (probs ``[N, T, C]``, features ``[N, D]``)."""
    set_mc_mode(model)
    probs, feats = [], []
    with _seeded(seed, device):
        for i in range(0, len(x), batch_size):
            f = model.features(x[i:i + batch_size].to(device))
            probs.append(head_samples(model, f, T).cpu())
            feats.append(f.float().cpu())
    if not probs:
        return np.zeros((0, T, 0), np.float32), np.zeros((0, model.feature_dim), np.float32)
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


@torch.no_grad()
def mc_predict(model: MCModel, ds: ImageDataset, T: int, *, device: torch.device,
               batch_size: int = 256, num_workers: int = 0, seed: int = 0,
               desc: str = "scoring", progress: bool = True) -> MCResult:
    """Stream a dataset through the model: T head samples per readable image."""
    set_mc_mode(model)
    cuda = device.type == "cuda"
    probs, feats, kept, skipped = [], [], [], {}
    loader = make_loader(ds, batch_size, num_workers, pin_memory=cuda)
    with _seeded(seed, device):
        for x, idx, reasons in tqdm(loader, desc=desc, unit="batch", leave=False,
                                    disable=not progress or len(loader) < 2):
            ok = torch.tensor([r == "" for r in reasons], dtype=torch.bool)
            for j, r in zip(idx.tolist(), reasons):
                if r:
                    skipped[ds.paths[j]] = r
            if not ok.any():
                continue
            x = x[ok].to(device, non_blocking=cuda)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                f = model.features(x)
                p = head_samples(model, f, T)
            probs.append(p.float().cpu())
            feats.append(f.float().cpu())
            kept.append(idx[ok])
    if not probs:
        n_cls = model.head[-1].out_features
        return MCResult(np.zeros((0, T, n_cls), np.float32),
                        np.zeros((0, model.feature_dim), np.float32),
                        np.zeros(0, np.int64), skipped)
    return MCResult(torch.cat(probs).numpy(), torch.cat(feats).numpy(),
                    torch.cat(kept).numpy().astype(np.int64), skipped)


class _seeded:
    """Seed the global torch RNG for the block and restore it afterwards."""

    def __init__(self, seed: int, device: torch.device) -> None:
        devices = [device] if device.type == "cuda" else []
        self._fork = torch.random.fork_rng(devices=devices)
        self.seed = seed

    def __enter__(self) -> None:
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)
