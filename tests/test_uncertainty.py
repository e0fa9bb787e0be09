import numpy as np
import torch

from medal.models import create_model
from medal.uncertainty import head_samples, mc_predict_tensors


def test_head_samples_shape_and_rows():
    m = create_model("small_cnn", 3, hidden=16)
    m.eval()
    m.head.train()
    f = torch.randn(5, m.feature_dim)
    p = head_samples(m, f, 7)
    assert p.shape == (5, 7, 3)
    assert torch.allclose(p.sum(-1), torch.ones(5, 7))
    assert not torch.allclose(p[:, 0], p[:, 1])  # T samples differ


def test_head_only_matches_full_model_without_dropout_noise():
    m = create_model("small_cnn", 2, hidden=16, dropout=1e-9)
    x = torch.randn(3, 1, 16, 16)
    probs, feats = mc_predict_tensors(m, x, 4, device=torch.device("cpu"))
    with torch.no_grad():
        m.eval()
        ref = m(x).softmax(-1).numpy()
    assert probs.shape == (3, 4, 2) and feats.shape == (3, m.feature_dim)
    np.testing.assert_allclose(probs, np.repeat(ref[:, None], 4, 1), atol=1e-5)


def test_seeded_sampling_is_reproducible_and_restores_rng():
    m = create_model("small_cnn", 2, hidden=16)
    x = torch.randn(6, 1, 16, 16)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, _ = mc_predict_tensors(m, x, 5, device=torch.device("cpu"), seed=1, batch_size=4)
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = mc_predict_tensors(m, x, 5, device=torch.device("cpu"), seed=1, batch_size=4)
    c, _ = mc_predict_tensors(m, x, 5, device=torch.device("cpu"), seed=2, batch_size=4)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def _pool(tmp_path, n=10):
    from conftest import make_image, save

    rng = np.random.default_rng(0)
    return [save(tmp_path / f"{i}.png", make_image(i % 2, rng)) for i in range(n)]


def test_mc_predict_streams_to_float16_files_and_keeps_topk(tmp_path):
    from medal.acquisition import bald
    from medal.data import ImageDataset
    from medal.uncertainty import mc_predict

    paths = _pool(tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    ds = ImageDataset([*paths[:4], bad, *paths[4:]], channels=1, size=16)
    m = create_model("small_cnn", 2, hidden=16)
    r = mc_predict(
        m,
        ds,
        6,
        device=torch.device("cpu"),
        batch_size=3,
        seed=0,
        out_dir=tmp_path / "scores",
        top_k=(bald, 4),
        progress=False,
    )
    assert r.kept.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert list(r.skipped) == [bad]
    assert r.probs.shape == (10, 6, 2) and r.probs.dtype == np.float16
    on_disk = np.load(tmp_path / "scores" / "probs.npy")
    assert on_disk.shape == (11, 6, 2)
    full = bald(np.asarray(r.probs, np.float32))
    expected = np.argsort(-full, kind="stable")[:4]
    # top-k was computed from float32 in the stream; stored probs are float16
    assert set(r.top_index.tolist()) == set(expected.tolist())
    np.testing.assert_allclose(r.top_scores, full[r.top_index], atol=2e-3)
    again = mc_predict(m, ds, 6, device=torch.device("cpu"), batch_size=3, seed=0, progress=False)
    np.testing.assert_allclose(again.probs, np.asarray(r.probs, np.float32), atol=1e-3)


def test_topk_merges_like_a_stable_sort():
    from medal.uncertainty import TopK

    rng = np.random.default_rng(1)
    s = rng.integers(0, 5, 100).astype(float)  # many ties
    t = TopK(7)
    for i in range(0, 100, 13):
        t.update(s[i : i + 13], np.arange(i, min(i + 13, 100)))
    np.testing.assert_array_equal(t.index, np.argsort(-s, kind="stable")[:7])


def test_full_network_sampling(tmp_path):
    from medal.data import ImageDataset
    from medal.uncertainty import full_samples, mc_predict

    m = create_model("small_cnn", 2, hidden=16, backbone_dropout=0.2)
    assert m.backbone_is_stochastic()
    from medal.models import set_mc_mode

    set_mc_mode(m)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        p, f = full_samples(m, x, 5, max_items=6)  # 2 samples per call -> 3 calls
    assert p.shape == (3, 5, 2) and f.shape == (3, m.feature_dim)
    assert not torch.allclose(p[:, 0], p[:, 1])
    ds = ImageDataset(_pool(tmp_path, 4), channels=1, size=16)
    r = mc_predict(m, ds, 5, device=torch.device("cpu"), mode="full", progress=False)
    assert r.probs.shape == (4, 5, 2)
    import pytest

    with pytest.raises(ValueError, match="backbone_dropout"):
        mc_predict(
            create_model("small_cnn", 2),
            ds,
            5,
            device=torch.device("cpu"),
            mode="full",
            progress=False,
        )


def test_out_of_memory_halves_the_batch(tmp_path):
    import pytest

    from medal.data import ImageDataset
    from medal.uncertainty import mc_predict

    m = create_model("small_cnn", 2, hidden=16, dropout=1e-9)  # samples equal: comparable
    real = m.features

    def limited(x):  # a backbone that runs out of memory above 2 images, like a full GPU
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(x)

    ds = ImageDataset(_pool(tmp_path, 7), channels=1, size=16)
    ref = mc_predict(m, ds, 4, device=torch.device("cpu"), batch_size=8, progress=False)
    m.features = limited
    with pytest.warns(RuntimeWarning, match="batch size halved to 2"):
        r = mc_predict(m, ds, 4, device=torch.device("cpu"), batch_size=8, progress=False)
    assert r.probs.shape == (7, 4, 2)
    np.testing.assert_allclose(r.probs, ref.probs, atol=1e-5)  # every image scored, correctly


def test_score_store_is_keyed_by_image_id(tmp_path):
    from medal.uncertainty import ScoreCollector, ScoreStore

    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1], size=(4, 3)).astype(np.float32)  # [4, T=3, C=2]
    feats = rng.normal(size=(4, 5)).astype(np.float32)
    ids = ["a", "b", "c", "d"]
    first = ScoreCollector(4, 3, 2, 5, tmp_path / "r1", None, ids=ids)
    first(np.array([0, 1, 3]), probs[[0, 1, 3]], feats[[0, 1, 3]])  # "c" unreadable
    mc = first.result({}, meta={"model": 1})
    assert mc.ids.tolist() == ["a", "b", "d"] and mc.kept.tolist() == [0, 1, 3]
    np.testing.assert_allclose(mc.probs, probs[[0, 1, 3]], atol=1e-3)
    unfinished = ScoreCollector(4, 3, 2, 5, tmp_path / "r2", None, ids=ids)
    unfinished(np.arange(4), probs, feats)
    unfinished.result({})  # no meta: never reused
    # a later pool in another order, with an image the stored scores lack
    later = ScoreCollector(3, 3, 2, 5, None, None, ids=["d", "e", "a"])
    stores = [ScoreStore(tmp_path / "r2"), ScoreStore(tmp_path / "r1")]
    assert later.reuse(stores, {"model": 2}) == 0 and not later.ok.any()
    assert later.reuse(stores, {"model": 1}) == 2
    assert later.ok.tolist() == [True, False, True]
    np.testing.assert_allclose(later.probs[[0, 2]], probs[[3, 0]], atol=1e-3)
    np.testing.assert_allclose(later.feats[[0, 2]], feats[[3, 0]], atol=1e-2)
    assert ScoreStore(tmp_path / "r2").read({"model": 1}) is None
