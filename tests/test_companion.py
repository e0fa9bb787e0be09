"""train.companion: a whole network trained beside the frozen head, their probabilities
averaged in predictions, metrics and the query's MC samples (issue 25, Runs F4, F5, M1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medal.cli import main
from medal.companion import COMPANION_HIDDEN, companion_decision, holdout_split
from medal.config import companion_on, load_config
from medal.errors import ConfigError, ModelError
from medal.inputs import model_from, start_model
from medal.query import _score_frozen
from medal.sources import sync
from medal.train import build_model, fit, load_checkpoint, save_checkpoint
from medal.uncertainty import mc_predict_tensors
from medal.workspace import Workspace

from conftest import write_config
from test_train import separable

CPU = torch.device("cpu")
PROBE = {
    "train.freeze_backbone": True,
    "model.hidden": 0,
    "train.probe_steps": 50,
    "train.validation_fraction": 0.0,
}
SETS = [f"{k}={v if not isinstance(v, bool) else str(v).lower()}" for k, v in PROBE.items()]


def _cfg(tmp_path, **over):
    return load_config(write_config(tmp_path), {**PROBE, **over})


def _certain(comp: nn.Module, cls: int = 0) -> None:
    """Make a companion predict class ``cls`` with probability ~1 on every image."""
    last = comp.head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-30.0)
        last.bias[cls] = 30.0


@pytest.mark.parametrize("n, expected", [(9, False), (10, True), (25, True)])
def test_auto_joins_exactly_at_the_label_count(tmp_path, n, expected):
    cfg = _cfg(tmp_path, **{"train.companion": "auto", "train.companion_min_labels": 10})
    go, why = companion_decision(cfg, n)
    assert go is expected
    assert ("once 10 training labels are given; now 9" in why) is (not expected), why


@pytest.mark.parametrize(
    "n, pool, expected",
    [(100, 101, False), (100, 100, True), (100, 0, True), (99, 0, False)],
)
def test_auto_waits_until_the_labels_cover_the_share_asked_of_the_images(
    tmp_path, n, pool, expected
):
    cfg = _cfg(
        tmp_path,
        **{
            "train.companion": "auto",
            "train.companion_min_labels": 100,
            "train.companion_min_coverage": 0.5,
        },
    )
    go, why = companion_decision(cfg, n, pool)
    assert go is expected, why
    if n == 100 and not expected:
        assert why == (
            'frozen head alone (train.companion = "auto"): the labels cover 50% of the images, '
            "train.companion_min_coverage is 50%"
        )
    if expected:
        assert f"covering {100 * n // (n + pool)}% of the images" in why, why
    # 0 asks nothing of the pool
    plain = _cfg(
        tmp_path,
        **{
            "train.companion": "auto",
            "train.companion_min_labels": 100,
            "train.companion_min_coverage": 0.0,
        },
    )
    assert companion_decision(plain, 100, 10**6)[0] is True


@pytest.mark.parametrize("coverage, joins", [(0.5, False), (0.15, True)])
def test_training_counts_the_pool_for_the_companion(tmp_path, tiny_data, coverage, joins):
    """medal's training passes the unlabelled pool's size: 8 labels and 40 pool images
    cover 17 % of the images."""
    from medal import api

    over = {
        **PROBE,
        "train.companion": "auto",
        "train.companion_min_labels": 8,
        "train.companion_min_coverage": coverage,
        "train.epochs": 1,
    }
    report = api.train(load_config(write_config(tmp_path), over), progress=False)
    notes = " | ".join(report.notes)
    assert ("the labels cover 17% of the images" in notes) is not joins, notes
    assert ("companion trained (8 training labels, covering 17% of the images" in notes) is joins


@pytest.mark.parametrize(
    "over",
    [
        {"train.freeze_backbone": False, "model.hidden": 128},
        {"model.backbone_dropout": 0.1, "model.features": "last"},
    ],
)
def test_auto_is_off_where_the_companion_cannot_apply(tmp_path, over):
    """``"auto"`` trains no companion beside a whole network or full-network sampling, where
    ``"always"`` is refused (above)."""
    cfg = _cfg(tmp_path, **{"train.companion": "auto", "train.companion_min_labels": 1, **over})
    assert not companion_on(cfg)
    assert companion_decision(cfg, 10_000) == (False, "")
    on = _cfg(tmp_path, **{"train.companion": "auto", "train.companion_min_labels": 1})
    assert companion_on(on) and companion_decision(on, 10_000)[0]


def test_off_and_always(tmp_path):
    assert companion_decision(_cfg(tmp_path, **{"train.companion": "off"}), 10_000) == (False, "")
    go, why = companion_decision(_cfg(tmp_path, **{"train.companion": "always"}), 2)
    assert go and "always" in why


def test_holdout_is_stratified_disjoint_and_seeded():
    y = np.array([0] * 30 + [1] * 10)
    tr, va = holdout_split(y, 0.2, seed=3)
    assert sorted([*tr, *va]) == list(range(40)) and len(va) == 8
    assert np.bincount(y[va]).tolist() == [6, 2]  # the classes' shares kept
    again = holdout_split(y, 0.2, seed=3)
    assert np.array_equal(again[1], va)
    assert not np.array_equal(holdout_split(y, 0.2, seed=4)[1], va)
    tr, va = holdout_split(np.array([0, 0, 0, 1]), 0.2, seed=0)  # too few to stratify
    assert len(va) == 1 and len(tr) == 3


@pytest.mark.parametrize(
    "over, key, hint",
    [
        ({"train.companion": "sometimes"}, "train.companion", "off, auto, always"),
        ({"train.companion_min_labels": 0}, "train.companion_min_labels", ">= 1"),
        ({"train.companion_holdout": 1.0}, "train.companion_holdout", "(0, 1)"),
        ({"train.companion_min_coverage": 1.5}, "train.companion_min_coverage", "in [0, 1]"),
        (
            {"train.companion": "always", "train.freeze_backbone": False},
            "train.companion",
            "freeze_backbone",
        ),
        ({"query.companion_samples": "both"}, "query.companion_samples", "average, mixture, head"),
        (
            {"train.companion": "always", "model.backbone_dropout": 0.1, "model.features": "last"},
            "train.companion",
            "full-network sampling",
        ),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_key(tmp_path, over, key, hint):
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path), {**PROBE, **over})
    assert key in str(e.value) and hint in str(e.value) and "\n" not in str(e.value)


def test_fit_trains_a_whole_network_beside_the_head_once_the_count_is_met(tmp_path):
    cfg = _cfg(tmp_path, **{"train.companion": "auto", "train.companion_min_labels": 20})
    x, y = separable(32)
    torch.manual_seed(0)
    model = build_model(cfg)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    few = fit(model, x[:19], y[:19], cfg, epochs=2, device=CPU, progress=False)
    assert model.companion is None
    assert any("once 20 training labels are given; now 19" in n for n in few.notes), few.notes
    r = fit(model, x, y, cfg, epochs=2, device=CPU, progress=False)
    comp = model.companion
    assert comp is not None and comp.head[-1].in_features == COMPANION_HIDDEN
    assert any("companion trained" in n and "26 images, 6 held out" in n for n in r.notes)
    assert not torch.equal(head_before["2.weight"], model.head.state_dict()["2.weight"])
    # the backbone stays the frozen one; the companion has a backbone of its own
    assert all(p is not q for p in comp.parameters() for q in model.backbone.parameters())
    xv, yv = separable(32, seed=1)
    comp.eval()
    with torch.no_grad():
        acc = (comp(xv).argmax(1).numpy() == yv).mean()
    assert acc > 0.8  # it learned the task on its own


def test_predictions_average_the_pair_sample_by_sample(tmp_path):
    """mc_predict_tensors (metrics, labelled features): with a companion that is certain of
    class 0, each sample is the head's own sample averaged with [1, 0]."""
    cfg = _cfg(tmp_path, **{"train.companion": "always"})
    x, y = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(0)), np.arange(32) % 2
    model = build_model(cfg)  # noise: the head is unsure, its samples differ
    fit(model, x, y, cfg, epochs=2, device=CPU, progress=False)
    _certain(model.companion)
    mixed, _ = mc_predict_tensors(model, x, 6, device=CPU, batch_size=64, seed=5)
    model.companion = None
    alone, _ = mc_predict_tensors(model, x, 6, device=CPU, batch_size=64, seed=5)
    assert mixed.shape == alone.shape == (32, 6, 2)
    np.testing.assert_allclose(mixed, (alone + np.array([1.0, 0.0])) / 2, atol=1e-6)
    assert alone.std(1).max() > 1e-4  # the head's samples differ


def test_checkpoints_keep_the_companion_and_a_warm_start_drops_it(tmp_path):
    cfg = _cfg(tmp_path, **{"train.companion": "always"})
    x, y = separable(32)
    model = build_model(cfg)
    fit(model, x, y, cfg, epochs=2, device=CPU, progress=False)
    path = tmp_path / "round-000.pt"
    save_checkpoint(path, model, cfg, 0)
    ck = torch.load(path, weights_only=True)
    assert ck["companion"]["hidden"] == COMPANION_HIDDEN
    assert any(k.startswith("companion.") for k in ck["state_dict"])
    loaded = model_from(_cfg(tmp_path), path)  # whatever the config says now: the round's pair
    assert loaded.companion is not None
    for k, v in model.companion.state_dict().items():
        assert torch.equal(v, loaded.companion.state_dict()[k])
    warm = start_model(cfg, path)  # the next round trains its companion anew
    assert warm.companion is None
    assert torch.equal(warm.head[-1].weight, model.head[-1].weight)
    for damage in ({"companion": {"hidden": 128}}, {"companion": None}):
        # a shape without its keys, weights without their shape: a damaged file, said so
        torch.save(
            {**ck, **damage}
            if damage["companion"]
            else {k: v for k, v in ck.items() if k != "companion"},
            path,
        )
        with pytest.raises(ModelError, match="companion's weights and shape"):
            load_checkpoint(path, build_model(cfg), cfg.classes, cfg.model.name, cfg.model.channels)


def test_train_then_query_scores_the_pair(tmp_path, tiny_data):
    """medal train then medal query with train.companion = "always": the round's checkpoint
    holds the companion, the query exports a round, and the frozen scoring's samples are the
    head's averaged with the companion's (checked with a companion certain of class 0)."""
    cfg_path = write_config(tmp_path)
    c = ["-c", str(cfg_path), "-q"]
    for pair in [*SETS, 'train.companion="always"']:
        c += ["--set", pair]
    assert main(["train", *c]) == 0
    assert main(["query", *c]) == 0
    ws_root = tmp_path / "ws"
    assert (ws_root / "labelling" / "round-001").is_dir()
    (ck,) = (ws_root / "checkpoints").glob("*.pt")
    cfg = load_config(cfg_path, {**PROBE, "train.companion": "always"})
    model = model_from(cfg, ck)
    _certain(model.companion)

    def scores(m):
        out = {}  # uses cfg as it is when called

        def sink(rows, probs, _feats):
            for r, p in zip(rows, probs):
                out[int(r)] = p

        with Workspace(cfg) as ws:
            items = sync(ws).pool
            skipped = _score_frozen(ws, cfg, m, items, CPU, 11, False, sink=sink)
        assert not skipped
        return out

    mixed = scores(model)
    comp = model.companion
    model.companion = None
    alone = scores(model)
    assert len(mixed) == len(alone) > 0
    for r, p in alone.items():
        np.testing.assert_allclose(mixed[r], (p + np.array([1.0, 0.0])) / 2, atol=1e-6)
    # query.companion_samples = "mixture": the head's T samples, then the companion's T
    cfg = load_config(cfg_path, {**PROBE, "query.companion_samples": "mixture"})
    model.companion = comp
    both = scores(model)
    for r, p in alone.items():
        assert both[r].shape == (2 * cfg.query.mc_samples, 2)
        np.testing.assert_allclose(both[r][: cfg.query.mc_samples], p, atol=1e-6)
        np.testing.assert_allclose(both[r][cfg.query.mc_samples :, 0], 1.0, atol=1e-6)
    # query.companion_samples = "head": the frozen head's samples alone, as without a companion
    cfg = load_config(cfg_path, {**PROBE, "query.companion_samples": "head"})
    head_only = scores(model)
    for r, p in alone.items():
        np.testing.assert_array_equal(head_only[r], p)


def test_the_query_memory_estimate_counts_the_companion(tmp_path):
    from medal.resources import _query_parts

    def parts(**over):
        cfg = _cfg(tmp_path, **over)
        return dict(_query_parts(cfg, 1000, 10, CPU, zero_label=False)[0])

    auto = {
        "train.companion": "auto",
        "train.companion_min_labels": 10,
        "train.companion_min_coverage": 0.0,
    }
    off, on = parts(**{"train.companion": "off"}), parts(**auto)
    extra = {k: v for k, v in on.items() if k not in off}
    assert extra["the companion's samples of 1000 images"] == 4 * 1000 * 8 * 2  # N T C float32
    assert any("through the companion" in k and v > 0 for k, v in extra.items())
    # "auto" where it would not join the 10 labels: not counted
    assert parts(**{**auto, "train.companion_min_labels": 11}) == off
    assert parts(**{**auto, "train.companion_min_coverage": 0.5}) == off


def test_a_mixture_query_stores_2t_samples(tmp_path, tiny_data):
    """medal query with query.companion_samples = "mixture" after a companion round: the
    stored scores hold the head's and the companion's samples, 2T per image."""
    cfg_path = write_config(tmp_path)
    c = ["-c", str(cfg_path), "-q"]
    for pair in [*SETS, 'train.companion="always"', 'query.companion_samples="mixture"']:
        c += ["--set", pair]
    assert main(["train", *c]) == 0
    assert main(["query", *c]) == 0
    (scores,) = (tmp_path / "ws" / "scores").iterdir()
    assert np.load(scores / "probs.npy").shape == (40, 16, 2)  # mc_samples = 8


def test_by_default_the_companion_joins_once_the_labels_cover_half_the_images(tmp_path):
    """Run X2's defaults: "auto" from 100 training labels covering half the images."""
    cfg = _cfg(tmp_path)  # the frozen backbone's linear head, the defaults otherwise
    assert (cfg.train.companion, cfg.train.companion_min_coverage) == ("auto", 0.5)
    assert companion_decision(cfg, 400, 401)[0] is False
    assert companion_decision(cfg, 400, 400)[0] is True
    assert companion_decision(cfg, 99, 0)[0] is False  # companion_min_labels
    # a whole network trains no companion by default (and is not refused)
    assert not companion_on(load_config(write_config(tmp_path)))
