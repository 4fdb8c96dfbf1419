"""The AnnData-facing layer every fusion model shares: inputs, parameters, save / load.

Three layers, kept apart (scvi-tools style): the ``torch.nn.Module`` knows only tensors; a model
class (a :class:`BaseModel`) knows AnnData — which ``obsm`` keys it reads, ``train()``,
``get_latent()``, ``save()`` / ``load()``; the training loop lives in ``_trainer.py``.
Architecture settings go to the constructor, optimisation settings to ``train()``. This module
does not import torch (``save`` / ``load`` import it when called).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from anndata import AnnData

from .. import _keys as K
from .._errors import SpatlasInputError

_WEIGHTS = "weights.pt"
_META = "model.json"


def _keyword_defaults(fn) -> dict[str, Any]:
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    }


def check_architecture(*, dropout: float, **positive_ints: Any) -> None:
    """Clear errors for architecture settings: positive integers and a dropout in [0, 1)."""
    for name, value in positive_ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpatlasInputError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= dropout < 1:
        raise SpatlasInputError(f"dropout must be in [0, 1), got {dropout}")


def obs_digest(adata: AnnData) -> str:
    """Short hash of the spot names (a saved model checks it is loaded on the same spots)."""
    h = hashlib.sha256("\n".join(map(str, adata.obs_names)).encode())
    return h.hexdigest()[:16]


class BaseModel:
    """A fusion model on a cohort: embeddings in ``obsm`` in, a joint latent per spot out.

    Subclasses set ``name`` (by :func:`spatlas.models.register_model`), take architecture
    settings as keyword-only constructor arguments and optimisation settings as keyword-only
    ``train()`` arguments, keep their network in ``self.module`` and implement ``train``,
    ``get_latent``, ``_build_module``, ``_get_state`` and ``_set_state``.

    Parameters
    ----------
    adata
        Cohort holding the input embeddings.
    expression_key
        ``obsm`` key of the (integrated) expression embedding, e.g. ``X_pca_harmony``.
    morphology_key
        ``obsm`` key of the (integrated) morphology embedding, or ``None`` for expression only.
    sample_key
        ``obs`` column of the sample.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        adata: AnnData,
        *,
        expression_key: str = "X_pca_harmony",
        morphology_key: str | None = None,
        sample_key: str = K.SAMPLE,
    ) -> None:
        for key in (expression_key, morphology_key):
            if key is not None and key not in adata.obsm:
                raise SpatlasInputError(
                    f"{self.name}: embedding {key!r} is not in adata.obsm "
                    f"(available: {', '.join(adata.obsm) or 'none'})"
                )
            if key is not None and not np.isfinite(np.asarray(adata.obsm[key])).all():
                raise SpatlasInputError(f"{self.name}: obsm[{key!r}] has NaN or infinite values")
        if sample_key not in adata.obs:
            raise SpatlasInputError(
                f"{self.name}: sample column {sample_key!r} is not in adata.obs "
                f"(columns: {', '.join(adata.obs.columns)})"
            )
        self.expression_key = expression_key
        self.morphology_key = morphology_key
        self.sample_key = sample_key
        self.n_obs = adata.n_obs
        self.obs_digest = obs_digest(adata)
        self.module: Any = None
        self.init_params: dict[str, Any] = {}
        self.train_params: dict[str, Any] = {}
        self.history: list[dict[str, float]] = []

    # -- parameters ------------------------------------------------------------------------

    @classmethod
    def parameters(cls) -> tuple[dict[str, Any], dict[str, Any]]:
        """Defaults of the constructor's and of ``train()``'s keyword-only arguments."""
        return _keyword_defaults(cls.__init__), _keyword_defaults(cls.train)

    @classmethod
    def split_params(cls, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split settings into constructor and ``train()`` arguments; unknown names are errors."""
        init, train = cls.parameters()
        unknown = sorted(set(params) - set(init) - set(train))
        if unknown:
            known = sorted((set(init) | set(train)) - {"expression_key", "morphology_key"})
            raise SpatlasInputError(
                f"model '{cls.name}' has no setting(s) {', '.join(unknown)} "
                f"(known: {', '.join(known)})"
            )
        return (
            {k: v for k, v in params.items() if k in init},
            {k: v for k, v in params.items() if k in train},
        )

    @property
    def is_trained(self) -> bool:
        """Whether the network exists (trained or loaded)."""
        return self.module is not None

    def _check_trained(self) -> None:
        if not self.is_trained:
            raise SpatlasInputError(f"{self.name}: call train() (or load a saved model) first")

    # -- the interface of a model ----------------------------------------------------------

    def train(self, **kwargs: Any) -> BaseModel:  # pragma: no cover - abstract
        """Train the network (optimisation settings are keyword arguments)."""
        raise NotImplementedError

    def get_latent(self, **kwargs: Any) -> np.ndarray:  # pragma: no cover - abstract
        """The joint latent of every spot, ``float32`` of shape ``(n_obs, latent_dim)``."""
        raise NotImplementedError

    def _build_module(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _get_state(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """JSON-able state besides the weights (e.g. input scaling) needed to rebuild outputs."""
        raise NotImplementedError

    def _set_state(self, state: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- save / load -----------------------------------------------------------------------

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to the folder ``path``: ``model.json`` and ``weights.pt``.

        The folder holds what rebuilding it needs: model name, spatlas and torch versions,
        constructor and ``train()`` settings, input scaling, the loss history and a hash of the
        spot names. Returns the folder.
        """
        import torch

        from .. import __version__

        self._check_trained()
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise SpatlasInputError(f"{path} exists and is not empty; pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "model": self.name,
            "spatlas_version": __version__,
            "torch_version": torch.__version__,
            "expression_key": self.expression_key,
            "morphology_key": self.morphology_key,
            "sample_key": self.sample_key,
            "n_obs": self.n_obs,
            "obs_digest": self.obs_digest,
            "init_params": self.init_params,
            "train_params": self.train_params,
            "state": self._get_state(),
            "history": self.history,
        }
        state_dict = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        torch.save(state_dict, path / _WEIGHTS)
        (path / _META).write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, adata: AnnData) -> BaseModel:
        """Rebuild a saved model on the cohort it was trained on (same spots, same order)."""
        import torch

        path = Path(path)
        if not (path / _META).exists() or not (path / _WEIGHTS).exists():
            raise SpatlasInputError(f"{path} holds no saved model ({_META} + {_WEIGHTS})")
        meta = json.loads((path / _META).read_text())
        if cls.name and meta["model"] != cls.name:
            raise SpatlasInputError(f"{path} holds a '{meta['model']}' model, not '{cls.name}'")
        if adata.n_obs != meta["n_obs"] or obs_digest(adata) != meta["obs_digest"]:
            raise SpatlasInputError(
                f"{path}: the model was trained on {meta['n_obs']} other spots; load it with "
                "the cohort it was trained on"
            )
        model = cls(
            adata,
            expression_key=meta["expression_key"],
            morphology_key=meta["morphology_key"],
            sample_key=meta["sample_key"],
            **meta["init_params"],
        )
        model.train_params = meta["train_params"]
        model.history = meta["history"]
        model._set_state(meta["state"])
        model.module = model._build_module()
        weights = torch.load(path / _WEIGHTS, map_location="cpu", weights_only=True)
        model.module.load_state_dict(weights)
        return model
