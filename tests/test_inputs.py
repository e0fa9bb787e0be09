"""``model.name = "auto"``: the backbone chosen by the number of pretraining images, kept by a
project once its first training chose it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medal import api
from medal.config import load_config
from medal.errors import ConfigError, ModelError
from medal.inputs import auto_backbone, for_count
from medal.workspace import Workspace

from conftest import write_config

SSL = {
    "representation.method": "simclr",
    "representation.epochs": 1,
    "representation.batch_size": 16,
    "train.freeze_backbone": True,
    "model.hidden": 0,
    "train.validation_fraction": 0.0,
}


def test_auto_is_the_deeper_backbone_from_the_threshold_on(tmp_path):
    cfg = load_config(write_config(tmp_path, ""), {**SSL, "model.name": "auto"})
    assert cfg.model.auto_min_images == 3000
    assert auto_backbone(cfg, 2999) == "small_cnn"
    assert auto_backbone(cfg, 3000) == "small_cnn4"
    assert for_count(cfg, 5000).model.name == "small_cnn4"
    # no pretraining (whole-network training from random weights): the smaller one
    none = dataclasses.replace(
        cfg, representation=dataclasses.replace(cfg.representation, method="none")
    )
    assert auto_backbone(none, 10**6) == "small_cnn"
    # a named backbone is never replaced
    named = load_config(write_config(tmp_path, ""), {**SSL, "model.name": "small_cnn"})
    assert for_count(named, 10**6) is named


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"model.auto_min_images": -1}, r"model\.auto_min_images.*>= 0"),
        ({"model.pretrained": "w.pt"}, r"model\.name.*named backbone when model\.pretrained"),
        ({"model.name": "deep"}, r"model\.name.*small_cnn4.*auto"),
    ],
)
def test_auto_settings_are_validated(tmp_path, over, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, ""), {"model.name": "auto", **over})


def _convs(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.backbone.modules())


def test_below_the_threshold_auto_trains_what_small_cnn_trains(tmp_path, tiny_data):
    """48 pretraining images (pool 40, labelled 8) under the default threshold: the same
    backbone file (cache key) and the same checkpoint as a config naming small_cnn."""
    path = write_config(tmp_path, "")
    auto = load_config(path, {**SSL, "model.name": "auto"})
    r = api.train(auto, progress=False)
    ck = torch.load(r.checkpoint, weights_only=False)
    assert ck["model_name"] == "small_cnn" and ck["config"]["model"]["name"] == "small_cnn"
    line = 'model.name = "auto": small_cnn for 48 pretraining images'
    assert any(n.startswith(line) for n in r.notes), r.notes
    named = load_config(path, {**SSL, "model.name": "small_cnn"})
    note, _ = api.ensure_backbone(named, progress=False)
    assert "loaded from the cache" in note  # the key auto's pretraining wrote
    assert api.resolve_model(auto).model.name == "small_cnn"


def test_from_the_threshold_on_auto_trains_small_cnn4_and_the_project_keeps_it(tmp_path, tiny_data):
    path = write_config(tmp_path, "")
    auto = load_config(path, {**SSL, "model.name": "auto", "model.auto_min_images": 48})
    assert api.resolve_model(auto).model.name == "small_cnn4"  # before any training
    r = api.train(auto, progress=False)
    assert any("pretrained on 48 images" in n for n in r.notes), r.notes
    line = 'model.name = "auto": small_cnn4 for 48 pretraining images'
    assert any(n.startswith(line) for n in r.notes), r.notes
    ck = torch.load(r.checkpoint, weights_only=False)
    assert ck["model_name"] == "small_cnn4"
    deep = load_config(path, {**SSL, "model.name": "small_cnn4"})
    note, _ = api.ensure_backbone(deep, progress=False)
    assert "loaded from the cache" in note
    assert len(list((auto.workspace / "cache" / "representation").glob("*.pt"))) == 1

    # the query scores with the checkpoint's backbone, whatever the threshold says now
    raised = load_config(path, {**SSL, "model.name": "auto", "model.auto_min_images": 10**6})
    q = api.query(raised, progress=False)
    assert q is not None and q.n_selected == 6
    # the next round warm-starts from the small_cnn4 checkpoint (four conv blocks)
    with Workspace(raised) as ws:
        model, parent = api.initial_model(ws, raised, 1)
    assert parent == 0 and _convs(model) == 4
    # round 1's labels are not back yet: the next training redoes model round 0 from fresh
    # weights, so the raised threshold applies to it
    assert api.resolve_model(raised).model.name == "small_cnn"


def test_auto_does_not_go_on_from_another_backbone(tmp_path, tiny_data):
    """A project trained with a named backbone other than auto's two: the query under
    ``model.name = "auto"`` stops with the name to set, and nothing is exported."""
    path = write_config(tmp_path, "")
    api.train(load_config(path, {**SSL, "representation.method": "none", "model.name": "resnet18"}))
    auto = load_config(path, {**SSL, "representation.method": "none", "model.name": "auto"})
    with pytest.raises(ModelError, match=r'is a resnet18; .*set model\.name = "resnet18"'):
        api.query(auto, progress=False)
    assert not (auto.workspace / "labelling" / "round-001").exists()
