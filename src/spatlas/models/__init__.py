"""Fusion models (vertical integration), chosen by name from a registry (MISSION §1).

``list_models()`` names them without importing torch; ``get_model(name)`` imports the model's
module and returns its class; ``fit_model(adata, name, ...)`` builds, trains and writes the
latent to ``obsm``::

    spatlas.models.list_models()   # ['cross_attention', 'e2e', 'grid_ae', 'rank_align']
    model = spatlas.models.fit_model(
        adata, "grid_ae", expression_key="X_pca_harmony", morphology_key="X_morph_harmony",
        morphology_weight=1.5, window=5, steps=1500,
    )                                                   # -> obsm['X_grid_ae']

New models register with :func:`register_model` (a class decorator); built-in models are listed
in ``_BUILTIN`` so that ``list_models()`` knows them before their module is imported.
"""

from __future__ import annotations

import difflib
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from ._base import BaseModel

__all__ = [
    "ModelEntry",
    "check_params",
    "fit_model",
    "get_model",
    "list_models",
    "parameter_names",
    "register_model",
]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its name, where its class lives (``module:Class``), one-line summary."""

    name: str
    target: str
    summary: str


_BUILTIN = (
    ModelEntry(
        "grid_ae",
        "spatlas.models.grid_ae:GridAE",
        "grid autoencoder on per-sample hex-aware windows with in-batch multi-triplet loss "
        "(AESTETIK-style)",
    ),
    ModelEntry(
        "cross_attention",
        "spatlas.models.cross_attention:CrossAttention",
        "MultiST-style: gene MLP + graph convolution, image projection, cross-attention over "
        "each spot's neighbourhood tokens, link prediction, InfoNCE, sample MMD",
    ),
    ModelEntry(
        "rank_align",
        "spatlas.models.rank_align:RankAlign",
        "RankByGene-style: morphology aligned to expression by InfoNCE + ranking-consistency "
        "hinge; output = the EMA teacher's aligned morphology embedding",
    ),
    ModelEntry(
        "e2e",
        "spatlas.models.e2e:E2E",
        "grid autoencoder that corrects the batch while fusing (sample-conditional decoder, "
        "MMD on the latent, per-sample pseudo-labels): feed it uncorrected PCs",
    ),
)
_ENTRIES: dict[str, ModelEntry] = {e.name: e for e in _BUILTIN}
_CLASSES: dict[str, type] = {}

M = TypeVar("M", bound=type)


def register_model(name: str, *, summary: str = "") -> Callable[[M], M]:
    """Class decorator registering a :class:`~spatlas.models._base.BaseModel` under ``name``."""

    def decorator(cls: M) -> M:
        cls.name = name  # type: ignore[attr-defined]
        _CLASSES[name] = cls
        if name not in _ENTRIES:
            doc = (cls.__doc__ or "").strip().splitlines()
            _ENTRIES[name] = ModelEntry(
                name, f"{cls.__module__}:{cls.__qualname__}", summary or (doc[0] if doc else "")
            )
        return cls

    return decorator


def list_models() -> list[str]:
    """Names of the registered models (imports no model module and no torch)."""
    return sorted(_ENTRIES)


def get_model(name: str) -> type[BaseModel]:
    """The model class registered as ``name`` (imports its module, and torch, on first use)."""
    if name not in _ENTRIES:
        close = difflib.get_close_matches(str(name), list(_ENTRIES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SpatlasInputError(f"unknown model '{name}'{hint} (known: {', '.join(list_models())})")
    if name not in _CLASSES:
        module, _, attr = _ENTRIES[name].target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        _CLASSES.setdefault(name, cls)
    return _CLASSES[name]


def parameter_names(name: str) -> tuple[set[str], set[str]]:
    """Keyword-only settings of a model's constructor and of its ``train()``.

    For a built-in model not imported yet, they are read from its module's source (``ast``), so
    that a config can be checked without importing torch (whose libraries hold about 0.5 GB of
    memory for the rest of the run); otherwise from the class.
    """
    if name in _ENTRIES and name not in _CLASSES:
        names = _source_parameters(_ENTRIES[name].target)
        if names is not None:
            return names
    init, train = get_model(name).parameters()
    return set(init), set(train)


def _source_parameters(target: str) -> tuple[set[str], set[str]] | None:
    """``__init__`` / ``train`` keyword-only names of ``module:Class`` from its source."""
    import ast
    import importlib.util

    module, _, attr = target.partition(":")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    with open(spec.origin, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == attr:
            functions = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
            methods = [functions.get("__init__"), functions.get("train")]
            if "parameters" in functions or any(f is None or f.args.kwarg for f in methods):
                return None  # inherited or forwarded settings: ask the class
            return tuple({a.arg for a in f.args.kwonlyargs} for f in methods)
    return None


def check_params(name: str, params: dict[str, Any]) -> None:
    """Raise :class:`SpatlasInputError` for names ``name`` does not take (no torch import)."""
    if name not in _ENTRIES:
        get_model(name)  # the unknown-model error
    init, train = parameter_names(name)
    unknown = sorted(set(params) - init - train)
    if unknown:
        known = sorted((init | train) - {"expression_key", "morphology_key"})
        raise SpatlasInputError(
            f"model '{name}' has no setting(s) {', '.join(unknown)} (known: {', '.join(known)})"
        )


def fit_model(
    adata: AnnData,
    name: str = "grid_ae",
    *,
    expression_key: str = "X_pca_harmony",
    morphology_key: str | None = None,
    sample_key: str = K.SAMPLE,
    seed: int = 0,
    key_added: str | None = None,
    **params: Any,
) -> BaseModel:
    """Build model ``name`` on ``adata``, train it and store its latent.

    Parameters
    ----------
    adata
        Cohort holding the input embeddings.
    name
        A registered model (:func:`list_models`).
    expression_key
        ``obsm`` key of the integrated expression embedding.
    morphology_key
        ``obsm`` key of the integrated morphology embedding; ``None`` for expression only
        (a morphology weight is then ignored).
    sample_key
        ``obs`` column of the sample (neighbourhoods and alignment stay within samples).
    seed
        Seed of every random choice of the model and its training.
    key_added
        ``obsm`` key of the latent; default ``X_{name}`` (``X_grid_ae``).
    **params
        Model settings: constructor (architecture) and ``train()`` (optimisation) arguments,
        e.g. ``window``, ``latent_dim``, ``morphology_weight``, ``steps``; see the model class.

    Returns
    -------
    The trained model. Writes ``obsm[key_added]`` (``float32``, ``(n_obs, latent_dim)``) and
    ``uns['spatlas']['models'][key_added]`` (model name, input keys, settings, seconds, final
    loss parts).
    """
    cls = get_model(name)
    init_params, train_params = cls.split_params(params)
    start = time.perf_counter()
    model = cls(
        adata,
        expression_key=expression_key,
        morphology_key=morphology_key,
        sample_key=sample_key,
        **init_params,
    )
    model.train(seed=seed, **train_params)
    latent = model.get_latent()
    seconds = time.perf_counter() - start
    key_added = key_added or K.embedding_key(name)
    adata.obsm[key_added] = latent
    final = model.history[-1] if model.history else {}
    adata.uns.setdefault(K.UNS, {}).setdefault(K.MODELS, {})[key_added] = {
        "model": name,
        "expression_key": expression_key,
        "morphology_key": morphology_key or "",
        "sample_key": sample_key,
        "seed": seed,
        "seconds": seconds,
        "init_params": {k: ("" if v is None else v) for k, v in model.init_params.items()},
        "train_params": {k: ("" if v is None else v) for k, v in model.train_params.items()},
        "final_loss": {k: v for k, v in final.items() if k != "step"},
    }
    logger.info("model %s -> obsm['%s'] in %.1f s", name, key_added, seconds)
    return model
