"""train.head_choice: the frozen backbone's head chosen between linear and a hidden layer by
cross-validation on the labelled set (issue 25, Run H1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medal.cli import main
from medal.config import head_choice_on, load_config
from medal.errors import ConfigError
from medal.headchoice import choose_head
from medal.inputs import model_from, start_model
from medal.models import Standardize, set_mc_mode
from medal.posterior import posterior_samples
from medal.train import _choose_head, _fit_head, _fit_scorer, build_model, fit, save_checkpoint
from medal.train import predict_deterministic
from medal.uncertainty import head_samples, mc_predict_tensors

from conftest import write_config
from test_train import separable

CPU = torch.device("cpu")
PROBE = {
    "train.freeze_backbone": True,
    "model.hidden": 0,
    "train.probe_steps": 60,
    "train.validation_fraction": 0.0,
    "train.head_choice": "cv",
    "train.head_choice_min_labels": 20,
    "train.head_choice_hidden": 32,
}


def _cfg(tmp_path, **over):
    return load_config(write_config(tmp_path), {**PROBE, **over})


def xor(n: int = 120, seed: int = 0, dim: int = 8) -> tuple[torch.Tensor, np.ndarray]:
    """Features ``[n, dim]`` whose class is the XOR of the signs of the first two: no linear
    head can rank them (AUROC about 0.5), a hidden layer can."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, dim, generator=g)
    y = ((f[:, 0] > 0) ^ (f[:, 1] > 0)).long().numpy()
    f[:, :2] *= 3
    return f, y


def linear_task(n: int = 120, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Features ``[n, 8]``, class by the sign of the first, plus label noise."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, 8, generator=g)
    y = (f[:, 0] + 0.8 * torch.randn(n, generator=g) > 0).long().numpy()
    return f, y


def _fitter(cfg, seed=0):
    return lambda head, f, y: _fit_head(head, f, y, cfg, seed, progress=False)


def test_a_hidden_layer_is_chosen_where_only_it_can_rank(tmp_path):
    cfg = _cfg(tmp_path, **{"train.probe_steps": 300})
    f, y = xor()
    c = choose_head(f, y, cfg, 0, _fitter(cfg))
    assert c is not None and c.folds == 5
    assert c.scores[0] < 0.6 and c.scores[32] > 0.8, c.scores
    assert c.hidden == 32
    assert "hidden layer of 32, by 5-fold cross-validation" in c.note()
    again = choose_head(f, y, cfg, 0, _fitter(cfg))
    assert again == c  # seeded: the same folds, heads and scores


def test_the_choice_follows_the_scores_and_ties_keep_linear(tmp_path):
    cfg = _cfg(tmp_path)
    f, y = linear_task()
    c = choose_head(f, y, cfg, 3, _fitter(cfg, 3))
    assert c is not None and c.scores[0] > 0.75
    assert c.hidden == (32 if c.scores[32] > c.scores[0] else 0)
    # equal scores (both heads predict uniform probabilities): the linear head
    c1 = choose_head(f, y, cfg, 3, _uniform)
    assert c1 is not None and c1.scores == {0: 0.5, 32: 0.5} and c1.hidden == 0


def _uniform(head, _f, _y):
    """A "training" that leaves every head predicting the same probability for each class."""
    with torch.no_grad():
        head[-1].weight.zero_()
        head[-1].bias.zero_()


@pytest.mark.parametrize(
    "over, n, why",
    [
        ({"train.head_choice": "off"}, 120, "off"),
        ({}, 19, "fewer labels than head_choice_min_labels"),
    ],
)
def test_no_choice_where_it_does_not_apply(tmp_path, over, n, why):
    cfg = _cfg(tmp_path, **over)
    f, y = xor()
    assert choose_head(f[:n], y[:n], cfg, 0, _fitter(cfg)) is None, why


def test_no_choice_while_a_class_has_fewer_than_two_labels(tmp_path):
    cfg = _cfg(tmp_path)
    f, y = xor()
    keep = np.r_[np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:1]]
    assert choose_head(f[keep], y[keep], cfg, 0, _fitter(cfg)) is None
    keep = np.r_[np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:3]]
    c = choose_head(f[keep], y[keep], cfg, 0, _fitter(cfg))
    assert c is not None and c.folds == 3  # the smallest class's count


def test_the_choice_waits_until_the_labels_cover_the_share_asked_of_the_images(tmp_path):
    cfg = _cfg(tmp_path, **{"train.probe_steps": 300, "train.head_choice_min_coverage": 0.5})
    f, y = xor()  # 120 labels
    c = choose_head(f, y, cfg, 0, _fitter(cfg), pool_size=121)  # 49.8 % of 241
    assert c is not None and (c.hidden, c.folds, c.scores) == (0, 0, {})
    assert c.note() == (
        "head: linear, no choice yet: the labels cover 50% of the images, "
        "train.head_choice_min_coverage is 50%"
    )
    made = choose_head(f, y, cfg, 0, _fitter(cfg), pool_size=120)  # exactly half
    assert made is not None and made.folds == 5 and made.hidden == 32
    assert choose_head(f, y, cfg, 0, _fitter(cfg)) == made  # no pool: every image labelled
    # 0 asks nothing of the pool
    plain = _cfg(tmp_path, **{"train.probe_steps": 300, "train.head_choice_min_coverage": 0.0})
    assert choose_head(f, y, plain, 0, _fitter(plain), pool_size=10**6) == made
    # a model whose previous round chose the hidden layer goes back to the linear head
    model = build_model(cfg)
    g, yg = xor(dim=model.feature_dim)
    assert _choose_head(model, g, yg, cfg, 0).hidden == 32 and model.head_hidden == 32
    assert _choose_head(model, g, yg, cfg, 0, pool_size=500).folds == 0
    assert model.head_hidden == 0


@pytest.mark.parametrize("coverage, waits", [(0.5, True), (0.15, False)])
def test_training_counts_the_pool_for_the_coverage(tmp_path, tiny_data, coverage, waits):
    """medal's training passes the unlabelled pool's size: 8 labels and 40 pool images
    cover 17 % of the images."""
    from medal import api

    over = {**PROBE, "train.head_choice_min_labels": 8, "train.head_choice_min_coverage": coverage}
    report = api.train(load_config(write_config(tmp_path), over), progress=False)
    notes = " | ".join(report.notes)
    assert ("the labels cover 17% of the images" in notes) is waits, notes
    assert ("cross-validation" in notes) is not waits, notes


def test_the_model_takes_the_chosen_head_and_its_checkpoint_keeps_it(tmp_path):
    cfg = _cfg(tmp_path, **{"train.probe_steps": 300})
    model = build_model(cfg)
    assert model.head_hidden == 0
    f, y = xor(dim=model.feature_dim)
    f[:, 2:] *= 0.1  # the rest are weak noise
    c = _choose_head(model, f, y, cfg, 0)
    assert c is not None and c.hidden == 32 and model.head_hidden == 32
    _fit_head(model.head, f, y, cfg, 0, progress=False)
    path = tmp_path / "round-000.pt"
    save_checkpoint(path, model, cfg, 0)
    assert torch.load(path, weights_only=True)["head_hidden"] == 32
    plain = _cfg(tmp_path, **{"train.head_choice": "off"})  # whatever the config says now
    loaded = model_from(plain, path)
    assert loaded.head_hidden == 32
    np.testing.assert_allclose(
        predict_deterministic(loaded.head, f, CPU), predict_deterministic(model.head, f, CPU)
    )
    warm = start_model(cfg, path)  # the next round starts from the chosen head
    assert warm.head_hidden == 32
    # below the label count the configured (linear) head comes back, fresh
    assert _choose_head(warm, f[:10], y[:10], cfg, 0) is None and warm.head_hidden == 0


def test_fit_chooses_on_image_features_and_says_so(tmp_path):
    cfg = _cfg(tmp_path, **{"train.head_choice_min_labels": 32})
    x, y = separable(32)
    model = build_model(cfg)
    r = fit(model, x, y, cfg, epochs=1, device=CPU, progress=False)
    (note,) = [n for n in r.notes if "cross-validation" in n]
    assert "5-fold" in note and "out-of-fold AUROC linear" in note
    assert model.head_hidden in (0, 32)
    assert ("hidden layer of 32" in note) is (model.head_hidden == 32)
    few = fit(build_model(cfg), x[:31], y[:31], cfg, epochs=1, device=CPU, progress=False)
    assert not any("cross-validation" in n for n in few.notes)


@pytest.mark.parametrize(
    "over, hint",
    [
        ({"train.head_choice": "every"}, "one of off, cv, auto"),
        ({"model.hidden": 64}, "model.hidden = 0"),
        ({"train.freeze_backbone": False}, "train.freeze_backbone = true"),
        ({"train.head_choice_min_labels": 1}, ">= 2"),
        ({"train.head_choice_hidden": 0}, ">= 1"),
        ({"train.finetune": "auto"}, "train.finetune"),
        ({"query.head_choice_samples": "both"}, "one of linear, chosen"),
        ({"train.head_choice_min_coverage": 1.5}, "in [0, 1]"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_key(tmp_path, over, hint):
    """``"cv"`` where it cannot apply is refused (``_cfg`` sets ``"cv"``)."""
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, **over)
    assert "head_choice" in str(e.value) and hint in str(e.value)
    assert "\n" not in str(e.value)


def test_train_then_query_with_the_choice(tmp_path, tiny_data):
    """medal train then medal query with train.head_choice = "cv" on the tiny set (8 labels,
    4 per class; the choice from 8 labels on): the round's checkpoint records the head the
    choice gave, and the query scores with it."""
    cfg_path = write_config(tmp_path)
    c = ["-c", str(cfg_path), "-q"]
    for k, v in {**PROBE, "train.head_choice_min_labels": 8}.items():
        c += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else repr(v)}"]
    c = [a.replace("'", '"') for a in c]
    assert main(["train", *c]) == 0
    (ck,) = (tmp_path / "ws" / "checkpoints").glob("*.pt")
    assert torch.load(ck, weights_only=True)["head_hidden"] in (0, 32)
    assert main(["query", *c]) == 0
    assert (tmp_path / "ws" / "labelling" / "round-001").is_dir()


def _hidden_chosen(tmp_path, **over):
    """A model whose choice on XOR features gave the hidden layer, its head trained, and the
    linear head it replaced (``was``)."""
    cfg = _cfg(tmp_path, **{"train.probe_steps": 300, **over})
    model = build_model(cfg)
    was = model.head
    f, y = xor(dim=model.feature_dim)
    f[:, 2:] *= 0.1
    assert _choose_head(model, f, y, cfg, 0).hidden == 32
    _fit_head(model.head, f, y, cfg, 0, progress=False)
    return cfg, model, was, f, y


def test_a_linear_scorer_is_trained_beside_a_chosen_hidden_layer(tmp_path):
    cfg, model, was, f, y = _hidden_chosen(tmp_path)
    before = was[-1].weight.clone()
    _fit_scorer(model, was, f, y, cfg, 0)
    assert model.scorer is was  # it went on from the linear head the choice replaced
    assert isinstance(model.scorer[0], Standardize)
    assert not torch.equal(before, model.scorer[-1].weight)  # trained
    # "chosen" (Run H1): no scorer; the chosen head's own samples are scored
    cfg2, model2, was2, f2, y2 = _hidden_chosen(tmp_path, **{"query.head_choice_samples": "chosen"})
    _fit_scorer(model2, was2, f2, y2, cfg2, 0)
    assert model2.scorer is None


def test_the_query_samples_the_scorer_and_metrics_the_chosen_head(tmp_path):
    cfg, model, was, f, y = _hidden_chosen(tmp_path)
    _fit_scorer(model, was, f, y, cfg, 0)
    set_mc_mode(model)
    torch.manual_seed(7)
    scored = posterior_samples(model, f[:16], cfg.query)
    torch.manual_seed(7)
    own = head_samples(model, f[:16], cfg.query.mc_samples, model.scorer)
    torch.manual_seed(7)
    chosen = head_samples(model, f[:16], cfg.query.mc_samples)
    assert torch.equal(scored, own)
    assert not torch.allclose(scored, chosen)
    # metrics and predictions (mc_predict_tensors) are the chosen head's: the scorer is unused
    x, _ = separable(16)
    with_scorer, _ = mc_predict_tensors(model, x, 6, device=CPU, batch_size=8, seed=5)
    scorer, model.scorer = model.scorer, None
    without, _ = mc_predict_tensors(model, x, 6, device=CPU, batch_size=8, seed=5)
    np.testing.assert_array_equal(with_scorer, without)
    model.scorer = scorer


def test_the_scorer_is_saved_loaded_and_warm_started(tmp_path):
    cfg, model, was, f, y = _hidden_chosen(tmp_path)
    _fit_scorer(model, was, f, y, cfg, 0)
    path = tmp_path / "round-000.pt"
    save_checkpoint(path, model, cfg, 0)
    assert any(k.startswith("scorer.") for k in torch.load(path, weights_only=True)["state_dict"])
    loaded = model_from(cfg, path)
    assert loaded.scorer is not None and loaded.head_hidden == 32
    for k, v in model.scorer.state_dict().items():
        assert torch.equal(v, loaded.scorer.state_dict()[k])
    warm = start_model(cfg, path)
    kept = warm.scorer
    _fit_scorer(warm, warm.head, f, y, cfg, 1)  # hidden again: on from the previous scorer
    assert warm.scorer is kept
    # the linear head chosen again (below the label count here): it goes on from the scorer,
    # as today's linear head goes on from the previous round's; then there is no scorer
    assert _choose_head(warm, f[:10], y[:10], cfg, 1) is None
    assert warm.head is kept and warm.head_hidden == 0
    _fit_scorer(warm, warm.head, f, y, cfg, 1)
    assert warm.scorer is None
    save_checkpoint(path, warm, cfg, 1)
    assert model_from(cfg, path).scorer is None


@pytest.mark.parametrize(
    "over, on",
    [
        ({}, True),
        ({"model.hidden": 64}, False),
        ({"train.freeze_backbone": False, "model.hidden": 128}, False),
        ({"train.finetune": "auto"}, False),
    ],
)
def test_auto_chooses_where_the_choice_applies_and_is_off_elsewhere(tmp_path, over, on):
    """``"auto"`` is ``"cv"`` for a frozen backbone's linear probe without LP-FT; elsewhere it
    is off instead of refused (``"cv"`` there is refused, above)."""
    cfg = _cfg(tmp_path, **{"train.head_choice": "auto", **over})
    assert head_choice_on(cfg) is on
    f, y = xor()
    made = choose_head(f, y, cfg, 0, _fitter(cfg))
    assert (made is not None) is on
    if on:
        cv = _cfg(tmp_path, **over)
        assert made == choose_head(f, y, cv, 0, _fitter(cv))  # the same choice as "cv"


def test_by_default_the_choice_is_made_once_the_labels_cover_half_the_images(tmp_path):
    """Run X2's defaults: "auto" (the choice for the frozen linear head) at half the images."""
    frozen = {"train.freeze_backbone": True, "model.hidden": 0, "train.validation_fraction": 0.0}
    cfg = load_config(write_config(tmp_path), {**frozen, "train.probe_steps": 300})
    assert not head_choice_on(load_config(write_config(tmp_path)))  # whole network: off
    t = cfg.train
    assert (t.head_choice, t.head_choice_min_coverage, head_choice_on(cfg)) == ("auto", 0.5, True)
    f, y = xor()  # 120 labels
    assert choose_head(f, y, cfg, 0, _fitter(cfg), pool_size=121).folds == 0  # waits
    assert choose_head(f, y, cfg, 0, _fitter(cfg), pool_size=120).folds == 5
