"""Backbone features under a frozen backbone, computed once per image.

With ``train.freeze_backbone`` the backbone never changes between rounds, so an image's
features ``[D]`` do not either: scoring a round then needs only the head's dropout samples,
and the pool is decoded and passed through the backbone once per project (and once per
simulation, whose runs share one cache folder) instead of once per round.
The cache is one file per backbone (its weights and the image settings are the key), so a
backbone fine-tuned by ``train.finetune`` (LP-FT) gets a file of its own, computed once for that
round's weights, and never the self-supervised backbone's features.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import make_loader
from .models import MCModel

FEATURE_BATCH = 512
"""Images per forward pass when a set's backbone features are computed (the batch of
:func:`medal.train.backbone_features`, so streamed features equal those of the whole set)."""


def backbone_key(backbone: nn.Module, preprocess: Sequence[object]) -> str:
    """Key of a backbone's features: a hash of its weights and buffers (``[*]`` tensors, in
    state-dict order) and of the image settings that make its inputs."""
    h = hashlib.sha256()
    for name, t in backbone.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(list(preprocess), default=str).encode())
    return h.hexdigest()[:24]


class FeatureCache:
    """``{image id: features [D]}`` for one backbone, in one ``.pt`` file written atomically.

    A file that cannot be read is treated as empty (and replaced on the next save)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._row: dict[str, int] = {}
        self._feats = torch.zeros(0, 0)
        if path.is_file():
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
                ids, feats = list(data["ids"]), data["features"].float()
                if len(ids) == len(feats):
                    self._row = {str(i): r for r, i in enumerate(ids)}
                    self._feats = feats
            except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt
                self._row, self._feats = {}, torch.zeros(0, 0)

    def __len__(self) -> int:
        return len(self._row)

    def lookup(self, ids: Sequence[str], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """``(features [N, dim] float32, found [N] bool)``; rows not found are zero."""
        out = np.zeros((len(ids), dim), np.float32)
        found = np.zeros(len(ids), bool)
        if len(self._row) and self._feats.shape[1] == dim:
            rows = [self._row.get(i, -1) for i in ids]
            have = np.array([r >= 0 for r in rows], bool)
            if have.any():
                idx = torch.as_tensor([r for r in rows if r >= 0])
                out[have] = self._feats[idx].numpy()
                found = have
        return out, found

    def add(self, ids: Sequence[str], feats: np.ndarray) -> None:
        """Add features ``[M, D]`` of ``ids`` and write the file (atomically)."""
        new = [(i, r) for r, i in enumerate(ids) if i not in self._row]
        if not new:
            return
        f = torch.as_tensor(np.asarray(feats, np.float32)[[r for _, r in new]])
        base = len(self._row)
        self._feats = f if base == 0 else torch.cat([self._feats, f])
        for k, (i, _) in enumerate(new):
            self._row[i] = base + k
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{time.time_ns()}.tmp")
        try:
            torch.save({"ids": list(self._row), "features": self._feats}, tmp)
            tmp.replace(self.path)
        finally:
            tmp.unlink(missing_ok=True)


@torch.no_grad()
def stream_features(
    model: MCModel,
    ds: torch.utils.data.Dataset,
    device: torch.device,
    *,
    batch_size: int = FEATURE_BATCH,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Deterministic backbone features (``model.features``) of every readable image of
    ``ds`` (items ``(x [C, S, S], i, reason)``), a batch at a time through a ``DataLoader``
    (pinned memory on CUDA): memory holds one batch of images, never the whole set.

    Returns ``(features [M, D] float32, kept [M] indices into ds, {index: reason})`` for the
    ``M`` readable images, in order.
    """
    model.eval()
    loader = make_loader(ds, batch_size, num_workers, pin_memory=device.type == "cuda")
    feats: list[np.ndarray] = []
    kept: list[int] = []
    reasons: dict[int, str] = {}
    for x, idx, why in loader:
        ok = torch.tensor([r == "" for r in why], dtype=torch.bool)
        reasons |= {j: r for j, r in zip(idx.tolist(), why) if r}
        if ok.any():
            good = x if ok.all() else x[ok]
            feats.append(model.features(good.to(device, non_blocking=True)).float().cpu().numpy())
            kept += idx[ok].tolist()
    out = np.concatenate(feats) if feats else np.zeros((0, model.feature_dim), np.float32)
    return out, np.asarray(kept, dtype=np.int64), reasons
