"""medal.query.select: the one function that decides a round's images, case by case, checked
against the acquisition functions it must call with the round's seed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medal import acquisition, distributed
from medal.config import load_config
from medal.query import Scored, select

from conftest import write_config


@pytest.fixture
def cfg(tmp_path):
    return load_config(write_config(tmp_path))


def scored(n: int = 30, T: int = 4, C: int = 2, D: int = 5, **kw) -> Scored:
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(n, T, C))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    feats = rng.normal(size=(n, D)).astype(np.float32)
    ids = np.array([f"img{i:03d}" for i in range(n)])
    return Scored(ids, feats, probs, **kw)


def test_top_k_takes_the_streaming_top_k(cfg):
    top = (np.array([4, 2, 9]), np.array([0.9, 0.8, 0.1]))
    picks = select(cfg, "top-k", scored(top=top), seed=3)
    assert picks.rows.tolist() == [4, 2, 9] and picks.scores.tolist() == [0.9, 0.8, 0.1]
    assert picks.strategy == "bald" and picks.notes == []
    with pytest.raises(ValueError, match="streaming top-k"):
        select(cfg, "top-k", scored(), seed=3)


def test_the_strategy_path_is_acquisition_select_with_the_round_seed(cfg):
    cfg = dataclasses.replace(cfg, query=dataclasses.replace(cfg.query, strategy="margin"))
    s = scored()
    picks = select(cfg, "strategy", s, seed=11)
    idx, scores = acquisition.select(
        "margin", s.probs, cfg.query.budget, rng=np.random.default_rng(11), features=s.features
    )
    assert picks.rows.tolist() == idx.tolist() and np.allclose(picks.scores, scores)
    assert picks.strategy == "margin"


def test_cold_start_spreads_over_the_features_and_says_why(cfg):
    labelled = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    s = scored(labelled_features=labelled)
    picks = select(cfg, "cold-start", s, seed=5, missing=("pneumonia",))
    idx = acquisition.typiclust(
        s.features, cfg.query.budget, rng=np.random.default_rng(5), labelled_features=labelled
    )
    assert picks.rows.tolist() == idx.tolist()
    assert np.allclose(picks.scores, acquisition.bald(s.probs[idx]))
    assert picks.strategy == "bald:cold-start-typiclust"
    assert "no label yet for pneumonia" in picks.notes[0]


def test_zero_label_is_typiclust_without_a_model(cfg):
    s = dataclasses.replace(scored(), probs=None)
    picks = select(cfg, "zero-label", s, seed=2)
    idx = acquisition.typiclust(s.features, cfg.query.budget, rng=np.random.default_rng(2))
    assert picks.rows.tolist() == idx.tolist()
    assert np.allclose(picks.scores, acquisition.typicality(s.features[idx], k=len(idx) - 1))
    assert picks.strategy == "typiclust:zero-label"
    with pytest.raises(ValueError, match="MC-dropout probabilities"):
        select(cfg, "strategy", s, seed=2)


def test_on_rank0_names_rank_0_and_refuses_a_mismatch(monkeypatch):
    assert distributed.on_rank0(object())
    with pytest.raises(RuntimeError, match="rank 0 lacks"):
        distributed.on_rank0(None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not distributed.on_rank0(None)
    with pytest.raises(RuntimeError, match="rank 1 holds"):
        distributed.on_rank0(object())
