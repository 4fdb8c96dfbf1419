"""Lazy import of optional dependencies with an install hint instead of a stack trace."""

from __future__ import annotations

import importlib
from types import ModuleType

from ._errors import MissingDependencyError

# module name -> (pip distribution, spatlas extra)
_KNOWN = {
    "torch": ("torch", "vision"),
    "torchvision": ("torchvision", "vision"),
    "timm": ("timm", "vision"),
    "scvi": ("scvi-tools", "scvi"),
    "ray": ("ray[tune]", "ray"),
    "decoupler": ("decoupler", "pathways"),
    "spatialdata": ("spatialdata", "spatialdata"),
    "harmonypy": ("harmonypy", None),
    "scanorama": ("scanorama", None),
    "leidenalg": ("leidenalg", None),
    "igraph": ("igraph", None),
}


def import_optional(module: str, *, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` saying how to install it.

    Parameters
    ----------
    module
        Importable module name, e.g. ``"scvi"``.
    purpose
        What needs it, e.g. ``"integration method 'scvi'"`` (goes into the message).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        dist, extra = _KNOWN.get(module, (module, None))
        hint = f"pip install 'spatlas[{extra}]'" if extra else f"pip install '{dist}'"
        raise MissingDependencyError(
            f"{purpose} needs the optional package '{dist}', which is not installed "
            f"({err}). Install it with: {hint}"
        ) from None
