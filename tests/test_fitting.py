"""medal.fitting.class_weights: inverse label frequency by default; inverse population shares
with ``train.class_prior``, which keeps a head's argmax balanced under a selection that depends
on the image only (what uncertainty sampling does to a rare class)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from medal import api
from medal.config import load_config
from medal.fitting import class_weights, loss_weights
from medal.train import _fit_head, _loss_and_weights

from conftest import write_config, write_tiny_data


def test_without_a_prior_every_class_weighs_the_same_in_total():
    y = np.array([0] * 2 + [1] * 8)
    w = class_weights(y, 3)
    assert w.tolist() == pytest.approx([2.5, 0.625, 0.0])  # absent class: 0
    assert float(w[y].sum()) == pytest.approx(len(y))


def test_a_prior_weighs_by_its_inverse_and_equals_the_default_where_labels_follow_it():
    y = np.array([0] * 2 + [1] * 8)
    w = class_weights(y, 2, prior=(0.1, 0.9))
    assert float(w[0] / w[1]) == pytest.approx(9.0)
    assert float(w[y].sum()) == pytest.approx(len(y))
    # labels drawn at random follow the population: the prior changes nothing
    assert class_weights(y, 2, prior=(0.2, 0.8)).tolist() == pytest.approx(
        class_weights(y, 2).tolist()
    )


def _biased_labels(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 1 : 9 population, x | class 0 ~ N(-1, 1), x | class 1 ~ N(+1, 1), so the balanced
    decision threshold is x = 0; labels kept with a probability that depends on x only and
    favours the region left of it, where the rare class is denser (as BALD's picks did):
    ``x [N, 1]``, ``y [N]``."""
    rng = np.random.default_rng(seed)
    n = 40_000
    y = (rng.random(n) < 0.9).astype(np.int64)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    keep = rng.random(n) < 0.3 * np.exp(-((x + 0.5) ** 2))
    return x[keep, None].astype(np.float32), y[keep]


def _threshold(cfg, x: np.ndarray, y: np.ndarray) -> float:
    torch.manual_seed(0)
    head = nn.Linear(1, 2)
    _fit_head(head, torch.from_numpy(x), y, cfg, seed=0, progress=False)
    w = (head.weight[1] - head.weight[0]).item()
    b = (head.bias[1] - head.bias[0]).item()
    return -b / w  # where the two logits are equal


def test_the_prior_undoes_a_selection_that_over_represents_the_rare_class(tmp_path):
    x, y = _biased_labels()
    assert 0.15 < (y == 0).mean() < 0.5  # the picks over-represent the rare class (pool: 0.1)
    cfg = load_config(write_config(tmp_path))
    prior = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, class_prior={"normal": 1, "pneumonia": 9})
    )
    by_labels, by_prior = _threshold(cfg, x, y), _threshold(prior, x, y)
    # inverse label frequency moves the threshold into the rare class's side (it misses more
    # of the rare class); the population's shares put it back at the balanced point
    assert by_labels < -0.25
    assert abs(by_prior) < 0.1


def test_every_training_path_takes_the_prior(tmp_path):
    y = np.array([0] * 2 + [1] * 8)
    cfg = load_config(write_config(tmp_path), {"train.class_prior": {"normal": 1, "pneumonia": 9}})
    expected = class_weights(y, 2, prior=(0.1, 0.9))
    assert loss_weights(y, cfg).tolist() == pytest.approx(expected.tolist())
    loss, _, sample_w = _loss_and_weights(y, cfg, torch.device("cpu"))  # whole network
    assert loss.weight.tolist() == pytest.approx(expected.tolist())
    assert sample_w.tolist() == pytest.approx(expected[y].tolist())  # train.balance = "sampler"
    _, probe_loss = _fit_head(  # the frozen backbone's head
        nn.Linear(3, 2), torch.zeros(10, 3), y, cfg, seed=0, progress=False
    )
    assert probe_loss.weight.tolist() == pytest.approx(expected.tolist())


def test_the_training_report_names_the_prior_beside_the_labels_shares(tmp_path):
    write_tiny_data(tmp_path)  # 4 labelled images per class
    prior = {"normal": 1, "pneumonia": 9}
    cfg = load_config(write_config(tmp_path), {"train.class_prior": prior})
    report = api.train(cfg, progress=False)
    assert (
        "class weights from train.class_prior (normal 10%, pneumonia 90%); the labels are "
        "normal 50%, pneumonia 50%"
    ) in report.notes
