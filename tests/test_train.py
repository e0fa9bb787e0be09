import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from medal.errors import ModelError
from medal.models import create_model
from medal.metrics import classification_metrics
from medal.fitting import class_weights
from medal.train import fit, load_checkpoint, predict_deterministic, save_checkpoint


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
        skm.roc_auc_score(yb, pb[:, 1])
    )
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


def test_checkpoint_of_other_features_names_the_setting(tiny_config, tmp_path):
    """A project trained before multiscale features became the default keeps its checkpoints
    usable: the error says which model.features they need."""
    last = create_model("small_cnn", 2, hidden=0, features="last")
    path = tmp_path / "ck.pt"
    save_checkpoint(path, last, tiny_config, 1)
    multiscale = create_model("small_cnn", 2, hidden=0, features="auto")
    with pytest.raises(
        ModelError,
        match=r"trained with model.features = 'last'.*"
        r"set model.features = \"last\"",
    ):
        load_checkpoint(path, multiscale, tiny_config.classes, "small_cnn", 1)
    old = torch.load(path, weights_only=True)
    del old["features"]  # as medal wrote checkpoints before model.features existed
    torch.save(old, path)
    load_checkpoint(
        path,
        create_model("small_cnn", 2, hidden=0, features="last"),
        tiny_config.classes,
        "small_cnn",
        1,
    )
    with pytest.raises(ModelError, match="trained with model.features = 'last'"):
        load_checkpoint(path, multiscale, tiny_config.classes, "small_cnn", 1)


def test_per_class_metrics_and_ece():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    m = classification_metrics(y, p, 2, ["normal", "pneumonia"])
    rec = skm.recall_score(y, p.argmax(1), average=None)
    assert m["sensitivity/normal"] == pytest.approx(rec[0])
    assert m["sensitivity/pneumonia"] == pytest.approx(rec[1])
    assert m["specificity/pneumonia"] == pytest.approx(rec[0])  # binary: spec(1) = sens(0)
    assert m["confusion/pneumonia/normal"] == 1 and m["confusion/normal/pneumonia"] == 1
    assert m["loss"] == pytest.approx(skm.log_loss(y, p))
    # ECE by hand, 15 bins: confidences 0.9, 0.6, 0.8, 0.7, 0.6 -> bins
    # {0.9: correct}, {0.6, 0.6: both wrong}, {0.8: correct}, {0.7: correct}
    expected = (abs(1 - 0.9) + 2 * abs(0 - 0.6) + abs(1 - 0.8) + abs(1 - 0.7)) / 5
    assert m["ece"] == pytest.approx(expected)


def test_resume_after_interruption_matches_uninterrupted_run(tiny_config, tmp_path):
    x, y = separable()
    init = create_model("small_cnn", 2, hidden=16).state_dict()

    def fresh():
        m = create_model("small_cnn", 2, hidden=16)
        m.load_state_dict(init)
        return m

    def crash(epoch):
        if epoch == 3:
            raise KeyboardInterrupt

    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(
            fresh(),
            x,
            y,
            tiny_config,
            epochs=6,
            device=torch.device("cpu"),
            progress=False,
            state_path=state,
            on_epoch_end=crash,
            state_every_s=0,
        )
    assert state.is_file()
    resumed = fresh()
    r = fit(
        resumed,
        x,
        y,
        tiny_config,
        epochs=6,
        device=torch.device("cpu"),
        progress=False,
        state_path=state,
        state_every_s=0,
    )
    assert [h["epoch"] for h in r.history] == [1, 2, 3, 4, 5, 6]
    assert not state.exists()
    straight = fresh()
    r2 = fit(straight, x, y, tiny_config, epochs=6, device=torch.device("cpu"), progress=False)
    assert [h["loss"] for h in r.history] == pytest.approx([h["loss"] for h in r2.history])
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_balanced_sampler_and_early_stopping(tiny_config):
    import dataclasses

    x, y = separable(40)
    y = y.copy()
    y[:30] = 0  # imbalanced
    tc = dataclasses.replace(tiny_config.train, balance="sampler", patience=2, min_steps=0)
    cfg = dataclasses.replace(tiny_config, train=tc)
    xv, yv = separable(seed=3)
    r = fit(
        create_model("small_cnn", 2, hidden=16),
        x,
        y,
        cfg,
        epochs=40,
        device=torch.device("cpu"),
        progress=False,
        x_val=xv,
        y_val=yv,
    )
    assert len(r.history) < 40  # stopped early
    assert len(r.history) - r.best_epoch == 2


def test_validate_every_k_epochs(tiny_config):
    import dataclasses

    x, y = separable()
    cfg = dataclasses.replace(
        tiny_config, train=dataclasses.replace(tiny_config.train, validate_every=3, min_steps=0)
    )
    xv, yv = separable(seed=5)
    r = fit(
        create_model("small_cnn", 2, hidden=16),
        x,
        y,
        cfg,
        epochs=7,
        device=torch.device("cpu"),
        progress=False,
        x_val=xv,
        y_val=yv,
    )
    assert [int(h["epoch"]) for h in r.history if "val_auroc" in h] == [3, 6, 7]
    assert r.best_epoch in (3, 6, 7)


def test_an_unreadable_saved_state_is_set_aside_and_training_starts_over(tiny_config, tmp_path):
    x, y = separable()
    state = tmp_path / "round-000.partial.pt"
    state.write_bytes(b"PK\x03\x04 truncated by a full disk")
    r = fit(
        create_model("small_cnn", 2, hidden=16),
        x,
        y,
        tiny_config,
        epochs=2,
        device=torch.device("cpu"),
        progress=False,
        state_path=state,
        state_every_s=0,
    )
    assert r.history[0]["epoch"] == 1 and len(r.history) == r.epochs  # from the start
    assert any("cannot be read" in n and "starts over" in n for n in r.notes)
    aside = list(tmp_path.glob("round-000.partial.pt.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"PK")
    assert not state.exists()  # the finished training removed its own state


def test_a_moved_workspace_loads_its_own_checkpoints(tmp_path, tiny_data, capsys):
    """Checkpoint paths are kept relative to the workspace: a copy queries with its own
    weights even when the original is gone."""
    import shutil
    import sqlite3

    from medal.cli import main

    from conftest import write_config

    cfg_path = write_config(tmp_path)
    assert main(["train", "-c", str(cfg_path), "-q"]) == 0
    db = sqlite3.connect(tmp_path / "ws" / "ledger.sqlite")
    assert db.execute("SELECT checkpoint FROM models").fetchone()[0] == "checkpoints/round-000.pt"
    db.close()
    shutil.move(tmp_path / "ws", tmp_path / "moved")
    capsys.readouterr()
    assert main(["query", "-c", str(cfg_path), "-q", "--set", 'workspace="moved"']) == 0, (
        capsys.readouterr().err
    )
    assert (tmp_path / "moved" / "labelling" / "round-001").is_dir()


def test_probe_trains_a_linear_head_on_fixed_standardised_features(tmp_path, tiny_data):
    """freeze_backbone + hidden = 0: the backbone is untouched, the head's standardisation is
    the labelled features' own, and the fixed full-batch schedule learns a separable task."""
    from medal.config import load_config
    from medal.models import Standardize
    from medal.train import backbone_features

    from conftest import write_config

    cfg = load_config(
        write_config(tmp_path),
        {"train.freeze_backbone": True, "model.hidden": 0, "train.probe_steps": 200},
    )
    x, y = separable(64)
    m = create_model("small_cnn", 2, hidden=0)
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    r = fit(m, x, y, cfg, epochs=1, device=torch.device("cpu"), progress=False)
    assert r.epochs == 1 and len(r.history) == 1
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics included
    assert isinstance(m.head[0], Standardize)
    f = backbone_features(m, x, torch.device("cpu"))
    assert torch.allclose(m.head[0].mean, f.mean(0), atol=1e-5)
    assert torch.allclose(m.head[0].scale, f.std(0, unbiased=False).clamp(min=1e-6), atol=1e-5)
    xv, yv = separable(64, seed=1)
    p = predict_deterministic(m, xv, torch.device("cpu"))
    assert (p.argmax(1) == yv).mean() >= 0.9


def test_pseudo_labels_learn_from_the_pool(tmp_path, tiny_data):
    """semi_supervised = pseudo_label: a second schedule on the confident pool predictions.
    With two labels and a separable pool, self-training moves the head towards the pool's
    structure and it classifies the pool at least as well; without the pool nothing changes."""
    from medal.config import load_config

    from conftest import write_config

    over = {
        "train.freeze_backbone": True,
        "model.hidden": 0,
        "train.probe_steps": 100,
        "train.semi_supervised": "pseudo_label",
        "train.pseudo_threshold": 0.6,
    }
    cfg = load_config(write_config(tmp_path), over)
    x, y = separable(64)
    xl, yl = x[:4], y[:4]
    torch.manual_seed(0)
    plain = create_model("small_cnn", 2, hidden=0)
    semi = create_model("small_cnn", 2, hidden=0)
    semi.load_state_dict(plain.state_dict())
    fit(plain, xl, yl, cfg, epochs=1, device=torch.device("cpu"), progress=False)
    pool = backbone_features_of(semi, x[4:])
    fit(semi, xl, yl, cfg, epochs=1, device=torch.device("cpu"), progress=False, unlabelled=pool)
    assert not torch.equal(plain.head[-1].weight, semi.head[-1].weight)

    def acc(m: torch.nn.Module) -> torch.Tensor:
        return (predict_deterministic(m, x[4:], torch.device("cpu")).argmax(1) == y[4:]).mean()

    assert acc(semi) >= acc(plain) - 0.05
    # without pool features the setting changes nothing: the same head as plain training
    torch.manual_seed(0)
    alone = create_model("small_cnn", 2, hidden=0)
    fit(alone, xl, yl, cfg, epochs=1, device=torch.device("cpu"), progress=False)
    assert torch.equal(alone.head[-1].weight, plain.head[-1].weight)


def backbone_features_of(model, x):
    from medal.train import backbone_features

    return backbone_features(model, x, torch.device("cpu"))
