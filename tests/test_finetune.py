"""LP-FT (train.finetune): when it switches on, what it changes, and what it must leave alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_config
from torch import nn

from medal import api
from medal.config import load_config
from medal.errors import ConfigError
from medal.finetune import finetune_decision
from medal.inputs import feature_key
from medal.sources import sync
from medal.train import build_model, fit, load_checkpoint
from medal.workspace import Workspace

PROBE = {
    "train.freeze_backbone": True,
    "model.hidden": 0,
    "train.validation_fraction": 0.0,
    "train.epochs": 1,
    "train.min_steps": 3,
    "train.probe_steps": 20,
}


def _fit(tmp_path, counts: tuple[int, int], **over) -> tuple[nn.Module, nn.Module]:
    """(model before, model after) ``fit`` on random 16x16 images with ``counts`` labels per
    class."""
    cfg = load_config(write_config(tmp_path), {**PROBE, **over})
    torch.manual_seed(0)
    model = build_model(cfg)
    before = build_model(cfg)
    before.load_state_dict(model.state_dict())
    y = np.repeat([0, 1], counts)
    x = (
        torch.randn(len(y), 1, 16, 16)
        + torch.as_tensor(y, dtype=torch.float32)[:, None, None, None]
    )
    fit(model, x, y, cfg, epochs=1, device=torch.device("cpu"), progress=False)
    return before, model


def _changed(a: nn.Module, b: nn.Module) -> list[str]:
    sb = b.state_dict()
    return [k for k, v in a.state_dict().items() if not torch.equal(v, sb[k])]


@pytest.mark.parametrize(
    "counts, expected", [((3, 2), False), ((2, 3), False), ((3, 3), True), ((5, 4), True)]
)
def test_auto_fine_tunes_exactly_when_every_class_reaches_the_count(tmp_path, counts, expected):
    over = {"train.finetune": "auto", "train.finetune_min_per_class": 3}
    cfg = load_config(write_config(tmp_path), {**PROBE, **over})
    go, why = finetune_decision(cfg, np.repeat([0, 1], counts))
    assert go is expected
    if not expected:
        assert "3 labels" in why and ("normal 2" in why or "pneumonia 2" in why), why
    before, after = _fit(tmp_path, counts, **over)
    backbone = [k for k in _changed(before, after) if k.startswith("backbone.")]
    assert bool(backbone) is expected, backbone
    # the head trains either way
    assert any(k.startswith("head.") for k in _changed(before, after))


def test_off_never_and_always_always_fine_tune(tmp_path):
    before, after = _fit(tmp_path, (30, 30), **{"train.finetune": "off"})
    assert not [k for k in _changed(before, after) if k.startswith("backbone.")]
    before, after = _fit(tmp_path, (1, 1), **{"train.finetune": "always"})
    assert [k for k in _changed(before, after) if k.startswith("backbone.")]


def test_fine_tuning_keeps_batchnorm_statistics_and_moves_its_weights(tmp_path):
    before, after = _fit(tmp_path, (4, 4), **{"train.finetune": "always"})
    changed = set(_changed(before, after))
    bn = [n for n, m in after.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn
    for n in bn:
        assert f"backbone.{n}.running_mean" not in changed
        assert f"backbone.{n}.running_var" not in changed
    assert any(f"backbone.{n}.weight" in changed for n in bn)


def test_fine_tuning_can_update_batchnorm_statistics(tmp_path):
    over = {"train.finetune": "always", "train.finetune_batchnorm": "update"}
    before, after = _fit(tmp_path, (4, 4), **over)
    changed = set(_changed(before, after))
    bn = [n for n, m in after.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and all(f"backbone.{n}.running_mean" in changed for n in bn)


def test_bad_finetune_settings_are_one_line_errors(tmp_path):
    path = write_config(tmp_path)
    for key, value, hint in (
        ("train.finetune", "sometimes", "off, auto, always"),
        ("train.finetune_min_per_class", 0, ">= 1"),
        ("train.finetune_batchnorm", "sometimes", "frozen, update"),
        ("train.finetune_lr_scale", 2.0, "(0, 1]"),
    ):
        with pytest.raises(ConfigError) as e:
            load_config(path, {key: value})
        assert key in str(e.value) and hint in str(e.value) and "\n" not in str(e.value)


def test_fine_tuning_leaves_the_cached_backbone_alone_and_gets_fresh_features(tmp_path, tiny_data):
    over = {
        **PROBE,
        "representation.method": "simclr",
        "representation.epochs": 1,
        "representation.batch_size": 16,
        "train.round_start": "retrain",
    }
    path = write_config(tmp_path)
    cfg_off = load_config(path, over)
    api.train(cfg_off, progress=False)
    (cached,) = (cfg_off.workspace / "cache" / "representation").glob("*.pt")
    ssl_bytes = cached.read_bytes()
    ssl_state = torch.load(cached, weights_only=True)
    with Workspace(cfg_off) as ws:  # the frozen backbone's pool features, cached
        model = api.start_model(cfg_off, None, backbone=cached)
        pool = sync(ws).pool
        f_ssl, found, _ = api.frozen_features(ws, cfg_off, model, pool, torch.device("cpu"))
    assert found.all()

    cfg = load_config(path, {**over, "train.finetune": "always"})
    r = api.train(cfg, progress=False)
    assert any("fine-tuned after the probe" in n for n in r.notes), r.notes
    assert cached.read_bytes() == ssl_bytes
    assert list((cfg.workspace / "cache" / "representation").glob("*.pt")) == [cached]
    tuned = build_model(cfg)
    load_checkpoint(r.checkpoint, tuned, cfg.classes, cfg.model.name, cfg.model.channels)
    assert any(
        not torch.equal(v, ssl_state[k])
        for k, v in tuned.backbone.state_dict().items()
        if v.dtype.is_floating_point
    )
    assert tuned.backbone_tuned  # the checkpoint says so
    with Workspace(cfg) as ws:
        f_tuned, found, _ = api.frozen_features(ws, cfg, tuned, pool, torch.device("cpu"))
    assert found.all()
    # the tuned backbone's features are the workspace's own; the shared cache holds the SSL one's
    assert [p.name for p in (cfg.workspace / "features-tuned").iterdir()] == [
        feature_key(cfg, tuned)
    ]
    assert [p.name for p in (cfg.workspace / "cache" / "features").iterdir()] == [
        feature_key(cfg, model)
    ]
    x, _, _, _ = api.load_items(cfg, pool)
    tuned.eval()
    with torch.no_grad():
        direct = tuned.features(x).numpy()
    np.testing.assert_allclose(f_tuned, direct, rtol=1e-4, atol=1e-5)
    assert not np.allclose(f_tuned, f_ssl, atol=1e-4)


def test_only_the_last_fine_tuned_backbones_features_are_kept(tmp_path, tiny_data):
    """Each fine-tuned round's backbone has its own features (N x D floats): opening a new
    one's store deletes the earlier round's, and never the shared cache's."""
    from medal.train import save_checkpoint

    cfg = load_config(write_config(tmp_path), PROBE)
    cpu = torch.device("cpu")
    with Workspace(cfg) as ws:
        pool = sync(ws).pool[:6]
        plain = build_model(cfg)
        api.frozen_features(ws, cfg, plain, pool, cpu)
        shared = ws.feature_cache_path(feature_key(cfg, plain))
        keys = []
        for i in range(2):
            torch.manual_seed(i)
            tuned = build_model(cfg)
            tuned.backbone_tuned = True
            f, found, _ = api.frozen_features(ws, cfg, tuned, pool, cpu)
            assert found.all() and f.shape == (6, tuned.feature_dim)
            keys.append(feature_key(cfg, tuned))
            assert [p.name for p in ws.tuned_feature_path("x").parent.iterdir()] == [keys[-1]]
        assert keys[0] != keys[1]
        assert shared.is_dir() and any(shared.iterdir())  # the frozen backbone's stay
        api.frozen_features(ws, cfg, plain, pool, cpu)  # an untuned model drops nothing
        assert ws.tuned_feature_path(keys[1]).is_dir()
        # the flag goes through a checkpoint, and is absent (False) for an untuned model
        path = tmp_path / "round-000.pt"
        save_checkpoint(path, tuned, cfg, 0)
        back = build_model(cfg)
        load_checkpoint(path, back, cfg.classes, cfg.model.name, cfg.model.channels)
        assert back.backbone_tuned
        save_checkpoint(path, plain, cfg, 0)
        assert "backbone_tuned" not in torch.load(path, weights_only=True)
        load_checkpoint(path, back, cfg.classes, cfg.model.name, cfg.model.channels)
        assert not back.backbone_tuned
