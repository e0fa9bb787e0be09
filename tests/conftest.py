"""Shared fixtures: tiny real PNG/DICOM datasets written into tmp_path."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from medal.config import load_config
from medal.dicomwrite import write_dicom

# torch single-threaded, in this process and the commands the tests start (unless the caller
# sets OMP_NUM_THREADS): the tests' models are tiny, and on a few shared cores torch's threads
# spend more time waiting for each other than computing (training the tiny CNN 2 epochs:
# 0.3 s of CPU with one thread, 2-4 s with two on a loaded 2-core machine). Set before torch
# is imported (neither module above imports it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

CLASSES = ("normal", "pneumonia")

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary: $MEDAL_CHROMIUM if set, else the first one on PATH."""
    explicit = os.environ.get("MEDAL_CHROMIUM")
    if explicit:
        return shutil.which(explicit)
    for name in BROWSER_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture
def chromium() -> str:
    """A headless-capable Chromium for browser tests.

    Without one the test is skipped with the reason (a fresh machine passes the README's test
    command); with MEDAL_REQUIRE_BROWSER=1 (set by .ci/run) it fails instead, so CI never
    silently skips browser tests.
    """
    path = find_chromium()
    if path:
        return path
    explicit = os.environ.get("MEDAL_CHROMIUM")
    looked = (
        f"MEDAL_CHROMIUM={explicit} is not an executable"
        if explicit
        else f"none of {', '.join(BROWSER_NAMES)} is on PATH"
    )
    reason = (
        f"no Chromium found ({looked}); install one "
        f"(Debian/Ubuntu: apt-get install chromium) or point MEDAL_CHROMIUM at it"
    )
    if os.environ.get("MEDAL_REQUIRE_BROWSER") == "1":
        pytest.fail(f"MEDAL_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(f"{reason}; MEDAL_REQUIRE_BROWSER=1 turns this skip into a failure")


def make_image(label: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """uint8 [size, size]: class 0 has a dark centre, class 1 a bright one (easily separable)."""
    img = rng.normal(110, 20, (size, size))
    c = slice(size // 4, 3 * size // 4)
    img[c, c] += -60 if label == 0 else 90
    return np.clip(img, 0, 255).astype(np.uint8)


def save(path: Path, img: np.ndarray, as_dicom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_dicom:
        write_dicom(
            path,
            img.astype(np.uint16) * 16,
            bits_stored=12,
            intercept=-1024,
            window=(1016.5, 4081.0),
        )
    else:
        Image.fromarray(img).save(path)
    return path


@pytest.fixture
def tiny_data(tmp_path: Path) -> dict:
    """labelled (4 per class, PNG), pool (40: PNG and DICOM), validation (8 per class).

    Returns paths and the hidden pool truth ``{resolved path: class name}``.
    """
    return write_tiny_data(tmp_path)


def write_tiny_data(tmp_path: Path) -> dict:
    """The :func:`tiny_data` set written under ``tmp_path/data`` (for fixtures of a wider
    scope, which cannot use the function-scoped ``tmp_path``)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c, name in enumerate(CLASSES):
        for i in range(4):
            save(root / "labelled" / name / f"l{i}.png", make_image(c, rng))
        for i in range(8):
            save(root / "validation" / name / f"v{i}.png", make_image(c, rng))
    truth = {}
    for i in range(40):
        c = int(rng.integers(2))
        dicom = i % 4 == 0
        p = root / "pool" / ("dicom" if dicom else "png") / f"p{i:02d}.{'dcm' if dicom else 'png'}"
        save(p, make_image(c, rng), as_dicom=dicom)
        truth[str(p.resolve())] = CLASSES[c]
    return {"root": root, "truth": truth}


def write_config(tmp_path: Path, extra: str = "", **sections: str) -> Path:
    text = f"""
workspace = "ws"
classes = ["normal", "pneumonia"]
{extra}
[data]
labelled = "data/labelled"
pool = "data/pool"
validation = "data/validation"
[model]
name = "small_cnn"
image_size = 16
hidden = 32
[train]
epochs = 2
min_steps = 10
batch_size = 8
# the tests exercise whole-network training with a hold-out unless they say otherwise;
# the defaults (self-supervised backbone, frozen, linear head) have their own tests
freeze_backbone = false
validation_fraction = 0.2
[representation]
method = "none"
[query]
strategy = "bald"
budget = 6
mc_samples = 8
"""
    path = tmp_path / "medal.toml"
    path.write_text(text)
    return path


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_data: dict):
    return load_config(write_config(tmp_path))


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as the module ``name`` (in ``sys.modules``, where
    dataclasses look their module up), for tests of the scripts' functions."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
