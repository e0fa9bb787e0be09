"""torchrun with 2 CPU processes (gloo): the merged selection equals the single-process one,
and DDP training writes the ledger and checkpoint once."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

from medal import api
from medal.config import load_config
from medal.workspace import Workspace

from conftest import write_config

ROOT = Path(__file__).parents[1]


def torchrun(args: list[str], n: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            "-m",
            "medal",
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def exported(folder: Path) -> list[tuple[str, str, str]]:
    # scores and probabilities are in the workspace's manifest (the round folder is blind)
    with open(folder.parent / "manifests" / f"{folder.name}.csv", newline="") as f:
        return [(r["image_id"], r["score"], r["p_normal"]) for r in csv.DictReader(f)]


def test_two_process_query_selects_what_one_process_selects(tmp_path, tiny_data):
    one = write_config(tmp_path)
    cfg = load_config(one, {"query.batch_size": 8})  # 40 images -> 5 batches over 2 ranks
    api.train(cfg, progress=False)
    two = tmp_path / "two.toml"
    two.write_text(one.read_text().replace('workspace = "ws"', 'workspace = "ws2"'))
    shutil.copytree(tmp_path / "ws", tmp_path / "ws2")
    for strategy in ("bald", "batchbald"):
        over = [f"query.strategy={strategy}"]
        single = api.query(
            load_config(one, {"query.batch_size": 8, "query.strategy": strategy}), progress=False
        )
        r = torchrun(
            [
                "query",
                "-c",
                str(two),
                "-q",
                "--set",
                "query.batch_size=8",
                "--set",
                f'query.strategy="{strategy}"',
            ]
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("labelling folder:") == 1, over  # only rank 0 reports
        folder = tmp_path / "ws2" / "labelling" / single.folder.name
        assert exported(folder) == exported(single.folder)
        if strategy == "batchbald":  # same model as the bald round: stored scores reused
            assert single.reused == 40 and "40 images' scores reused" in r.stdout
        # hand both rounds back unlabelled so the next strategy can query again
        for f in (single.folder, folder):
            (f / "labels.csv").write_text("file,label\n")
        api.ingest(load_config(one), single.folder)
        api.ingest(load_config(two), folder)


def test_two_process_training_with_ddp(tmp_path, tiny_data):
    path = write_config(tmp_path)
    r = torchrun(["train", "-c", str(path), "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("model round 0: trained from scratch on 8 labels") == 1
    cfg = load_config(path)
    with Workspace(cfg) as ws:
        models = ws.db.models()
        assert [m.round for m in models] == [0]
        assert (ws.root / models[0].checkpoint).is_file()  # relative to the workspace
    q = api.query(cfg, progress=False)  # the DDP-trained checkpoint loads and scores
    assert q.n_selected == 6


def test_two_process_training_with_a_self_supervised_frozen_backbone(tmp_path, tiny_data):
    """Both ranks pretrain the backbone together (a shard of every batch each) before the plan,
    rank 0 caches it once; the plan then loads it and both ranks train only the head."""
    import torch

    path = write_config(tmp_path)
    sets = [
        "--set",
        "representation.method=simclr",
        "--set",
        "representation.epochs=1",
        "--set",
        "representation.batch_size=16",
        "--set",
        "train.freeze_backbone=true",
    ]
    r = torchrun(["train", "-c", str(path), "-q", *sets])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("self-supervised backbone loaded from the cache") == 1
    cached = list((tmp_path / "ws" / "cache" / "representation").glob("*.pt"))
    assert len(cached) == 1
    ssl = torch.load(cached[0], weights_only=True)
    ck = torch.load(tmp_path / "ws" / "checkpoints" / "round-000.pt", weights_only=True)
    for k, v in ssl.items():  # the head trained, the backbone stayed the pretrained one
        assert torch.equal(ck["state_dict"][f"backbone.{k}"], v), k
