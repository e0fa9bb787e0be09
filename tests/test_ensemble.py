"""query.posterior = "ensemble": K extra heads fitted to bootstrap resamples of the labelled
images' frozen-backbone features stand in for the T dropout samples (issue 25, Run E1)."""

import numpy as np
import pytest
import torch

from medal.cli import main
from medal.config import load_config
from medal.errors import ConfigError, ModelError
from medal.models import create_model, set_mc_mode
from medal.posterior import (
    bootstrap_rows,
    member_samples,
    posterior_samples,
    samples_per_image,
)
from medal.train import build_model, fit, load_checkpoint, predict_deterministic, save_checkpoint
from medal.uncertainty import head_samples

from conftest import write_config
from test_train import separable

CPU = torch.device("cpu")
ENSEMBLE = {
    "train.freeze_backbone": True,
    "model.hidden": 0,
    "train.probe_steps": 100,
    "train.validation_fraction": 0.0,
    "query.posterior": "ensemble",
    "query.ensemble_size": 3,
}


def _cfg(tmp_path, **over):
    return load_config(write_config(tmp_path), {**ENSEMBLE, **over})


def test_the_default_posterior_is_todays_dropout_samples(tmp_path):
    """mc_dropout (the default): no extra heads in the model or its weights, T = mc_samples,
    and the query's samples are head_samples' own for the same seed."""
    cfg = load_config(write_config(tmp_path), {"train.freeze_backbone": True, "model.hidden": 0})
    assert cfg.query.posterior == "mc_dropout" and cfg.query.ensemble_size == 5
    torch.manual_seed(0)
    model = build_model(cfg)
    assert len(model.members) == 0
    assert not [k for k in model.state_dict() if k.startswith("members")]
    assert samples_per_image(cfg.query) == cfg.query.mc_samples == 8
    set_mc_mode(model)
    f = torch.randn(5, model.feature_dim)
    torch.manual_seed(7)
    got = posterior_samples(model, f, cfg.query)
    torch.manual_seed(7)
    want = head_samples(model, f, 8)
    assert got.shape == (5, 8, 2) and torch.equal(got, want)
    assert not torch.equal(got[:, 0], got[:, 1])  # dropout samples, not one prediction


def test_bootstrap_rows_are_class_stratified_resamples():
    y = np.array([0] * 17 + [1] * 3)
    rows = bootstrap_rows(y, 4)
    assert rows.shape == (20,)
    assert np.bincount(y[rows]).tolist() == [17, 3]  # every class, as often as labelled
    assert len(np.unique(rows)) < 20  # drawn with replacement
    assert np.array_equal(rows, bootstrap_rows(y, 4))
    assert not np.array_equal(rows, bootstrap_rows(y, 5))
    drawn = np.concatenate([bootstrap_rows(y, s) for s in range(200)])
    assert set(drawn.tolist()) == set(range(20))  # each labelled image can be drawn


def test_members_are_fitted_heads_that_differ_and_leave_the_main_head_alone(tmp_path):
    """Each member alone classifies held-out separable data (chance is 0.5), they differ from
    each other, their samples are [B, K, C] with dropout off, and the main head is the one a
    training without members gives."""
    cfg = _cfg(tmp_path)
    x, y = separable(64)
    torch.manual_seed(0)
    model = create_model("small_cnn", 2, hidden=0, members=3)
    torch.manual_seed(0)
    plain = create_model("small_cnn", 2, hidden=0)
    fit(model, x, y, cfg, epochs=1, device=CPU, progress=False)
    dropout_cfg = _cfg(tmp_path, **{"query.posterior": "mc_dropout"})
    fit(plain, x, y, dropout_cfg, epochs=1, device=CPU, progress=False)
    for a, b in zip(model.head.state_dict().values(), plain.head.state_dict().values()):
        assert torch.equal(a, b)
    xv, yv = separable(64, seed=1)
    weights = []
    for member in model.members:
        p = predict_deterministic(torch.nn.Sequential(model.backbone, member), xv, CPU)
        assert (p.argmax(1) == yv).mean() >= 0.9
        weights.append(member[-1].weight.detach())
    for i in range(3):
        for j in range(i):
            assert not torch.allclose(weights[i], weights[j], atol=1e-3)
    set_mc_mode(model)  # dropout on, as the query leaves it: the members still sample none
    f = model.features(xv).detach()
    s = member_samples(model, f)
    assert s.shape == (64, 3, 2)
    assert torch.allclose(s.sum(-1), torch.ones(64, 3))
    assert torch.equal(s, member_samples(model, f))
    assert torch.equal(s, posterior_samples(model, f, cfg.query))
    for k, member in enumerate(model.members):
        assert member[1].training  # its dropout layer's mode is given back
        member.eval()
        assert torch.allclose(s[:, k], member(f).softmax(-1))
    assert float(s.var(1).sum(-1).mean()) > 0  # the members disagree somewhere


def test_checkpoints_keep_the_members_and_say_when_they_do_not_fit(tmp_path):
    cfg = _cfg(tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert len(model.members) == 3
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model, cfg, 1)
    again = build_model(cfg)
    load_checkpoint(path, again, cfg.classes, "small_cnn", 1)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    # switching back to MC dropout: the members are not needed
    plain = create_model("small_cnn", 2, hidden=0, features="auto")
    load_checkpoint(path, plain, cfg.classes, "small_cnn", 1)
    assert torch.equal(plain.head[-1].weight, model.head[-1].weight)
    # a model asking for another number of heads: a query is refused, a warm start refits
    five = create_model("small_cnn", 2, hidden=0, features="auto", members=5)
    with pytest.raises(ModelError, match="holds 3 ensemble heads.*asks for 5.*medal train"):
        load_checkpoint(path, five, cfg.classes, "small_cnn", 1)
    own = [m[-1].weight.clone() for m in five.members]
    load_checkpoint(path, five, cfg.classes, "small_cnn", 1, fresh_members=True)
    assert torch.equal(five.head[-1].weight, model.head[-1].weight)
    assert all(torch.equal(m[-1].weight, w) for m, w in zip(five.members, own))


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"query.posterior": "bayes"}, "'query.posterior' must be one of mc_dropout, ensemble"),
        ({"query.ensemble_size": 1}, "'query.ensemble_size' must be >= 2, got 1"),
        ({"train.freeze_backbone": False}, "'query.posterior' must be .*train.freeze_backbone"),
        (
            {"model.backbone_dropout": 0.2, "model.features": "last"},
            "'query.posterior' must be .*full-network sampling",
        ),
        ({"query.sampling": "full", "model.backbone_dropout": 0.2}, "full-network sampling"),
    ],
)
def test_config_errors_name_the_keys(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, **over)


def test_query_after_train_scores_with_the_checkpoints_members(tmp_path, tiny_data):
    """medal train then medal query: the checkpoint holds the K heads, and the stored scores
    are their softmax outputs [N, K, C] on the pool's cached features."""
    from medal.features import FeatureStore
    from medal.inputs import model_from

    cfg_path = write_config(tmp_path)
    c = ["-c", str(cfg_path), "-q"]
    for pair in (
        "train.freeze_backbone=true",
        "model.hidden=0",
        "train.probe_steps=100",
        "train.validation_fraction=0.0",
        'query.posterior="ensemble"',
        "query.ensemble_size=3",
    ):
        c += ["--set", pair]
    assert main(["train", *c]) == 0
    assert main(["query", *c]) == 0
    ws = tmp_path / "ws"
    (ck,) = (ws / "checkpoints").glob("*.pt")
    state = torch.load(ck, weights_only=True)["state_dict"]
    assert {k.split(".")[1] for k in state if k.startswith("members.")} == {"0", "1", "2"}
    (scores,) = (ws / "scores").iterdir()
    probs = np.load(scores / "probs.npy")
    ids = [str(i) for i in np.load(scores / "ids.npy")]
    assert probs.shape == (40, 3, 2)
    cfg = load_config(cfg_path, ENSEMBLE)
    model = model_from(cfg, ck)
    (cache,) = [d for d in (ws / "cache" / "features").iterdir() if d.is_dir()]
    feats, found = FeatureStore(cache).lookup(ids, model.feature_dim)
    assert found.all()
    want = member_samples(model, torch.from_numpy(feats)).numpy()
    kept = np.load(scores / "kept.npy")
    assert np.allclose(probs[kept], want, atol=2e-3)  # float16 on disk
    assert (ws / "labelling" / "round-001").is_dir()
