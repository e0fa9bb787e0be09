import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from medal.errors import ModelError
from medal.models import create_model
from medal.train import (class_weights, classification_metrics, fit, load_checkpoint,
                         predict_deterministic, save_checkpoint)


def separable(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.3
    x[:, :, 4:12, 4:12] += (y.float() * 2 - 1).view(-1, 1, 1, 1)
    return x, y.numpy()


def test_loss_decreases_and_learns(tiny_config):
    x, y = separable()
    m = create_model("small_cnn", 2, hidden=16)
    r = fit(m, x, y, tiny_config, epochs=5, device=torch.device("cpu"), progress=False)
    assert r.epochs >= 5
    assert r.history[-1]["loss"] < r.history[0]["loss"]
    xv, yv = separable(seed=1)
    p = predict_deterministic(m, xv, torch.device("cpu"))
    assert (p.argmax(1) == yv).mean() >= 0.9


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 50)
    p = rng.dirichlet(np.ones(3), 50)
    m = classification_metrics(y, p, 3)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p.argmax(1)))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p.argmax(1)))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"))
    yb = rng.integers(0, 2, 40)
    pb = rng.dirichlet(np.ones(2), 40)
    assert classification_metrics(yb, pb, 2)["auroc"] == pytest.approx(
        skm.roc_auc_score(yb, pb[:, 1]))
    assert np.isnan(classification_metrics(np.zeros(4, int), pb[:4], 2)["auroc"])


def test_class_weights():
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w.tolist() == pytest.approx([4 / 6, 2.0, 0.0])


def test_checkpoint_round_trip_and_refusals(tiny_config, tmp_path):
    m = create_model("small_cnn", 2, hidden=32)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, m, tiny_config, 3)
    m2 = create_model("small_cnn", 2, hidden=32)
    ck = load_checkpoint(path, m2, tiny_config.classes, "small_cnn", 1)
    assert ck["round"] == 3 and ck["classes"] == ["normal", "pneumonia"]
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ModelError, match="trained for classes"):
        load_checkpoint(path, m2, ("a", "b"), "small_cnn", 1)
    with pytest.raises(ModelError, match="is a small_cnn"):
        load_checkpoint(path, create_model("resnet18", 2), tiny_config.classes, "resnet18", 1)
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt", m2, tiny_config.classes, "small_cnn", 1)
