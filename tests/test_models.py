import pytest
import torch
from torch import nn

from medal.errors import ModelError
from medal.models import available_models, create_model, set_mc_mode


@pytest.mark.parametrize("name", ["small_cnn", "small_cnn4", "resnet18"])
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_shapes(name, channels):
    m = create_model(name, 3, in_channels=channels, hidden=16).eval()
    x = torch.randn(2, channels, 32, 32)
    assert m(x).shape == (2, 3)
    assert m.features(x).shape == (2, m.feature_dim)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet34", "resnet50", "densenet121", "efficientnet_b0"])
def test_forward_shapes_large(name):
    m = create_model(name, 2, in_channels=1, hidden=16).eval()
    assert m(torch.randn(2, 1, 64, 64)).shape == (2, 2)


def test_registry_lists_required_models():
    assert {"small_cnn", "resnet18"} <= set(available_models())
    with pytest.raises(ModelError, match="unknown model 'vgg'.*small_cnn"):
        create_model("vgg", 2)


def test_mc_mode_samples_dropout_only():
    m = create_model("small_cnn", 2, hidden=16)
    n = set_mc_mode(m)
    assert n == 2
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert not mod.training
        if isinstance(mod, nn.Dropout):
            assert mod.training
    x = torch.randn(4, 1, 16, 16)
    running = [b.running_mean.clone() for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    with torch.no_grad():
        a, b = m(x), m(x)
    assert not torch.allclose(a, b)  # dropout samples differ
    after = [b.running_mean for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    assert all(torch.equal(r, s) for r, s in zip(running, after))  # BN statistics untouched


def test_pretrained_from_local_file(tmp_path):
    src = create_model("resnet18", 2, in_channels=3)
    torch.save(src.backbone.state_dict(), tmp_path / "w.pth")
    gray = create_model("resnet18", 2, in_channels=1, pretrained=tmp_path / "w.pth")
    expect = src.backbone.conv1.weight.mean(1, keepdim=True)
    assert torch.allclose(gray.backbone.conv1.weight, expect)
    assert torch.equal(gray.backbone.layer1[0].conv1.weight, src.backbone.layer1[0].conv1.weight)
    with pytest.raises(ModelError, match="not found.*never downloads"):
        create_model("resnet18", 2, pretrained=tmp_path / "missing.pth")
    torch.save(create_model("small_cnn", 2).backbone.state_dict(), tmp_path / "small.pth")
    with pytest.raises(ModelError, match="does not fit"):
        create_model("resnet18", 2, pretrained=tmp_path / "small.pth")


@pytest.mark.parametrize(
    "name, last_in_prefix",
    [
        ("small_cnn", "2"),  # conv, BN, ReLU; then the first Dropout2d
        ("resnet18", "layer1.0.1"),  # stem and layer1's two blocks
        pytest.param("densenet121", "features.denseblock1.0", marks=pytest.mark.slow),
        pytest.param("efficientnet_b0", "features.1.0.0", marks=pytest.mark.slow),
    ],
)
def test_backbone_split_reproduces_features(name, last_in_prefix):
    """The prefix is everything before the first dropout layer, in forward order."""
    m = create_model(name, 2, hidden=16, backbone_dropout=0.3).eval()  # eval: dropout off
    assert m.backbone_is_stochastic()
    prefix, rest = m.backbone_split()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rest(prefix(x)), m.features(x))
    assert not any(isinstance(mod, nn.Dropout2d) for mod in prefix.modules())
    assert isinstance(rest[0], nn.Dropout2d)  # the cut is at the first dropout layer
    assert prefix[-1] is m.backbone.get_submodule(last_in_prefix)


@pytest.mark.parametrize(
    "name, width",
    [
        ("small_cnn", 32 + 64 + 128),
        ("small_cnn4", 32 + 64 + 128 + 128),
        ("resnet18", 64 + 128 + 256 + 512),
    ],
)
def test_multiscale_features_add_each_earlier_stage(name, width):
    ms = create_model(name, 2, hidden=0, features="multiscale").eval()
    last = create_model(name, 2, hidden=0, features="last").eval()
    last.backbone.load_state_dict(ms.backbone.state_dict())  # same weights, same keys
    assert ms.feature_dim == width and last.feature_dim == ms.backbone_dim
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        f = ms.features(x)
        assert f.shape == (3, width)
        torch.testing.assert_close(f[:, -ms.backbone_dim :], last.features(x))
        if name.startswith("small_cnn"):  # first stage: conv, BN, ReLU, then average pooling
            torch.testing.assert_close(f[:, :32], ms.backbone[:3](x).mean((2, 3)))
        else:
            bb = ms.backbone
            stem = bb.maxpool(bb.relu(bb.bn1(bb.conv1(x))))
            torch.testing.assert_close(f[:, :64], bb.layer1(stem).mean((2, 3)))
    assert ms(x).shape == (3, 2)
    assert not any(m._forward_hooks for m in ms.backbone.modules())  # none left behind
    ms.train()
    ms.features(x)[:, 0].sum().backward()  # the earliest stage trains with the whole network
    assert (
        ms.backbone[0].weight.grad.abs().sum() > 0
        if name.startswith("small_cnn")
        else ms.backbone.conv1.weight.grad.abs().sum() > 0
    )


def test_auto_features_follow_backbone_dropout():
    assert create_model("small_cnn", 2, features="auto").feature_dim == 224
    assert create_model("small_cnn", 2, features="last").feature_dim == 128
    with_dropout = create_model("small_cnn", 2, features="auto", backbone_dropout=0.2)
    assert with_dropout.feature_dim == 128 and with_dropout.backbone_is_stochastic()
    with pytest.raises(ModelError, match="multiscale.*backbone_dropout = 0"):
        create_model("small_cnn", 2, features="multiscale", backbone_dropout=0.2)
    with pytest.raises(ModelError, match="features must be one of auto, last, multiscale"):
        create_model("small_cnn", 2, features="deep")
    with pytest.raises(ModelError, match="full-network sampling needs model.features = 'last'"):
        create_model("small_cnn", 2, features="multiscale").backbone_split()
    with torch.device("meta"):  # the memory checks build models without weights
        assert create_model("resnet18", 2, features="auto").feature_dim == 960
