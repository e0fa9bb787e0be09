"""Self-supervised pretraining on the pool: the loss, the cache, and the frozen-backbone probe."""

from __future__ import annotations

import math

import torch

from medal import api
from medal.config import load_config
from medal.representation import SSLSettings, cache_key, nt_xent
from medal.train import build_model, load_checkpoint

from conftest import write_config


def test_nt_xent_matches_a_hand_computation():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = 0.5
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    sim = (z @ z.T).numpy() / t
    positive = {0: 2, 1: 3, 2: 0, 3: 1}
    expected = 0.0
    for i in range(4):
        others = [sim[i, j] for j in range(4) if j != i]
        expected += -sim[i, positive[i]] + math.log(sum(math.exp(v) for v in others))
    assert abs(float(nt_xent(z1, z2, t)) - expected / 4) < 1e-5


def test_cache_key_depends_on_images_and_settings_not_order():
    s = SSLSettings(epochs=2)
    a = cache_key(["b", "a"], {"size": 16}, {"name": "small_cnn"}, s)
    assert a == cache_key(["a", "b"], {"size": 16}, {"name": "small_cnn"}, s)
    assert a != cache_key(["a", "c"], {"size": 16}, {"name": "small_cnn"}, s)
    assert a != cache_key(["a", "b"], {"size": 32}, {"name": "small_cnn"}, s)
    assert a != cache_key(["a", "b"], {"size": 16}, {"name": "small_cnn"}, SSLSettings(epochs=3))


def test_simclr_backbone_is_cached_reused_and_kept_by_the_probe(tmp_path, tiny_data):
    cfg_path = write_config(tmp_path, "")
    over = {
        "representation.method": "simclr",
        "representation.epochs": 2,
        "representation.batch_size": 16,
        "train.freeze_backbone": True,
        "train.round_start": "retrain",
    }
    cfg = load_config(cfg_path, over)
    torch.manual_seed(cfg.seed)
    untrained = build_model(cfg).backbone.state_dict()

    r = api.train(cfg, progress=False)
    assert any("pretrained on 48 images" in n for n in r.notes), r.notes  # pool 40 + labelled 8
    cached = list((cfg.workspace / "cache" / "representation").glob("*.pt"))
    assert len(cached) == 1
    ssl_state = torch.load(cached[0], weights_only=True)
    assert any(
        not torch.equal(ssl_state[k], untrained[k])
        for k in ssl_state
        if ssl_state[k].dtype.is_floating_point
    )

    # the probe trained only the head: the checkpoint's backbone is the pretrained one
    model = build_model(cfg)
    load_checkpoint(r.checkpoint, model, cfg.classes, cfg.model.name, cfg.model.channels)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, ssl_state[k]), k
    assert not torch.equal(model.head[-1].weight, build_model(cfg).head[-1].weight)

    # another training on the same images reuses the cached backbone
    cfg2 = load_config(cfg_path, {**over, "train.epochs": 1})
    r2 = api.train(cfg2, progress=False)
    assert any("loaded from the cache" in n for n in r2.notes), r2.notes
    assert r2.metrics["validation"]["n"] == 16


def test_zero_label_start_chooses_the_first_round_from_the_pool(tmp_path, tiny_data, capsys):
    """No labelled image at all: 'medal query' picks round 1 by TypiClust in the
    self-supervised embedding, then the usual loop runs."""
    import csv
    import shutil

    from medal.cli import main

    shutil.rmtree(tiny_data["root"] / "labelled")
    cfg_path = write_config(tmp_path, "")
    text = cfg_path.read_text()
    cfg_path.write_text(text.replace('labelled = "data/labelled"\n', ""))
    c = ["-c", str(cfg_path), "-q"]
    assert main(["query", *c]) == 2
    assert 'representation.method = "simclr"' in capsys.readouterr().err
    assert not (tmp_path / "ws" / "labelling" / "round-001").exists()

    c += [
        "--set",
        "representation.method=simclr",
        "--set",
        "representation.epochs=2",
        "--set",
        "representation.batch_size=16",
        "--set",
        "train.freeze_backbone=true",
    ]
    assert main(["query", *c]) == 0, capsys.readouterr().err
    assert "chosen by typiclust:zero-label from a pool of 40" in capsys.readouterr().out
    folder = tmp_path / "ws" / "labelling" / "round-001"
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0]) == ["file", "image_id", "source_path", "rank"]
    assert "no model yet" not in (folder / "index.html").read_text()  # blind
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        for r in rows:
            w.writerow([r["file"], tiny_data["truth"][r["source_path"]]])
    assert main(["ingest", *c, str(folder)]) == 0
    capsys.readouterr()
    assert main(["status", *c]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("1 "))
    assert "typiclust:zero-label" in line and " – " in line and "-1" not in line
    assert main(["train", *c]) == 0
    out = capsys.readouterr().out
    assert "model round 1: trained from scratch on 6 labels" in out
    assert "loaded from the cache" in out  # the backbone pretrained for round 1 is reused
    assert main(["query", *c]) == 0
    assert "round 002: 6 images chosen by bald" in capsys.readouterr().out


def test_pretraining_is_repeatable_and_the_same_as_trains(tmp_path, tiny_data):
    """`simulate` and the benchmarks pretrain through api.pretrain_representation: from the same
    images and settings it gives the backbone `medal train` pretrains, every time (its initial
    weights were unseeded, so each fresh benchmark had another backbone)."""
    over = {
        "representation.method": "simclr",
        "representation.epochs": 1,
        "representation.batch_size": 16,
        "train.freeze_backbone": True,
    }
    cfg = load_config(write_config(tmp_path, ""), over)
    states = []
    for _ in range(2):
        api.pretrain_representation(cfg, progress=False)
        (cached,) = (cfg.workspace / "cache" / "representation").glob("*.pt")
        states.append(torch.load(cached, weights_only=True))
        cached.unlink()
    api.train(cfg, progress=False)
    (cached,) = (cfg.workspace / "cache" / "representation").glob("*.pt")
    states.append(torch.load(cached, weights_only=True))
    for s in states[1:]:
        assert s.keys() == states[0].keys()
        for k in s:
            assert torch.equal(s[k], states[0][k]), k


def test_representation_seed_is_the_project_seed_by_default_and_names_another_backbone(
    tmp_path, tiny_data
):
    """representation.seed (default: the project's seed) picks the pretraining's initial
    weights and views: another seed is another cache entry with other weights; the same seed
    given explicitly is the same backbone."""
    over = {
        "representation.method": "simclr",
        "representation.epochs": 1,
        "representation.batch_size": 16,
        "train.freeze_backbone": True,
    }
    cfg = load_config(write_config(tmp_path, ""), over)

    def backbone(c) -> tuple[str, dict]:
        _, path = api.ensure_backbone(c, progress=False)
        return path.name, torch.load(path, weights_only=True)

    default = backbone(cfg)
    assert api.representation_seed(cfg) == cfg.seed == 0
    explicit = backbone(load_config(cfg.path, {**over, "representation.seed": 0}))
    assert explicit[0] == default[0]
    other = backbone(load_config(cfg.path, {**over, "representation.seed": 1}))
    assert other[0] != default[0]
    assert any(not torch.equal(other[1][k], default[1][k]) for k in default[1])
    # the project's seed is the default: seed 1 without representation.seed is that backbone
    follows = backbone(load_config(cfg.path, {**over, "seed": 1}))
    assert follows[0] == other[0]
    for k in follows[1]:
        assert torch.equal(follows[1][k], other[1][k]), k
    files = sorted(p.name for p in (cfg.workspace / "cache" / "representation").glob("*.pt"))
    assert files == sorted({default[0], other[0]})
