"""Self-supervised pretraining on the pool: the loss, the cache, and the frozen-backbone probe."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from medal import api, distributed, resources
from medal.config import load_config
from medal.errors import ConfigError, DataError
from medal.representation import (
    SSLSettings,
    Views,
    cache_key,
    nt_xent,
    plan_steps,
    pretrain,
    pretrain_and_cache,
)
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


def test_steps_are_the_epochs_clamped_to_min_and_max_steps():
    """steps = clamp(epochs x (N // batch), min_steps, max_steps): a pool of 100,000 costs
    the 3000 steps of about 25,000 images; the bundled sets keep their epochs."""
    s = SSLSettings(epochs=30, batch_size=256)
    big = plan_steps(100_000, s)
    assert (big.steps, big.natural, big.batch, big.per_epoch) == (3000, 30 * 390, 256, 390)
    assert big.epochs == 8  # the 8th pass cut short
    assert plan_steps(25_000, s).steps == 30 * 97 <= 3000
    assert plan_steps(4708, s).steps == 30 * 18  # PneumoniaMNIST's pool and labels: unchanged
    small = plan_steps(100, s)
    assert (small.steps, small.batch) == (30, 100)  # a batch is at most the images
    floor = plan_steps(100, dataclasses.replace(s, min_steps=500))
    assert (floor.steps, floor.epochs) == (500, 500)
    assert "representation.max_steps; 11700 for the epochs" in big.describe()


def test_cache_key_keeps_todays_keys_unless_the_step_limits_change_the_steps():
    """The keys below are those of the code before min_steps/max_steps existed (the cached
    backbones of existing workspaces stay valid); a limit that changes the steps changes it."""
    pre, model = {"size": 28}, {"name": "small_cnn"}
    s = SSLSettings(epochs=2, batch_size=16)
    assert cache_key(["b", "a"], pre, model, s) == "e36d061a0a3e464ef0014aba"
    ids = [f"id{i}" for i in range(1000)]
    s = SSLSettings(epochs=2, batch_size=64)  # 2 x 15 steps
    today = "d2e43e7ce84a22c47544a1df"
    assert cache_key(ids, pre, model, s) == today
    assert cache_key(ids, pre, model, dataclasses.replace(s, max_steps=30)) == today
    capped = cache_key(ids, pre, model, dataclasses.replace(s, max_steps=29))
    assert capped != today
    assert capped != cache_key(ids, pre, model, dataclasses.replace(s, max_steps=28))
    floor = cache_key(ids, pre, model, dataclasses.replace(s, min_steps=100))
    assert floor not in (today, capped)


def test_step_limits_are_validated(tmp_path):
    cfg = write_config(tmp_path, "")
    for over, message in [
        ({"representation.min_steps": -1}, r"'representation\.min_steps' must be >= 0, got -1"),
        ({"representation.max_steps": 0}, r"'representation\.max_steps' must be >= 1 and >= "),
        (
            {"representation.min_steps": 500, "representation.max_steps": 400},
            r"'representation\.max_steps' must be >= 1 and >= representation\.min_steps "
            r"\(500\), got 400",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(cfg, over)
    r = load_config(cfg, {}).representation
    assert (r.min_steps, r.max_steps) == (0, 3000)


def test_ssl_settings_carry_every_pretraining_key(tmp_path):
    """The settings ``medal train`` pretrains with (and the benchmarks, through the same
    function) take each representation key and the pretraining's seed."""
    over = {
        "representation.epochs": 7,
        "representation.batch_size": 64,
        "representation.temperature": 0.3,
        "representation.lr": 0.002,
        "representation.min_steps": 40,
        "representation.max_steps": 90,
    }
    cfg = load_config(write_config(tmp_path, ""), over)
    s = api.ssl_settings(cfg)
    assert (s.epochs, s.batch_size, s.temperature, s.lr, s.min_steps, s.max_steps) == (
        7,
        64,
        0.3,
        0.002,
        40,
        90,
    )
    assert s.seed == cfg.seed
    assert api.ssl_settings(dataclasses.replace(cfg, seed=5)).seed == 5
    again = load_config(write_config(tmp_path, ""), {**over, "representation.seed": 11})
    assert api.ssl_settings(dataclasses.replace(again, seed=5)).seed == 11


class _Images(torch.utils.data.Dataset):
    """``x [N, C, S, S]`` under ImageDataset's contract, items in ``broken`` unreadable (and
    every item after ``readable_reads`` reads: "gone"); counts the items read."""

    def __init__(self, x: torch.Tensor, broken: set[int], readable_reads: int = -1) -> None:
        self.x, self.broken, self.reads, self.readable_reads = x, broken, 0, readable_reads

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        self.reads += 1
        if 0 <= self.readable_reads < self.reads:
            return torch.zeros_like(self.x[i]), i, "gone"
        if i in self.broken:
            return torch.zeros_like(self.x[i]), i, "not an image"
        return self.x[i], i, ""


def _backbone(batch_norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        *([nn.BatchNorm2d(8)] if batch_norm else []),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def test_streamed_pretraining_skips_unreadable_images_and_reads_batch_by_batch():
    """The dataset is read once to find the readable images, then batch by batch: the same
    weights as from those images in memory; the steps follow min_steps/max_steps."""
    x = torch.randn(40, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    broken = {3, 17}
    data = _Images(x, broken)
    s = SSLSettings(epochs=2, batch_size=8, projection_dim=8)
    steps: list[int] = []
    kw = {"device": torch.device("cpu"), "progress": False}
    streamed, plan = pretrain(_backbone(), 16, data, s, log=lambda _, i: steps.append(i), **kw)
    assert (plan.images, plan.steps, plan.batch) == (38, 8, 8)
    assert data.reads == 40 + 8 * 8 and steps == list(range(1, 9))
    held, _ = pretrain(_backbone(), 16, x[[i for i in range(40) if i not in broken]], s, **kw)
    assert streamed.keys() == held.keys()
    for k in held:
        assert torch.equal(streamed[k], held[k]), k

    steps.clear()
    _, plan = pretrain(
        _backbone(),
        16,
        data,
        dataclasses.replace(s, max_steps=3),
        log=lambda _, i: steps.append(i),
        **kw,
    )
    assert plan.steps == 3 and steps == [1, 2, 3]
    _, plan = pretrain(_backbone(), 16, data, dataclasses.replace(s, min_steps=10), **kw)
    assert (plan.steps, plan.epochs) == (10, 3)


def test_an_image_unreadable_after_the_first_pass_stops_the_pretraining():
    """Read once, unreadable later (changed on disk without the decode cache): the step would
    learn from its zeros, so the pretraining stops with the reason."""
    data = _Images(torch.randn(20, 1, 16, 16), set(), readable_reads=20)
    with pytest.raises(DataError, match="became unreadable while pretraining: gone"):
        pretrain(
            _backbone(),
            16,
            data,
            SSLSettings(epochs=1, batch_size=8, projection_dim=8),
            device=torch.device("cpu"),
            progress=False,
        )


def test_views_of_a_shard_are_the_rows_of_the_views_of_the_batch():
    """Under torchrun a rank makes the views of its rows only: the same as those rows of the
    whole batch's views (all random numbers are drawn for the whole batch)."""
    x = torch.randn(10, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    whole = Views()(x, torch.Generator().manual_seed(5))
    rows = range(6, 10)
    part = Views()(x[6:], torch.Generator().manual_seed(5), batch=10, rows=rows)
    assert torch.equal(part, whole[6:])


def test_streaming_pretraining_memory_does_not_grow_with_the_pool(tmp_path, monkeypatch):
    """resnet18 at 224 px: 100,000 images were refused with 24 GB (they were held in memory,
    about 56 GB); streamed, only the batch counts. A batch that cannot fit still is refused."""
    cfg = load_config(
        write_config(tmp_path, ""), {"model.name": "resnet18", "model.image_size": 224}
    )
    monkeypatch.setattr(resources, "available_memory", lambda: 24 * 10**9)
    cpu = torch.device("cpu")
    line = resources.check_pretraining_memory(cfg, 100_000, cpu)
    # the estimate is said to the user (the same for any pool larger than a batch)
    assert line is not None and line.endswith("GB needed, 24.0 GB available")
    assert line.startswith("100000 images streamed: memory: about ")
    assert resources.check_pretraining_memory(cfg, 10_000_000, cpu) == line.replace(
        "100000", "10000000"
    )
    too_big = load_config(cfg.path, {"model.name": "resnet18", "model.image_size": 1024})
    with pytest.raises(ConfigError, match=r"set representation\.batch_size = \d+ or model\."):
        resources.check_pretraining_memory(too_big, 100_000, cpu)


def _rank(rank: int, port: int, folder: Path) -> None:
    """One of the 2 processes of the test below (forked: no second import of torch)."""
    torch.set_num_threads(1)
    os.environ.update(
        {
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    distributed.init("cpu")
    losses = _ddp_case(folder / f"rank{rank}.pt", distributed.ranks())
    if distributed.is_main():
        torch.save(losses, folder / "losses.pt")
    distributed.shutdown()


def _ddp_case(path: Path, ranks: tuple[int, int] = (0, 1)) -> list[float]:
    """The pretraining both runs of the 2-process test make, cached at ``path``: 40 images,
    batches of 11 (shards of 6 and 5 rows), 6 steps, a backbone without BatchNorm; the
    losses."""
    x = torch.randn(40, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    losses: list[float] = []
    pretrain_and_cache(
        path,
        _backbone(batch_norm=False),
        16,
        _Images(x, {5}),
        SSLSettings(epochs=2, batch_size=11, projection_dim=8),
        device=torch.device("cpu"),
        progress=False,
        log=lambda loss, _: losses.append(loss),
        ranks=ranks,
    )
    return losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_pretrain_what_one_does(tmp_path):
    """Under torchrun (2 gloo processes here) each rank takes a shard of every batch, NT-Xent
    sees the embeddings of both (the global batch's negatives), the gradients are summed: the
    same losses and weights as one process, to float rounding; rank 0 alone writes them."""
    port = _free_port()
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_rank, args=(r, port, tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert not (tmp_path / "rank1.pt").exists()
    two = torch.load(tmp_path / "rank0.pt", weights_only=True)
    two_losses = torch.load(tmp_path / "losses.pt", weights_only=True)
    one_losses = _ddp_case(tmp_path / "one.pt")
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    assert len(two_losses) == len(one_losses) == 6
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    for k in one:
        assert torch.allclose(two[k], one[k], rtol=1e-4, atol=1e-5), k


def _rank_pretrains(rank: int, port: int, cfg_path: Path, over: dict) -> None:
    """One rank of `torchrun medal train`'s pretraining (forked, as above)."""
    from medal.workspace import Workspace

    torch.set_num_threads(1)
    os.environ.update(
        {
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    device = distributed.setup("cpu")
    cfg = load_config(cfg_path, over)
    with distributed.main_only(lambda: Workspace(cfg)) as ws:
        api.pretrain_on_every_rank(ws, cfg, device, False)
    distributed.shutdown()


@pytest.mark.parametrize(
    "backbone",
    [{}, {"model.name": "auto", "model.auto_min_images": 48}],
    ids=["small_cnn", "auto-small_cnn4"],
)
def test_every_rank_pretrains_the_backbone_the_training_then_loads(tmp_path, tiny_data, backbone):
    """Under torchrun both ranks pretrain the workspace's backbone together (rank 0 holds the
    workspace and caches it); a training afterwards finds it in the cache, under the key one
    process would have given it. ``model.name = "auto"``: every rank builds the backbone rank 0
    chose for the 48 images."""
    over = {
        "representation.method": "simclr",
        "representation.epochs": 2,
        "representation.batch_size": 16,
        "train.freeze_backbone": True,
        **backbone,
    }
    cfg_path = write_config(tmp_path, "")
    port = _free_port()
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_rank_pretrains, args=(r, port, cfg_path, over)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    cfg = load_config(cfg_path, over)
    (cached,) = (cfg.workspace / "cache" / "representation").glob("*.pt")
    note, path = api.ensure_backbone(cfg, progress=False)
    assert "loaded from the cache" in note and path == cached
    state = torch.load(cached, weights_only=True)
    torch.manual_seed(cfg.seed)
    untrained = build_model(api.resolve_model(cfg)).backbone.state_dict()
    assert state.keys() == untrained.keys()
    assert ("12.weight" in state) == bool(backbone)  # small_cnn4's fourth conv block
    assert any(not torch.equal(state[k], untrained[k]) for k in state if "weight" in k)
