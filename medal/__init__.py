"""medal: active learning for medical images.

The public API: :mod:`medal.api` (one function per CLI command: ``medal.api.train(cfg)``,
``query``, ``ingest``, ``run_round``, ``status``, ...), the config loader, the workspace and
ledger, the report types and the errors. Names are imported when first used, so
``import medal`` (and ``medal --version``) does not import torch. (``train``, ``query``
and ``simulate`` are modules of this package as well as functions, so the functions are
reached through ``medal.api`` and ``medal.simulate``.)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0.dev0"

_PUBLIC = {
    "Config": "config",
    "load_config": "config",
    "TrainReport": "api",
    "QueryReport": "api",
    "RoundReport": "api",
    "Status": "api",
    "SimulationSettings": "simulate",
    "Workspace": "workspace",
    "Ledger": "ledger",
    "Snapshot": "sources",
    "sync": "sources",
    "MedalError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "ImageReadError": "errors",
    "ModelError": "errors",
    "LabellingError": "errors",
    "WorkspaceError": "errors",
}

__all__ = ["__version__", "api", *_PUBLIC]


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use (PEP 562)."""
    if name == "api":
        return importlib.import_module(".api", __name__)
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'medal' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
