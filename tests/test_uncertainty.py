import numpy as np
import pytest
import torch
from torch import nn

from medal.models import create_model, set_mc_mode
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
    assert isinstance(r.probs, np.memmap) and isinstance(r.features, np.memmap)  # not copies
    on_disk = np.load(tmp_path / "scores" / "probs.npy")
    assert on_disk.shape == (10, 6, 2)  # the readable rows only: never gathered in memory
    assert np.array_equal(on_disk, r.probs) and np.load(
        tmp_path / "scores" / "kept.npy"
    ).tolist() == list(range(10))
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
    stored = (tmp_path / "r1" / "features.npy").read_bytes()
    (tmp_path / "r1" / "features.npy").write_bytes(stored[:-1])  # truncated: never reused
    assert ScoreStore(tmp_path / "r1").read({"model": 1}) is None


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(1,), (17,), (64, 224), (3, 5, 960)])
def test_dropout_mask_draws_what_nn_dropout_draws(p, shape):
    from medal.uncertainty import dropout_mask

    x = torch.randn(*shape) + 0.5
    torch.manual_seed(3)
    ref = nn.Dropout(p).train()(x)
    after_ref = torch.get_rng_state()
    torch.manual_seed(3)
    got = x * dropout_mask(shape, p, x.dtype)
    assert torch.equal(got, ref)  # the same masks, bit for bit
    assert torch.equal(torch.get_rng_state(), after_ref)  # and the same numbers used up


@pytest.mark.parametrize("hidden", [0, 16])
def test_head_samples_equal_the_head_on_features_repeated_t_times(hidden):
    m = create_model("small_cnn", 3, hidden=hidden, features="multiscale")
    set_mc_mode(m)
    if hidden == 0:  # a standardisation that is not the identity: its prefix runs once
        m.head[0].fit(torch.randn(40, m.feature_dim) * 3 + 1)
    f, T = torch.randn(6, m.feature_dim), 5
    torch.manual_seed(11)
    p = head_samples(m, f, T)
    after = torch.get_rng_state()
    torch.manual_seed(11)
    with torch.no_grad():
        logits = m.head(f.repeat(T, 1)).view(T, 6, 3)  # rows t * B + b
    assert torch.equal(p, logits.softmax(-1).transpose(0, 1))
    assert torch.equal(torch.get_rng_state(), after)


def _full_dropout_model(name):
    m = create_model(name, 2, hidden=16, backbone_dropout=0.3)
    set_mc_mode(m)
    return m


def _whole_model_samples(m, x, T, per_call):
    """Reference: the whole model on ``x`` replicated ``per_call`` times, call after call."""
    probs, feats = [], []
    for t0 in range(0, T, per_call):
        k = min(per_call, T - t0)
        f = m.features(x.repeat(k, 1, 1, 1))
        probs.append(m.head(f).softmax(-1).view(k, len(x), -1))
        feats.append(f.view(k, len(x), -1))
    return torch.cat(probs).transpose(0, 1), torch.cat(feats).mean(0)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
@pytest.mark.parametrize("per_call", [1, 2, 5])
def test_full_samples_equal_the_whole_model_sampled(name, per_call):
    """One replica per call is the straightforward loop of T passes; k replicas per call are the
    model on the batch replicated k times. 2 of T = 5: the last call has one replica, and the
    features are still the mean over all 5 samples (not the mean of the calls' means)."""
    from medal.uncertainty import full_samples

    m = _full_dropout_model(name)
    x, T = torch.randn(3, 1, 32, 32), 5
    with torch.no_grad():
        torch.manual_seed(5)
        p, f = full_samples(m, x, T, max_items=per_call * len(x))
        torch.manual_seed(5)
        ref_p, ref_f = _whole_model_samples(m, x, T, per_call)
    torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f, ref_f, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(p[:, 0], p[:, 1])  # the samples differ


def test_full_samples_run_everything_before_the_first_dropout_once():
    from medal.uncertainty import full_samples

    m = _full_dropout_model("resnet18")
    rows = {"stem": [], "layer1": [], "layer2": []}
    m.backbone.conv1.register_forward_hook(lambda _m, i, _o: rows["stem"].append(len(i[0])))
    layer1, layer2 = m.backbone.layer1[0], m.backbone.layer2[0]  # [1]: their dropout layers
    layer1.register_forward_hook(lambda _m, i, _o: rows["layer1"].append(len(i[0])))
    layer2.register_forward_hook(lambda _m, i, _o: rows["layer2"].append(len(i[0])))
    with torch.no_grad():
        full_samples(m, torch.randn(3, 1, 32, 32), 4, max_items=6)
    assert rows == {"stem": [3], "layer1": [3], "layer2": [6, 6]}


class _RandomInside(nn.Module):
    """A block whose randomness no dropout *module* shows (functional dropout)."""

    def forward(self, x):
        return nn.functional.dropout(x, 0.5, training=True)


class _BlockWithDropout(nn.Module):
    """A block (not a plain Sequential) with a dropout layer inside."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.drop = nn.Conv2d(c, c, 3, padding=1), nn.Dropout2d(0.4)

    def forward(self, x):
        return self.drop(self.conv(x)) + x


def _custom_backbone_model(block):
    m = create_model("small_cnn", 2, hidden=16, backbone_dropout=0.2)
    m.backbone = nn.Sequential(
        nn.Conv2d(1, 128, 3, padding=1),
        nn.ReLU(),
        block,
        nn.Conv2d(128, 128, 3, padding=1),
        nn.Dropout2d(0.2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    set_mc_mode(m)
    return m


def test_full_samples_sample_a_dropout_layer_inside_a_block():
    from medal.uncertainty import full_samples

    m = _custom_backbone_model(_BlockWithDropout(128))
    x, T = torch.randn(2, 1, 16, 16), 4
    with torch.no_grad():
        torch.manual_seed(2)
        p, _ = full_samples(m, x, T, max_items=len(x))
        torch.manual_seed(2)
        ref = torch.stack([m(x).softmax(-1) for _ in range(T)], 1)
    torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)


def test_full_samples_refuse_a_prefix_that_draws_random_numbers():
    from medal.errors import ModelError
    from medal.uncertainty import full_samples

    m = _custom_backbone_model(_RandomInside())
    with torch.no_grad(), pytest.raises(ModelError, match="drew random numbers"):
        full_samples(m, torch.randn(2, 1, 16, 16), 4, max_items=2)
