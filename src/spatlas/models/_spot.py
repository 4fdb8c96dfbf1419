"""What the spot-level fusion models share.

Scaled inputs, a per-sample spatial kNN table, the seeded training context and batched
deterministic inference.

``cross_attention`` and ``rank_align`` see a spot through its own embeddings and the tokens of
its spatial neighbours (``n_neighbors`` nearest spots **of the same sample**), gathered per
mini-batch from an ``(N, k)`` index table: the graph is never an ``N x N`` matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from anndata import AnnData
from scipy.spatial import cKDTree
from torch import nn

from .. import _keys as K
from .._errors import SpatlasInputError
from .._settings import resolve_device, torch_threads
from ._base import BaseModel
from ._losses import LossParts
from ._trainer import TrainSettings, train_loop


def spatial_knn_table(xy: np.ndarray, groups: np.ndarray, n_neighbors: int) -> np.ndarray:
    """The ``n_neighbors`` nearest other spots of every spot within its group, ``(N, k)`` int64.

    Rows of groups with fewer than ``k + 1`` spots are padded with ``-1``. Self is removed by
    index (duplicated coordinates are handled); ties are broken by the KD-tree, deterministically.
    """
    n = xy.shape[0]
    table = np.full((n, n_neighbors), -1, dtype=np.int64)
    if n_neighbors == 0:
        return table
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        k = min(n_neighbors, rows.size - 1)
        if k < 1:
            continue
        _, idx = cKDTree(xy[rows]).query(xy[rows], k=k + 1)
        idx = idx.reshape(rows.size, k + 1)
        is_self = idx == np.arange(rows.size)[:, None]
        is_self[~is_self.any(axis=1), -1] = True
        table[rows, :k] = rows[idx[~is_self].reshape(rows.size, k)]
    return table


def standard_scaler(X: np.ndarray) -> dict[str, list[float]]:
    """Column means and standard deviations (1 where a column is constant)."""
    X = X.astype(np.float64)
    scale = X.std(axis=0)
    return {"shift": X.mean(axis=0).tolist(), "scale": np.where(scale > 0, scale, 1.0).tolist()}


def apply_scaler(X: np.ndarray, scaler: dict[str, list[float]]) -> np.ndarray:
    """``(X − shift) / scale`` as ``float32``."""
    shift = np.asarray(scaler["shift"], dtype=np.float64)
    scale = np.asarray(scaler["scale"], dtype=np.float64)
    return ((X - shift) / scale).astype(np.float32)


def mlp(n_in: int, hidden: int, n_out: int, *, dropout: float = 0.0) -> nn.Sequential:
    """Linear -> LayerNorm -> ReLU -> Dropout -> Linear."""
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.LayerNorm(hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, n_out),
    )


def endless_batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless mini-batches: shuffled passes over the spots, incomplete tails dropped."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@contextmanager
def seeded_torch(seed: int, device: torch.device, n_threads: int | None) -> Iterator[None]:
    """Fixed torch thread count and a forked, seeded RNG (the caller's RNG is left untouched)."""
    with (
        torch_threads(n_threads),
        torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []),
    ):
        torch.manual_seed(seed)
        yield


class SpotModel(BaseModel):
    """Base of the spot-level models: standardised inputs, per-sample kNN tokens, batched output.

    Subclasses implement ``_build_module`` (a module with ``embed(expr_tokens, morph_tokens,
    valid) -> latent``) and ``train`` (which calls :meth:`_fit`).

    Parameters
    ----------
    adata, expression_key, morphology_key, sample_key
        See :class:`~spatlas.models._base.BaseModel`.
    n_neighbors
        Spatial neighbours of each spot (same sample), e.g. 6 = the first hex ring of Visium.
    coords
        ``obsm`` key or two ``obs`` columns of the coordinates; default ``obsm['spatial']``.
    """

    requires_morphology: bool = False

    def __init__(
        self,
        adata: AnnData,
        *,
        expression_key: str = "X_pca_harmony",
        morphology_key: str | None = None,
        sample_key: str = K.SAMPLE,
        n_neighbors: int = 6,
        coords: str | Sequence[str] | None = K.SPATIAL,
    ) -> None:
        super().__init__(
            adata,
            expression_key=expression_key,
            morphology_key=morphology_key,
            sample_key=sample_key,
        )
        from ..pp._neighbourhoods import _coordinates

        if self.requires_morphology and morphology_key is None:
            raise SpatlasInputError(
                f"{self.name} aligns morphology to expression: pass morphology_key "
                "(e.g. 'X_morph_harmony'; compute it with spatlas.pp.morphology_embedding)"
            )
        if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or n_neighbors < 0:
            raise SpatlasInputError(f"n_neighbors must be an integer >= 0, got {n_neighbors!r}")
        self.init_params = {
            "n_neighbors": n_neighbors,
            "coords": coords if coords is None or isinstance(coords, str) else list(coords),
        }
        self._expr_raw = np.asarray(adata.obsm[expression_key], dtype=np.float32)
        self._morph_raw = (
            np.asarray(adata.obsm[morphology_key], dtype=np.float32)
            if morphology_key is not None
            else np.zeros((adata.n_obs, 0), dtype=np.float32)
        )
        self.n_expression, self.n_morphology = (
            self._expr_raw.shape[1],
            self._morph_raw.shape[1],
        )
        samples = adata.obs[sample_key].astype(str).to_numpy()
        self.sample_codes = np.unique(samples, return_inverse=True)[1].ravel().astype(np.int64)
        self.n_samples = int(self.sample_codes.max()) + 1 if self.n_obs else 0
        xy, self.coords_used = _coordinates(adata, coords)
        self.knn = spatial_knn_table(xy, self.sample_codes, n_neighbors)
        self.scalers = {
            "expression": standard_scaler(self._expr_raw),
            "morphology": standard_scaler(self._morph_raw),
        }
        self._apply_scalers()

    def _apply_scalers(self) -> None:
        self.expr = apply_scaler(self._expr_raw, self.scalers["expression"])
        self.morph = apply_scaler(self._morph_raw, self.scalers["morphology"])

    def _get_state(self) -> dict[str, Any]:
        return {
            "scalers": self.scalers,
            "n_expression": self.n_expression,
            "n_morphology": self.n_morphology,
            "n_samples": self.n_samples,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        if (state["n_expression"], state["n_morphology"]) != (
            self.n_expression,
            self.n_morphology,
        ):
            raise SpatlasInputError(
                f"{self.name}: saved model expects {state['n_expression']} expression and "
                f"{state['n_morphology']} morphology dimensions"
            )
        self.scalers = state["scalers"]
        self._apply_scalers()

    # -- tokens ------------------------------------------------------------------------------

    def _tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "expr": torch.from_numpy(self.expr).to(device),
            "morph": torch.from_numpy(self.morph).to(device),
            "knn": torch.from_numpy(self.knn).to(device),
            "sample": torch.from_numpy(self.sample_codes).to(device),
        }

    @staticmethod
    def tokens(
        data: dict[str, torch.Tensor], rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expression and morphology tokens ``(B, 1 + k, ·)`` of ``rows`` and their neighbours.

        Token 0 is the spot itself; ``valid`` ``(B, 1 + k)`` marks tokens that hold a spot
        (padding rows are zeros).
        """
        idx = torch.cat([rows[:, None], data["knn"][rows]], dim=1)
        valid = idx >= 0
        safe = idx.clamp_min(0)
        weight = valid.unsqueeze(-1).to(data["expr"].dtype)
        return data["expr"][safe] * weight, data["morph"][safe] * weight, valid

    # -- training and inference ---------------------------------------------------------------

    def _fit(
        self,
        make_step: Callable[[nn.Module, dict[str, torch.Tensor], Iterator[np.ndarray]], Any],
        *,
        settings: TrainSettings,
        batch_size: int,
        seed: int,
        device: str,
        n_threads: int | None,
        progress: bool,
    ) -> None:
        """Build the module and run the shared loop; ``make_step`` returns ``step(i)``."""
        if self.n_obs < 2:
            raise SpatlasInputError(f"{self.name}: needs at least 2 spots, got {self.n_obs}")
        dev = torch.device(resolve_device(device))
        with seeded_torch(seed, dev, n_threads):
            module = self._build_module().to(dev)
            data = self._tensors(dev)
            batches = endless_batches(self.n_obs, min(batch_size, self.n_obs), seed)
            step: Callable[[int], LossParts] = make_step(module, data, batches)
            self.history = train_loop(
                module, step, settings, desc=self.name, show_progress=progress
            )
        module.eval()
        self.module = module

    def get_latent(self, *, batch_size: int = 4096, n_threads: int | None = 1) -> np.ndarray:
        """Latent of every spot: one deterministic eval-mode pass (``float32``, ``(N, d)``).

        ``batch_size`` does not change the result; ``n_threads``: torch / BLAS threads.
        """
        self._check_trained()
        module = self.module
        dev = next(module.parameters()).device
        module.eval()
        chunks = []
        with torch_threads(n_threads), torch.no_grad():
            data = self._tensors(dev)
            for start in range(0, self.n_obs, batch_size):
                rows = torch.arange(start, min(start + batch_size, self.n_obs), device=dev)
                chunks.append(module.embed(*self.tokens(data, rows)).float().cpu().numpy())
        return np.concatenate(chunks).astype(np.float32, copy=False)
