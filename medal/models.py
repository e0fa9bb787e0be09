"""Backbones with a stochastic (dropout) head, built by name from one registry.

Every model maps ``x [B, C, S, S]`` to logits ``[B, K]`` and exposes ``features(x) -> [B, D]``
(the deterministic backbone) and ``head(f) -> [B, K]`` (the stochastic part), so MC dropout can
run the backbone once and sample only the head. ``features = "multiscale"`` makes ``D`` the
backbone's pooled output plus the global-average-pooled output of each earlier stage.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn

from .errors import ModelError

_REGISTRY: dict[str, Callable[[int], tuple[nn.Module, int]]] = {}

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

FEATURE_MODES = ("auto", "last", "multiscale")


def register_backbone(name: str) -> Callable:
    """Decorator: ``fn(in_channels) -> (backbone returning [B, D], D)``."""

    def deco(fn: Callable[[int], tuple[nn.Module, int]]) -> Callable:
        _REGISTRY[name] = fn
        return fn

    return deco


def available_models() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _conv_block(i: int, o: int) -> list[nn.Module]:
    """3x3 convolution (no bias), BatchNorm, ReLU: ``[B, i, H, W] -> [B, o, H, W]``."""
    return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


def _small_cnn_net(in_channels: int, extra_blocks: int) -> nn.Sequential:
    """Conv blocks of 32, 64 and 128 channels with 2x2 max pooling after the first two, then
    ``extra_blocks`` more 128-channel blocks at the last scale, global average pooled:
    ``[B, C, S, S] -> [B, 128]``."""
    layers = [
        *_conv_block(in_channels, 32),
        nn.MaxPool2d(2),
        *_conv_block(32, 64),
        nn.MaxPool2d(2),
        *_conv_block(64, 128),
    ]
    for _ in range(extra_blocks):
        layers += _conv_block(128, 128)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


@register_backbone("small_cnn")
def _small_cnn(in_channels: int) -> tuple[nn.Module, int]:
    return _small_cnn_net(in_channels, 0), 128


@register_backbone("small_cnn4")
def _small_cnn4(in_channels: int) -> tuple[nn.Module, int]:
    """small_cnn with a fourth conv block (128 channels) at the last 7x7 scale: 32-64-128-128,
    the backbone of the pool self-supervision side experiment (../shared/research)."""
    return _small_cnn_net(in_channels, 1), 128


def _adapt_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of ``conv`` taking ``in_channels`` inputs (weights re-initialised as torchvision)."""
    if conv.in_channels == in_channels:
        return conv
    square = cast(tuple[int, int], conv.kernel_size), cast(tuple[int, int], conv.stride)
    return nn.Conv2d(
        in_channels, conv.out_channels, *square, cast(Any, conv.padding), bias=conv.bias is not None
    )


def _tv(name: str) -> Callable[[int], tuple[nn.Module, int]]:
    def build(in_channels: int) -> tuple[nn.Module, int]:
        import torchvision.models as tvm

        net = getattr(tvm, name)(weights=None)
        if name.startswith("resnet"):
            net.conv1 = _adapt_stem(net.conv1, in_channels)
            dim = net.fc.in_features
            net.fc = nn.Identity()
        elif name.startswith("densenet"):
            net.features.conv0 = _adapt_stem(net.features.conv0, in_channels)
            dim = net.classifier.in_features
            net.classifier = nn.Identity()
        else:  # efficientnet
            net.features[0][0] = _adapt_stem(net.features[0][0], in_channels)
            dim = net.classifier[-1].in_features
            net.classifier = nn.Identity()
        return net, dim

    return build


for _name in ("resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_b0"):
    register_backbone(_name)(_tv(_name))


class Standardize(nn.Module):
    """``[*, D] -> [*, D]``: subtract a per-feature mean, divide by a per-feature scale (buffers,
    identity until :meth:`fit`), so a linear head's weight decay treats every feature alike."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit(self, f: torch.Tensor) -> None:
        """Set the statistics from features ``f [N, D]``."""
        self.mean.copy_(f.mean(0))
        self.scale.copy_(
            f.std(0, unbiased=False).clamp(min=1e-6) if len(f) > 1 else torch.ones_like(self.scale)
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return (f - self.mean) / self.scale


class StochasticHead(nn.Sequential):
    """``[*, D] -> [*, K]``: dropout, hidden layer, dropout, linear; or, with ``hidden = 0``, a
    linear head on standardised features with dropout on its input (the natural head for a
    frozen self-supervised backbone: dropout-regularised logistic regression)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, p: float) -> None:
        if hidden == 0:
            super().__init__(
                Standardize(in_features), nn.Dropout(p), nn.Linear(in_features, num_classes)
            )
        else:
            super().__init__(
                nn.Dropout(p),
                nn.Linear(in_features, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(p),
                nn.Linear(hidden, num_classes),
            )


def add_backbone_dropout(backbone: nn.Module, p: float) -> int:
    """Insert ``Dropout2d(p)`` after the backbone's main stages (full-network MC dropout).

    Stages: the conv blocks of small_cnn, ``layer1..4`` of ResNets, the dense blocks of
    DenseNet, the stages of EfficientNet. Returns the number of layers inserted.
    """
    n = 0
    if isinstance(backbone, nn.Sequential):  # small_cnn: after each ReLU but the last
        mods = list(backbone)
        relus = [i for i, m in enumerate(mods) if isinstance(m, nn.ReLU)][:-1]
        for i in reversed(relus):
            mods.insert(i + 1, nn.Dropout2d(p))
            n += 1
        backbone._modules.clear()
        for i, m in enumerate(mods):
            backbone.add_module(str(i), m)
        return n
    for name in ("layer1", "layer2", "layer3", "layer4"):
        if hasattr(backbone, name):
            setattr(backbone, name, nn.Sequential(getattr(backbone, name), nn.Dropout2d(p)))
            n += 1
    feats = getattr(backbone, "features", None)
    if n == 0 and isinstance(feats, nn.Sequential):
        for key, m in list(feats.named_children()):
            if key.startswith("denseblock") or (key.isdigit() and 1 <= int(key) < len(feats) - 1):
                setattr(feats, key, nn.Sequential(m, nn.Dropout2d(p)))
                n += 1
    return n


def resolve_features(features: str, backbone_dropout: float) -> str:
    """``model.features`` as built: "last" or "multiscale" ("auto": multiscale unless the
    backbone has dropout, whose full-network sampling splits it and needs "last")."""
    if features not in FEATURE_MODES:
        raise ModelError(
            f"model.features must be one of {', '.join(FEATURE_MODES)}, got {features!r}"
        )
    if features == "multiscale" and backbone_dropout > 0:
        raise ModelError(
            "model.features = 'multiscale' needs model.backbone_dropout = 0; "
            "use 'last' (or 'auto') with backbone dropout"
        )
    if features == "auto":
        return "last" if backbone_dropout > 0 else "multiscale"
    return features


def earlier_stages(backbone: nn.Module) -> list[str]:
    """Names of the backbone's stages before its last, whose pooled outputs join its own
    output under ``features = "multiscale"``: small_cnn's first conv blocks (their ReLUs),
    ``layer1..3`` of ResNets, the first dense blocks of DenseNet, EfficientNet's stages."""
    if isinstance(backbone, nn.Sequential):
        return [k for k, m in backbone.named_children() if isinstance(m, nn.ReLU)][:-1]
    if all(hasattr(backbone, f"layer{i}") for i in range(1, 5)):
        return ["layer1", "layer2", "layer3"]
    feats = getattr(backbone, "features", None)
    if isinstance(feats, nn.Sequential):
        dense = [f"features.{k}" for k, _ in feats.named_children() if k.startswith("denseblock")]
        return dense[:-1] if dense else [f"features.{i}" for i in range(1, len(feats) - 2)]
    raise ModelError(
        f"model.features = 'multiscale': no known stages in {type(backbone).__name__}; use 'last'"
    )


def _is_plain_sequential(m: nn.Module) -> bool:
    """An ``nn.Sequential`` whose call is the composition of its children (no hooks)."""
    return (
        isinstance(m, nn.Sequential)
        and type(m).forward is nn.Sequential.forward
        and not (m._forward_hooks or m._forward_pre_hooks)
    )


def _top_steps(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's forward as a chain of modules, for the forms :func:`_tv` builds
    (torchvision's ResNet, DenseNet and EfficientNet forwards written out); any other backbone
    is one step, and so is one with hooks of its own (they would not run otherwise)."""
    if backbone._forward_hooks or backbone._forward_pre_hooks:
        return [backbone]
    import torchvision.models as tvm

    bb: Any = backbone  # torchvision's attributes are typed as Module
    if type(bb) is tvm.ResNet:
        stem = [bb.conv1, bb.bn1, bb.relu, bb.maxpool]
        stages = [bb.layer1, bb.layer2, bb.layer3, bb.layer4]
        return [*stem, *stages, bb.avgpool, nn.Flatten(1), bb.fc]
    if type(bb) is tvm.EfficientNet:
        return [bb.features, bb.avgpool, nn.Flatten(1), bb.classifier]
    if type(bb) is tvm.DenseNet:  # features, then F.relu(inplace), pooling, flatten, classifier
        return [
            bb.features,
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(1),
            bb.classifier,
        ]
    return [backbone]


def forward_steps(backbone: nn.Module) -> list[nn.Module]:
    """The modules that ``backbone``'s forward applies one after the other (``backbone(x) ==
    steps[-1](...steps[0](x))``), with plain ``nn.Sequential`` containers opened into their
    children, so a dropout layer inside one (``add_backbone_dropout``) is a step of its own."""
    steps: list[nn.Module] = []
    todo = _top_steps(backbone) if not _is_plain_sequential(backbone) else [backbone]
    while todo:
        m = todo.pop(0)
        if _is_plain_sequential(m):
            todo[:0] = list(m.children())
        else:
            steps.append(m)
    return steps


def is_stochastic(m: nn.Module) -> bool:
    """Whether ``m`` holds a dropout layer (itself or any submodule)."""
    return any(isinstance(sub, _DROPOUT_TYPES) for sub in m.modules())


def split_at_first_dropout(steps: list[nn.Module]) -> tuple[nn.Sequential, nn.Sequential]:
    """``(prefix, rest)``: the steps before the first one that holds a dropout layer, and the
    others. A step with a dropout layer somewhere inside it goes whole into ``rest``, so
    ``prefix`` holds no dropout layer; with none at all, ``rest`` is empty (identity)."""
    k = next((i for i, m in enumerate(steps) if is_stochastic(m)), len(steps))
    return nn.Sequential(*steps[:k]), nn.Sequential(*steps[k:])


class MCModel(nn.Module):
    """A backbone (deterministic unless ``backbone_dropout`` > 0) and a stochastic head.

    ``features``: "last" (the backbone's pooled output, ``backbone_dim`` values), "multiscale"
    (that plus the pooled output of each earlier stage; a frozen self-supervised backbone's
    lower stages keep texture a linear head can use), or "auto" (multiscale unless the backbone
    has dropout, whose full-network sampling splits the backbone and needs "last").

    ``members``: K extra heads of the same form as ``head`` (``query.posterior =
    "ensemble"``), each ``[B, D] -> [B, C]``, kept in :attr:`members` (saved with the
    weights); none by default."""

    def __init__(
        self,
        name: str,
        num_classes: int,
        *,
        in_channels: int = 1,
        dropout: float = 0.5,
        hidden: int = 128,
        backbone_dropout: float = 0.0,
        features: str = "last",
        members: int = 0,
    ) -> None:
        super().__init__()
        if name not in _REGISTRY:
            raise ModelError(f"unknown model {name!r}; available: {', '.join(_REGISTRY)}")
        self.features_mode = resolve_features(features, backbone_dropout)
        """"last" or "multiscale", as built."""
        self.backbone, self.backbone_dim = _REGISTRY[name](in_channels)
        self.stages = earlier_stages(self.backbone) if self.features_mode == "multiscale" else []
        self.feature_dim = self.backbone_dim + sum(self._stage_widths(in_channels))
        if backbone_dropout > 0:
            add_backbone_dropout(self.backbone, backbone_dropout)
        self.head = StochasticHead(self.feature_dim, hidden, num_classes, dropout)
        self.members = nn.ModuleList(
            StochasticHead(self.feature_dim, hidden, num_classes, dropout) for _ in range(members)
        )
        """The ensemble's heads (empty unless ``members``); :meth:`forward` uses ``head``."""
        self.scorer: StochasticHead | None = None
        """A linear head trained beside a chosen hidden-layer head (``train.head_choice``,
        ``query.head_choice_samples = "linear"``) whose MC dropout samples the query scores;
        None otherwise. :meth:`forward` does not use it."""
        self.backbone_tuned = False
        """Whether the backbone was fine-tuned on labels (``train.finetune``; the checkpoint
        keeps it): its features are this workspace's alone, not the shared cache's."""
        self.companion: MCModel | None = None
        """A whole network whose probabilities are averaged with this model's
        (``train.companion``, :mod:`medal.companion`); :meth:`forward` does not use it."""
        self.spec: dict[str, Any] = {}
        """A companion's shape (:func:`medal.companion.companion_spec`); empty otherwise."""

    @torch.no_grad()
    def _stage_widths(self, in_channels: int) -> list[int]:
        """Channels of each earlier stage, from one forward pass of a 32x32 input (on the
        backbone's device, ``meta`` included; eval mode, so no statistics change)."""
        if not self.stages:
            return []
        p = next(self.backbone.parameters())
        was = self.backbone.training
        self.backbone.eval()
        try:
            taps = self._run(torch.zeros(1, in_channels, 32, 32, device=p.device, dtype=p.dtype))[0]
        finally:
            self.backbone.train(was)
        return [t.shape[1] for t in taps]

    def _run(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(earlier stages' outputs [B, C_i, H_i, W_i], backbone output [B, backbone_dim])``."""
        taps: list[torch.Tensor] = []
        handles = [
            self.backbone.get_submodule(n).register_forward_hook(
                lambda _m, _i, out: taps.append(out)
            )
            for n in self.stages
        ]
        try:
            out = self.backbone(x)
        finally:
            for h in handles:
                h.remove()
        return taps, out

    @property
    def num_classes(self) -> int:
        return int(cast(nn.Linear, self.head[-1]).out_features)

    @property
    def head_hidden(self) -> int:
        """The head's hidden units, 0 for the linear head (:class:`StochasticHead`)."""
        return (
            0
            if isinstance(self.head[0], Standardize)
            else cast(nn.Linear, self.head[1]).out_features
        )

    def new_head(self, hidden: int) -> StochasticHead:
        """A fresh :class:`StochasticHead` of ``hidden`` units (0: linear) with the head's
        dropout, on the head's device; weights from the global RNG."""
        p = next(m.p for m in self.head if isinstance(m, nn.Dropout))
        device = cast(nn.Linear, self.head[-1]).weight.device
        return StochasticHead(self.feature_dim, hidden, self.num_classes, p).to(device)

    def set_head_width(self, hidden: int) -> None:
        """Replace ``head`` and any ensemble heads by fresh heads of ``hidden`` units
        (:meth:`new_head`; ``train.head_choice`` and checkpoints that record the choice)."""
        self.head = self.new_head(hidden)
        self.members = nn.ModuleList(self.new_head(hidden) for _ in range(len(self.members)))

    def backbone_is_stochastic(self) -> bool:
        return is_stochastic(self.backbone)

    def backbone_split(self) -> tuple[nn.Sequential, nn.Sequential]:
        """``(prefix, rest)`` with ``features(x) == rest(prefix(x))``, cut before the first
        stochastic step of the backbone's forward (:func:`split_at_first_dropout`), so
        full-network sampling runs the deterministic ``prefix`` once per batch and samples only
        ``rest``. A ResNet with backbone dropout keeps its stem and ``layer1`` in ``prefix``."""
        if self.stages:
            raise ModelError("full-network sampling needs model.features = 'last'")
        return split_at_first_dropout(forward_steps(self.backbone))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, S, S]`` -> ``[B, D]`` (``D = feature_dim``)."""
        if not self.stages:
            return self.backbone(x)
        taps, out = self._run(x)
        return torch.cat([t.mean((2, 3)) for t in taps] + [out], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, S, S]`` -> logits ``[B, K]``."""
        return self.head(self.features(x))


def create_model(
    name: str,
    num_classes: int,
    *,
    in_channels: int = 1,
    dropout: float = 0.5,
    hidden: int = 128,
    pretrained: Path | None = None,
    backbone_dropout: float = 0.0,
    features: str = "last",
    members: int = 0,
) -> MCModel:
    """Build a model by registry name; ``pretrained`` is a local backbone state-dict file
    (loaded before the backbone dropout layers are inserted, so plain torchvision keys fit).
    ``features``: see :class:`MCModel` ("auto" resolves with ``backbone_dropout``);
    ``members``: the ensemble's extra heads (:attr:`MCModel.members`)."""
    model = MCModel(
        name,
        num_classes,
        in_channels=in_channels,
        dropout=dropout,
        hidden=hidden,
        features=resolve_features(features, backbone_dropout),
        members=members,
    )
    if pretrained is not None:
        load_backbone_weights(model, Path(pretrained))
    if backbone_dropout > 0:
        add_backbone_dropout(model.backbone, backbone_dropout)
    return model


class ModelSettings(Protocol):
    """What :func:`model_from_config` reads of a config's ``[model]`` (``medal.config``'s
    ``ModelConfig``; a protocol, so that this module needs no import of the config)."""

    @property
    def name(self) -> str: ...
    @property
    def channels(self) -> int: ...
    @property
    def dropout(self) -> float: ...
    @property
    def hidden(self) -> int: ...
    @property
    def pretrained(self) -> Path | None: ...
    @property
    def backbone_dropout(self) -> float: ...
    @property
    def features(self) -> str: ...


class ConfigWithModel(Protocol):
    """A config with ``model`` settings and ``classes`` (``medal.config.Config``)."""

    @property
    def model(self) -> ModelSettings: ...
    @property
    def classes(self) -> tuple[str, ...]: ...


def model_from_config(
    cfg: ConfigWithModel, *, load_pretrained: bool = True, members: int = 0
) -> MCModel:
    """The model ``cfg.model`` describes for ``cfg.classes``: the one place the config becomes
    a :func:`create_model` call. ``load_pretrained`` false leaves ``model.pretrained`` unread
    (a model built on the ``meta`` device to measure its size); ``members``: the ensemble's
    extra heads (``query.ensemble_size`` with ``query.posterior = "ensemble"``)."""
    m = cfg.model
    return create_model(
        m.name,
        len(cfg.classes),
        in_channels=m.channels,
        dropout=m.dropout,
        hidden=m.hidden,
        pretrained=m.pretrained if load_pretrained else None,
        backbone_dropout=m.backbone_dropout,
        features=m.features,
        members=members,
    )


def read_pretrained(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``model.pretrained`` file, or one :class:`ModelError` line naming
    the file and what was expected. Commands call it before they write anything, so a bad
    file leaves the workspace as it was."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"model.pretrained: weights file not found: {path} (medal never "
            f"downloads weights; save them locally and give the path)"
        )
    state = read_weights(path, "model.pretrained:")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(
            f"model.pretrained: {path} holds a {type(state).__name__}, not a "
            f"state dict (names -> tensors, as torch.save(model.state_dict()) "
            f"writes)"
        )
    return state


def load_backbone_weights(model: MCModel, path: Path) -> None:
    """Load a torchvision-style state dict into the backbone (classifier keys ignored).

    A 3-channel stem is averaged over its RGB filters when the model takes 1 channel.
    """
    state = read_pretrained(path)
    own = model.backbone.state_dict()
    adapted = {}
    for k, v in state.items():
        if k not in own:
            continue
        if v.ndim == 4 and own[k].ndim == 4 and v.shape[1] == 3 and own[k].shape[1] == 1:
            v = v.mean(dim=1, keepdim=True)
        adapted[k] = v
    bad = [k for k, v in adapted.items() if v.shape != own[k].shape]
    missing = [k for k in own if k not in adapted]
    if bad or len(missing) == len(own):
        raise ModelError(
            f"model.pretrained: {path} does not fit this backbone "
            f"({len(bad)} shape mismatches, {len(missing)} of {len(own)} weights "
            f"missing)"
        )
    model.backbone.load_state_dict(adapted, strict=False)


_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


def read_weights(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, or one :class:`ModelError` line
    starting with ``what`` and naming ``path``: a file that is not one torch.save writes (a zip
    archive, or the legacy pickle format), a truncated or corrupt one, or one that holds more
    than tensors and plain containers (never unpickled: that would run code from the file)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"{what} cannot read {path}: {e.strerror or e}") from None
    expected = "expected a file written by torch.save"
    if not (magic == _ZIP_MAGIC or magic[:1] == _PICKLE_MAGIC):
        raise ModelError(
            f"{what} {path} is not a PyTorch weights file ({expected}: a zip "
            f"archive; this one starts with {magic!r})"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError(
            f"{what} {path} holds Python objects other than tensors, which medal "
            f"does not unpickle ({expected} of a state dict)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure to load means an unusable file
        raise ModelError(
            f"{what} {path} is truncated or corrupt ({expected}): {first_sentence(e)}"
        ) from None


def first_sentence(e: BaseException) -> str:
    """The first sentence of an exception's message (torch's run to paragraphs)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text.split(". ", 1)[0].rstrip(".")


def set_mc_mode(model: nn.Module) -> int:
    """Eval mode everywhere except dropout layers, which keep sampling. Returns their count."""
    model.eval()
    n = 0
    for m in model.modules():
        if isinstance(m, _DROPOUT_TYPES):
            m.train()
            n += 1
    return n


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device = {name!r} but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(name)
