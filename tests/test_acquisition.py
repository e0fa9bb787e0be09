"""Acquisition functions on hand-computed cases, invariants and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from medal import acquisition as acq


def H(p):
    return -sum(x * math.log(x) for x in p if x > 0)


# two images, T=2, C=2 -- written out by hand
P = np.array([
    [[0.9, 0.1], [0.1, 0.9]],   # samples disagree: high BALD
    [[0.5, 0.5], [0.5, 0.5]],   # samples agree on 50/50: entropy high, BALD 0
])


def test_hand_computed_scores():
    # image 0: mean (0.5, 0.5); image 1: mean (0.5, 0.5)
    np.testing.assert_allclose(acq.predictive_entropy(P), [math.log(2), math.log(2)])
    np.testing.assert_allclose(acq.bald(P), [math.log(2) - H([0.9, 0.1]), 0.0], atol=1e-12)
    np.testing.assert_allclose(acq.variation_ratios(P), [0.5, 0.0])  # votes 0,1 / 0,0
    np.testing.assert_allclose(acq.mean_std(P), [0.4, 0.0])
    np.testing.assert_allclose(acq.margin(P), [0.0, 0.0])
    np.testing.assert_allclose(acq.least_confidence(P), [0.5, 0.5])
    q = np.array([[[0.7, 0.2, 0.1]], [[0.4, 0.35, 0.25]]])  # T = 1, C = 3
    np.testing.assert_allclose(acq.margin(q), [-0.5, -0.05])
    np.testing.assert_allclose(acq.least_confidence(q), [0.3, 0.6])
    np.testing.assert_allclose(acq.predictive_entropy(q), [H([0.7, 0.2, 0.1]),
                                                           H([0.4, 0.35, 0.25])])


@pytest.fixture
def rand_probs():
    rng = np.random.default_rng(0)
    return rng.dirichlet(np.ones(3) * 0.7, size=(50, 8))  # [N=50, T=8, C=3]


def test_invariants(rand_probs):
    b, e = acq.bald(rand_probs), acq.predictive_entropy(rand_probs)
    assert (b >= 0).all() and (b <= e + 1e-9).all()
    same = np.repeat(rand_probs[:, :1], 8, axis=1)  # every sample agrees
    np.testing.assert_allclose(acq.bald(same), 0.0, atol=1e-12)
    uniform = np.full((1, 4, 3), 1 / 3)
    np.testing.assert_allclose(acq.predictive_entropy(uniform), math.log(3))
    perm = np.random.default_rng(1).permutation(50)
    for name, fn in acq.SCORE_FUNCTIONS.items():
        np.testing.assert_allclose(fn(rand_probs[perm]), fn(rand_probs)[perm], err_msg=name)
        assert fn(rand_probs).shape == (50,)


def joint_mi(probs, batch):
    """Brute force: H(y_batch) - sum_i E_t H(y_i | w_t), enumerating every configuration."""
    T, C = probs.shape[1], probs.shape[2]
    h = 0.0
    for config in itertools.product(range(C), repeat=len(batch)):
        p = np.mean([np.prod([probs[i, t, c] for i, c in zip(batch, config)])
                     for t in range(T)])
        h -= p * math.log(p) if p > 0 else 0.0
    return h - sum(acq._entropy(probs[i]).mean() for i in batch)


@pytest.mark.parametrize("C,seed", [(2, 0), (3, 1), (2, 2)])
def test_batchbald_matches_brute_force_greedy(C, seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(C), size=(6, 4))
    idx, gains = acq.batchbald(probs, 3, rng=np.random.default_rng(0))
    batch: list[int] = []
    prev = 0.0
    for k in range(3):
        cands = {n: joint_mi(probs, batch + [n]) for n in range(6) if n not in batch}
        best = max(cands, key=cands.get)
        assert idx[k] == best
        assert gains[k] == pytest.approx(cands[best] - prev, abs=1e-9)
        batch.append(best)
        prev = cands[best]


def test_batchbald_of_one_is_bald_top1(rand_probs):
    idx, gains = acq.batchbald(rand_probs, 1, rng=np.random.default_rng(0))
    assert idx[0] == np.argmax(acq.bald(rand_probs))
    assert gains[0] == pytest.approx(acq.bald(rand_probs).max())


def test_batchbald_sampled_path_close_to_exact():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(2), size=(30, 10))
    exact_idx, exact_gain = acq.batchbald(probs, 8, rng=np.random.default_rng(0),
                                          exact_limit=10**6)
    idx, gain = acq.batchbald(probs, 8, rng=np.random.default_rng(0), exact_limit=8,
                              num_samples=20000)
    assert np.abs(np.cumsum(gain) - np.cumsum(exact_gain)).max() < 0.05
    assert len(set(idx) & set(exact_idx)) >= 6


def test_batchbald_avoids_duplicates():
    # two copies of image a, and an image b slightly less uncertain but informative about a
    # different split of the MC samples: BatchBALD takes one copy of a, then b
    a = np.array([[0.95, 0.05], [0.05, 0.95], [0.95, 0.05], [0.05, 0.95]])
    b = np.array([[0.92, 0.08], [0.92, 0.08], [0.08, 0.92], [0.08, 0.92]])
    probs = np.stack([a, a, b])
    idx, _ = acq.batchbald(probs, 2, rng=np.random.default_rng(0))
    assert sorted(idx.tolist()) in ([0, 2], [1, 2])
    assert acq.top_k(acq.bald(probs), 2).tolist() == [0, 1]  # plain BALD picks both copies


def test_power_sampling():
    scores = np.array([0.1, 5.0, 0.2, 4.0, 0.3, 3.0])
    a = acq.power_sampling(scores, 3, rng=np.random.default_rng(7))
    b = acq.power_sampling(scores, 3, rng=np.random.default_rng(7))
    assert len(set(a.tolist())) == 3 and a.tolist() == b.tolist()
    greedy = acq.power_sampling(scores, 3, rng=np.random.default_rng(7), beta=1000.0)
    assert greedy.tolist() == [1, 3, 5]


def test_k_center_picks_far_points():
    pts = np.array([[0, 0], [0.1, 0], [10, 0], [10, 0.1], [0, 10], [5, 5]], float)
    idx = acq.k_center_greedy(pts, 2, rng=np.random.default_rng(0),
                              labelled_features=np.array([[0.0, 0.0]]))
    assert set(idx.tolist()) == {2, 4} or set(idx.tolist()) == {3, 4}


def test_class_balanced_spreads_budget():
    scores = np.array([9, 8, 7, 6, 1, 0.5])
    pred = np.array([0, 0, 0, 0, 1, 1])
    assert acq.class_balanced(scores, pred, 4, 2).tolist() == [0, 4, 1, 5]


def test_badge_returns_distinct_indices(rand_probs):
    feats = np.random.default_rng(0).normal(size=(50, 4))
    idx = acq.badge(rand_probs, feats, 10, rng=np.random.default_rng(0))
    assert len(set(idx.tolist())) == 10


@pytest.mark.parametrize("name", acq.STRATEGIES)
def test_select_every_strategy(name, rand_probs):
    feats = np.random.default_rng(0).normal(size=(50, 4))
    idx, scores = acq.select(name, rand_probs, 5, rng=np.random.default_rng(0), features=feats)
    assert idx.dtype == np.int64 and scores.dtype == np.float64
    assert idx.shape == scores.shape == (5,)
    assert len(set(idx.tolist())) == 5


def test_select_ranking_errors_and_reproducibility(rand_probs):
    idx, scores = acq.select("bald", rand_probs, 5, rng=np.random.default_rng(0))
    assert idx.tolist() == np.argsort(-acq.bald(rand_probs), kind="stable")[:5].tolist()
    assert (np.diff(scores) <= 0).all()
    r1, _ = acq.select("random", rand_probs, 5, rng=np.random.default_rng(4))
    r2, _ = acq.select("random", rand_probs, 5, rng=np.random.default_rng(4))
    assert r1.tolist() == r2.tolist()
    with pytest.raises(ValueError, match="unknown acquisition strategy 'bold'.*bald"):
        acq.select("bold", rand_probs, 5, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="'coreset' needs"):
        acq.select("coreset", rand_probs, 5, rng=np.random.default_rng(0))
    assert acq.select("bald", rand_probs[:0], 5, rng=np.random.default_rng(0))[0].shape == (0,)
    bal, _ = acq.select("entropy", rand_probs, 6, rng=np.random.default_rng(0), balance=True)
    pred = rand_probs.mean(1).argmax(1)[bal]
    assert np.bincount(pred, minlength=3).tolist() == [2, 2, 2]
