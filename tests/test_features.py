"""The frozen-backbone feature cache: keyed by the backbone's weights, and scoring from it
chooses exactly what scoring from freshly computed features chooses."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medal.cli import main
from medal.features import FeatureStore, backbone_key, open_feature_store
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


def test_feature_store_round_trip_first_seen_and_width(tmp_path):
    folder = tmp_path / "f"
    c = FeatureStore(folder)
    c.add(["a", "b"], np.array([[1, 2], [3, 4]], np.float32))
    c.add(["b", "c"], np.array([[9, 9], [5, 6]], np.float32))  # b is kept as first seen
    f, found = FeatureStore(folder).lookup(["c", "x", "a", "b"], 2)
    assert found.tolist() == [True, False, True, True]
    assert f.tolist() == [[5, 6], [0, 0], [1, 2], [3, 4]]
    assert FeatureStore(folder).read(["b", "c", "a"], 2).tolist() == [[3, 4], [5, 6], [1, 2]]
    assert not FeatureStore(folder).lookup(["a"], 3)[1].any()  # other width: not these features
    with pytest.raises(KeyError, match="no features of width 2 for image 'x'"):
        FeatureStore(folder).read(["a", "x"], 2)
    assert len(FeatureStore(folder)) == 3 and len(list(folder.glob("*.f32"))) == 2


def test_feature_store_reads_a_batch_at_a_time(tmp_path, monkeypatch):
    """Scoring reads the pool's features in bounded chunks: one pread per run of consecutive
    rows of the requested batch, never the whole file (the old cache loaded [N, D] whole)."""
    rng = np.random.default_rng(0)
    ids = [f"id{i:04d}" for i in range(1000)]
    feats = rng.normal(size=(1000, 16)).astype(np.float32)
    store = FeatureStore(tmp_path / "f")
    with store.writer(16) as w:
        for c in range(0, 1000, 128):
            w.write(ids[c : c + 128], feats[c : c + 128])
    reads: list[int] = []
    pread = os.pread

    def counting(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting)
    store = FeatureStore(tmp_path / "f")
    want = [7, 8, 9, 500, 3, 999]
    got = store.read([ids[i] for i in want], 16)
    assert np.array_equal(got, feats[want])  # bit-identical float32
    assert len(reads) == 4 and max(reads) == 3 * 16 * 4  # runs 7-9, 500, 3, 999
    reads.clear()
    assert np.array_equal(store.read(ids[:256], 16), feats[:256]) and reads == [256 * 16 * 4]


def test_feature_segment_truncated_or_damaged_is_removed_never_read(tmp_path):
    folder = tmp_path / "f"
    FeatureStore(folder).add(["a", "b"], np.array([[1, 2], [3, 4]], np.float32))
    FeatureStore(folder).add(["c"], np.array([[5, 6]], np.float32))
    first, second = sorted(folder.glob("*.f32"))
    data = first.read_bytes()
    first.write_bytes(data[:-1])  # truncated: its tail is gone
    second.write_bytes(second.read_bytes()[:-1] + b"X")  # not ending in the magic
    store = FeatureStore(folder)
    assert not store.found(["a", "b", "c"], 2).any()
    assert not first.exists() and not second.exists()  # removed: computed again
    first.write_bytes(data[8:])  # shorter by one row, footer intact: sizes disagree
    assert not FeatureStore(folder).found(["a"], 2).any() and not first.exists()
    first.write_bytes(b"MEDALFT1")
    assert not FeatureStore(folder).found(["a"], 2).any()


def test_feature_segment_killed_mid_write_is_never_read(tmp_path):
    """A writer SIGKILLed after writing rows, before its segment is renamed into place,
    leaves only a temporary file: the store reads what was finished before (the segments
    already full, SEGMENT_ROWS images each), and a later writer removes the temporary file
    once it is stale."""
    folder = tmp_path / "f"
    FeatureStore(folder).add(["a"], np.array([[1, 2]], np.float32))
    code = (
        "import os, signal, numpy as np\n"
        "from medal import features\n"
        "features.SEGMENT_ROWS = 2\n"
        f"w = features.FeatureStore({str(folder)!r}).writer(2)\n"
        "w.write(['b', 'c'], np.ones((2, 2), np.float32))\n"  # a full segment: finished
        "w.write(['d'], np.zeros((1, 2), np.float32)); w._f.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code], env=env)
    assert r.returncode == -signal.SIGKILL
    (tmp,) = folder.glob(".*.tmp")
    assert tmp.stat().st_size == 8  # the row of d, no footer
    store = FeatureStore(folder)
    assert store.found(["a", "b", "c", "d"], 2).tolist() == [True, True, True, False]
    assert store.read(["c", "a"], 2).tolist() == [[1, 1], [1, 2]]
    os.utime(tmp, (0, 0))  # a day old: a crashed writer's
    store.add(["d"], np.array([[3, 4]], np.float32))
    assert not tmp.exists() and FeatureStore(folder).read(["d"], 2).tolist() == [[3, 4]]


def test_feature_writer_finishes_a_segment_every_segment_rows(tmp_path, monkeypatch):
    from medal import features

    monkeypatch.setattr(features, "SEGMENT_ROWS", 3)
    store = FeatureStore(tmp_path / "f")
    feats = np.arange(14, dtype=np.float32).reshape(7, 2)
    ids = list("abcdefg")
    with store.writer(2) as w:
        w.write(ids[:2], feats[:2])
        w.write([*ids[2:4], "a"], np.concatenate([feats[2:4], feats[6:]]))  # a: kept as first
        w.write(ids[4:], feats[4:])
    sizes = [len(s.ids) for s in FeatureStore(tmp_path / "f")._segments]
    assert sizes == [4, 3]  # a segment is finished once it holds 3 or more
    assert np.array_equal(store.read(ids[::-1], 2), feats[::-1])


def test_old_single_file_cache_is_converted_or_rebuilt(tmp_path):
    """A cache from before the store (one <key>.pt) is read once into a segment and
    removed; an unreadable one is removed, never a crash."""
    folder = tmp_path / "features" / "k"
    folder.parent.mkdir()
    old = folder.with_name("k.pt")
    torch.save({"ids": ["a", "b"], "features": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, old)
    store = open_feature_store(folder)
    assert not old.exists() and store.read(["b", "a"], 2).tolist() == [[3, 4], [1, 2]]
    old.write_bytes(b"not a torch file")
    assert open_feature_store(folder).read(["a"], 2).tolist() == [[1, 2]]
    assert not old.exists()


def test_query_scores_from_the_store_a_batch_at_a_time(tmp_path, tiny_data, monkeypatch):
    """The frozen-backbone query never gathers the pool's features [N, D]: it reads them
    from the store in batches of query.batch_size (issue 28)."""
    sizes: list[int] = []
    read = FeatureStore.read

    def counted(self: FeatureStore, ids: list[str], dim: int) -> np.ndarray:
        sizes.append(len(ids))
        return read(self, ids, dim)

    def gathered(*a: object) -> None:
        raise AssertionError("the query gathered every feature")

    cfg_path = write_config(tmp_path, "")
    c = ["-c", str(cfg_path), "-q", "--set", "train.freeze_backbone=true"]
    assert main(["train", *c]) == 0
    monkeypatch.setattr(FeatureStore, "read", counted)
    monkeypatch.setattr(FeatureStore, "lookup", gathered)
    assert main(["query", *c, "--set", "query.batch_size=8"]) == 0
    assert sum(sizes) == 40 and max(sizes) == 8


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
    cached = list((ws / "cache" / "features").iterdir())
    assert len(cached) == 1 and len(FeatureStore(cached[0])) == 40  # the whole pool, once
    assert len(list(cached[0].glob("*.f32"))) == 1  # in one segment
    store = FeatureStore(cached[0])
    stored = [i for seg in store._segments for i in seg.ids]
    assert store.found(stored, 32 + 64 + 128).all()  # multiscale default
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
