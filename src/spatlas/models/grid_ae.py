"""``grid_ae``: the grid autoencoder with multi-triplet loss (AESTETIK-style, MISSION §2.4).

Each spot is seen through a ``w x w`` window of its neighbours **within its own sample** on the
real lattice (hex-aware for Visium, see :mod:`spatlas.pp._neighbourhoods`); every cell carries
the scaled expression (and morphology) embedding of the spot there plus a mask channel that
marks empty cells. Windows are gathered per mini-batch from an ``(N, w²)`` index table. A
convolutional encoder maps a window to a latent (default 16-d); a mirrored decoder reconstructs
the window of both modalities (masked L1). The loss (paper eq. 5) is

    α · (REC_m + TRIPLET_m) + (3 − α) · (REC_tr + TRIPLET_tr),   α = morphology_weight ∈ [0, 3],

where each triplet term uses per-modality K-Means pseudo-labels of the input embeddings averaged
over the spot's window (spatially coherent; on DLPFC this alone lifts the mean per-sample ARI
from about .32 to .41) and multi-triplets drawn **within the mini-batch** (a positive and
one negative from each other pseudo-label per anchor; optionally positives from other
samples). Training is a fixed number of AdamW steps with a batch size that does not grow with
N; inference is one deterministic eval-mode pass (MC-dropout averaging only on request).

Differences from the reference (AESTETIK 0.3.1; compared in ``benchmarks/vs_aestetik.py``):
windows on the hex lattice instead of a square window on (row, col) (13 of 25 cells hit a
spot there) and a mask channel instead of median filling; windows gathered per batch instead
of an N x C x w x w array built by a per-spot Python loop; triplets sampled within the batch
instead of 2 x (K − 1) extra encoder passes per anchor; 1,000 optimiser steps instead of ~100;
one eval-mode pass instead of 1,000 stochastic ones; pseudo-labels of window-averaged rather
than single-spot embeddings; float32 throughout; one encoder and decoder instead of
median-of-3 ensembles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from anndata import AnnData
from torch import nn

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger
from .._settings import resolve_device, torch_threads
from ..pp._neighbourhoods import Layout, _coordinates, neighbourhood_table
from . import register_model
from ._base import BaseModel, check_architecture
from ._losses import (
    BatchPenalty,
    LossParts,
    SampleAdversary,
    check_batch_penalty,
    masked_l1,
    multi_triplet_loss,
    sample_penalty,
)
from ._spot import endless_batches, seeded_torch
from ._trainer import TrainSettings, train_loop

Scaling = Literal["standard", "minmax", "global"]
SCALINGS = ("standard", "minmax", "global")
PseudoLabels = Literal["auto", "global", "per_sample"]
PSEUDO_LABELS = ("auto", "global", "per_sample")
# ``pseudo_labels='auto'`` switches to per-sample labels when the global ones explain more than
# this fraction of the sample entropy (uncertainty coefficient U(sample | labels)). Measured by
# grid_ae on the benchmark inputs (Harmony PCs; K-Means of window means): DLPFC Br8100 0.012
# (morphology 0.067), her2st A-E 0.33 (window 3), where whole patients form their own clusters.
SAMPLE_DEPENDENCE_LIMIT = 0.15


def sample_dependence(labels: np.ndarray, samples: np.ndarray) -> float:
    """Uncertainty coefficient U(sample | labels) = I(labels; sample) / H(sample) in [0, 1].

    0: every label is spread over the samples in their overall proportions; 1: each label lies
    in one sample. 0 when there is a single sample.
    """
    from scipy.stats import entropy
    from sklearn.metrics import mutual_info_score

    samples = np.unique(np.asarray(samples), return_inverse=True)[1].ravel()
    h_s = float(entropy(np.bincount(samples)))
    if h_s <= 0:
        return 0.0
    return max(0.0, min(1.0, mutual_info_score(samples, np.asarray(labels)) / h_s))


def window_mean(X: np.ndarray, table: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Mean of ``X`` over each row's ``table`` entries that hold a spot (``>= 0``), ``(N, C)``."""
    out = np.empty((table.shape[0], X.shape[1]), dtype=X.dtype)
    for start in range(0, table.shape[0], chunk):
        idx = table[start : start + chunk]
        valid = idx >= 0
        total = (X[np.maximum(idx, 0)] * valid[..., None]).sum(axis=1)
        out[start : start + chunk] = total / np.maximum(valid.sum(axis=1, keepdims=True), 1)
    return out


class GridAEModule(nn.Module):
    """Convolutional autoencoder of ``(C + 1) x w x w`` windows (C feature channels + mask).

    Encoder: Conv(C + 1 -> hidden, 3 x 3, same padding) -> BatchNorm -> ReLU -> Dropout2d ->
    Linear(hidden · w² -> latent). Decoder: Linear(latent -> hidden · w²) -> ReLU ->
    Conv(hidden -> C, 1 x 1) (-> sigmoid for inputs min-max scaled to [0, 1]): the linear
    layer already gives every cell its own code, so a per-cell read-out suffices and the
    decoder costs a tenth of a 3 x 3 one. With ``sample_decoder`` the decoder is
    sample-conditional (a learned code per sample, of ``n_samples``, is added to the latent
    before decoding, so the latent need not carry sample-specific offsets); ``adversary`` adds
    a classifier of the ``n_samples`` samples trained through gradient reversal.
    """

    def __init__(
        self,
        n_channels: int,
        window: int,
        *,
        latent_dim: int = 16,
        hidden: int = 32,
        dropout: float = 0.3,
        bounded_output: bool = False,
        n_samples: int = 0,
        sample_decoder: bool = False,
        adversary: bool = False,
    ) -> None:
        super().__init__()
        self.n_channels, self.window = n_channels, window
        cells = hidden * window * window
        self.encoder = nn.Sequential(
            nn.Conv2d(n_channels + 1, hidden, kernel_size=3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Dropout2d(dropout),
            nn.Flatten(),
            nn.Linear(cells, latent_dim),
        )
        decoder: list[nn.Module] = [
            nn.Linear(latent_dim, cells),
            nn.Unflatten(1, (hidden, window, window)),
            nn.ReLU(),
            nn.Conv2d(hidden, n_channels, kernel_size=1),
        ]
        if bounded_output:
            decoder.append(nn.Sigmoid())
        self.decoder = nn.Sequential(*decoder)
        use_code = sample_decoder and n_samples > 0
        self.sample_code = nn.Embedding(n_samples, latent_dim) if use_code else None
        self.adversary = SampleAdversary(latent_dim, max(n_samples, 2)) if adversary else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, latent_dim)`` of windows ``(B, C + 1, w, w)``."""
        return self.encoder(x)

    def forward(
        self, x: torch.Tensor, samples: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latent, reconstruction)``; the reconstruction has the C feature channels.

        ``samples`` (codes, ``(B,)``) condition the decoder when it is sample-conditional.
        """
        z = self.encoder(x)
        code = z if self.sample_code is None else z + self.sample_code(samples)
        return z, self.decoder(code)


@register_model("grid_ae")
class GridAE(BaseModel):
    """Grid autoencoder on per-sample hex-aware windows with in-batch multi-triplet loss.

    Parameters
    ----------
    adata
        Cohort holding the input embeddings and spot coordinates.
    expression_key
        ``obsm`` key of the integrated expression embedding (e.g. ``X_pca_harmony``).
    morphology_key
        ``obsm`` key of the integrated morphology embedding (e.g. ``X_morph_harmony``), or
        ``None`` for expression only.
    sample_key
        ``obs`` column of the sample; windows never cross samples.
    window
        Odd window side ``w`` (1 = the spot alone).
    layout
        Lattice of the coordinates: ``auto`` (per sample), ``hex``, ``square``, ``irregular``;
        see :func:`spatlas.pp.build_neighbourhoods`.
    coords
        Two ``obs`` columns or an ``obsm`` key of the coordinates; default
        ``array_row`` / ``array_col`` when present, else ``obsm['spatial']``.
    latent_dim
        Width of the joint latent.
    hidden
        Convolution channels.
    dropout
        Channel dropout in training (inference is deterministic).
    scaling
        Input scaling per channel: ``standard`` (z-score; default), ``minmax`` (to [0, 1], as
        the reference, with a sigmoid decoder output) or ``global`` (centred, one scale per
        modality, keeping the relative variance of the PCs).
    sample_decoder
        Condition the decoder on the sample (a learned code per sample added to the latent).
    batch_penalty
        Remove sample identity from the latent: ``none`` (default; the inputs are already
        integrated), ``mmd`` (MMD between samples in each batch) or ``adversarial`` (sample
        classifier behind gradient reversal). See the ``e2e`` model.
    """

    def __init__(
        self,
        adata: AnnData,
        *,
        expression_key: str = "X_pca_harmony",
        morphology_key: str | None = None,
        sample_key: str = K.SAMPLE,
        window: int = 5,
        layout: Layout = "auto",
        coords: str | Sequence[str] | None = None,
        latent_dim: int = 16,
        hidden: int = 32,
        dropout: float = 0.3,
        scaling: Scaling = "standard",
        sample_decoder: bool = False,
        batch_penalty: BatchPenalty = "none",
    ) -> None:
        super().__init__(
            adata,
            expression_key=expression_key,
            morphology_key=morphology_key,
            sample_key=sample_key,
        )
        if scaling not in SCALINGS:
            raise SpatlasInputError(f"unknown scaling {scaling!r} (known: {', '.join(SCALINGS)})")
        check_architecture(latent_dim=latent_dim, hidden=hidden, dropout=dropout)
        check_batch_penalty(batch_penalty)
        self.init_params = {
            "window": window,
            "layout": layout,
            "coords": coords if coords is None or isinstance(coords, str) else list(coords),
            "latent_dim": latent_dim,
            "hidden": hidden,
            "dropout": dropout,
            "scaling": scaling,
            "sample_decoder": bool(sample_decoder),
            "batch_penalty": batch_penalty,
        }
        self.window = window
        expr = np.asarray(adata.obsm[expression_key], dtype=np.float32)
        morph = (
            np.asarray(adata.obsm[morphology_key], dtype=np.float32)
            if morphology_key is not None
            else np.zeros((adata.n_obs, 0), dtype=np.float32)
        )
        self.n_expression, self.n_morphology = expr.shape[1], morph.shape[1]
        self._raw = np.concatenate([expr, morph], axis=1)  # unscaled: pseudo-labels
        xy, self.coords_used = _coordinates(adata, coords)
        samples = adata.obs[sample_key].astype(str).to_numpy()
        self.sample_codes = np.unique(samples, return_inverse=True)[1].ravel().astype(np.int64)
        self.n_samples = int(self.sample_codes.max()) + 1 if self.n_obs else 0
        self.table, self.layouts = neighbourhood_table(xy, samples, window=window, layout=layout)
        self.scaler = self._fit_scaler()
        self.features = self._scale(self._raw)

    # -- inputs ----------------------------------------------------------------------------

    def _fit_scaler(self) -> dict[str, list[float]]:
        X = self._raw.astype(np.float64)
        scaling = self.init_params["scaling"]
        if scaling == "minmax":
            shift, scale = X.min(axis=0), X.max(axis=0) - X.min(axis=0)
        else:
            shift, scale = X.mean(axis=0), X.std(axis=0)
            if scaling == "global":  # one scale per modality: PC variances keep their ratios
                for part in (slice(0, self.n_expression), slice(self.n_expression, None)):
                    if scale[part].size:
                        scale[part] = np.sqrt(np.mean(scale[part] ** 2))
        scale = np.where(scale > 0, scale, 1.0)
        return {"shift": shift.tolist(), "scale": scale.tolist()}

    def _scale(self, X: np.ndarray) -> np.ndarray:
        shift = np.asarray(self.scaler["shift"], dtype=np.float64)
        scale = np.asarray(self.scaler["scale"], dtype=np.float64)
        return ((X - shift) / scale).astype(np.float32)

    def _get_state(self) -> dict[str, Any]:
        return {
            "scaler": self.scaler,
            "n_expression": self.n_expression,
            "n_morphology": self.n_morphology,
            "layouts": self.layouts,
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
        self.scaler = state["scaler"]
        self.features = self._scale(self._raw)

    def _build_module(self) -> GridAEModule:
        p = self.init_params
        return GridAEModule(
            self.n_expression + self.n_morphology,
            self.window,
            latent_dim=p["latent_dim"],
            hidden=p["hidden"],
            dropout=p["dropout"],
            bounded_output=p["scaling"] == "minmax",
            n_samples=self.n_samples,
            sample_decoder=bool(p.get("sample_decoder")),
            adversary=p.get("batch_penalty") == "adversarial",
        )

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.from_numpy(self.features).to(device),
            torch.from_numpy(self.table).to(device),
        )

    @staticmethod
    def windows(
        features: torch.Tensor, table: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``(B, C, w, w)`` (0 in empty cells) and mask ``(B, 1, w, w)`` of ``rows``."""
        idx = table[rows]
        valid = idx >= 0
        b, cells = idx.shape
        w = math.isqrt(cells)
        x = features[idx.clamp_min(0)] * valid.unsqueeze(-1).to(features.dtype)
        x = x.transpose(1, 2).reshape(b, features.shape[1], w, w)
        return x, valid.to(features.dtype).view(b, 1, w, w)

    # -- training --------------------------------------------------------------------------

    def train(
        self,
        *,
        steps: int = 1000,
        batch_size: int = 512,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        schedule: str = "cosine",
        morphology_weight: float = 1.5,
        total_weight: float = 3.0,
        rec_weight: float = 1.0,
        triplet_weight: float = 1.0,
        batch_weight: float = 1.0,
        margin: float = 1.0,
        n_pseudo_labels: int = 7,
        smooth_pseudo_labels: bool = True,
        pseudo_labels: PseudoLabels = "auto",
        relabel_after: float | None = None,
        cross_sample_positives: bool = False,
        seed: int = 0,
        device: str = "auto",
        n_threads: int | None = 1,
        progress: bool = True,
    ) -> GridAE:
        """Train the autoencoder.

        Parameters
        ----------
        steps
            AdamW optimiser steps (the training budget does not grow with the number of spots).
        batch_size
            Spots per mini-batch (capped at the number of spots).
        lr, weight_decay, schedule
            Peak learning rate, AdamW weight decay, ``cosine`` (warm-up then decay to 10 %)
            or ``constant``.
        morphology_weight
            α in [0, ``total_weight``]: weight of the morphology reconstruction + triplet
            terms; the expression terms get ``total_weight − α``. Without a morphology
            embedding it is set to 0.
        total_weight
            Sum of the two modality weights (paper: 3).
        rec_weight, triplet_weight
            Multipliers of the reconstruction and triplet parts inside each modality.
        batch_weight
            Weight of the sample-alignment part (with ``batch_penalty`` ``mmd`` or
            ``adversarial``).
        margin
            Triplet margin (Euclidean distance on the latent).
        n_pseudo_labels
            K of the per-modality K-Means pseudo-labels (set it to the number of domains).
        smooth_pseudo_labels
            Cluster each modality's embedding averaged over the spot's window (the cells that
            hold a spot) rather than the spot alone: spatially coherent pseudo-labels.
        pseudo_labels
            ``global``: K-Means over all spots (for well-integrated inputs); ``per_sample``:
            K-Means within each sample, triplets drawn within each sample (for inputs whose
            global clusters follow the samples: triplets on such labels would push the samples
            further apart); ``auto`` (default): per modality, global unless the global labels
            explain more than :data:`SAMPLE_DEPENDENCE_LIMIT` of the sample entropy (see
            :func:`sample_dependence`); ``train_params`` records the choice.
        relabel_after
            Fraction of the steps after which the pseudo-labels are replaced by K-Means of the
            current latent over all spots (self-training; with a batch penalty the latent is
            sample-aligned, so these labels are shared across samples). ``None``: never.
        cross_sample_positives
            Draw triplet positives from other samples when the batch has any (global labels).
        seed
            Seed of the weights, batches, dropout, pseudo-labels and triplet draws.
        device
            ``auto`` (CUDA when available), ``cpu``, ``cuda``, ...
        n_threads
            Torch / BLAS threads; ``None``: ``spatlas._settings.settings.n_threads``. Default 1:
            these small convolutions gain little from a second thread, lose 10-20x to thread
            barriers on a busy machine, and a fixed count keeps results bit-identical.
        progress
            Show a progress bar with the loss parts.

        Returns
        -------
        ``self``; ``self.history`` holds the loss parts every 10 steps.
        """
        alpha = float(morphology_weight)
        if not 0 <= alpha <= total_weight:
            raise SpatlasInputError(
                f"morphology_weight must be in [0, {total_weight}], got {morphology_weight}"
            )
        if pseudo_labels not in PSEUDO_LABELS:
            raise SpatlasInputError(
                f"unknown pseudo_labels {pseudo_labels!r} (known: {', '.join(PSEUDO_LABELS)})"
            )
        if relabel_after is not None and not 0 < relabel_after < 1:
            raise SpatlasInputError(f"relabel_after must be in (0, 1) or None, got {relabel_after}")
        if self.n_morphology == 0 and alpha > 0:
            logger.info(
                "%s: no morphology embedding, morphology_weight %.2f -> 0", self.name, alpha
            )
            alpha = 0.0
        beta = total_weight - alpha
        n = self.n_obs
        if n < 2:
            raise SpatlasInputError(f"{self.name}: needs at least 2 spots, got {n}")
        batch_size = int(min(batch_size, n))
        settings = TrainSettings(
            steps=int(steps), lr=lr, weight_decay=weight_decay, schedule=schedule
        )
        self.train_params = {
            **settings.as_params(batch_size),
            "morphology_weight": alpha,
            "total_weight": total_weight,
            "rec_weight": rec_weight,
            "triplet_weight": triplet_weight,
            "batch_weight": batch_weight,
            "margin": margin,
            "n_pseudo_labels": n_pseudo_labels,
            "smooth_pseudo_labels": smooth_pseudo_labels,
            "pseudo_labels": pseudo_labels,
            "relabel_after": relabel_after,
            "cross_sample_positives": cross_sample_positives,
            "seed": seed,
        }
        de = self.n_expression
        k = int(min(n_pseudo_labels, n))
        use_tri_e = beta > 0 and triplet_weight > 0 and k >= 2
        use_tri_m = alpha > 0 and triplet_weight > 0 and k >= 2
        source = window_mean(self._raw, self.table) if smooth_pseudo_labels else self._raw
        labels_e = within_e = labels_m = within_m = None
        if use_tri_e:
            labels_e, within_e = self._pseudo_labels(source[:, :de], k, seed, pseudo_labels, "e")
        if use_tri_m:
            labels_m, within_m = self._pseudo_labels(source[:, de:], k, seed, pseudo_labels, "m")
        relabel_step = None if relabel_after is None else int(relabel_after * settings.steps)
        penalty = self.init_params["batch_penalty"]
        dev = torch.device(resolve_device(device))
        self.train_params["device_used"] = str(dev)  # 'auto' resolved: cuda when present
        logger.info("grid_ae: training on %s", dev)

        with seeded_torch(seed, dev, n_threads):
            module = self._build_module().to(dev)
            features, table = self._tensors(dev)
            groups = torch.from_numpy(self.sample_codes)
            labels = {
                "e": None if labels_e is None else torch.from_numpy(labels_e),
                "m": None if labels_m is None else torch.from_numpy(labels_m),
                "within_e": bool(within_e),
                "within_m": bool(within_m),
            }
            draws = torch.Generator().manual_seed(seed + 1)
            batches = endless_batches(n, batch_size, seed)
            zero = torch.zeros((), device=dev)

            def step(i: int) -> LossParts:
                if i == relabel_step and (use_tri_e or use_tri_m):
                    self._relabel(module, features, table, labels, k, seed)
                rows = next(batches)
                rows_dev = torch.from_numpy(rows).to(dev)
                x, mask = self.windows(features, table, rows_dev)
                z, recon = module(torch.cat([x, mask], dim=1), groups[rows].to(dev))
                rec_e = masked_l1(x[:, :de], recon[:, :de], mask)
                rec_m = masked_l1(x[:, de:], recon[:, de:], mask)

                def triplets(key: str) -> torch.Tensor:
                    if labels[key] is None:
                        return zero
                    within = labels[f"within_{key}"]
                    return multi_triplet_loss(
                        z,
                        labels[key][rows],
                        generator=draws,
                        groups=groups[rows],
                        margin=margin,
                        cross_sample=cross_sample_positives and not within,
                        within_sample=within,
                    )

                tri_e, tri_m = triplets("e"), triplets("m")  # this order: one draw generator
                total = alpha * (rec_weight * rec_m + triplet_weight * tri_m) + beta * (
                    rec_weight * rec_e + triplet_weight * tri_e
                )
                parts = LossParts(total, rec_e, tri_e, rec_m, tri_m, zero)
                if penalty != "none":
                    parts.batch = sample_penalty(penalty, z, groups[rows], module.adversary)
                    parts.total = total + batch_weight * parts.batch
                return parts

            self.history = train_loop(
                module, step, settings, desc=self.name, show_progress=progress
            )
        module.eval()
        self.module = module
        return self

    def _pseudo_labels(
        self, X: np.ndarray, k: int, seed: int, mode: str, modality: str
    ) -> tuple[np.ndarray, bool]:
        """K-Means pseudo-labels of ``X`` and whether triplets must stay within a sample.

        ``global``: over all spots; ``per_sample``: within each sample (codes per sample);
        ``auto``: global unless they follow the samples (:func:`sample_dependence` above
        :data:`SAMPLE_DEPENDENCE_LIMIT`), then per sample. The choice and the dependence are
        recorded in ``train_params``.
        """
        from ..tl._cluster import kmeans_labels

        if mode != "per_sample":
            labels = kmeans_labels(X, k, seed=seed)
            if mode == "global":
                return labels, False
            dependence = sample_dependence(labels, self.sample_codes)
            chosen = "per_sample" if dependence > SAMPLE_DEPENDENCE_LIMIT else "global"
            self.train_params[f"pseudo_labels_{modality}"] = chosen
            self.train_params[f"sample_dependence_{modality}"] = round(dependence, 4)
            logger.info(
                "%s: global %s pseudo-labels explain %.0f %% of the sample entropy -> %s "
                "pseudo-labels (limit %.0f %%)",
                self.name,
                "expression" if modality == "e" else "morphology",
                100 * dependence,
                chosen.replace("_", "-"),
                100 * SAMPLE_DEPENDENCE_LIMIT,
            )
            if chosen == "global":
                return labels, False
        out = np.zeros(self.n_obs, dtype=np.int64)
        for code in range(self.n_samples):
            rows = np.flatnonzero(self.sample_codes == code)
            if rows.size >= 2:
                out[rows] = kmeans_labels(X[rows], min(k, rows.size), seed=seed)
        return out, True

    def _relabel(
        self,
        module: GridAEModule,
        features: torch.Tensor,
        table: torch.Tensor,
        labels: dict[str, Any],
        k: int,
        seed: int,
    ) -> None:
        """Replace the pseudo-labels by K-Means of the current latent over all spots."""
        from ..tl._cluster import kmeans_labels

        module.eval()
        with torch.no_grad():
            z = torch.cat(
                [
                    module.encode(torch.cat(self.windows(features, table, rows), dim=1))
                    for rows in torch.arange(self.n_obs, device=features.device).split(4096)
                ]
            )
        module.train()
        new = torch.from_numpy(kmeans_labels(z.cpu().numpy(), k, seed=seed))
        for key in ("e", "m"):
            if labels[key] is not None:
                labels[key] = new
        labels["within_e"] = labels["within_m"] = False
        logger.info("%s: pseudo-labels replaced by K-Means of the latent", self.name)

    # -- inference -------------------------------------------------------------------------

    def get_latent(
        self,
        *,
        batch_size: int = 4096,
        mc_samples: int = 0,
        seed: int = 0,
        n_threads: int | None = 1,
    ) -> np.ndarray:
        """Latent of every spot: one deterministic eval-mode pass.

        Parameters
        ----------
        batch_size
            Spots per inference batch (does not change the result).
        mc_samples
            0 (default): deterministic. ``> 0``: average this many passes with dropout active
            (MC-dropout; seeded by ``seed``).
        seed
            Seed of the MC-dropout passes.
        n_threads
            Torch / BLAS threads (see ``train``).

        Returns
        -------
        ``float32`` array of shape ``(n_obs, latent_dim)``.
        """
        self._check_trained()
        module = self.module
        dev = next(module.parameters()).device
        module.eval()
        dropouts = [m for m in module.modules() if isinstance(m, nn.Dropout | nn.Dropout2d)]
        out = np.empty((self.n_obs, self.init_params["latent_dim"]), dtype=np.float32)
        with (
            torch_threads(n_threads),
            torch.no_grad(),
            torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []),
        ):
            torch.manual_seed(seed)
            features, table = self._tensors(dev)
            for start in range(0, self.n_obs, batch_size):
                rows = torch.arange(start, min(start + batch_size, self.n_obs), device=dev)
                inputs = torch.cat(self.windows(features, table, rows), dim=1)
                if mc_samples > 0:
                    for m in dropouts:
                        m.train()
                    z = torch.stack([module.encode(inputs) for _ in range(mc_samples)]).mean(0)
                    for m in dropouts:
                        m.eval()
                else:
                    z = module.encode(inputs)
                out[start : start + rows.shape[0]] = z.cpu().numpy()
        return out
