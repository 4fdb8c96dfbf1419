"""spatlas: multi-modal spatial-transcriptomics atlases across many samples.

The top-level import is cheap: the namespaces (``io``, ``pp``, ``tl``, ``pl``, ``models``,
``metrics``, ``tune``, ``datasets``) load on first access, and none of them imports torch,
scvi-tools, ray or timm until a function that needs them is called.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._errors import SpatlasError, SpatlasInputError
from ._logging import logger, set_verbosity

__version__ = "0.1.0"

_SUBMODULES = (
    "io",
    "pp",
    "tl",
    "pl",
    "models",
    "metrics",
    "tune",
    "datasets",
    "pipeline",
    "report",
)

__all__ = [
    "SpatlasError",
    "SpatlasInputError",
    "__version__",
    "logger",
    "set_verbosity",
    *_SUBMODULES,
]

if TYPE_CHECKING:  # pragma: no cover
    from . import datasets, io, metrics, models, pipeline, pl, pp, tl, tune  # noqa: F401


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'spatlas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
