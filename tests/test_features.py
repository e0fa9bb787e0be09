"""The frozen-backbone feature cache: keyed by the backbone's weights, and scoring from it
chooses exactly what scoring from freshly computed features chooses."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import torch

from medal.cli import main
from medal.features import FeatureCache, backbone_key
from medal.models import create_model

from conftest import write_config


def test_backbone_key_follows_weights_and_image_settings():
    m = create_model("small_cnn", 2, hidden=0)
    k = backbone_key(m.backbone, [1, 28])
    assert k == backbone_key(m.backbone, [1, 28])
    assert k != backbone_key(m.backbone, [1, 32])
    with torch.no_grad():
        m.backbone[0].weight[0, 0, 0, 0] += 1e-3
    assert k != backbone_key(m.backbone, [1, 28])


def test_feature_cache_round_trip_and_unreadable_file(tmp_path):
    path = tmp_path / "f.pt"
    c = FeatureCache(path)
    c.add(["a", "b"], np.array([[1, 2], [3, 4]], np.float32))
    c.add(["b", "c"], np.array([[9, 9], [5, 6]], np.float32))  # b is kept as first seen
    f, found = FeatureCache(path).lookup(["c", "x", "a", "b"], 2)
    assert found.tolist() == [True, False, True, True]
    assert f.tolist() == [[5, 6], [0, 0], [1, 2], [3, 4]]
    assert not FeatureCache(path).lookup(["a"], 3)[1].any()  # other width: not these features
    path.write_bytes(b"not a torch file")
    assert len(FeatureCache(path)) == 0


def _chosen(ws):
    with open(ws / "labelling" / "manifests" / "round-002.csv", newline="") as f:
        return [(r["source_path"], r["score"]) for r in csv.DictReader(f)]


def test_frozen_query_from_cached_features_equals_fresh(tmp_path, tiny_data):
    cfg_path = write_config(tmp_path, "")
    c = [
        "-c",
        str(cfg_path),
        "-q",
        "--set",
        "train.freeze_backbone=true",
        "--set",
        "model.hidden=0",
        "--set",
        "train.validation_fraction=0.0",
    ]
    assert main(["train", *c]) == 0
    assert main(["query", *c]) == 0
    ws = tmp_path / "ws"
    cached = list((ws / "cache" / "features").glob("*.pt"))
    assert len(cached) == 1 and len(FeatureCache(cached[0])) == 40  # the whole pool, once
    ids = list(torch.load(cached[0], weights_only=True)["ids"])
    assert FeatureCache(cached[0]).lookup(ids, 32 + 64 + 128)[1].all()  # multiscale default
    folder = ws / "labelling" / "round-001"
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerows([r["file"], tiny_data["truth"][r["source_path"]]] for r in rows)
    assert main(["ingest", *c, str(folder)]) == 0
    assert main(["train", *c]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(ws, copy)
    text = cfg_path.read_text().replace('workspace = "ws"', 'workspace = "copy"')
    cfg_copy = tmp_path / "copy.toml"
    cfg_copy.write_text(text)
    shutil.rmtree(copy / "cache" / "features")
    assert main(["query", *c]) == 0  # features from the cache
    assert main(["query", "-c", str(cfg_copy), *c[2:]]) == 0  # features computed afresh
    assert _chosen(ws) == _chosen(copy)
    assert len(_chosen(ws)) == 6


def test_streamed_features_equal_those_of_the_whole_set(tmp_path):
    """stream_features (a batch at a time: how frozen features and the zero-label query
    compute them, issue 28) gives exactly the features of the set decoded whole; an
    unreadable file is reported by its index and left out."""
    from medal.data import ImageDataset, load_all
    from medal.features import stream_features
    from medal.train import backbone_features

    from conftest import save

    rng = np.random.default_rng(0)
    paths = [
        save(tmp_path / f"{i:02d}.png", rng.integers(0, 255, (20, 20)).astype(np.uint8))
        for i in range(10)
    ]
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = create_model("small_cnn", 2, hidden=0)
    whole = backbone_features(model, load_all(paths, channels=1, size=16)[0], cpu)
    got, kept, bad = stream_features(model, ImageDataset(paths, channels=1, size=16), cpu)
    assert torch.equal(torch.from_numpy(got), whole) and kept.tolist() == list(range(10))
    assert bad == {} and got.dtype == np.float32
    paths[3].write_bytes(b"broken")
    got, kept, bad = stream_features(
        model, ImageDataset(paths, channels=1, size=16), cpu, batch_size=4
    )
    assert kept.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9] and list(bad) == [3]
    torch.testing.assert_close(torch.from_numpy(got), whole[kept])
