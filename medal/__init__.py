"""medal: active learning for medical images."""

__version__ = "0.2.0.dev0"
