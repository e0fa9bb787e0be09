"""The posterior the acquisition scores sample from (``query.posterior``).

``"mc_dropout"`` (the default): T = ``query.mc_samples`` dropout samples of the head
(:func:`medal.uncertainty.head_samples`). ``"ensemble"``: the K = ``query.ensemble_size``
extra heads of :attr:`medal.models.MCModel.members`, each fitted after the probe to a
class-stratified bootstrap resample of the labelled images' frozen-backbone features
(:func:`bootstrap_rows`, :func:`medal.train.fit_members`), stand in for the T samples: their
softmax outputs with dropout off, ``[B, K, C]``, in the layout of the dropout samples, so BALD,
entropy and the other scores take them unchanged. The model's own head, trained on every
label, still makes the predictions and the metrics.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import QueryConfig
from .errors import ModelError
from .models import MCModel
from .uncertainty import head_samples


def ensemble_members(q: QueryConfig) -> int:
    """The extra heads a model is built with: ``query.ensemble_size`` under the ensemble
    posterior, else 0."""
    return q.ensemble_size if q.posterior == "ensemble" else 0


def samples_per_image(q: QueryConfig) -> int:
    """T of the scores ``[N, T, C]``: the ensemble's size, or the MC dropout samples."""
    return q.ensemble_size if q.posterior == "ensemble" else q.mc_samples


def samples_scored(q: QueryConfig, model: MCModel) -> int:
    """T of the pool's stored scores ``[N, T, C]``: :func:`samples_per_image`, twice that
    when the model has a whole-network companion scored as a mixture
    (``query.companion_samples = "mixture"``)."""
    mixture = model.companion is not None and q.companion_samples == "mixture"
    return samples_per_image(q) * (2 if mixture else 1)


def bootstrap_rows(y: np.ndarray, seed: int) -> np.ndarray:
    """A class-stratified bootstrap resample of labels ``y [N]`` (class indices): rows
    ``[N]`` into ``y``, for each class as many rows of that class as it has, drawn with
    replacement (``numpy.random.default_rng(seed)``), in class order. Stratified, so that every
    member sees every labelled class (a plain resample of 20 labels misses a class of 2 one
    time in eight, and that member would then never predict it)."""
    y = np.asarray(y, np.int64)
    rng = np.random.default_rng(seed)
    parts = [rng.choice(np.flatnonzero(y == c), (y == c).sum()) for c in np.unique(y)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@torch.no_grad()
def member_samples(model: MCModel, feats: torch.Tensor) -> torch.Tensor:
    """``feats [B, D]`` -> probabilities ``[B, K, C]``: the softmax of each of the model's K
    ensemble heads, dropout off (every layer's mode is given back afterwards)."""
    if len(model.members) == 0:
        raise ModelError(
            'query.posterior = "ensemble" but the model has no ensemble heads; run medal train '
            "with this config first"
        )
    modes = [(m, m.training) for m in model.members.modules()]
    model.members.eval()
    try:
        out = [member(feats).float().softmax(-1) for member in model.members]
    finally:
        for m, was in modes:
            m.training = was
    return torch.stack(out, 1)


def posterior_samples(model: MCModel, feats: torch.Tensor, q: QueryConfig) -> torch.Tensor:
    """``feats [B, D]`` -> the samples the query scores, ``[B, T, C]``: the ensemble's
    :func:`member_samples` (T = K) or :func:`~medal.uncertainty.head_samples` (T =
    ``query.mc_samples`` dropout samples of the head, or of ``model.scorer`` when
    ``train.head_choice`` left one, drawn from the global RNG)."""
    if q.posterior == "ensemble":
        return member_samples(model, feats)
    return head_samples(model, feats, q.mc_samples, model.scorer)
