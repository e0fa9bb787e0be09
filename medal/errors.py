"""Exception hierarchy. The library raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


class MedalError(Exception):
    """Base class of every error medal raises on purpose."""


class ConfigError(MedalError):
    """A config file or key is missing or invalid."""


class DataError(MedalError):
    """Input images, folders or CSV lists are missing or invalid."""


class ImageReadError(DataError):
    """One image file could not be decoded; ``reason`` says why in one line."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ModelError(MedalError):
    """A model or checkpoint cannot be built or loaded."""


class LabellingError(MedalError):
    """A returned labelling folder is invalid; ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        full = (
            message
            if not self.problems
            else message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        )
        super().__init__(full)


class WorkspaceError(MedalError):
    """The workspace on disk is missing, locked or inconsistent."""


class SimulationError(MedalError):
    """A simulation cannot start or continue (bad settings, an oracle asked the wrong thing)."""
