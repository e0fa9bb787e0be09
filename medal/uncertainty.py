"""Monte Carlo dropout sampling: images -> per-sample class probabilities ``[N, T, C]``.

Head-only sampling (the default) runs the deterministic backbone once per image and samples
only the dropout head, with the features expanded to ``[T * B, D]`` so the T samples are one
vectorised call. Full-network sampling (dropout inside the backbone) replicates each batch
into as few forward calls as ``max_batch_items`` allows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
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
    top_index: np.ndarray | None = None
    """With ``top_k``: rows (into ``probs``) of the k best images, best first."""
    top_scores: np.ndarray | None = None


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


def full_samples(model: MCModel, x: torch.Tensor, T: int, max_items: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """T stochastic passes of the whole network over ``x [B, C, S, S]``, replicated into as few
    forward calls as ``max_items`` (images per call) allows.

    Returns (probabilities ``[B, T, C]``, features averaged over the samples ``[B, D]``).
    """
    B = x.shape[0]
    per_call = max(1, min(T, max_items // max(B, 1)))
    prefix, rest = model.backbone_split()
    h = prefix(x)  # deterministic stem, once
    probs, feats = [], []
    for t0 in range(0, T, per_call):
        k = min(per_call, T - t0)
        f = rest(h.repeat(k, *([1] * (h.ndim - 1))))  # [k*B, D], k independent dropout masks
        probs.append(model.head(f).float().softmax(-1).view(k, B, -1))
        feats.append(f.float().view(k, B, -1).mean(0))
    return torch.cat(probs).transpose(0, 1), torch.stack(feats).mean(0)


class TopK:
    """The k highest scores seen so far, merged batch by batch (bounded memory).

    Ties are broken by the lower position, as a stable sort of all scores would.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.scores = np.zeros(0, np.float64)
        self.index = np.zeros(0, np.int64)

    def update(self, scores: np.ndarray, index: np.ndarray) -> None:
        s = np.concatenate([self.scores, scores.astype(np.float64)])
        i = np.concatenate([self.index, index.astype(np.int64)])
        order = np.lexsort((i, -s))[:self.k]
        self.scores, self.index = s[order], i[order]


def _amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


@torch.no_grad()
def mc_predict(model: MCModel, ds: ImageDataset, T: int, *, device: torch.device,
               batch_size: int = 256, num_workers: int = 0, seed: int = 0,
               desc: str = "scoring", progress: bool = True, mode: str = "head",
               precision: str = "bf16", max_batch_items: int = 4096,
               out_dir: Path | None = None,
               top_k: tuple[Callable[[np.ndarray], np.ndarray], int] | None = None
               ) -> MCResult:
    """Stream a dataset through the model: T MC-dropout samples per readable image.

    ``mode``: ``"head"`` (backbone once, head sampled T times, vectorised) or ``"full"``
    (T stochastic passes of the whole network, batched). With ``out_dir``, probabilities
    ``[M, T, C]`` and features ``[M, D]`` are written to float16 ``.npy`` files there and
    returned as memory maps, so memory stays bounded whatever the pool size. With
    ``top_k=(score_fn, k)``, the k best images by ``score_fn`` are also kept incrementally.
    On CUDA out-of-memory the batch is halved (with a warning) and the step retried.
    """
    if mode == "full" and not model.backbone_is_stochastic():
        raise ValueError("full-network sampling needs dropout inside the backbone "
                         "(model.backbone_dropout > 0)")
    set_mc_mode(model)
    cuda = device.type == "cuda"
    amp = _amp_dtype(device, precision)
    if cuda:
        model.to(memory_format=torch.channels_last)
    n, C, D = len(ds), model.num_classes, model.feature_dim
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        probs_all = np.lib.format.open_memmap(out_dir / "probs.tmp.npy", "w+", np.float16,
                                              (n, T, C))
        feats_all = np.lib.format.open_memmap(out_dir / "features.tmp.npy", "w+", np.float16,
                                              (n, D))
    else:
        probs_all = np.zeros((n, T, C), np.float32)
        feats_all = np.zeros((n, D), np.float32)
    ok_rows = np.zeros(n, dtype=bool)
    skipped: dict[Path, str] = {}
    best = TopK(top_k[1]) if top_k else None
    loader = make_loader(ds, batch_size, num_workers, pin_memory=cuda)
    step = batch_size

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if mode == "full":
                return full_samples(model, x, T, max_batch_items)
            f = model.features(x)
            return head_samples(model, f, T), f.float()

    with _seeded(seed, device):
        for x, idx, reasons in tqdm(loader, desc=desc, unit="batch", leave=False,
                                    disable=not progress or len(loader) < 2):
            ok = torch.tensor([r == "" for r in reasons], dtype=torch.bool)
            for j, r in zip(idx.tolist(), reasons):
                if r:
                    skipped[ds.paths[j]] = r
            if not ok.any():
                continue
            x, idx = x[ok], idx[ok]
            if cuda:
                x = x.pin_memory().to(device, non_blocking=True,
                                      memory_format=torch.channels_last)
            i = 0
            while i < len(x):
                try:
                    p, f = run(x[i:i + step])
                except RuntimeError as e:
                    if not _is_oom(e) or step == 1:
                        raise
                    step = max(1, step // 2)
                    if cuda:
                        torch.cuda.empty_cache()
                    warnings.warn(f"out of memory while scoring; batch size halved to {step}",
                                  RuntimeWarning, stacklevel=2)
                    continue
                rows = idx[i:i + step].numpy()
                p_np = p.float().cpu().numpy()
                probs_all[rows] = p_np
                feats_all[rows] = f.float().cpu().numpy()
                ok_rows[rows] = True
                if best is not None:
                    best.update(top_k[0](p_np), rows)
                i += step
    kept = np.flatnonzero(ok_rows)
    if out_dir is not None:
        probs_all.flush()
        feats_all.flush()
        del probs_all, feats_all
        for name in ("probs", "features"):
            (out_dir / f"{name}.tmp.npy").replace(out_dir / f"{name}.npy")
        np.save(out_dir / "kept.npy", kept)
        probs_all = np.load(out_dir / "probs.npy", mmap_mode="r")
        feats_all = np.load(out_dir / "features.npy", mmap_mode="r")
    if len(kept) < n:
        probs_all, feats_all = probs_all[kept], feats_all[kept]
    result = MCResult(probs_all, feats_all, kept, skipped)
    if best is not None:
        # positions in the dataset -> positions among the kept rows
        result.top_index = np.searchsorted(kept, best.index)
        result.top_scores = best.scores
    return result


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
