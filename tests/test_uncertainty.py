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
