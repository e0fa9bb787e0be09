"""Acquisition functions: pure functions over MC-dropout probabilities.

``probs`` is always ``[N, T, C]``: N images, T stochastic forward passes, C classes (rows sum to
1). Scores are ``[N]`` float64, higher = more worth a radiologist's time. Ranking is separate
from scoring (:func:`select`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

EPS = 1e-12


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    return -(p * np.log(p + EPS)).sum(axis)


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """``[N, T, C] -> [N]``: entropy of the MC-averaged prediction, H[E_t p]."""
    return _entropy(probs.mean(1))


def bald(probs: np.ndarray) -> np.ndarray:
    """``[N, T, C] -> [N]``: mutual information H[E_t p] - E_t H[p_t] (Houlsby et al. 2011)."""
    return np.maximum(predictive_entropy(probs) - _entropy(probs).mean(1), 0.0)


def variation_ratios(probs: np.ndarray) -> np.ndarray:
    """``[N, T, C] -> [N]``: 1 - (votes for the modal class) / T."""
    votes = probs.argmax(-1)  # [N, T]
    C = probs.shape[-1]
    counts = np.stack([(votes == c).sum(1) for c in range(C)], 1) if probs.size else \
        np.zeros((len(probs), C))
    return 1.0 - counts.max(1) / max(probs.shape[1], 1)


def mean_std(probs: np.ndarray) -> np.ndarray:
    """``[N, T, C] -> [N]``: standard deviation over T, averaged over classes."""
    return probs.std(1).mean(-1).astype(np.float64)


def margin(probs: np.ndarray) -> np.ndarray:
    """``[N, T, C] -> [N]``: minus the gap between the two most probable mean classes."""
    top = np.sort(probs.mean(1), -1)
    return -(top[:, -1] - top[:, -2]).astype(np.float64)


def least_confidence(probs: np.ndarray) -> np.ndarray:
    """``[N, T, C] -> [N]``: 1 - the highest mean class probability."""
    return 1.0 - probs.mean(1).max(-1).astype(np.float64)


SCORE_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "bald": bald, "entropy": predictive_entropy, "variation_ratios": variation_ratios,
    "mean_std": mean_std, "margin": margin, "least_confidence": least_confidence,
}

STRATEGIES: tuple[str, ...] = (*SCORE_FUNCTIONS, "random", "batchbald", "powerbald",
                               "powerentropy", "coreset", "badge")


def validate_strategy(name: str) -> None:
    if name not in STRATEGIES:
        raise ValueError(f"unknown acquisition strategy {name!r}; valid: {', '.join(STRATEGIES)}")


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, ties broken by lower index."""
    return np.argsort(-scores, kind="stable")[:k]


def power_sampling(scores: np.ndarray, budget: int, *, rng: np.random.Generator,
                   beta: float = 1.0) -> np.ndarray:
    """Sample ``budget`` indices without replacement with probability ∝ score**beta
    (stochastic power acquisition, Kirsch et al. 2021), via the Gumbel-top-k trick."""
    logits = beta * np.log(np.maximum(scores, EPS))
    return top_k(logits + rng.gumbel(size=len(scores)), budget)


def class_balanced(scores: np.ndarray, predicted: np.ndarray, budget: int,
                   n_classes: int) -> np.ndarray:
    """Round-robin over predicted classes, each taking its best remaining image."""
    queues = [list(top_k(np.where(predicted == c, scores, -np.inf), int((predicted == c).sum())))
              for c in range(n_classes)]
    out: list[int] = []
    while len(out) < budget and any(queues):
        for q in queues:
            if q and len(out) < budget:
                out.append(int(q.pop(0)))
    return np.asarray(out, dtype=np.int64)


def k_center_greedy(features: np.ndarray, budget: int, *, rng: np.random.Generator,
                    labelled_features: np.ndarray | None = None) -> np.ndarray:
    """Greedy k-center (core-set) on ``features [N, D]``; starts from ``labelled_features``."""
    N = len(features)
    f = features.astype(np.float64)
    if labelled_features is not None and len(labelled_features):
        dist = np.full(N, np.inf)
        for i in range(0, len(labelled_features), 1024):
            d = _sqdist(f, labelled_features[i:i + 1024].astype(np.float64)).min(1)
            dist = np.minimum(dist, d)
        picks: list[int] = []
    else:
        first = int(rng.integers(N))
        picks = [first]
        dist = _sqdist(f, f[first:first + 1])[:, 0]
    while len(picks) < min(budget, N):
        j = int(np.argmax(dist))
        picks.append(j)
        dist = np.minimum(dist, _sqdist(f, f[j:j + 1])[:, 0])
    return np.asarray(picks, dtype=np.int64)


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None], 0.0)


def badge(probs: np.ndarray, features: np.ndarray, budget: int, *,
          rng: np.random.Generator) -> np.ndarray:
    """BADGE (Ash et al. 2020): k-means++ seeding on gradient embeddings
    ``(p - onehot(argmax p)) ⊗ features``, ``[N, C*D]``."""
    p = probs.mean(1)
    g = p.copy()
    g[np.arange(len(p)), p.argmax(1)] -= 1.0
    emb = (g[:, :, None] * features[:, None, :]).reshape(len(p), -1)
    first = int(np.argmax((emb * emb).sum(1)))
    picks = [first]
    dist = _sqdist(emb, emb[first:first + 1])[:, 0]
    while len(picks) < min(budget, len(p)):
        total = dist.sum()
        j = int(rng.choice(len(p), p=dist / total)) if total > 0 else int(rng.integers(len(p)))
        if j in picks:
            j = int(np.argmax(dist))
        picks.append(j)
        dist = np.minimum(dist, _sqdist(emb, emb[j:j + 1])[:, 0])
    return np.asarray(picks, dtype=np.int64)


def batchbald(probs: np.ndarray, budget: int, *, rng: np.random.Generator,
              num_samples: int = 1000, exact_limit: int = 4096, chunk: int = 256
              ) -> tuple[np.ndarray, np.ndarray]:
    """Greedy BatchBALD (Kirsch et al. 2019) over ``probs [N, T, C]``.

    Each step adds the image that maximises the mutual information between the batch's joint
    labels and the model parameters, ``H(y_1..y_k) - sum_i E_t H(y_i | w_t)``. The joint entropy
    is exact while the batch has at most ``exact_limit`` label configurations; beyond that,
    ``num_samples`` configurations are drawn from the joint predictive and the entropy is
    estimated by importance weighting. Returns (indices ``[K]`` in pick order, the gain in
    joint mutual information of each pick ``[K]``).
    """
    N, T, C = probs.shape
    K = min(budget, N)
    probs = np.asarray(probs, dtype=np.float64)
    cond = _entropy(probs).mean(1)  # [N] E_t H[y | w_t]
    picks: list[int] = []
    gains: list[float] = []
    joint = np.ones((1, T))  # [M, T]: p(configuration m of the chosen labels | w_t)
    sampled = False
    prev = 0.0
    for _ in range(K):
        q = joint.mean(1)  # [M] p(configuration m)
        scores = np.empty(N)
        for s in range(0, N, chunk):
            pj = np.einsum("mt,btc->bmc", joint, probs[s:s + chunk]) / T  # [B, M, C]
            log = np.log(pj + EPS)
            if sampled:  # configurations were drawn from q: weight each by 1/q
                h = -(pj * log / np.maximum(q, EPS)[None, :, None]).sum((1, 2)) / len(q)
            else:
                h = -(pj * log).sum((1, 2))
            scores[s:s + chunk] = h - cond[s:s + chunk]
        scores[picks] = -np.inf
        sel = int(np.argmax(scores))
        total = float(scores[sel]) - float(cond[picks].sum())
        picks.append(sel)
        gains.append(total - prev)
        prev = total
        p_sel = probs[sel].T  # [C, T]
        if sampled:
            # extend every sampled configuration by a label drawn from p(y_sel | configuration)
            w = joint @ probs[sel]  # [M, C]
            cum = np.cumsum(w / w.sum(1, keepdims=True), 1)
            c = np.minimum((cum < rng.random((len(w), 1))).sum(1), C - 1)
            joint = joint * p_sel[c]
        elif len(joint) * C > exact_limit:
            ext = (joint[:, None, :] * p_sel[None]).reshape(-1, T)
            qe = ext.mean(1)
            joint = ext[rng.choice(len(ext), size=num_samples, replace=True, p=qe / qe.sum())]
            sampled = True
        else:
            joint = (joint[:, None, :] * p_sel[None]).reshape(-1, T)
    return np.asarray(picks, dtype=np.int64), np.asarray(gains, dtype=np.float64)


def select(strategy: str, probs: np.ndarray, budget: int, *, rng: np.random.Generator,
           features: np.ndarray | None = None, labelled_features: np.ndarray | None = None,
           balance: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Choose up to ``budget`` images from ``probs [N, T, C]``.

    Returns (indices ``[K]`` int64 in rank order, per-image scores ``[K]`` float64 for reports).
    """
    validate_strategy(strategy)
    N = len(probs)
    K = min(budget, N)
    if K <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    if strategy in SCORE_FUNCTIONS:
        scores = SCORE_FUNCTIONS[strategy](probs)
        if balance:
            idx = class_balanced(scores, probs.mean(1).argmax(1), K, probs.shape[-1])
        else:
            idx = top_k(scores, K)
        return idx.astype(np.int64), scores[idx]
    b = bald(probs)
    if strategy == "random":
        idx = rng.permutation(N)[:K]
    elif strategy == "batchbald":
        idx, gains = batchbald(probs, K, rng=rng)
        return idx, gains
    elif strategy in ("powerbald", "powerentropy"):
        s = b if strategy == "powerbald" else predictive_entropy(probs)
        idx = power_sampling(s, K, rng=rng)
        return idx.astype(np.int64), s[idx]
    else:
        if features is None:
            raise ValueError(f"strategy {strategy!r} needs penultimate-layer features")
        if strategy == "coreset":
            idx = k_center_greedy(features, K, rng=rng, labelled_features=labelled_features)
        else:
            idx = badge(probs, features, K, rng=rng)
    return np.asarray(idx, dtype=np.int64), b[idx]
