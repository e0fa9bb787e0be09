"""medal.data: the decode cache, datasets, tensors."""

import numpy as np
import torch

from medal.data import ImageDataset, load_all, to_tensor
from medal.scan import file_sha256

from conftest import save


def test_to_tensor_converts_channels_and_size():
    gray = np.random.default_rng(0).random((10, 12)).astype(np.float32)
    rgb = np.stack([gray] * 3, -1)
    assert to_tensor(gray, 1, 8).shape == (1, 8, 8)
    assert to_tensor(gray, 3, 8).shape == (3, 8, 8)
    assert to_tensor(rgb, 1, 8).shape == (1, 8, 8)
    # a gray image as RGB converts back to the same gray values
    torch.testing.assert_close(
        to_tensor(rgb, 1, 12)[0, :, :12], to_tensor(gray, 1, 12)[0], atol=1e-3, rtol=0
    )


def test_broken_file_is_reported_not_raised(tmp_path):
    good = save(tmp_path / "good.png", np.full((6, 6), 200, np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:30])
    ds = ImageDataset([good, bad], channels=1, size=6)
    assert ds[0][2] == "" and ds[1][2] != ""
    x, kept, skipped = load_all([good, bad], channels=1, size=6)
    assert x.shape == (1, 1, 6, 6) and kept.tolist() == [0] and list(skipped) == [bad]


def test_decode_cache_decodes_once_and_keys_by_settings(tmp_path):
    from medal.data import DecodeCache

    rng = np.random.default_rng(0)
    src = [
        save(
            tmp_path / "src" / f"{i}.dcm",
            rng.integers(0, 255, (20, 20)).astype(np.uint8),
            as_dicom=True,
        )
        for i in range(3)
    ]
    bad = tmp_path / "src" / "bad.dcm"
    bad.write_bytes(b"garbage")
    paths = [*src, bad]
    ids = [file_sha256(p) for p in paths]
    cache = tmp_path / "cache"
    ds = ImageDataset(paths, channels=1, size=8, ids=ids, cache_dir=cache)
    first = [ds[i] for i in range(4)]
    assert first[3][2] and all(r == "" for _, _, r in first[:3])
    # move the sources away: a second pass is served entirely from the cache
    (tmp_path / "src").rename(tmp_path / "gone")
    again = ImageDataset(paths, channels=1, size=8, ids=ids, cache_dir=cache)
    for (a, _, ra), (b, _, rb) in zip(first, [again[i] for i in range(4)]):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # stored as float16
        assert ra == rb
    # other preprocessing settings use other entries
    other = ImageDataset(paths, channels=1, size=10, ids=ids, cache_dir=cache)
    assert other[0][2] != ""  # not cached for size 10, and the file is gone
    keys = {
        DecodeCache(cache, channels=1, size=s, window="file", frame="middle").key for s in (8, 10)
    }
    assert len(keys) == 2


def test_decode_cache_shared_by_two_processes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    rng = np.random.default_rng(1)
    paths = [
        save(tmp_path / f"{i}.png", rng.integers(0, 255, (16, 16)).astype(np.uint8))
        for i in range(40)
    ]
    ids = [file_sha256(p) for p in paths]
    script = (
        "import sys; from pathlib import Path\n"
        "from medal.data import ImageDataset\n"
        "paths=[Path(p) for p in sys.argv[2].split(',')]; ids=sys.argv[3].split(',')\n"
        "ds=ImageDataset(paths, channels=1, size=8, ids=ids, cache_dir=Path(sys.argv[1]))\n"
        "assert all(ds[i][2]=='' for i in range(len(ds)))\n"
    )
    args = [
        sys.executable,
        "-c",
        script,
        str(tmp_path / "cache"),
        ",".join(map(str, paths)),
        ",".join(ids),
    ]
    root = str(Path(__file__).parents[1])
    procs = [subprocess.Popen(args, cwd=root) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    files = list((tmp_path / "cache").rglob("*"))
    assert not [f for f in files if f.name.endswith(".tmp")]
    assert len([f for f in files if f.suffix == ".npy"]) == 40
    ds = ImageDataset(paths, channels=1, size=8)
    cached = ImageDataset(paths, channels=1, size=8, ids=ids, cache_dir=tmp_path / "cache")
    for i in range(40):
        torch.testing.assert_close(ds[i][0], cached[i][0], atol=2e-3, rtol=0)
