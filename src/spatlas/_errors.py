"""Exceptions that carry a message meant for the user (shown without a traceback)."""

from __future__ import annotations

from collections.abc import Iterable


class SpatlasError(Exception):
    """Base class of errors spatlas raises on purpose."""


class SpatlasInputError(SpatlasError, ValueError):
    """Bad input: a file, a sample sheet, a config value or data that cannot be used.

    Parameters
    ----------
    problems
        One line per problem; each says what is wrong and how to fix it.
    """

    def __init__(self, problems: str | Iterable[str]):
        if isinstance(problems, str):
            problems = [problems]
        self.problems: list[str] = [str(p) for p in problems]
        super().__init__("\n".join(self.problems))


class ConfigError(SpatlasInputError):
    """A config file or ``--set`` override that cannot be used."""


class MissingDependencyError(SpatlasError, ImportError):
    """An optional dependency is needed and not installed."""
