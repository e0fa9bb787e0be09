"""Acquisition functions: which unlabelled images are most worth a radiologist's time.

Every scoring function is a pure function of MC-dropout probabilities ``probs`` of shape
``[N, T, C]`` (N images, T stochastic forward passes, C classes; each ``probs[n, t]`` sums to 1)
and returns float64 scores ``[N]`` where higher means more worth labelling. Logs are natural.
Batch strategies (BatchBALD, power sampling, core-set, BADGE, class balancing) choose indices.
Every strategy is registered (:func:`register_score`, :func:`register_strategy`) with what it
needs (pool features, labelled features, the joint samples of the whole pool); the registry is
the only list of names, and :func:`select` is the single entry point that maps a name to a
ranked selection.

This is a leaf module: it imports only numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

EPS = 1e-12
"""Added inside logs so that 0 * log(0) evaluates to 0."""

_CHUNK_ELEMENTS = 1 << 22
"""Upper bound on float64 elements in one temporary block (32 MiB) for chunked computations."""


# --------------------------------------------------------------------------- per-image scores


def _as_probs(probs: np.ndarray) -> np.ndarray:
    """``probs`` as a float64 ``[N, T, C]`` array (no copy when it already is one)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"probs must have shape [N, T, C], got {p.shape}")
    return p


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Entropy (nats) of the distributions along ``axis``."""
    return -(p * np.log(p + EPS)).sum(axis)


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy of the MC-averaged prediction, H[E_t p]: ``[N, T, C] -> [N]``."""
    return _entropy(_as_probs(probs).mean(1))


def bald(probs: np.ndarray) -> np.ndarray:
    """BALD mutual information H[E_t p] - E_t H[p_t] (Houlsby et al. 2011): ``[N, T, C] -> [N]``.

    Clipped at 0, since the difference can come out a hair negative in floating point.
    """
    p = _as_probs(probs)
    return np.maximum(_entropy(p.mean(1)) - _entropy(p).mean(1), 0.0)


def epig(probs: np.ndarray, target_probs: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Expected predictive information gain (Smith et al., AISTATS 2023): how much labelling an
    image is expected to tell about the predictions on target inputs, ``E_x* I(y; y* | x, x*)``.

    ``probs [N, T, C]`` for the candidates and ``target_probs [M, T, C]`` for target inputs
    drawn from the pool, with the same T parameter samples -> ``[N]``. The joint predictive
    ``p(y, y*) = E_t p_t(y|x) p_t(y*|x*)`` is compared with the product of its marginals;
    memory is ``chunk x M x C x C`` at a time.
    """
    p, q = _as_probs(probs), _as_probs(target_probs)
    t = p.shape[1]
    if q.shape[1] != t:
        raise ValueError(f"probs and target_probs need the same T, got {t} and {q.shape[1]}")
    marg_q = q.mean(1)  # [M, C]
    out = np.empty(len(p))
    for a in range(0, len(p), chunk):
        pc = p[a : a + chunk]
        joint = np.einsum("ntc,mtd->nmcd", pc, q) / t  # [n, M, C, C]
        indep = pc.mean(1)[:, None, :, None] * marg_q[None, :, None, :]
        kl = (joint * (np.log(joint + EPS) - np.log(indep + EPS))).sum((2, 3))
        out[a : a + chunk] = np.maximum(kl.mean(1), 0.0)
    return out


def variation_ratios(probs: np.ndarray) -> np.ndarray:
    """1 - (number of passes voting for the modal class) / T: ``[N, T, C] -> [N]``."""
    p = _as_probs(probs)
    n, t, c = p.shape
    votes = p.argmax(-1)  # [N, T]
    counts = (votes[:, :, None] == np.arange(c)).sum(1)  # [N, C]
    modal = counts.max(1) if c else np.zeros(n)
    return 1.0 - modal / max(t, 1)


def mean_std(probs: np.ndarray) -> np.ndarray:
    """Standard deviation over the T passes, averaged over classes: ``[N, T, C] -> [N]``."""
    return _as_probs(probs).std(1).mean(-1)


def margin(probs: np.ndarray) -> np.ndarray:
    """Minus the gap between the two largest mean class probabilities, -(p1 - p2):
    ``[N, T, C] -> [N]`` (higher = smaller margin). With C == 1, p2 is taken as 0."""
    mean = _as_probs(probs).mean(1)
    if mean.shape[1] < 2:
        mean = np.concatenate([mean, np.zeros((len(mean), 2 - mean.shape[1]))], 1)
    top2 = np.partition(mean, -2, axis=1)[:, -2:]  # [N, 2]: second largest, largest
    return -(top2[:, 1] - top2[:, 0])


def least_confidence(probs: np.ndarray) -> np.ndarray:
    """1 - the largest mean class probability: ``[N, T, C] -> [N]``."""
    return 1.0 - _as_probs(probs).mean(1).max(-1)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """int64 indices ``[min(k, N)]`` of the k highest of ``scores [N]``, ties to lower index."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[: max(k, 0)].astype(
        np.int64
    )


# --------------------------------------------------------------------------- BatchBALD


def batchbald(
    probs: np.ndarray,
    budget: int,
    *,
    rng: np.random.Generator,
    num_samples: int = 10000,
    exact_limit: int = 1 << 13,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy BatchBALD (Kirsch et al. 2019) over ``probs [N, T, C]``.

    Step k adds the image n maximising the joint mutual information I(y_1..y_k, y_n; w) of the
    batch so far plus n. Writing B for the chosen batch,
    ``I(B + n) - I(B) = H(y_n | y_B) - E_t H[p_t(y_n)]``, so only the conditional entropy of
    the candidate given the batch's labels has to be computed per candidate:
    ``H(y_n | y_B) = sum_y p(y_B=y) H[p(y_n | y_B=y)]`` with
    ``p(y_n | y_B=y) = sum_t w(t | y) p_t(y_n)`` and ``w(t | y) ∝ prod_{i in B} p_t(y_i)``.

    The sum over label configurations y of B is exact while B has at most ``exact_limit``
    configurations (C**k). Beyond that it is a Monte Carlo average over ``num_samples``
    configurations drawn from p(y_B) as in the reference algorithm: each configuration is tied
    to one MC pass t (stratified over the T passes) and its labels are drawn from p_t; when an
    image joins the batch each configuration draws that image's label from its own pass, so the
    samples stay exact draws from the joint. Averaging the posterior entropies over configurations
    sampled from p(y_B) is the importance-weighted joint-entropy estimator
    ``-1/M sum_m sum_c p(y_m, c) / p(y_m) log p(y_m, c)`` minus the candidate-independent H(y_B).

    Candidates are processed in chunks so that temporaries stay within about 32 MiB.

    Returns (indices ``[K]`` int64 in pick order, joint-MI gain of each pick ``[K]`` float64),
    K = min(budget, N). The gains sum to the (estimated) joint MI of the batch; the first pick is
    argmax :func:`bald` and its gain is its BALD score.
    """
    p = _as_probs(probs)
    n_img, n_pass, n_cls = p.shape
    k_max = min(max(budget, 0), n_img)
    if k_max == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    cond = _entropy(p).mean(1)  # [N] E_t H[p_t(y_n)]
    # p arranged as [T, N*C] for the matmul with the configuration weights
    p_tnc = np.ascontiguousarray(p.transpose(1, 0, 2)).reshape(n_pass, n_img * n_cls)
    chosen = np.zeros(n_img, dtype=bool)
    first_scores = bald(p)
    sel = int(np.argmax(first_scores))
    picks, gains = [sel], [float(first_scores[sel])]
    chosen[sel] = True
    batch = _Configurations(p, sel, num_samples, exact_limit, rng)
    while len(picks) < k_max:
        weights, config_prob = batch.posterior(picks)
        cond_entropy = _conditional_entropy(weights, config_prob, p_tnc, n_img, n_cls)  # [N]
        scores = np.where(chosen, -np.inf, cond_entropy - cond)
        sel = int(np.argmax(scores))
        picks.append(sel)
        gains.append(float(scores[sel]))
        chosen[sel] = True
        batch.add(sel)
    return np.asarray(picks, dtype=np.int64), np.asarray(gains, dtype=np.float64)


class _Configurations:
    """The label configurations y of a BatchBALD batch B and their weights over the T passes.

    Exact while there are at most ``exact_limit`` of them: ``joint[m, t] = p_t(configuration
    m)``, m over all C**k configurations. Beyond that, ``num_samples`` configurations sampled
    from p(y_B): ``log_w[m, t] = log prod_i p_t(y_mi)``, configuration m drawn from pass
    ``pass_of[m]``."""

    def __init__(
        self,
        p: np.ndarray,
        first: int,
        num_samples: int,
        exact_limit: int,
        rng: np.random.Generator,
    ) -> None:
        self.p, self.exact_limit, self.rng = p, exact_limit, rng
        self.joint: np.ndarray | None = p[first].T.copy()  # [C, T]
        self.log_w: np.ndarray | None = None
        self.pass_of = np.arange(max(num_samples, 1)) % p.shape[1]

    def posterior(self, picks: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(``w(t | m)`` ``[M, T]``, ``p(y_B = m)`` ``[M]``) of the batch ``picks``; switches
        to sampled configurations when the exact ones would be too many."""
        if self.joint is not None and self.joint.shape[0] > self.exact_limit:
            self.joint = None
            self.log_w = _sample_configurations(self.p, picks, self.pass_of, self.rng)
        if self.joint is not None:
            mass = self.joint.sum(1)  # [M] T * p(y_B = m)
            weights = self.joint / np.where(mass > 0, mass, 1.0)[:, None]  # [M, T] w(t | m)
            return weights, mass / mass.sum()
        assert self.log_w is not None
        w = np.exp(self.log_w - self.log_w.max(1, keepdims=True))
        return w / w.sum(1, keepdims=True), np.full(len(w), 1.0 / len(w))

    def add(self, sel: int) -> None:
        """Extend the batch by image ``sel``."""
        p, n_pass = self.p, self.p.shape[1]
        if self.joint is not None:
            self.joint = (self.joint[:, None, :] * p[sel].T[None]).reshape(-1, n_pass)
        else:
            assert self.log_w is not None
            labels = _sample_labels(p[sel][self.pass_of], self.rng)  # [M]
            with np.errstate(divide="ignore"):
                self.log_w = self.log_w + np.log(p[sel][:, labels].T)


def _conditional_entropy(
    weights: np.ndarray, config_prob: np.ndarray, p_tnc: np.ndarray, n_img: int, n_cls: int
) -> np.ndarray:
    """H(y_n | y_B) for every image n: ``sum_m config_prob[m] H[weights[m] @ p(y_n | t)]``.

    ``weights [M, T]`` (rows: posterior over passes given configuration m), ``config_prob [M]``,
    ``p_tnc [T, N*C]``. Returns ``[N]``. Chunked over images.
    """
    m = weights.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // max(m * n_cls, 1))
    out = np.empty(n_img)
    for s in range(0, n_img, chunk):
        e = min(s + chunk, n_img)
        post = weights @ p_tnc[:, s * n_cls : e * n_cls]  # [M, B*C] p(y_n = c | y_B = m)
        h = _entropy(post.reshape(m, e - s, n_cls))  # [M, B]
        out[s:e] = config_prob @ h
    return out


def _sample_labels(dist: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One class per row of ``dist [M, C]`` by inverse CDF; returns int ``[M]``."""
    cdf = np.cumsum(dist, 1)
    u = rng.random(len(dist)) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(1), dist.shape[1] - 1)


def _sample_configurations(
    p: np.ndarray, picks: list[int], pass_of: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Draw label configurations of the batch ``picks``, configuration m from pass
    ``pass_of[m]``; return their log weights ``log prod_i p_t(y_mi)`` as ``[M, T]``."""
    log_w = np.zeros((len(pass_of), p.shape[1]))
    with np.errstate(divide="ignore"):
        for i in picks:
            labels = _sample_labels(p[i][pass_of], rng)
            log_w += np.log(p[i][:, labels].T)
    return log_w


# --------------------------------------------------------------------------- batch strategies


def power_sampling(
    scores: np.ndarray, budget: int, *, rng: np.random.Generator, beta: float = 1.0
) -> np.ndarray:
    """Stochastic power acquisition (Kirsch et al. 2021): draw ``min(budget, N)`` distinct
    indices without replacement with probability ∝ ``scores**beta`` (``scores [N]``), by the
    Gumbel-top-k trick on ``beta * log(scores)``. Scores are clipped to >= EPS first. Returns
    int64 indices in draw order."""
    s = np.asarray(scores, dtype=np.float64)
    logits = beta * np.log(np.maximum(s, EPS))
    return top_k(logits + rng.gumbel(size=len(s)), budget)


def class_balanced(
    scores: np.ndarray, predicted: np.ndarray, budget: int, n_classes: int
) -> np.ndarray:
    """Spread ``budget`` picks over predicted classes round-robin.

    In each round, classes 0..n_classes-1 in turn take their highest-scoring remaining image
    (ties to lower index); classes with none left are skipped. ``scores [N]``, ``predicted [N]``
    ints in ``[0, n_classes)``. Returns int64 indices ``[min(budget, N)]`` in pick order.
    """
    s = np.asarray(scores, dtype=np.float64)
    pred = np.asarray(predicted).astype(np.int64)
    if len(pred) != len(s):
        raise ValueError(f"scores and predicted differ in length: {len(s)} vs {len(pred)}")
    if len(pred) and (pred.min() < 0 or pred.max() >= n_classes):
        raise ValueError(f"predicted classes must lie in [0, {n_classes})")
    order = np.argsort(-s, kind="stable")
    cls = pred[order]
    # rank of each image within its own class (0 = that class's best)
    rank = np.empty(len(order), dtype=np.int64)
    by_class = np.argsort(cls, kind="stable")
    counts = np.bincount(cls, minlength=n_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank[by_class] = np.arange(len(order)) - np.repeat(starts, counts)
    return order[np.lexsort((cls, rank))][: max(budget, 0)].astype(np.int64)


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x).astype(np.float64)


def typicality(features: np.ndarray, k: int = 20) -> np.ndarray:
    """Typicality ``[N]`` of each row of ``features [N, D]``: the inverse of its mean Euclidean
    distance to its ``k`` nearest other rows (TypiClust, Hacohen et al. 2022)."""
    from sklearn.neighbors import NearestNeighbors

    n = len(features)
    if n <= 1:
        return np.ones(n)
    k = min(k, n - 1)
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features)
    return 1.0 / (dist[:, 1:].mean(1) + 1e-12)


def typiclust(
    features: np.ndarray,
    budget: int,
    *,
    rng: np.random.Generator,
    labelled_features: np.ndarray | None = None,
) -> np.ndarray:
    """TypiClust (Hacohen et al., ICML 2022): typical and diverse picks for small budgets.

    Clusters the pool ``features [N, D]`` together with ``labelled_features [L, D]`` into
    L + budget clusters (k-means); then, ``budget`` times, takes the cluster with the fewest
    labelled or already chosen members (ties: the largest) and picks its most typical pool
    image. Needs no model output, so it also chooses a first round from zero labels.
    Returns int64 indices into ``features`` ``[min(budget, N)]``, in pick order.
    """
    from sklearn.cluster import KMeans

    f = np.asarray(features, np.float64)
    n = len(f)
    k = min(max(budget, 0), n)
    if k == 0:
        return np.zeros(0, np.int64)
    lab = (
        np.zeros((0, f.shape[1]))
        if labelled_features is None
        else np.asarray(labelled_features, np.float64)
    )
    both = np.concatenate([f, lab])
    n_clusters = min(len(lab) + k, len(both))
    km = KMeans(n_clusters=n_clusters, n_init=3, random_state=int(rng.integers(2**31 - 1))).fit(
        both
    )
    pool_cluster, lab_cluster = km.labels_[:n], km.labels_[n:]
    covered = np.bincount(lab_cluster, minlength=n_clusters)
    size = np.bincount(pool_cluster, minlength=n_clusters)
    taken = np.zeros(n, bool)
    typ: dict[int, np.ndarray] = {}
    picks: list[int] = []
    for _ in range(k):
        left = size - np.bincount(pool_cluster[taken], minlength=n_clusters)
        order = np.lexsort((-size, covered))  # fewest covered first, then the largest
        c = next(int(c) for c in order if left[c] > 0)
        members = np.flatnonzero(pool_cluster == c)
        if c not in typ:
            typ[c] = typicality(f[members])
        t = np.where(taken[members], -np.inf, typ[c])
        best = members[int(np.argmax(t))]
        picks.append(int(best))
        taken[best] = True
        covered[c] += 1
    return np.asarray(picks, np.int64)


def k_center_greedy(
    features: np.ndarray,
    budget: int,
    *,
    labelled_features: np.ndarray | None = None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Greedy k-center core-set selection (Sener & Savarese 2018), Euclidean distance.

    ``features [N, D]``; ``labelled_features [L, D]`` (optional) are the already-labelled
    points the first pick must be far from. Without them (or with L == 0) the first pick is
    uniformly random. Each further pick is the point farthest from everything chosen or
    labelled. Returns int64 indices ``[min(budget, N)]`` in pick order, all distinct.
    """
    f = np.asarray(features)
    if not np.issubdtype(f.dtype, np.floating):
        f = f.astype(np.float64)
    n = len(f)
    k = min(max(budget, 0), n)
    if k == 0:
        return np.zeros(0, np.int64)
    f_sq = _sq_norms(f)
    dist = np.full(n, np.inf)  # squared distance to the nearest centre
    picks: list[int] = []
    if labelled_features is not None and len(labelled_features):
        lab = np.asarray(labelled_features, dtype=f.dtype)
        lab_sq = _sq_norms(lab)
        rows = max(1, _CHUNK_ELEMENTS // max(len(lab), 1))
        for s in range(0, n, rows):
            cols = max(1, _CHUNK_ELEMENTS // rows)
            for c in range(0, len(lab), cols):
                d = (
                    f_sq[s : s + rows, None]
                    + lab_sq[None, c : c + cols]
                    - 2.0 * (f[s : s + rows] @ lab[c : c + cols].T)
                )
                dist[s : s + rows] = np.minimum(dist[s : s + rows], d.min(1))
    else:
        picks.append(int(rng.integers(n)))
    chosen = np.zeros(n, dtype=bool)

    def add_centre(j: int) -> None:
        nonlocal dist
        chosen[j] = True
        dist = np.minimum(dist, f_sq + f_sq[j] - 2.0 * (f @ f[j]))

    if picks:
        add_centre(picks[0])
    while len(picks) < k:
        j = int(np.argmax(np.where(chosen, -np.inf, dist)))
        picks.append(j)
        add_centre(j)
    return np.asarray(picks, dtype=np.int64)


def badge(
    probs: np.ndarray, features: np.ndarray, budget: int, *, rng: np.random.Generator
) -> np.ndarray:
    """BADGE (Ash et al. 2020): k-means++ seeding on gradient embeddings.

    The embedding of image i is ``g_i ⊗ f_i`` (``[C*D]``) with ``g_i = p_i - onehot(argmax p_i)``
    (``p_i`` the MC-mean prediction from ``probs [N, T, C]``) and ``f_i = features[i]``
    (``[N, D]``): the gradient of the cross-entropy at the predicted label w.r.t. the last layer.
    It is never materialised: ``<g_i ⊗ f_i, g_j ⊗ f_j> = (g_i·g_j)(f_i·f_j)``, so memory is
    O(N (C + D)). As in the BADGE reference, the first centre is the largest embedding; later
    ones are drawn with probability ∝ squared distance to the nearest centre (D² sampling); if
    every remaining point coincides with a centre, a uniformly random unchosen point is taken.
    Returns int64 indices ``[min(budget, N)]`` in pick order, all distinct.
    """
    p = _as_probs(probs).mean(1)  # [N, C]
    f = np.asarray(features, dtype=np.float64)
    n = len(p)
    if len(f) != n:
        raise ValueError(f"probs and features differ in length: {n} vs {len(f)}")
    k = min(max(budget, 0), n)
    if k == 0:
        return np.zeros(0, np.int64)
    g = p.copy()
    g[np.arange(n), p.argmax(1)] -= 1.0
    sq = _sq_norms(g) * _sq_norms(f)  # [N] |g_i ⊗ f_i|^2
    chosen = np.zeros(n, dtype=bool)
    dist = np.full(n, np.inf)
    picks: list[int] = []
    j = int(np.argmax(sq))
    while True:
        picks.append(j)
        chosen[j] = True
        if len(picks) == k:
            break
        d = sq + sq[j] - 2.0 * (g @ g[j]) * (f @ f[j])
        dist = np.where(chosen, 0.0, np.minimum(dist, np.maximum(d, 0.0)))
        total = dist.sum()
        if total > 0:
            j = int(rng.choice(n, p=dist / total))
        else:
            j = int(rng.choice(np.flatnonzero(~chosen)))
    return np.asarray(picks, dtype=np.int64)


# --------------------------------------------------------------------------- strategy registry


@dataclass(frozen=True)
class Inputs:
    """What a strategy may use beyond the probabilities ``[N, T, C]`` of the pool."""

    rng: np.random.Generator
    features: np.ndarray | None = None
    """``[N, D]`` backbone features of the pool (``needs_features`` strategies)."""
    labelled_features: np.ndarray | None = None
    """``[L, D]`` features of the labelled images (``needs_labelled_features`` strategies)."""
    balance: bool = False
    """Spread the picks over predicted classes (per-image strategies only)."""


def _required(features: np.ndarray | None, strategy: str) -> np.ndarray:
    """The pool features a ``needs_features`` strategy was promised by the registry."""
    if features is None:
        raise ValueError(f"strategy {strategy!r} needs the pool's features (Inputs.features)")
    return features


Chooser = Callable[[np.ndarray, int, Inputs], tuple[np.ndarray, np.ndarray]]
"""``(probs [N, T, C] float64, k, inputs) -> (indices [K] int64, scores [K] float64)``,
called with ``1 <= k <= N``."""


@dataclass(frozen=True)
class Strategy:
    """One acquisition strategy and what it needs (as timm's ``register_model`` entries and
    MONAI Label's ``Strategy`` classes declare themselves).

    A caller asks the strategy, never its name: :attr:`score` (a per-image score whose
    top-k is the selection, so a pool can be ranked while it streams past), and which inputs
    :func:`select` must be given besides the pool's probabilities."""

    name: str
    choose: Chooser
    description: str
    score: Callable[[np.ndarray], np.ndarray] | None = None
    """A per-image score ``[N, T, C] -> [N]`` whose top-k (ties to the lower index) is the
    selection; ``None`` for batch strategies."""
    needs_features: bool = False
    """Needs ``features [N, D]`` of the pool."""
    needs_labelled_features: bool = False
    """Uses ``labelled_features [L, D]`` of the labelled images."""
    joint_samples: bool = True
    """Needs every image's T samples at once (not only a running top-k of scores)."""
    uses_model: bool = True
    """Uses the model's outputs (``False`` for random: a model that never saw a class
    cannot mislead it, so the cold-start exploration does not replace it)."""

    def streaming_score(self, balance: bool = False) -> Callable[[np.ndarray], np.ndarray] | None:
        """The score to keep a running top-k of while the pool is scored, when that top-k
        is the whole selection (a per-image strategy without class balancing); else
        ``None``."""
        return None if self.joint_samples or balance else self.score


_REGISTRY: dict[str, Strategy] = {}


def register_strategy(
    name: str,
    description: str,
    *,
    needs_features: bool = False,
    needs_labelled_features: bool = False,
    uses_model: bool = True,
) -> Callable[[Chooser], Chooser]:
    """Decorator: register a :data:`Chooser` under ``name`` (a batch strategy: it needs the
    joint samples of the whole pool). Per-image scores use :func:`register_score`."""

    def add(choose: Chooser) -> Chooser:
        _add(
            Strategy(
                name,
                choose,
                description,
                None,
                needs_features,
                needs_labelled_features,
                True,
                uses_model,
            )
        )
        return choose

    return add


def register_score(name: str, score: Callable[[np.ndarray], np.ndarray]) -> None:
    """Register a per-image score ``[N, T, C] -> [N]``: the strategy selects its top k (ties
    to the lower index), or spreads them over predicted classes with ``balance``."""

    def choose(p: np.ndarray, k: int, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
        scores = score(p)
        if inputs.balance:
            idx = class_balanced(scores, p.mean(1).argmax(1), k, p.shape[2])
        else:
            idx = top_k(scores, k)
        return idx, scores[idx]

    _add(
        Strategy(
            name,
            choose,
            f"the top k by {score.__name__} (or class-balanced with "
            f"balance); reported scores are those scores",
            score,
            joint_samples=False,
        )
    )


def _add(strategy: Strategy) -> None:
    if strategy.name in _REGISTRY:
        raise ValueError(f"acquisition strategy {strategy.name!r} is registered twice")
    _REGISTRY[strategy.name] = strategy


def available_strategies() -> tuple[str, ...]:
    """Every registered strategy name, in registration order (the only list of names)."""
    return tuple(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``; ValueError listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown acquisition strategy {name!r}; valid: {', '.join(_REGISTRY)}"
        ) from None


def validate_strategy(name: str) -> None:
    """Raise ValueError, listing the valid names, if ``name`` is not a registered strategy."""
    get_strategy(name)


for _name, _fn in (
    ("bald", bald),
    ("entropy", predictive_entropy),
    ("variation_ratios", variation_ratios),
    ("mean_std", mean_std),
    ("margin", margin),
    ("least_confidence", least_confidence),
):
    register_score(_name, _fn)


@register_strategy(
    "random", "a permutation drawn from the rng; reported scores are BALD", uses_model=False
)
def _random(p: np.ndarray, k: int, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
    idx = inputs.rng.permutation(len(p))[:k].astype(np.int64)
    return idx, bald(p)[idx]


@register_strategy("batchbald", "batchbald: greedy joint-MI picks and their gains")
def _batchbald(p: np.ndarray, k: int, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
    return batchbald(p, k, rng=inputs.rng)


def _power(score: Callable[[np.ndarray], np.ndarray]) -> Chooser:
    def choose(p: np.ndarray, k: int, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
        scores = score(p)
        idx = power_sampling(scores, k, rng=inputs.rng)
        return idx, scores[idx]

    return choose


register_strategy("powerbald", "power_sampling on BALD; reported scores are BALD")(_power(bald))
register_strategy(
    "powerentropy", "power_sampling on predictive entropy; reported scores are those entropies"
)(_power(predictive_entropy))


@register_strategy(
    "coreset",
    "k_center_greedy on the pool features, far from the labelled "
    "features; reported scores are BALD",
    needs_features=True,
    needs_labelled_features=True,
)
def _coreset(p: np.ndarray, k: int, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
    idx = k_center_greedy(
        _required(inputs.features, "coreset"),
        k,
        labelled_features=inputs.labelled_features,
        rng=inputs.rng,
    )
    return idx, bald(p)[idx]


@register_strategy(
    "badge", "badge on the gradient embeddings; reported scores are BALD", needs_features=True
)
def _badge(p: np.ndarray, k: int, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
    idx = badge(p, _required(inputs.features, "badge"), k, rng=inputs.rng)
    return idx, bald(p)[idx]


@register_strategy(
    "typiclust",
    "typiclust on the pool features with the labelled features; reported scores are BALD",
    needs_features=True,
    needs_labelled_features=True,
)
def _typiclust(p: np.ndarray, k: int, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
    idx = typiclust(
        _required(inputs.features, "typiclust"),
        k,
        labelled_features=inputs.labelled_features,
        rng=inputs.rng,
    )
    return idx, bald(p)[idx]


@register_strategy(
    "epig", "the top k by epig, with up to 256 pool images drawn from the rng as the targets"
)
def _epig(p: np.ndarray, k: int, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
    targets = inputs.rng.choice(len(p), size=min(len(p), 256), replace=False)
    scores = epig(p, p[targets])
    idx = top_k(scores, k)
    return idx, scores[idx]


STRATEGIES: tuple[str, ...] = available_strategies()
"""The registered names at import (derived from the registry; for display)."""

SCORE_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    s.name: s.score for s in _REGISTRY.values() if s.score is not None
}
"""The per-image strategies' scores (derived from the registry)."""


# --------------------------------------------------------------------------- entry point


def select(
    strategy: str,
    probs: np.ndarray,
    budget: int,
    *,
    rng: np.random.Generator,
    features: np.ndarray | None = None,
    labelled_features: np.ndarray | None = None,
    balance: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose up to ``budget`` images from ``probs [N, T, C]`` with the registered strategy
    named ``strategy`` (:func:`get_strategy`; each one's :attr:`Strategy.description` says
    what it picks and which scores it reports).

    Returns (indices ``[K]`` int64 in rank order, scores ``[K]`` float64 for reporting),
    K = min(budget, N). ``features [N, D]`` are required by the strategies that declare
    :attr:`Strategy.needs_features`; ``labelled_features [L, D]`` are used by those that
    declare :attr:`Strategy.needs_labelled_features`. ``balance=True`` spreads the picks over
    predicted classes (argmax of the mean probabilities) with :func:`class_balanced`; it
    applies to the per-image strategies only and is ignored by the others, which have their
    own notion of a diverse batch.

    Raises ValueError for an unknown strategy, or for one that needs ``features`` without
    them.
    """
    s = get_strategy(strategy)
    p = _as_probs(probs)
    n = len(p)
    k = min(max(budget, 0), n)
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    if s.needs_features:
        if features is None:
            raise ValueError(f"acquisition strategy {strategy!r} needs features [N, D]")
        if len(features) != n:
            raise ValueError(
                f"strategy {strategy!r}: features has {len(features)} rows, probs has {n}"
            )
    return s.choose(p, k, Inputs(rng, features, labelled_features, balance))
