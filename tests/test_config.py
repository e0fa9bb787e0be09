import json
from pathlib import Path

import pytest

from medal.config import load_config
from medal.errors import ConfigError

BASE = """
workspace = "ws"
classes = ["normal", "pneumonia"]
[data]
labelled = "lab"
pool = "pool"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_minimal_config_has_defaults_and_resolves_paths(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.workspace == (tmp_path / "ws").resolve()
    assert cfg.data.pool == (tmp_path / "pool").resolve()
    assert cfg.data.validation is None
    assert cfg.model.name == "auto" and cfg.query.strategy == "bald"
    assert cfg.classes == ("normal", "pneumonia")


def test_unknown_key_names_key_and_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"query\.budgett.*valid keys in \[query\]: strategy"):
        load_config(write(tmp_path, BASE + "[query]\nbudgett = 3\n"))
    with pytest.raises(ConfigError, match="unknown key.*'workspaces'"):
        load_config(write(tmp_path, 'workspaces = "x"\n' + BASE))


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'workspace'"):
        load_config(write(tmp_path, BASE.replace('workspace = "ws"', "")))
    with pytest.raises(ConfigError, match="missing required key 'classes'"):
        load_config(write(tmp_path, BASE.replace('classes = ["normal", "pneumonia"]', "")))


@pytest.mark.parametrize(
    "snippet, match",
    [
        ('[query]\nstrategy = "bold"\n', r"query\.strategy.*one of bald, entropy"),
        ('[model]\nname = "vgg"\n', r"model\.name.*small_cnn, small_cnn4, resnet18"),
        ("[query]\nbudget = 0\n", r"query\.budget.*>= 1"),
        ('[query]\nbudget = "ten"\n', r"query\.budget.*must be int"),
        ("[model]\ndropout = 0.0\n", r"model\.dropout"),
        ("[image]\nwindow = [40]\n", r"image\.window"),
        ('[model]\nfeatures = "deep"\n', r"model\.features.*one of auto, last, multiscale"),
        (
            '[model]\nfeatures = "multiscale"\nbackbone_dropout = 0.2\n',
            r"model\.features.*\"last\" or \"auto\" when model\.backbone_dropout > 0",
        ),
    ],
)
def test_bad_values_name_key_and_allowed(tmp_path, snippet, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, BASE + snippet))


def test_bad_classes_and_toml(tmp_path):
    with pytest.raises(ConfigError, match="duplicates"):
        load_config(write(tmp_path, BASE.replace('"pneumonia"', '"Normal"')))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "workspace = \n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_overrides_and_window_tuple(tmp_path):
    cfg = load_config(write(tmp_path, BASE), {"query.budget": 7, "image.window": [40, 400]})
    assert cfg.query.budget == 7
    assert cfg.image.window == (40.0, 400.0)


def test_bundled_config_is_valid():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "pneumoniamnist.toml")
    assert cfg.classes == ("normal", "pneumonia")
    assert cfg.data.test is not None


@pytest.mark.parametrize(
    "name, match",
    [
        ("labels.csv", "writes a file or folder of that name"),
        ("Labels_dr.CSV", "writes a file or folder of that name"),
        ("index.html", "writes a file or folder of that name"),
        ("README.txt", "writes a file or folder of that name"),
        ("previews", "writes a file or folder of that name"),
        ("manifest.csv", "writes a file or folder of that name"),
        ("unsure", "reserved label"),
        ("é" * 128, "256 bytes in UTF-8; folder names allow at most 255"),
        ("a<b", r"contains '<'"),
        ("a:b", r"contains ':'"),
        ('a"b', "contains '\"'"),
        ("a|b", r"contains '\|'"),
        ("a?b", r"contains '\?'"),
        ("a*b", r"contains '\*'"),
        ("a/b", r"contains '/'"),
        ("a\\b", r"contains '\\\\'"),
        ("a\tb", r"contains '\\t'"),
        ("a\x01b", r"contains '\\x01'"),
        ("dot.", "ending in a dot or a space"),
        (".", "leading dot"),
        ("..", "leading dot"),
        (".hidden", "leading dot"),
        ("CON", "reserved device name"),
        ("nul.txt", "reserved device name"),
        ("com1", "reserved device name"),
        ("LPT9", "reserved device name"),
    ],
)
def test_class_names_that_break_round_folders_are_refused(tmp_path, name, match):
    text = BASE.replace('"pneumonia"', json.dumps(name))
    with pytest.raises(ConfigError, match=rf"'classes': .* cannot be a class name: .*{match}"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    "name", ["Pneumonia (viral)", "grade 2", "é" * 127, "console", "com10", "lpt", "a.b", "=1+1"]
)
def test_unusual_but_valid_class_names_are_kept(tmp_path, name):
    cfg = load_config(write(tmp_path, BASE.replace('"pneumonia"', json.dumps(name))))
    assert cfg.classes == ("normal", name)


def test_class_prior_is_a_table_of_every_class_normalised(tmp_path):
    from medal.config import parse_overrides

    cfg = load_config(
        write(tmp_path, BASE + "[train]\nclass_prior = {normal = 1, pneumonia = 9}\n")
    )
    assert cfg.train.class_prior == {"normal": 1.0, "pneumonia": 9.0}
    assert cfg.class_prior() == pytest.approx((0.1, 0.9))
    assert load_config(write(tmp_path, BASE)).class_prior() is None
    over = parse_overrides(["train.class_prior={normal = 0.2, pneumonia = 0.8}"])
    assert load_config(write(tmp_path, BASE), over).class_prior() == pytest.approx((0.2, 0.8))
    for bad, match in [
        ("0.1", r"'train\.class_prior' must be a table of class shares"),
        (
            "{normal = 1}",
            r"'train\.class_prior' must be a share for each class \(normal, pneumonia\)",
        ),
        ("{normal = 1, pneumonia = 9, other = 1}", "and nothing else"),
        ("{normal = 0, pneumonia = 9}", r"train\.class_prior\.normal must be a finite number > 0"),
        ('{normal = "a", pneumonia = 9}', r"train\.class_prior\.normal must be a number > 0"),
        ('{normal = 1, pneumonia = 9}\nbalance = "none"', r"class_prior' must be unset with train"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(write(tmp_path, BASE + f"[train]\nclass_prior = {bad}\n"))


def test_parse_overrides_reads_toml_values_and_names_a_bad_pair():
    from medal.config import parse_overrides

    assert parse_overrides(
        [
            "query.budget=50",
            "train.augment=false",
            "image.window=[40, 400]",
            "query.strategy=bald",
            'workspace="/tmp/x y"',
        ]
    ) == {
        "query.budget": 50,
        "train.augment": False,
        "image.window": [40, 400],
        "query.strategy": "bald",
        "workspace": "/tmp/x y",
    }
    with pytest.raises(ConfigError, match="KEY=VALUE.*'budget'"):
        parse_overrides(["budget"])


def test_cli_and_simulate_import_without_a_cycle():
    """simulate no longer reaches into the CLI for override parsing (issue 12)."""
    import subprocess
    import sys

    code = (
        "import sys; import medal.simulate; "
        "assert 'medal.cli' not in sys.modules, 'simulate imported the CLI'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_data_paths_are_optional_and_query_names_a_missing_pool(tmp_path, capsys):
    """A config for `medal simulate` needs no [data] (it makes its own pool and start set);
    `medal query` without data.pool says what to set."""
    from medal.cli import main

    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text('workspace = "ws"\nclasses = ["a", "b"]\n')
    cfg = load_config(cfg_path)
    assert cfg.data.pool is None and cfg.data.labelled is None
    assert main(["query", "-c", str(cfg_path), "-q"]) == 2
    # with the default self-supervised backbone no label is needed, but a pool is
    assert "no pool: set data.pool" in capsys.readouterr().err
    assert main(["query", "-c", str(cfg_path), "-q", "--set", 'representation.method="none"']) == 2
    err = capsys.readouterr().err
    assert "data.labelled is not set" in err and 'representation.method = "simclr"' in err


def test_model_names_and_window_modes_come_from_their_owners(tmp_path, monkeypatch):
    """config keeps no copy of these lists: a backbone registered at run time is accepted."""
    from torch import nn

    from medal import models

    assert "my_net" not in models.available_models()
    with pytest.raises(ConfigError, match="model.name.*one of small_cnn"):
        load_config(write(tmp_path, BASE), {"model.name": "my_net"})
    monkeypatch.setitem(
        models._REGISTRY, "my_net", lambda c: (nn.Sequential(nn.Flatten(), nn.LazyLinear(8)), 8)
    )
    assert load_config(write(tmp_path, BASE), {"model.name": "my_net"}).model.name == "my_net"
    with pytest.raises(ConfigError, match='image.window.*"file", "minmax" or'):
        load_config(write(tmp_path, BASE), {"image.window": "lung"})


def test_defaults_are_the_measured_label_efficient_setup(tmp_path):
    """The README's label-efficiency measurements are of these defaults."""
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text('workspace = "ws"\nclasses = ["a", "b"]\n')
    cfg = load_config(cfg_path)
    assert cfg.representation.method == "simclr" and cfg.train.freeze_backbone
    assert cfg.model.hidden == 0 and cfg.train.validation_fraction == 0.0
    assert cfg.query.strategy == "bald"
    assert cfg.model.features == "auto"  # multiscale on the frozen backbone
