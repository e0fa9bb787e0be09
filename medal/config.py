"""TOML config -> frozen dataclasses.

Every key has a default except ``workspace`` and ``classes``.
Relative paths resolve against the folder of the config file. An unknown key, a missing required
key or a value of the wrong type or range raises :class:`~medal.errors.ConfigError` naming the key
and what is allowed.
"""

from __future__ import annotations

import argparse

import dataclasses
import math
import os
import tomllib
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .roundfolder import reserved_name

DEVICES = ("auto", "cpu", "cuda")
SAMPLING_MODES = ("auto", "head", "full")
PRECISIONS = ("bf16", "fp16", "fp32")
POSTERIORS = ("mc_dropout", "ensemble")
ROUND_STARTS = ("warm_start", "retrain")
BALANCE_MODES = ("loss", "sampler", "none")
MONITORS = ("balanced_accuracy+auroc", "auroc", "balanced_accuracy", "accuracy", "loss")


@dataclass(frozen=True)
class DataConfig:
    pool: Path | None = None
    """Folder of unlabelled images, searched recursively. Needed by ``medal query``; not by
    ``medal simulate``, which makes its own pool from ``--truth``."""
    labelled: Path | None = None
    """Folder with one subfolder per class, or a CSV with columns ``file,label``. Optional:
    without it, or with its class subfolders still empty (no label yet), ``medal query``
    chooses the first round from the pool alone (needs ``representation.method = "simclr"``)."""
    validation: Path | None = None
    """Optional; same forms as ``labelled``. Used to pick the best epoch and report metrics."""
    test: Path | None = None
    """Optional; same forms as ``labelled``. Reported only, never used for decisions."""


@dataclass(frozen=True)
class ImageConfig:
    window: str | tuple[float, float] = "file"
    """"file" (the file's own DICOM window), "minmax", or [center, width]."""
    frame: str | int = "middle"
    """Multi-frame DICOM: "middle", a frame index, or "all" (every frame is its own image,
    with the frame index in its id)."""
    cache: bool = True
    """Keep preprocessed pixels in <workspace>/cache so each image is decoded once."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "auto"
    """A registered backbone, or "auto": ``small_cnn4`` when the self-supervised pretraining sees
    at least ``auto_min_images`` images, ``small_cnn`` below that or without pretraining. A
    project keeps the backbone its first training chose (later rounds start from it)."""
    auto_min_images: int = 3000
    """With ``name = "auto"``: the number of pretraining images (pool, labelled, automatic
    hold-out) from which the deeper ``small_cnn4`` is used."""
    image_size: int = 28
    channels: int = 1
    """Input channels the network sees: 1 (grayscale) or 3 (RGB). Images are converted."""
    dropout: float = 0.5
    hidden: int = 0
    """0 (default): a linear head on standardised features with dropout on its input, the head
    for ``train.freeze_backbone``; > 0: a hidden layer of this width (dropout, linear, ReLU,
    dropout, linear), for training the whole network."""
    backbone_dropout: float = 0.0
    """> 0 adds Dropout2d after the backbone's stages, so MC sampling runs the whole network."""
    features: str = "auto"
    """What the head sees: "last" (the backbone's pooled output), "multiscale" (that plus the
    pooled output of each earlier stage), "auto" (multiscale unless backbone_dropout > 0)."""
    pretrained: Path | None = None
    """Optional local weights file for the backbone (never downloaded)."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    """Epochs for the first training (round 0), and for every round under ``retrain``."""
    fine_tune_epochs: int | None = None
    """Epochs when fine-tuning from the previous round's checkpoint; default: ``epochs``."""
    round_start: str = "warm_start"
    """"warm_start": fine-tune from the previous round's best checkpoint; "retrain": start each
    round from the initial (or pretrained) weights."""
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    balance: str = "loss"
    """Imbalanced labels: "loss" (inverse-frequency class weights), "sampler" (class-balanced
    sampling of batches) or "none"."""
    class_prior: dict[str, float] | None = None
    """The population's class shares (e.g. ``{normal = 0.1, pneumonia = 0.9}``; any positive
    numbers, normalised): with ``balance`` "loss" or "sampler", weights are the inverse of these
    shares instead of the labels' own class frequencies. None: the labels' frequencies."""
    augment: bool = True
    """torchvision.transforms.v2 augmentation (crops, small rotations, intensity jitter) during
    training only."""
    hflip: bool = True
    """Random horizontal flips as part of the augmentation."""
    min_steps: int = 50
    """Lower bound on optimiser steps per training, so tiny labelled sets still train."""
    monitor: str = "balanced_accuracy+auroc"
    """Validation metric that picks the best epoch and drives early stopping."""
    patience: int = 0
    """Stop after this many epochs without a better validation metric; 0 = never stop early."""
    validate_every: int = 1
    """Evaluate on the validation set every this many epochs (and after the last one); the
    best epoch is chosen among the evaluated ones. Larger values train faster."""
    freeze_backbone: bool = True
    """Train only the stochastic head on fixed backbone features (a "probe"; the default, as
    measured in the README: with 20–100 labels it beats training the whole network): with a
    self-supervised backbone (``[representation]``) this keeps what the pool taught it, which
    full fine-tuning on a few labels throws away. The head trains on all labelled features at
    once for ``probe_steps`` steps (a fixed schedule: no epoch is chosen on a hold-out, so
    ``epochs``, ``batch_size``, ``min_steps``, ``augment`` and ``monitor`` do not apply)."""
    probe_steps: int = 300
    """With ``freeze_backbone``: full-batch AdamW steps of the head (cosine learning rate)."""
    probe_lr: float = 0.01
    """With ``freeze_backbone``: the head's peak learning rate."""
    semi_supervised: str = "none"
    """With ``freeze_backbone``: "pseudo_label" also learns from the unlabelled pool by
    self-training (the pool images the head predicts with probability >= ``pseudo_threshold``
    take that class for a second run of the schedule); "none": labelled images only."""
    pseudo_threshold: float = 0.95
    """Confidence a pool image's prediction needs to become a pseudo-label."""
    finetune: str = "off"
    """With ``freeze_backbone``, after the probe: "off" (default: the head only), "always", or
    "auto": once every class has ``finetune_min_per_class`` training labels, fine-tune backbone
    and head together (LP-FT; ``epochs`` epochs of ``batch_size``, at least ``min_steps``
    steps, cosine learning rate from ``lr`` for the head and ``lr * finetune_lr_scale`` for the
    backbone, ``augment``, BatchNorm statistics kept from the pretraining, last epoch kept).
    The cached self-supervised backbone is never changed."""
    finetune_min_per_class: int = 50
    """``finetune = "auto"``: training labels every class needs before fine-tuning starts."""
    finetune_lr_scale: float = 0.1
    """Fine-tuning: the backbone's learning rate as a fraction of the head's (``lr``)."""
    finetune_batchnorm: str = "frozen"
    """Fine-tuning: "frozen" (default) keeps the BatchNorm running statistics of the
    pretraining (computed on the whole pool); "update" lets the labelled batches update them."""
    companion: str = "auto"
    """With ``freeze_backbone``: a whole network trained beside the frozen head, their
    probabilities averaged (predictions, metrics and the query's MC samples; see
    :mod:`medal.companion`). "auto" (default): once ``companion_min_labels`` training labels
    are given and they cover ``companion_min_coverage`` of the images, where it applies (a
    frozen backbone whose head alone is sampled; off elsewhere, where "always" is refused);
    "always"; "off": the frozen head alone. The companion starts from random
    weights each round, holds out ``companion_holdout`` of the labels (stratified) to choose its
    best epoch by ``monitor`` and trains as ``freeze_backbone = false`` would (``epochs``,
    ``batch_size``, ``lr``, ``augment``, ...); its head has ``COMPANION_HIDDEN`` units."""
    companion_min_labels: int = 100
    """``companion = "auto"``: training labels (all classes together; a validation hold-out
    is not counted) before the companion joins; fixed in advance, so it uses nothing but the
    labels spent."""
    companion_min_coverage: float = 0.5
    """``companion = "auto"``: share of the images, training labels ÷ (training labels +
    unlabelled pool images), that the labels must also cover before the companion joins. On a
    strategy's picks a whole network trained on a small, chosen part of the pool lowers the
    averaged model (docs/experiments-acquisition.md, Runs C1-C3); at half (default) it is
    level there and lifts the ceiling (docs/experiments-lpft.md, Runs X1, X2). 0: none."""
    companion_holdout: float = 0.2
    """Share of the labels the companion holds out (stratified) to choose its best epoch; the
    frozen head still trains on every label."""
    head_choice: str = "auto"
    """With ``freeze_backbone`` and the linear head (``model.hidden = 0``): "cv" chooses each
    round between the linear head and a head with a hidden layer of ``head_choice_hidden``
    units, by the out-of-fold macro AUROC of a stratified 5-fold split of the training labels
    (:mod:`medal.headchoice`), once there are ``head_choice_min_labels`` of them; "auto"
    (default): "cv" where it applies (a frozen backbone's linear head without ``finetune``),
    off elsewhere (where "cv" is refused); "off": the configured head always."""
    head_choice_min_labels: int = 100
    """``head_choice = "cv"``: training labels (all classes together) before the choice is
    made; fewer keep the linear head."""
    head_choice_hidden: int = 128
    """``head_choice = "cv"``: units of the hidden-layer head it may choose."""
    head_choice_min_coverage: float = 0.5
    """``head_choice = "cv"``: share of the images, training labels ÷ (training labels +
    unlabelled pool images), that the labels must cover before the choice is made; below it
    the linear head is kept. Cross-validation on a strategy's picks is biased while they are a
    small, chosen part of the pool (docs/experiments-lpft.md, Runs H1-H2b); default: half
    (Runs K3, X1, X2). 0: no condition."""
    validation_fraction: float = 0.0
    """Without ``data.validation``: share of the initial labelled set held out (stratified,
    chosen once and frozen in the ledger, so metrics compare across rounds) to choose epochs
    by. 0 (default): none, since the probe's fixed schedule chooses nothing on it; with
    ``freeze_backbone = false`` a hold-out of e.g. 0.2 picks the best epoch."""
    tensorboard: bool = False
    """Log the project to TensorBoard, one run in ``<workspace>/tensorboard``: each model
    round's validation/test metrics against the number of labels (``labels/...``), its
    training loss and validation metrics written while it trains (``round-NNN/...``), and the
    self-supervised pretraining loss per step (``pretraining/loss``). Needs the tensorboard
    extra: ``pip install 'medal-al[tensorboard]'``; view with
    ``tensorboard --logdir <workspace>/tensorboard``."""


@dataclass(frozen=True)
class RepresentationConfig:
    method: str = "simclr"
    """"simclr" (default): before the first training, pretrain the backbone self-supervised
    (SimCLR, NT-Xent) on the pool and labelled images, cached in
    <workspace>/cache/representation by image content and settings; "none": start from random
    (or ``model.pretrained``) weights (then also set ``train.freeze_backbone = false``, or the
    head learns on untrained features)."""
    epochs: int = 30
    batch_size: int = 256
    temperature: float = 0.2
    lr: float = 1e-3
    min_steps: int = 0
    """Fewest optimiser steps of the pretraining: its steps are epochs x (images //
    batch_size), raised to ``min_steps`` for small sets and cut to ``max_steps`` for large
    ones; part of the cache key when above 0."""
    max_steps: int = 3000
    """Most optimiser steps of the pretraining (3000 batches of 256: about the 30 epochs of
    25,000 images), so a pool of 100,000 costs no more than one of 25,000; part of the cache
    key where it shortens the pretraining."""
    seed: int | None = None
    """Seed of the pretraining (the backbone's initial weights, the random views, the batch
    order); part of the cache key. Default: the project's ``seed``. ``medal simulate`` sets it
    per run (``--backbones``)."""


@dataclass(frozen=True)
class QueryConfig:
    strategy: str = "bald"
    budget: int = 20
    mc_samples: int = 20
    batch_size: int = 256
    cold_start: str = "typiclust"
    """While some class has no label yet, the model cannot be trusted to look for it:
    "typiclust" picks the round by typicality and coverage (TypiClust, with the labelled
    images as covered clusters) on backbone features, the same choice as a zero-label first
    round; "diversity" by k-center (core-set) diversity on them, starting from the labelled
    images; "off" always uses ``strategy``."""
    balance: bool = False
    """Spread the budget over the predicted classes (round-robin by score); for per-image
    strategies."""
    sampling: str = "auto"
    """"head" (backbone once, T head samples), "full" (T stochastic passes of the whole
    network, batched), or "auto" (full when model.backbone_dropout > 0, else head)."""
    precision: str = "bf16"
    """Autocast dtype for scoring on CUDA: "bf16", "fp16" or "fp32" (CPU always uses fp32)."""
    max_batch_items: int = 0
    """Full-network sampling: most images (batch x samples) per forward call; 0 = auto
    (CUDA: 4096, so the T replicas share few large calls; CPU: query.batch_size, since
    smaller calls are faster there)."""
    posterior: str = "mc_dropout"
    """What the scores' samples ``[N, T, C]`` come from: "mc_dropout" (default: T =
    ``mc_samples`` dropout samples of the head, or of the whole network), or "ensemble":
    after each training, ``ensemble_size`` extra heads are fitted by the probe's schedule, each
    to a class-stratified bootstrap resample of the labelled images' features (seed: the
    round's + k), and their softmax outputs with dropout off are the samples (T =
    ``ensemble_size``). The model's own head, trained on every label, still predicts and is
    evaluated. Needs ``train.freeze_backbone`` and head-only sampling."""
    ensemble_size: int = 5
    """With ``posterior = "ensemble"``: the number of extra heads K (>= 2)."""
    companion_samples: str = "average"
    """With a whole-network companion (``train.companion``), the samples the scores take:
    "average" (default: sample t of the head averaged with sample t of the companion, T
    samples), "mixture" (the head's T samples followed by the companion's T, 2T samples, so
    that BALD and the other scores see the two models' disagreement) or "head" (the frozen
    head's T samples alone: the picks are those without a companion, and the manifest's
    probabilities are the head's). Metrics are the pair's average whichever it is."""
    head_choice_samples: str = "linear"
    """When ``train.head_choice`` chose the hidden layer, the head whose MC dropout samples the
    scores take: "linear" (default: a linear head trained beside it on the same labels, so
    the picks are those of the linear head, and the manifest's probabilities its) or "chosen"
    (the hidden layer's own samples; Run H1). Predictions and metrics are the chosen head's."""


@dataclass(frozen=True)
class LabellingConfig:
    deidentify: bool = False
    """Exported DICOM copies are de-identified (PS3.15 basic profile); the manifest mapping
    them back to source files then stays in the workspace, not in the round folder."""
    previews: bool = True
    """Write a PNG preview of each image as the model saw it (windowed) and index.html."""
    preview_size: int = 512
    """Longest side of the previews, in pixels."""
    show_predictions: bool = False
    """The labelling page (``medal labels serve``) and the round folder (``index.html``,
    ``manifest.csv``) show the model's prediction, probabilities and score. Off by default:
    readers label blind, as automation bias is real in radiology; the workspace keeps them
    (``labelling/manifests/round-NNN.csv``)."""


@dataclass(frozen=True)
class Config:
    path: Path
    """The config file itself (absolute)."""
    workspace: Path
    classes: tuple[str, ...]
    data: DataConfig
    image: ImageConfig = field(default_factory=ImageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    representation: RepresentationConfig = field(default_factory=RepresentationConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    labelling: LabellingConfig = field(default_factory=LabellingConfig)
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0

    def class_prior(self) -> tuple[float, ...] | None:
        """``train.class_prior`` as shares ``[K]`` in the order of ``classes`` (sum 1), or
        None when unset."""
        prior = self.train.class_prior
        if prior is None:
            return None
        total = sum(prior[c] for c in self.classes)
        return tuple(prior[c] / total for c in self.classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (paths as strings) for storing beside checkpoints and in the ledger."""

        def conv(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, tuple):
                return [conv(x) for x in v]
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            return v

        return conv(dataclasses.asdict(self))


_SECTIONS = {
    "data": DataConfig,
    "image": ImageConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "representation": RepresentationConfig,
    "query": QueryConfig,
    "labelling": LabellingConfig,
}
_TOP_KEYS = ("workspace", "classes", "seed", "device", "num_workers")


def add_overrides_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` option (into ``overrides``, for
    :func:`parse_overrides`) of medal's commands and scripts."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["query.budget=50", ...]`` (``--set`` arguments) -> ``{"query.budget": 50}``; values are
    TOML (``50``, ``true``, ``"text"``, ``[40, 400]``), and anything else is a plain string."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. query.budget=50), got {pair!r}")
        text = value.strip()
        try:
            out[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = text
    return out


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML config file. ``overrides`` maps dotted keys (``"query.budget"``) to values."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from None
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: Path) -> Config:
    """Validate a parsed TOML mapping; ``path`` is the file relative paths resolve against."""
    where = str(path)
    base = path.parent
    known = set(_TOP_KEYS) | set(_SECTIONS)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"valid top-level keys: {', '.join(sorted(known))}"
        )
    for key in ("workspace", "classes"):
        if key not in raw:
            raise ConfigError(f"{where}: missing required key {key!r}")

    workspace = _path(raw["workspace"], "workspace", base, where)
    classes = _classes(raw["classes"], where)

    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        sections[name] = _build(cls, table, name, base, where)

    seed = _seed(raw.get("seed", 0), "seed", where)
    device = raw.get("device", "auto")
    if device not in DEVICES and not (isinstance(device, str) and device.startswith("cuda:")):
        raise ConfigError(
            f"{where}: 'device' must be one of {', '.join(DEVICES)} or 'cuda:N', got {device!r}"
        )
    num_workers = _num_workers(raw.get("num_workers", 0), where)
    cfg = Config(
        path=path,
        workspace=workspace,
        classes=tuple(classes),
        seed=seed,
        device=device,
        num_workers=num_workers,
        **sections,
    )
    _validate_values(cfg, where)
    return cfg


def _classes(classes: Any, where: str) -> list[str]:
    """The ``classes`` list, stripped: at least two non-empty strings, distinct even where folder
    names ignore case and Unicode normalisation, each one a valid folder name."""
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) and c.strip() for c in classes)
    ):
        raise ConfigError(
            f"{where}: 'classes' must be a list of at least two non-empty strings, got {classes!r}"
        )
    classes = [c.strip() for c in classes]
    # macOS and Windows folder names ignore case, and macOS Unicode normalisation too
    lowered = [unicodedata.normalize("NFC", c).lower() for c in classes]
    if len(set(lowered)) != len(lowered):
        raise ConfigError(
            f"{where}: 'classes' has duplicates (ignoring case and Unicode "
            f"normalisation, NFC/NFD): {', '.join(map(ascii, classes))}"
        )
    for c in classes:
        reason = class_name_problem(c)
        if reason is not None:
            raise ConfigError(f"{where}: 'classes': {c!r} cannot be a class name: {reason}")
    return classes


# Names medal writes into a round folder (besides the image copies and class folders).
_WINDOWS_DEVICES = {
    "con",
    "prn",
    "aux",
    "nul",
    "conin$",
    "conout$",
    *(f"{p}{n}" for p in ("com", "lpt") for n in "0123456789\u00b9\u00b2\u00b3"),
}
# Unicode categories of characters that are invisible or reorder the text around them
# (bidi overrides and isolates, zero-width spaces and joiners, line/paragraph separators):
# a folder name with one looks like another name, or like nothing.
_INVISIBLE_CATEGORIES = {
    "Cf": "an invisible formatting character",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}
_WINDOWS_FORBIDDEN = set('<>:"/\\|?*')


def class_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a class name (each class is a folder in every round folder and
    in labelled sources), or ``None`` if it can.

    Refused: ``unsure`` and the names of files medal writes into a round folder
    (``labels.csv``, ``labels_*.csv``, ``manifest.csv``, ``index.html``, ``README.txt``,
    ``previews``), compared without case as Windows and macOS do; names that are not folder
    names on Windows or macOS: longer than 255 bytes in UTF-8, containing ``< > : " / \\ | ? *``
    or control characters, ending in a dot or a space, ``.``/``..``/hidden (leading dot), and
    Windows device names (``CON``, ``PRN``, ``AUX``, ``NUL``, ``CONIN$``, ``CONOUT$``,
    ``COM0``-``COM9``, ``LPT0``-``LPT9``, also with an extension, e.g. ``nul.txt``); names
    with invisible characters that make them look like another name (Unicode format
    characters such as bidi overrides, zero-width spaces and joiners; line and paragraph
    separators).
    """
    low = name.lower()
    if not name:
        return "it is empty"
    if low == "unsure":
        return "'unsure' is the reserved label for images a reader cannot decide"
    if reserved_name(name):
        return "medal writes a file or folder of that name into every round folder"
    if len(name.encode("utf-8")) > 255:
        return f"{len(name.encode('utf-8'))} bytes in UTF-8; folder names allow at most 255"
    bad = sorted({ch for ch in name if ch in _WINDOWS_FORBIDDEN or ord(ch) < 32 or ord(ch) == 127})
    if bad:
        return (
            f"contains {', '.join(repr(ch) for ch in bad)}, not allowed in folder names "
            f'(Windows forbids < > : " / \\ | ? * and control characters)'
        )
    invisible = sorted({ch for ch in name if unicodedata.category(ch) in _INVISIBLE_CATEGORIES})
    if invisible:
        ch = invisible[0]
        return (
            f"contains {ascii(ch)} ({unicodedata.name(ch, 'unnamed')}), "
            f"{_INVISIBLE_CATEGORIES[unicodedata.category(ch)]}: the name would look "
            f"like another one"
        )
    if name.startswith("."):
        return "a leading dot makes a hidden folder ('.' and '..' are not folder names)"
    if name[-1] in ". ":
        return "Windows does not allow folder names ending in a dot or a space"
    if low.split(".", 1)[0].rstrip(" ") in _WINDOWS_DEVICES:
        return (
            "a reserved device name on Windows (CON, PRN, AUX, NUL, CONIN$, CONOUT$, "
            "COM0-COM9, LPT0-LPT9)"
        )
    return None


def _build(cls: type, table: dict[str, Any], section: str, base: Path, where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"valid keys in [{section}]: {', '.join(fields)}"
        )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key {key!r}")
            continue
        parse = _KEY_PARSERS.get(key) or _TYPE_PARSERS.get(str(f.type))
        if parse is None:  # pragma: no cover - guards against adding a field without a parser
            raise AssertionError(f"no parser for {key} of type {f.type}")
        values[name] = parse(table[name], key, base, where)
    return cls(**values)


def _frame(v: Any, key: str, where: str) -> str | int:
    if not (v in ("middle", "all") or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)):
        raise ConfigError(
            f'{where}: {key!r} must be "middle", "all" or a frame index >= 0, got {v!r}'
        )
    return v


def _float(v: Any, key: str, where: str) -> float:
    if isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    return _finite(_check_type(v, float, key, where), key, where)


# How a config value is read, by the field's annotation; ``(value, key, base, where)``: ``key``
# is the dotted key, ``base`` the folder relative paths resolve against, ``where`` the source
# named in messages.
_Parser = Callable[[Any, str, Path, str], Any]
_TYPE_PARSERS: dict[str, _Parser] = {
    "Path": lambda v, key, base, where: _path(v, key, base, where),
    "Path | None": lambda v, key, base, where: (
        None if v in ("", None) else _path(v, key, base, where)
    ),
    "str | tuple[float, float]": lambda v, key, base, where: _window(v, key, where),
    "str | int": lambda v, key, base, where: _frame(v, key, where),
    "bool": lambda v, key, base, where: _check_type(v, bool, key, where),
    "int": lambda v, key, base, where: _check_type(v, int, key, where),
    "int | None": lambda v, key, base, where: _check_type(v, int, key, where),
    "float": lambda v, key, base, where: _float(v, key, where),
    "str": lambda v, key, base, where: _check_type(v, str, key, where),
}
_KEY_PARSERS: dict[str, _Parser] = {
    "representation.seed": lambda v, key, base, where: _seed(v, key, where),
    "train.class_prior": lambda v, key, base, where: _shares(v, key, where),
}


def _shares(v: Any, key: str, where: str) -> dict[str, float] | None:
    """A table of class name -> positive finite number (the names are checked against
    ``classes`` with the other cross-key rules); an empty table means unset."""
    if not isinstance(v, dict):
        raise ConfigError(
            f"{where}: {key!r} must be a table of class shares, e.g. "
            f"{{normal = 0.1, pneumonia = 0.9}}, got {v!r}"
        )
    out = {}
    for name, share in v.items():
        if isinstance(share, bool) or not isinstance(share, (int, float)):
            raise ConfigError(f"{where}: {key}.{name} must be a number > 0, got {share!r}")
        if not (math.isfinite(share) and share > 0):
            raise ConfigError(f"{where}: {key}.{name} must be a finite number > 0, got {share!r}")
        out[str(name)] = float(share)
    return out or None


def _window(v: Any, key: str, where: str) -> str | tuple[float, float]:
    from .io.images import WINDOW_MODES  # io owns the window modes

    if isinstance(v, str) and v in WINDOW_MODES:
        return v
    if (
        isinstance(v, list)
        and len(v) == 2
        and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v
        )
        and v[1] > 0
    ):
        return (float(v[0]), float(v[1]))
    modes = ", ".join(f'"{m}"' for m in WINDOW_MODES)
    raise ConfigError(
        f"{where}: {key!r} must be one of {modes} or [center, width] of finite "
        f"numbers with width > 0, got {v!r}"
    )


def _check_type(v: Any, t: type, key: str, where: str) -> Any:
    ok = isinstance(v, t) and not (t is not bool and isinstance(v, bool))
    if not ok:
        raise ConfigError(f"{where}: {key!r} must be {t.__name__}, got {v!r}")
    return v


def _path(v: Any, key: str, base: Path, where: str) -> Path:
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"{where}: {key!r} must be a non-empty path string, got {v!r}")
    if "\x00" in v:
        raise ConfigError(
            f"{where}: {key!r} contains a NUL character (\\x00), which no path can hold, got {v!r}"
        )
    p = Path(v).expanduser()
    try:
        return (p if p.is_absolute() else base / p).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a link loop, a name too long
        raise ConfigError(
            f"{where}: {key!r}: cannot resolve the path {v!r}: {getattr(e, 'strerror', None) or e}"
        ) from None


def _finite(v: float, key: str, where: str) -> float:
    if not math.isfinite(v):
        raise ConfigError(f"{where}: {key!r} must be a finite number, got {v!r}")
    return v


SEED_MAX = 2**32 - 1
"""Largest seed: NumPy's and torch's generators take it, and the round seeds derived from it
(``seed * 1000 + round``) stay within torch's 64-bit range."""


def _seed(v: Any, key: str, where: str) -> int:
    v = _check_type(v, int, key, where)
    if not 0 <= v <= SEED_MAX:
        raise ConfigError(f"{where}: {key!r} must be between 0 and {SEED_MAX} (2**32 - 1), got {v}")
    return v


def cpu_count() -> int:
    """CPUs this process may run on (its affinity, where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _num_workers(v: Any, where: str) -> int:
    v = _check_type(v, int, "num_workers", where)
    cpus = cpu_count()
    if not 0 <= v <= cpus:
        raise ConfigError(
            f"{where}: 'num_workers' must be between 0 and {cpus} (the CPUs this "
            f"machine gives medal; more worker processes cannot load faster), "
            f"got {v}"
        )
    return v


class _Need:
    """``need(ok, key, allowed, value)``: a :class:`ConfigError` naming the key, what it must
    be and what it is, unless ``ok``."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, ok: bool, key: str, allowed: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{self.where}: {key!r} must be {allowed}, got {value!r}")


def _validate_values(cfg: Config, where: str) -> None:
    """Every value in its range, in the order the keys are checked (model, train, then the
    rest): the first bad one is named."""
    need = _Need(where)
    _validate_model(cfg.model, need)
    _validate_train(cfg.train, need)
    _validate_train_probe_and_finetune(cfg.train, need)
    _validate_head_choice(cfg, need)
    _validate_class_prior(cfg, need)
    _validate_companion(cfg, need)
    _validate_the_rest(cfg, need)
    _validate_posterior(cfg, need)


def _validate_class_prior(cfg: Config, need: _Need) -> None:
    """``train.class_prior``: only where class weights are used (not with ``train.balance =
    "none"``), naming every class once and nothing else."""
    prior = cfg.train.class_prior
    if prior is not None:
        need(
            cfg.train.balance != "none",
            "train.class_prior",
            'unset with train.balance = "none"',
            prior,
        )
        need(
            set(prior) == set(cfg.classes),
            "train.class_prior",
            f"a share for each class ({', '.join(cfg.classes)}) and nothing else",
            prior,
        )


def _validate_model(m: ModelConfig, need: _Need) -> None:
    """The [model] values: a registered name, image size, channels, dropout, head width."""
    from .models import available_models  # the registry lists the model names

    names = (*available_models(), "auto")
    need(m.name in names, "model.name", f"one of {', '.join(names)}", m.name)
    need(m.auto_min_images >= 0, "model.auto_min_images", ">= 0", m.auto_min_images)
    need(
        m.name != "auto" or m.pretrained is None,
        "model.name",
        "a named backbone when model.pretrained is given (its weights fit one architecture), "
        'not "auto"',
        m.name,
    )
    need(8 <= m.image_size <= 2048, "model.image_size", "between 8 and 2048", m.image_size)
    need(m.channels in (1, 3), "model.channels", "1 or 3", m.channels)
    need(0.0 < m.dropout < 1.0, "model.dropout", "in (0, 1) (MC dropout needs dropout)", m.dropout)
    need(m.hidden >= 0, "model.hidden", ">= 0 (0 = linear head)", m.hidden)


def _validate_train(t: TrainConfig, need: _Need) -> None:
    """The [train] values of the epochs, the optimiser, class balance and best-epoch choice."""
    need(t.epochs >= 1, "train.epochs", ">= 1", t.epochs)
    need(
        t.fine_tune_epochs is None or t.fine_tune_epochs >= 1,
        "train.fine_tune_epochs",
        ">= 1",
        t.fine_tune_epochs,
    )
    need(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size)
    need(t.lr > 0, "train.lr", "> 0", t.lr)
    need(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    need(t.min_steps >= 0, "train.min_steps", ">= 0", t.min_steps)
    need(
        t.round_start in ROUND_STARTS,
        "train.round_start",
        f"one of {', '.join(ROUND_STARTS)}",
        t.round_start,
    )
    need(
        t.balance in BALANCE_MODES, "train.balance", f"one of {', '.join(BALANCE_MODES)}", t.balance
    )
    need(t.monitor in MONITORS, "train.monitor", f"one of {', '.join(MONITORS)}", t.monitor)
    need(t.patience >= 0, "train.patience", ">= 0", t.patience)
    need(t.validate_every >= 1, "train.validate_every", ">= 1", t.validate_every)


def _validate_train_probe_and_finetune(t: TrainConfig, need: _Need) -> None:
    """The [train] values of the head probe (``freeze_backbone``), pseudo-labels, fine-tuning
    after the probe, and the held-out fraction."""
    need(t.probe_steps >= 1, "train.probe_steps", ">= 1", t.probe_steps)
    need(t.probe_lr > 0, "train.probe_lr", "> 0", t.probe_lr)
    need(
        t.semi_supervised in ("none", "pseudo_label"),
        "train.semi_supervised",
        "one of none, pseudo_label",
        t.semi_supervised,
    )
    need(
        0.5 <= t.pseudo_threshold < 1.0, "train.pseudo_threshold", "in [0.5, 1)", t.pseudo_threshold
    )
    need(
        t.finetune in ("off", "auto", "always"),
        "train.finetune",
        "one of off, auto, always",
        t.finetune,
    )
    need(
        t.finetune_min_per_class >= 1,
        "train.finetune_min_per_class",
        ">= 1",
        t.finetune_min_per_class,
    )
    need(
        0.0 < t.finetune_lr_scale <= 1.0,
        "train.finetune_lr_scale",
        "in (0, 1]",
        t.finetune_lr_scale,
    )
    need(
        t.finetune_batchnorm in ("frozen", "update"),
        "train.finetune_batchnorm",
        "one of frozen, update",
        t.finetune_batchnorm,
    )
    need(
        0.0 <= t.validation_fraction < 1.0,
        "train.validation_fraction",
        "in [0, 1)",
        t.validation_fraction,
    )


def head_choice_on(cfg: Config) -> bool:
    """Whether ``train.head_choice`` chooses the head: ``"cv"``, or ``"auto"`` where it applies
    (the linear probe of a frozen backbone, ``model.hidden = 0``, without LP-FT)."""
    t = cfg.train
    if t.head_choice == "auto":
        return t.freeze_backbone and cfg.model.hidden == 0 and t.finetune == "off"
    return t.head_choice == "cv"


def full_sampling(cfg: Config) -> bool:
    """Whether the query samples the whole network (``query.sampling``), not the head alone."""
    q = cfg.query
    return q.sampling == "full" or (q.sampling == "auto" and cfg.model.backbone_dropout > 0)


def companion_on(cfg: Config) -> bool:
    """Whether ``train.companion`` may train a companion: ``"always"``, or ``"auto"`` where it
    applies (a frozen backbone whose head alone is sampled); its label and coverage conditions
    are :func:`medal.companion.companion_decision`'s."""
    t = cfg.train
    if t.companion == "auto":
        return t.freeze_backbone and not full_sampling(cfg)
    return t.companion == "always"


def _validate_head_choice(cfg: Config, need: _Need) -> None:
    """The values of the head's choice by cross-validation (``train.head_choice``)."""
    t = cfg.train
    need(
        t.head_choice in ("off", "cv", "auto"),
        "train.head_choice",
        "one of off, cv, auto",
        t.head_choice,
    )
    need(
        t.head_choice != "cv" or (t.freeze_backbone and cfg.model.hidden == 0),
        "train.head_choice",
        '"off" unless train.freeze_backbone = true and model.hidden = 0 (it chooses between '
        "the linear head and a hidden layer for the frozen backbone's probe)",
        t.head_choice,
    )
    need(
        t.head_choice_min_labels >= 2,
        "train.head_choice_min_labels",
        ">= 2",
        t.head_choice_min_labels,
    )
    need(t.head_choice_hidden >= 1, "train.head_choice_hidden", ">= 1", t.head_choice_hidden)
    need(
        0.0 <= t.head_choice_min_coverage <= 1.0,
        "train.head_choice_min_coverage",
        "in [0, 1]",
        t.head_choice_min_coverage,
    )
    need(
        t.head_choice != "cv" or t.finetune == "off",
        "train.head_choice",
        '"off" with train.finetune (LP-FT fine-tunes the probe\'s head with the backbone)',
        t.head_choice,
    )
    need(
        cfg.query.head_choice_samples in ("linear", "chosen"),
        "query.head_choice_samples",
        "one of linear, chosen",
        cfg.query.head_choice_samples,
    )


def _validate_companion(cfg: Config, need: _Need) -> None:
    """The values of the whole-network companion (``train.companion``): only the head-only
    scoring of a frozen backbone runs it."""
    t, q = cfg.train, cfg.query
    need(
        q.companion_samples in ("average", "mixture", "head"),
        "query.companion_samples",
        "one of average, mixture, head",
        q.companion_samples,
    )
    need(
        t.companion != "always" or not full_sampling(cfg),
        "train.companion",
        '"off" with full-network sampling (query.sampling = "full", or "auto" with '
        "model.backbone_dropout > 0): the companion is scored beside the head only",
        t.companion,
    )
    need(
        t.companion in ("off", "auto", "always"),
        "train.companion",
        "one of off, auto, always",
        t.companion,
    )
    need(
        t.companion != "always" or t.freeze_backbone,
        "train.companion",
        '"off" unless train.freeze_backbone = true (it complements the frozen head)',
        t.companion,
    )
    need(
        t.companion_min_labels >= 1,
        "train.companion_min_labels",
        ">= 1",
        t.companion_min_labels,
    )
    need(
        0.0 <= t.companion_min_coverage <= 1.0,
        "train.companion_min_coverage",
        "in [0, 1]",
        t.companion_min_coverage,
    )
    need(
        0.0 < t.companion_holdout < 1.0,
        "train.companion_holdout",
        "in (0, 1)",
        t.companion_holdout,
    )


def _validate_steps(r: RepresentationConfig, need: _Need) -> None:
    need(r.min_steps >= 0, "representation.min_steps", ">= 0", r.min_steps)
    rule = f">= 1 and >= representation.min_steps ({r.min_steps})"
    need(r.max_steps >= max(1, r.min_steps), "representation.max_steps", rule, r.max_steps)


def _validate_the_rest(cfg: Config, need: _Need) -> None:
    from .acquisition import available_strategies  # the registry is the only list
    from .models import FEATURE_MODES

    m, q, r = cfg.model, cfg.query, cfg.representation
    need(r.method in ("none", "simclr"), "representation.method", "one of none, simclr", r.method)
    need(r.epochs >= 1, "representation.epochs", ">= 1", r.epochs)
    need(r.batch_size >= 2, "representation.batch_size", ">= 2", r.batch_size)
    need(r.temperature > 0, "representation.temperature", "> 0", r.temperature)
    need(r.lr > 0, "representation.lr", "> 0", r.lr)
    _validate_steps(r, need)
    strategies = available_strategies()
    need(q.strategy in strategies, "query.strategy", f"one of {', '.join(strategies)}", q.strategy)
    need(q.budget >= 1, "query.budget", ">= 1", q.budget)
    need(q.mc_samples >= 2, "query.mc_samples", ">= 2", q.mc_samples)
    need(
        cfg.labelling.preview_size >= 16,
        "labelling.preview_size",
        ">= 16",
        cfg.labelling.preview_size,
    )
    need(q.batch_size >= 1, "query.batch_size", ">= 1", q.batch_size)
    need(
        q.cold_start in ("diversity", "typiclust", "off"),
        "query.cold_start",
        "one of diversity, typiclust, off",
        q.cold_start,
    )
    need(
        q.sampling in SAMPLING_MODES,
        "query.sampling",
        f"one of {', '.join(SAMPLING_MODES)}",
        q.sampling,
    )
    need(
        q.precision in PRECISIONS, "query.precision", f"one of {', '.join(PRECISIONS)}", q.precision
    )
    need(q.max_batch_items >= 0, "query.max_batch_items", ">= 0 (0 = auto)", q.max_batch_items)
    need(0.0 <= m.backbone_dropout < 1.0, "model.backbone_dropout", "in [0, 1)", m.backbone_dropout)
    need(
        m.features in FEATURE_MODES,
        "model.features",
        f"one of {', '.join(FEATURE_MODES)}",
        m.features,
    )
    need(
        not (m.features == "multiscale" and m.backbone_dropout > 0),
        "model.features",
        '"last" or "auto" when model.backbone_dropout > 0 (full-network sampling splits the '
        "backbone)",
        m.features,
    )
    need(
        not (q.sampling == "full" and m.backbone_dropout == 0),
        "query.sampling",
        '"head" or "auto" when model.backbone_dropout = 0 (the backbone has no dropout)',
        q.sampling,
    )


def _validate_posterior(cfg: Config, need: _Need) -> None:
    """``query.posterior`` and ``query.ensemble_size``: an ensemble of heads needs fixed
    backbone features to fit them on and head-only sampling to score with them."""
    q = cfg.query
    need(
        q.posterior in POSTERIORS, "query.posterior", f"one of {', '.join(POSTERIORS)}", q.posterior
    )
    need(q.ensemble_size >= 2, "query.ensemble_size", ">= 2", q.ensemble_size)
    if q.posterior != "ensemble":
        return
    need(
        cfg.train.freeze_backbone,
        "query.posterior",
        '"mc_dropout" when train.freeze_backbone = false (the ensemble\'s heads are fitted on '
        "frozen-backbone features)",
        q.posterior,
    )
    full = full_sampling(cfg)
    need(
        not full,
        "query.posterior",
        '"mc_dropout" with full-network sampling (query.sampling = "full", or "auto" with '
        'model.backbone_dropout > 0); "ensemble" samples heads only (query.sampling = "head")',
        q.posterior,
    )
