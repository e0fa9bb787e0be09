"""Memory estimates before scoring the pool and before self-supervised pretraining (issue 13).

A command that cannot fit is refused with one line (the estimate, the memory available, a
setting that fits) before it decodes an image, instead of being killed by the kernel; the
workspace is left as it was. Ordinary runs are not refused. The training estimate has its
tests in ``test_hostile_files.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import write_config
from medal import resources
from medal.cli import main
from medal.config import load_config
from medal.errors import ConfigError

GB = 1_000_000_000
CPU = torch.device("cpu")


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every file under ``folder`` with its bytes (``.lock`` only by name)."""
    return {
        p.relative_to(folder).as_posix(): "dir"
        if p.is_dir()
        else "lock"
        if p.name == ".lock"
        else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


def refused(argv: list[str], capsys, pattern: str) -> str:
    """Run the CLI; assert exit code 2 and one error line matching ``pattern``."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.rstrip("\n").splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"medal {argv[0]}: error: "), err
    assert re.search(pattern, err), err
    return err


def never_decode(monkeypatch) -> None:
    """Fail the test if any image is decoded (the refusal must come first)."""
    from medal import data

    def no(*args, **kwargs):
        raise AssertionError("an image was decoded before the memory check")

    monkeypatch.setattr(data.ImageDataset, "__getitem__", no)


@pytest.fixture
def trained(tmp_path, tiny_data, capsys):
    """A workspace with one trained model (16 px) and its config."""
    cfg = write_config(tmp_path)
    assert main(["train", "-q", "-c", str(cfg)]) == 0
    capsys.readouterr()
    return cfg


# --- scoring the pool ---------------------------------------------------------------------------
def test_query_that_cannot_fit_is_refused_before_scoring(trained, tmp_path, capsys, monkeypatch):
    """model.image_size = 2048 over the 40-image pool: a batch of 40 through small_cnn needs
    ~43 GB; with 8 GB available the query is refused before anything is scored or written."""
    ws = tmp_path / "ws"
    before = tree(ws)
    monkeypatch.setattr(resources, "available_memory", lambda: 8 * GB)
    never_decode(monkeypatch)
    err = refused(
        ["query", "-q", "-c", str(trained), "--set", "model.image_size=2048"],
        capsys,
        r"not enough memory to score the pool: about (\d+)\.\d GB needed, 8\.0 GB "
        r"available \(model\.image_size = 2048: one batch of query\.batch_size = 256 "
        r"through small_cnn \d+\.\d GB.*\); set query\.batch_size = (\d+) or "
        r"model\.image_size = (\d+) \(MEDAL_MEMORY_CHECK=off skips this check\)",
    )
    assert tree(ws) == before
    batch, size = map(
        int, re.search(r"batch_size = (\d+) or model\.image_size = (\d+)", err).groups()
    )
    assert 1 <= batch <= 8 and 8 <= size < 2048
    # each suggestion fits by the same estimate
    cfg = load_config(trained, {"model.image_size": 2048, "query.batch_size": batch})
    resources.check_query_memory(cfg, 40, 8, CPU)
    cfg = load_config(trained, {"model.image_size": size})
    resources.check_query_memory(cfg, 40, 8, CPU)


def test_query_refused_on_the_real_memory_of_any_machine(trained, tmp_path, capsys, monkeypatch):
    """No stand-in for the memory: full-network sampling of 64 replicas of 40 images at
    2048 px in one call would need terabytes."""
    never_decode(monkeypatch)
    ws = tmp_path / "ws"
    before = tree(ws)
    refused(
        [
            "query",
            "-q",
            "-c",
            str(trained),
            "--set",
            "model.image_size=2048",
            "--set",
            "model.backbone_dropout=0.2",
            "--set",
            "query.sampling=full",
            "--set",
            "query.mc_samples=64",
            "--set",
            "query.max_batch_items=100000",
        ],
        capsys,
        r"not enough memory to score the pool: about \d+\.\d GB needed, .* \(64 replicas "
        r"at once\) .*; set query\.max_batch_items = 0( and query\.batch_size = \d+)? or "
        r"model\.image_size = \d+ \(",
    )
    assert tree(ws) == before
    assert not (ws / "labelling").exists() and not (ws / "scores").exists()


def test_ordinary_queries_are_not_refused(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 8 * GB)
    assert main(["query", "-q", "-c", str(trained)]) == 0, capsys.readouterr().err
    assert (tmp_path / "ws" / "labelling" / "round-001" / "labels.csv").is_file()
    # 100,000 pool images at 224 px through resnet18, defaults otherwise: fits in 8 GB
    cfg = load_config(
        trained, {"model.image_size": 224, "model.name": "resnet18", "model.channels": 3}
    )
    resources.check_query_memory(cfg, 100_000, 500, CPU)


def test_frozen_backbone_and_zero_label_stream_the_pool(tmp_path, monkeypatch):
    """A frozen backbone's features and a zero-label start stream the pool a batch at a
    time (issue 28): 100,000 images at 128 px (6.6 GB, 13 GB while they were gathered) fit
    in 8 GB. A batch that cannot fit, and features of a pool too large, are still refused."""
    cfg_path = write_config(tmp_path)
    monkeypatch.setattr(resources, "available_memory", lambda: 8 * GB)
    frozen = load_config(cfg_path, {"model.image_size": 128, "train.freeze_backbone": True})
    resources.check_query_memory(frozen, 100_000, 100, CPU)
    zero = load_config(cfg_path, {"model.image_size": 128, "representation.method": "simclr"})
    resources.check_query_memory(zero, 100_000, 0, CPU, zero_label=True)
    # 512 images at 512 px through small_cnn at once: ~35 GB of activations
    big = load_config(cfg_path, {"model.image_size": 512, "train.freeze_backbone": True})
    with pytest.raises(
        ConfigError,
        match=r"not enough memory to score the pool: .*a batch of 512 through small_cnn for "
        r"the backbone features 35\.\d GB.*; set model\.image_size = (\d+) \(",
    ) as refusal:
        resources.check_query_memory(big, 20_000, 100, CPU)
    size = int(re.search(r"model\.image_size = (\d+) \(", str(refusal.value)).group(1))
    assert 8 <= size < 512
    fits = load_config(cfg_path, {"model.image_size": size, "train.freeze_backbone": True})
    resources.check_query_memory(fits, 20_000, 100, CPU)
    # what does grow with the pool is still counted: its list, and scores where all are held
    with pytest.raises(ConfigError, match=r"the list of 30000000 pool images \d+\.\d GB"):
        resources.check_query_memory(frozen, 30_000_000, 100, CPU, top_k=True)
    with pytest.raises(ConfigError, match=r"scores of 10000000 images \d+\.\d GB"):
        resources.check_query_memory(frozen, 10_000_000, 100, CPU)
    with pytest.raises(ConfigError, match=r"not enough memory to choose the first round"):
        resources.check_query_memory(zero, 100_000_000, 0, CPU, zero_label=True)


def test_frozen_top_k_query_estimate_grows_only_by_the_pool_list(tmp_path):
    """A frozen backbone's head-only top-k query (the defaults) reads features from the
    store a batch at a time and keeps k scores: from 100,000 to 1,000,000 images its
    estimate grows by the pool's list alone (the features of the pool, 16 * D bytes per
    image before the store, are no longer counted). A strategy that selects from every
    score still counts them."""
    cfg = load_config(write_config(tmp_path), {"train.freeze_backbone": True})
    dim = 32 + 64 + 128

    def need(n: int, top_k: bool) -> float:
        return sum(b for _, b in resources._query_parts(cfg, n, 10, CPU, False, top_k)[0])

    assert need(1_000_000, True) - need(100_000, True) == resources.POOL_ITEM_BYTES * 900_000
    T, C = cfg.query.mc_samples, len(cfg.classes)
    grows = need(1_000_000, False) - need(100_000, False)
    assert grows == (resources.POOL_ITEM_BYTES + 4 * (T * C + 2 * dim)) * 900_000


# --- training -------------------------------------------------------------------------------
def test_training_counts_its_images_once(tmp_path, monkeypatch):
    """data.load_all fills one tensor, so the training images are counted once (and the
    batches in flight while they are decoded): 11,000 images at 256 px (2.9 GB) train in
    4 GB, which counting them twice refused; 14,000 do not fit and are refused."""
    cfg = load_config(write_config(tmp_path), {"model.image_size": 256})
    monkeypatch.setattr(resources, "available_memory", lambda: 4 * GB)
    resources.check_training_memory(cfg, 11_000, 16, CPU)
    with pytest.raises(
        ConfigError,
        match=r"not enough memory to train: .*\(model\.image_size = 256: 14000 images held "
        r"in memory 3\.\d GB",
    ):
        resources.check_training_memory(cfg, 14_000, 16, CPU)


# --- self-supervised pretraining ----------------------------------------------------------------
def test_pretraining_that_cannot_fit_is_refused_before_loading(
    tmp_path, tiny_data, capsys, monkeypatch
):
    """representation.method = "simclr" at 1024 px: training a batch of 1 fits in 8 GB, but
    two views of 48 images through small_cnn keep ~70 GB of activations: refused before the
    48 images are loaded; no backbone cached, no model."""
    cfg = write_config(tmp_path)
    monkeypatch.setattr(resources, "available_memory", lambda: 8 * GB)
    c = [
        "-q",
        "-c",
        str(cfg),
        "--set",
        "model.image_size=1024",
        "--set",
        "train.batch_size=1",
        "--set",
        "representation.method=simclr",
    ]
    resources.check_training_memory(
        load_config(cfg, {"model.image_size": 1024, "train.batch_size": 1}), 24, 16, CPU
    )
    never_decode(monkeypatch)
    err = refused(
        ["train", *c],
        capsys,
        r"not enough memory for self-supervised pretraining: about \d+\.\d GB needed, "
        r"8\.0 GB available \(model\.image_size = 1024: batches read ahead "
        r"\d+\.\d GB, two views of a batch of representation\.batch_size = 256 through "
        r"small_cnn \d+\.\d GB\); set representation\.batch_size = (\d+) or "
        r"model\.image_size = \d+ \(MEDAL_MEMORY_CHECK=off",
    )
    ws = tmp_path / "ws"
    assert not (ws / "checkpoints").exists() or not any((ws / "checkpoints").iterdir())
    assert not list(ws.rglob("*.pt")) and not list(ws.rglob("*.tmp"))
    batch = int(re.search(r"representation\.batch_size = (\d+) or", err).group(1))
    assert batch >= 2
    resources.check_pretraining_memory(
        load_config(cfg, {"model.image_size": 1024, "representation.batch_size": batch}), 48, CPU
    )


def test_pretraining_refused_on_the_real_memory_of_any_machine(
    tmp_path, tiny_data, capsys, monkeypatch
):
    """The zero-label start at 2048 px: pretraining two views of 40 images would keep about
    240 GB of activations (and decoding the pool for its features ~43 GB)."""
    import shutil

    never_decode(monkeypatch)
    shutil.rmtree(tiny_data["root"] / "labelled")
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace('labelled = "data/labelled"\n', ""))
    refused(
        [
            "query",
            "-q",
            "-c",
            str(cfg),
            "--set",
            "representation.method=simclr",
            "--set",
            "model.image_size=2048",
        ],
        capsys,
        r"not enough memory (to choose the first round|for self-supervised pretraining)",
    )
    ws = tmp_path / "ws"
    assert not list(ws.rglob("*.pt")) and not (ws / "labelling").exists()


def test_the_check_can_be_switched_off(tmp_path, monkeypatch):
    cfg = load_config(write_config(tmp_path), {"model.image_size": 2048})
    monkeypatch.setattr(resources, "available_memory", lambda: 1 * GB)
    with pytest.raises(ConfigError):
        resources.check_query_memory(cfg, 1000, 10, CPU)
    with pytest.raises(ConfigError):
        resources.check_pretraining_memory(cfg, 1000, CPU)
    monkeypatch.setenv("MEDAL_MEMORY_CHECK", "off")
    resources.check_query_memory(cfg, 1000, 10, CPU)
    resources.check_pretraining_memory(cfg, 1000, CPU)
    monkeypatch.delenv("MEDAL_MEMORY_CHECK")
    monkeypatch.setattr(resources, "available_memory", lambda: None)  # unknown: not checked
    resources.check_query_memory(cfg, 1000, 10, CPU)
    resources.check_pretraining_memory(cfg, 1000, CPU)
