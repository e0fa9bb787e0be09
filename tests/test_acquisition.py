"""Acquisition functions: hand-computed values, invariants, BatchBALD against brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from medal import acquisition as acq
from medal.acquisition import (
    SCORE_FUNCTIONS,
    STRATEGIES,
    badge,
    bald,
    batchbald,
    epig,
    class_balanced,
    k_center_greedy,
    least_confidence,
    margin,
    mean_std,
    power_sampling,
    predictive_entropy,
    select,
    typicality,
    typiclust,
    validate_strategy,
    variation_ratios,
)


def dirichlet_probs(n: int, t: int, c: int, seed: int = 0, alpha: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(c, alpha), size=(n, t))


def h(*p: float) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


# Image A: the two passes disagree completely. Image B: both passes favour class 0.
TWO = np.array(
    [
        [[1.0, 0.0], [0.0, 1.0]],
        [[0.8, 0.2], [0.6, 0.4]],
    ]
)


# --------------------------------------------------------------------------- hand-computed


def test_predictive_entropy_by_hand():
    np.testing.assert_allclose(predictive_entropy(TWO), [math.log(2), h(0.7, 0.3)], atol=1e-9)


def test_bald_by_hand():
    expected_b = h(0.7, 0.3) - (h(0.8, 0.2) + h(0.6, 0.4)) / 2
    np.testing.assert_allclose(bald(TWO), [math.log(2), expected_b], atol=1e-9)


def test_variation_ratios_by_hand():
    np.testing.assert_allclose(variation_ratios(TWO), [0.5, 0.0])
    # votes 0, 0, 2 over three passes: the mode has 2 of 3 votes
    three = np.array([[[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]]])
    np.testing.assert_allclose(variation_ratios(three), [1 - 2 / 3])


def test_mean_std_by_hand():
    # A: each class takes values {1, 0} -> std 0.5; B: {0.8, 0.6} and {0.2, 0.4} -> std 0.1
    np.testing.assert_allclose(mean_std(TWO), [0.5, 0.1], atol=1e-12)


def test_margin_by_hand():
    np.testing.assert_allclose(margin(TWO), [0.0, -(0.7 - 0.3)], atol=1e-12)
    three = np.array([[[0.5, 0.3, 0.2], [0.3, 0.1, 0.6]]])  # mean 0.4, 0.2, 0.4
    np.testing.assert_allclose(margin(three), [0.0], atol=1e-12)
    three = np.array([[[0.6, 0.3, 0.1], [0.4, 0.1, 0.5]]])  # mean 0.5, 0.2, 0.3
    np.testing.assert_allclose(margin(three), [-(0.5 - 0.3)], atol=1e-12)


def test_least_confidence_by_hand():
    np.testing.assert_allclose(least_confidence(TWO), [0.5, 0.3], atol=1e-12)


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("name", sorted(SCORE_FUNCTIONS))
def test_scores_are_float64_n_and_permutation_equivariant(name):
    fn = SCORE_FUNCTIONS[name]
    p = dirichlet_probs(20, 5, 4, seed=1).astype(np.float32)
    s = fn(p)
    assert s.shape == (20,) and s.dtype == np.float64
    perm = np.random.default_rng(2).permutation(20)
    np.testing.assert_allclose(fn(p[perm]), s[perm], rtol=0, atol=1e-12)
    assert fn(np.zeros((0, 5, 4))).shape == (0,)


def test_bald_bounded_by_entropy():
    p = dirichlet_probs(200, 8, 3, seed=3, alpha=0.5)
    b, e = bald(p), predictive_entropy(p)
    assert np.all(b >= 0) and np.all(b <= e + 1e-9)
    assert np.all(e <= math.log(3) + 1e-9)


def test_bald_zero_when_passes_agree():
    one = dirichlet_probs(10, 1, 4, seed=4)
    p = np.repeat(one, 6, axis=1)
    np.testing.assert_allclose(bald(p), 0.0, atol=1e-12)
    np.testing.assert_allclose(mean_std(p), 0.0, atol=1e-12)
    np.testing.assert_allclose(variation_ratios(p), 0.0)


@pytest.mark.parametrize("c", [2, 3, 7])
def test_entropy_maximal_at_uniform(c):
    uniform = np.full((1, 3, c), 1.0 / c)
    np.testing.assert_allclose(predictive_entropy(uniform), [math.log(c)], atol=1e-9)
    assert np.all(predictive_entropy(dirichlet_probs(100, 3, c, seed=5)) <= math.log(c) + 1e-9)
    np.testing.assert_allclose(least_confidence(uniform), [1 - 1 / c])
    np.testing.assert_allclose(margin(uniform), [0.0], atol=1e-12)


def test_strategy_names():
    assert STRATEGIES == acq.available_strategies()  # derived from the registry
    assert set(SCORE_FUNCTIONS) <= set(STRATEGIES)
    for name in STRATEGIES:
        validate_strategy(name)
        s = acq.get_strategy(name)
        assert s.name == name and s.description  # every strategy says what it picks
    with pytest.raises(ValueError, match="valid: bald, entropy"):
        validate_strategy("nope")


def test_strategies_declare_what_they_need():
    needs = {name: acq.get_strategy(name) for name in STRATEGIES}
    assert {n for n, s in needs.items() if s.needs_features} == {"coreset", "badge", "typiclust"}
    assert {n for n, s in needs.items() if s.needs_labelled_features} == {"coreset", "typiclust"}
    assert {n for n, s in needs.items() if not s.joint_samples} == set(SCORE_FUNCTIONS)
    assert {n for n, s in needs.items() if not s.uses_model} == {"random"}
    # a running top-k stands in for the selection only for a per-image score, unbalanced
    assert needs["bald"].streaming_score() is bald
    assert needs["bald"].streaming_score(balance=True) is None
    assert needs["batchbald"].streaming_score() is None


def test_a_registered_strategy_is_selectable_and_listed():
    @acq.register_strategy("_test_last", "the last k images", needs_features=True)
    def last(p, k, inputs):
        assert inputs.features is not None
        idx = np.arange(len(p) - 1, len(p) - 1 - k, -1, dtype=np.int64)
        return idx, np.zeros(k)

    try:
        assert "_test_last" in acq.available_strategies()
        p = dirichlet_probs(6, 2, 2)
        idx, _ = select("_test_last", p, 2, rng=np.random.default_rng(0), features=np.zeros((6, 3)))
        assert idx.tolist() == [5, 4]
        with pytest.raises(ValueError, match="needs features"):
            select("_test_last", p, 2, rng=np.random.default_rng(0))
        with pytest.raises(ValueError, match="registered twice"):
            acq.register_strategy("_test_last", "again")(last)
    finally:
        del acq._REGISTRY["_test_last"]


# --------------------------------------------------------------------------- BatchBALD


def brute_joint_mi(probs: np.ndarray, batch: list[int]) -> float:
    """I(y_batch; w) by enumerating every label configuration."""
    _, t, c = probs.shape
    joint_h = 0.0
    for ys in itertools.product(range(c), repeat=len(batch)):
        p = np.mean([np.prod([probs[i, s, y] for i, y in zip(batch, ys)]) for s in range(t)])
        if p > 0:
            joint_h -= p * math.log(p)
    cond = sum(np.mean([h(*probs[i, s]) for s in range(t)]) for i in batch)
    return joint_h - cond


def brute_greedy(probs: np.ndarray, budget: int) -> tuple[list[int], list[float]]:
    picks: list[int] = []
    gains: list[float] = []
    prev = 0.0
    for _ in range(budget):
        cand = [n for n in range(len(probs)) if n not in picks]
        mis = [brute_joint_mi(probs, picks + [n]) for n in cand]
        best = int(np.argmax(mis))
        picks.append(cand[best])
        gains.append(mis[best] - prev)
        prev = mis[best]
    return picks, gains


@pytest.mark.parametrize(
    "n,t,c,budget,seed",
    [
        (5, 3, 2, 3, 0),
        (6, 4, 2, 3, 1),
        (6, 4, 3, 3, 2),
        (4, 2, 3, 2, 3),
        (6, 3, 3, 2, 4),
    ],
)
def test_batchbald_exact_matches_brute_force_greedy(n, t, c, budget, seed):
    p = dirichlet_probs(n, t, c, seed=seed, alpha=0.7)
    idx, gains = batchbald(p, budget, rng=np.random.default_rng(0))
    ref_idx, ref_gains = brute_greedy(p, budget)
    assert idx.dtype == np.int64 and gains.dtype == np.float64
    assert idx.tolist() == ref_idx
    np.testing.assert_allclose(gains, ref_gains, atol=1e-9)


def test_batchbald_avoids_redundant_duplicates():
    # image 0 duplicated: BALD would take both copies, BatchBALD takes the copy once
    base = dirichlet_probs(4, 6, 2, seed=7, alpha=0.3)
    best = int(np.argmax(bald(base)))
    p = np.concatenate([base, base[best : best + 1]])
    idx, gains = batchbald(p, 2, rng=np.random.default_rng(0))
    assert idx[0] == best and idx[1] != len(base)
    assert np.all(np.diff(gains) <= 1e-12)  # submodular: gains do not increase


def test_batchbald_budget_one_is_argmax_bald():
    for seed in range(5):
        p = dirichlet_probs(50, 10, 4, seed=seed, alpha=0.5)
        idx, gains = batchbald(p, 1, rng=np.random.default_rng(0))
        b = bald(p)
        assert idx.tolist() == [int(np.argmax(b))]
        np.testing.assert_allclose(gains, [b.max()])


@pytest.mark.parametrize("exact_limit", [1, 3])
def test_batchbald_sampled_close_to_exact(exact_limit):
    # C**k exceeds exact_limit from k=1 (limit 1) or k=2 (limit 3): the sampled path runs
    p = dirichlet_probs(6, 4, 3, seed=11, alpha=0.7)
    idx, gains = batchbald(
        p, 3, rng=np.random.default_rng(0), num_samples=20000, exact_limit=exact_limit
    )
    assert len(set(idx.tolist())) == 3
    true_mi = [brute_joint_mi(p, idx[:k].tolist()) for k in range(1, 4)]
    np.testing.assert_allclose(gains, np.diff([0.0, *true_mi]), atol=0.02)
    _, ref_gains = brute_greedy(p, 3)
    assert true_mi[-1] >= sum(ref_gains) - 0.02


def test_batchbald_sampled_long_batch_tracks_exact():
    # C=2, budget 8: exact runs to k=3 (8 configurations), sampling from then on
    p = dirichlet_probs(30, 10, 2, seed=3, alpha=1.0)
    exact_idx, exact_gains = batchbald(p, 8, rng=np.random.default_rng(0), exact_limit=1 << 20)
    idx, gains = batchbald(p, 8, rng=np.random.default_rng(0), exact_limit=8, num_samples=20000)
    assert np.abs(np.cumsum(gains) - np.cumsum(exact_gains)).max() < 0.05
    assert len(set(idx.tolist()) & set(exact_idx.tolist())) >= 6


def test_batchbald_prefers_complementary_image_to_a_copy():
    # a: passes split {0,2} vs {1,3}; b: slightly less uncertain, splits {0,1} vs {2,3}.
    # BALD takes both copies of a; BatchBALD takes one copy of a, then b.
    a = np.array([[0.95, 0.05], [0.05, 0.95], [0.95, 0.05], [0.05, 0.95]])
    b = np.array([[0.92, 0.08], [0.92, 0.08], [0.08, 0.92], [0.08, 0.92]])
    p = np.stack([a, a, b])
    assert np.argsort(-bald(p), kind="stable")[:2].tolist() == [0, 1]
    idx, _ = batchbald(p, 2, rng=np.random.default_rng(0))
    assert idx.tolist() == [0, 2]


def test_batchbald_sampled_is_seeded_and_chunked(monkeypatch):
    p = dirichlet_probs(30, 5, 3, seed=12)
    a = batchbald(p, 4, rng=np.random.default_rng(1), num_samples=500, exact_limit=3)
    b = batchbald(p, 4, rng=np.random.default_rng(1), num_samples=500, exact_limit=3)
    exact = batchbald(p, 4, rng=np.random.default_rng(1))
    monkeypatch.setattr(acq, "_CHUNK_ELEMENTS", 64)
    c = batchbald(p, 4, rng=np.random.default_rng(1), num_samples=500, exact_limit=3)
    exact_chunked = batchbald(p, 4, rng=np.random.default_rng(1))
    for x, y in [(a, b), (a, c), (exact, exact_chunked)]:
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_allclose(x[1], y[1], atol=1e-12)


def test_batchbald_edges():
    p = dirichlet_probs(3, 4, 2, seed=13)
    idx, gains = batchbald(p, 10, rng=np.random.default_rng(0))
    assert sorted(idx.tolist()) == [0, 1, 2] and gains.shape == (3,)
    idx, gains = batchbald(p, 0, rng=np.random.default_rng(0))
    assert idx.shape == gains.shape == (0,)
    # hard one-hot predictions (zeros in probs) stay finite on both paths
    hard = np.eye(2)[np.random.default_rng(0).integers(0, 2, size=(8, 5))]
    for limit in (1, 1 << 13):
        idx, gains = batchbald(hard, 4, rng=np.random.default_rng(0), exact_limit=limit)
        assert len(set(idx.tolist())) == 4 and np.all(np.isfinite(gains))


# --------------------------------------------------------------------------- power sampling


def test_power_sampling_distinct_and_seeded():
    scores = np.random.default_rng(0).random(50)
    a = power_sampling(scores, 20, rng=np.random.default_rng(3))
    b = power_sampling(scores, 20, rng=np.random.default_rng(3))
    assert a.dtype == np.int64 and len(set(a.tolist())) == 20
    np.testing.assert_array_equal(a, b)
    assert len(power_sampling(scores, 80, rng=np.random.default_rng(0))) == 50
    assert len(power_sampling(np.zeros(5), 3, rng=np.random.default_rng(0))) == 3


def test_power_sampling_large_beta_is_top_k():
    scores = np.linspace(0.1, 1.0, 30)[np.random.default_rng(1).permutation(30)]
    idx = power_sampling(scores, 5, rng=np.random.default_rng(0), beta=1e4)
    np.testing.assert_array_equal(idx, np.argsort(-scores)[:5])


def test_power_sampling_probabilities_proportional_to_score_power():
    rng = np.random.default_rng(0)
    draws = np.array([power_sampling(np.array([1.0, 3.0]), 1, rng=rng)[0] for _ in range(4000)])
    assert abs(draws.mean() - 0.75) < 0.03
    draws = np.array(
        [power_sampling(np.array([1.0, 3.0]), 1, rng=rng, beta=2.0)[0] for _ in range(4000)]
    )
    assert abs(draws.mean() - 0.9) < 0.03


# --------------------------------------------------------------------------- diversity


def toy_layout() -> np.ndarray:
    """A tight cluster at the origin plus four far corners (indices 10..13)."""
    cluster = np.random.default_rng(0).normal(0, 0.1, size=(10, 2))
    corners = np.array([[10.0, 10.0], [-10.0, 10.0], [10.0, -10.0], [-10.0, -10.0]])
    return np.concatenate([cluster, corners])


def test_k_center_picks_far_points():
    f = toy_layout()
    idx = k_center_greedy(f, 4, labelled_features=np.zeros((1, 2)), rng=np.random.default_rng(0))
    assert idx.dtype == np.int64 and sorted(idx.tolist()) == [10, 11, 12, 13]
    # without labelled points: random start, then the farthest point each time
    idx = k_center_greedy(f, 5, rng=np.random.default_rng(1))
    assert len(set(idx.tolist())) == 5 and {10, 11, 12, 13} <= set(idx.tolist())


def test_k_center_farthest_first_and_chunked(monkeypatch):
    f = np.array([[0.0], [1.0], [3.0], [7.0]])
    idx = k_center_greedy(f, 3, labelled_features=np.array([[0.0]]), rng=np.random.default_rng(0))
    assert idx.tolist() == [3, 2, 1]  # 7 is farthest from 0; then 3 (dist 3), then 1
    f = np.random.default_rng(2).normal(size=(40, 3))
    lab = np.random.default_rng(3).normal(size=(25, 3))
    ref = k_center_greedy(f, 10, labelled_features=lab, rng=np.random.default_rng(0))
    monkeypatch.setattr(acq, "_CHUNK_ELEMENTS", 7)
    np.testing.assert_array_equal(
        k_center_greedy(f, 10, labelled_features=lab, rng=np.random.default_rng(0)), ref
    )


def test_k_center_distinct_with_duplicate_points():
    idx = k_center_greedy(np.ones((6, 2)), 6, rng=np.random.default_rng(0))
    assert sorted(idx.tolist()) == list(range(6))


def test_badge_distinct_seeded_and_skips_duplicates():
    p = dirichlet_probs(40, 4, 3, seed=20)
    f = np.random.default_rng(21).normal(size=(40, 5))
    a = badge(p, f, 10, rng=np.random.default_rng(0))
    b = badge(p, f, 10, rng=np.random.default_rng(0))
    assert a.dtype == np.int64 and len(set(a.tolist())) == 10
    np.testing.assert_array_equal(a, b)
    # first centre: the largest gradient embedding (computed explicitly here)
    pm = p.mean(1)
    g = pm - np.eye(3)[pm.argmax(1)]
    emb = (g[:, :, None] * f[:, None, :]).reshape(40, -1)
    assert a[0] == int(np.argmax((emb**2).sum(1)))
    # an exact copy of a centre has D^2 = 0 and is never drawn while others remain
    p2 = np.concatenate([p[:3], p[a[0] : a[0] + 1]])
    f2 = np.concatenate([f[:3], f[a[0] : a[0] + 1]])
    for seed in range(10):
        idx = badge(p2, f2, 3, rng=np.random.default_rng(seed))
        assert len(set(idx.tolist())) == 3
        assert not {int(a[0]) if a[0] < 3 else -1, 3} <= set(idx.tolist())
    # all-zero embeddings (confident one-hot predictions): still distinct picks
    hard = np.repeat(np.eye(2)[[0, 1, 0, 1]][:, None], 3, axis=1)
    assert sorted(badge(hard, f[:4], 4, rng=np.random.default_rng(0)).tolist()) == [0, 1, 2, 3]


def test_class_balanced_round_robin():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    pred = np.array([0, 0, 0, 1, 1])
    assert class_balanced(scores, pred, 4, 2).tolist() == [0, 3, 1, 4]
    assert class_balanced(scores, pred, 5, 2).tolist() == [0, 3, 1, 4, 2]  # class 1 ran out
    assert class_balanced(scores, pred, 9, 3).tolist() == [0, 3, 1, 4, 2]  # class 2 empty
    # interleaved classes and unsorted scores
    scores = np.array([0.1, 0.5, 0.3, 0.9, 0.4, 0.2])
    pred = np.array([1, 0, 2, 1, 0, 2])
    assert class_balanced(scores, pred, 6, 3).tolist() == [1, 3, 2, 4, 0, 5]
    assert class_balanced(scores, pred, 0, 3).tolist() == []
    with pytest.raises(ValueError):
        class_balanced(scores, pred, 2, 2)


# --------------------------------------------------------------------------- select


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_select_shapes_and_dtypes(strategy):
    p = dirichlet_probs(25, 6, 3, seed=30).astype(np.float32)
    f = np.random.default_rng(31).normal(size=(25, 4)).astype(np.float32)
    idx, scores = select(
        strategy, p, 7, rng=np.random.default_rng(0), features=f, labelled_features=f[:2]
    )
    assert idx.shape == scores.shape == (7,)
    assert idx.dtype == np.int64 and scores.dtype == np.float64
    assert len(set(idx.tolist())) == 7 and idx.min() >= 0 and idx.max() < 25
    idx, scores = select(strategy, p, 100, rng=np.random.default_rng(0), features=f)
    assert sorted(idx.tolist()) == list(range(25))
    for n, budget in [(0, 5), (25, 0)]:
        idx, scores = select(strategy, p[:n], budget, rng=np.random.default_rng(0), features=f[:n])
        assert idx.shape == scores.shape == (0,)
        assert idx.dtype == np.int64 and scores.dtype == np.float64


@pytest.mark.parametrize("strategy", sorted(SCORE_FUNCTIONS))
def test_select_per_image_is_stable_top_k(strategy):
    p = dirichlet_probs(30, 5, 3, seed=32)
    p[10] = p[3]  # a tie: the lower index ranks first
    s = SCORE_FUNCTIONS[strategy](p)
    idx, scores = select(strategy, p, 30, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(idx, np.argsort(-s, kind="stable"))
    np.testing.assert_array_equal(scores, s[idx])
    assert idx.tolist().index(3) < idx.tolist().index(10)


def test_select_reported_scores():
    p = dirichlet_probs(20, 5, 3, seed=33)
    f = np.random.default_rng(34).normal(size=(20, 4))
    b, e = bald(p), predictive_entropy(p)
    for strategy in ("random", "powerbald", "coreset", "badge"):
        idx, scores = select(strategy, p, 5, rng=np.random.default_rng(0), features=f)
        np.testing.assert_array_equal(scores, b[idx])
    idx, scores = select("powerentropy", p, 5, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(scores, e[idx])
    idx, scores = select("batchbald", p, 5, rng=np.random.default_rng(0))
    ref = batchbald(p, 5, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(idx, ref[0])
    np.testing.assert_array_equal(scores, ref[1])


def test_select_random_reproducible():
    p = dirichlet_probs(50, 3, 2, seed=35)
    a = select("random", p, 10, rng=np.random.default_rng(7))
    b = select("random", p, 10, rng=np.random.default_rng(7))
    c = select("random", p, 10, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], np.random.default_rng(7).permutation(50)[:10])
    assert not np.array_equal(a[0], c[0])


def test_select_errors():
    p = dirichlet_probs(5, 3, 2, seed=36)
    with pytest.raises(ValueError, match="unknown acquisition strategy 'bogus'.*batchbald"):
        select("bogus", p, 2, rng=np.random.default_rng(0))
    for strategy in ("coreset", "badge"):
        with pytest.raises(ValueError, match=strategy):
            select(strategy, p, 2, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[N, T, C\]"):
        select("bald", p[0], 2, rng=np.random.default_rng(0))


def test_select_balance_spreads_over_predicted_classes():
    # classes 0 and 1 each predicted for half the pool; class 0 images are far more uncertain
    rng = np.random.default_rng(37)
    p0 = rng.dirichlet([3, 2], size=(10, 4))
    p1 = rng.dirichlet([1, 50], size=(10, 4))
    p = np.concatenate([np.sort(p0, -1)[:, :, ::-1], p1])  # class 0 wins every pass
    pred = p.mean(1).argmax(1)
    assert (pred == 0).sum() == 10 and (pred == 1).sum() == 10
    idx, _ = select("entropy", p, 6, rng=np.random.default_rng(0))
    assert set(pred[idx].tolist()) == {0}
    idx, scores = select("entropy", p, 6, rng=np.random.default_rng(0), balance=True)
    assert pred[idx].tolist() == [0, 1, 0, 1, 0, 1]
    np.testing.assert_array_equal(scores, predictive_entropy(p)[idx])


def test_typicality_is_inverse_mean_knn_distance():
    f = np.array([[0.0], [1.0], [3.0]])
    # k=1: nearest other row at distances 1, 1, 2
    np.testing.assert_allclose(typicality(f, k=1), [1.0, 1.0, 0.5], rtol=1e-9)
    # k=2: mean of (1, 3), (1, 2), (2, 3)
    np.testing.assert_allclose(typicality(f, k=2), [0.5, 1 / 1.5, 0.4], rtol=1e-9)


def test_typiclust_picks_the_centre_of_each_cluster_first():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = (60, 40, 20)
    blobs = [c + rng.normal(0, 1, (n, 2)) for c, n in zip(centres, sizes)]
    f = np.concatenate(blobs)
    which = np.repeat([0, 1, 2], sizes)
    idx = typiclust(f, 3, rng=np.random.default_rng(1))
    # one pick per blob, the largest blob first, and each pick near its blob's centre
    assert list(which[idx]) == [0, 1, 2]
    assert np.all(np.linalg.norm(f[idx] - centres[which[idx]], axis=1) < 1.0)
    # a blob that is already labelled is covered: the picks go to the other two
    idx = typiclust(f, 2, rng=np.random.default_rng(1), labelled_features=centres[:1])
    assert sorted(which[idx]) == [1, 2]
    assert len(set(idx.tolist())) == len(idx)


def test_epig_against_a_hand_computed_case_and_its_bounds():
    # two parameter samples, two classes; candidate and target flip together
    a = np.array([[[0.9, 0.1], [0.1, 0.9]]])
    # y and y* are then the same coin: I(y; y*) = H(joint) terms by hand
    joint = (
        np.array(
            [
                [0.9 * 0.9 + 0.1 * 0.1, 0.9 * 0.1 + 0.1 * 0.9],
                [0.1 * 0.9 + 0.9 * 0.1, 0.1 * 0.1 + 0.9 * 0.9],
            ]
        )
        / 2
    )
    expected = float((joint * np.log(joint / 0.25)).sum())
    assert epig(a, a)[0] == pytest.approx(expected, rel=1e-6)
    # a target the parameters agree on carries no information
    certain = np.array([[[0.7, 0.3], [0.7, 0.3]]])
    assert epig(a, certain)[0] == pytest.approx(0.0, abs=1e-9)
    # EPIG never exceeds BALD (data processing inequality) and is >= 0
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], size=(30, 8))
    e = epig(p, p[:10], chunk=7)
    assert np.all(e >= 0) and np.all(e <= bald(p) + 1e-9)
