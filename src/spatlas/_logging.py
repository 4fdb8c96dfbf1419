"""The ``spatlas`` logger; the library never prints."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

logger = logging.getLogger("spatlas")
logger.addHandler(logging.NullHandler())

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests and notebooks swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def set_verbosity(level: int | str = "INFO") -> None:
    """Log spatlas messages at ``level`` and above to stderr."""
    logger.setLevel(level)
    handlers = [h for h in logger.handlers if isinstance(h, _StderrHandler)]
    if not handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
        handlers = [handler]
    for handler in handlers:  # a run log (add_file_handler) may lower the logger's level
        handler.setLevel(level)


def add_file_handler(path: str | Path) -> logging.Handler:
    """Also log to ``path`` (used for a run's ``run.log``); returns the handler to remove later."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler
