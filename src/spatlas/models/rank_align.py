"""``rank_align``: morphology aligned to expression by ranking consistency (RankByGene, §2.6).

Two projection heads map a spot's expression PCs and its morphology embedding to a shared
space. Within each mini-batch:

- ``contrastive``: InfoNCE between the spot's gene and image projections (each spot's pair is
  the positive, the batch's other spots the negatives);
- ``rank``: the signed ranking-consistency hinge — for an anchor ``a`` and random members
  ``j, k``, if ``a`` is more similar to ``j`` than to ``k`` in expression (cosine of the input
  PCs), its image projection must be too, by a margin
  (:func:`~spatlas.models._losses.ranking_hinge`).

The image branch has an **EMA teacher**: after every optimiser step its weights move towards the
student's with a momentum that ramps from 0.96 to 1 over training (cosine), and the teacher's
projection of the morphology embedding is the model's output: an **aligned morphology
embedding** whose similarities follow expression. It is meant as the morphology input of
another model, e.g. ``grid_ae`` with ``morphology_key='X_rank_align'``, and as the image
features of :func:`spatlas.tl.fit_expression_predictor` (expression read from the H&E).

After training, the image branch embeds **new images without their expression**:
:meth:`RankAlign.image_encoder` returns an :class:`AlignedImageEncoder` (input scaling + the
teacher), and :meth:`AlignedImageEncoder.load` reads it back from a folder written by
:meth:`RankAlign.save` with no access to the training cohort.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from anndata import AnnData
from torch import nn

from .. import _keys as K
from .._errors import SpatlasInputError
from . import register_model
from ._base import check_architecture
from ._losses import LossParts, info_nce, ranking_hinge
from ._spot import SpotModel, apply_scaler, mlp
from ._trainer import TrainSettings


class RankAlignModule(nn.Module):
    """Gene head, image student head and its EMA teacher (no gradient)."""

    def __init__(
        self,
        n_expression: int,
        n_morphology: int,
        *,
        hidden: int = 128,
        latent_dim: int = 16,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.gene = mlp(n_expression, hidden, latent_dim, dropout=dropout)
        self.student = mlp(n_morphology, hidden, latent_dim, dropout=dropout)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher ← momentum · teacher + (1 − momentum) · student`` (weights and buffers)."""
        for t, s in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)

    def embed(self, expr: torch.Tensor, morph: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The aligned morphology embedding: the teacher's L2-normalised projection of the spot."""
        return F.normalize(self.teacher(morph[:, 0]), dim=1)


def teacher_momentum(step: int, steps: int, start: float = 0.96) -> float:
    """EMA momentum at ``step``: cosine ramp from ``start`` to 1 over ``steps``."""
    return 1.0 - (1.0 - start) * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))


class AlignedImageEncoder:
    """The trained image branch of ``rank_align``: morphology features -> aligned embedding.

    Applies the training cohort's morphology scaling, then the EMA teacher, then L2
    normalisation: exactly :meth:`RankAlign.get_latent` for a spot, but needs only its
    morphology features (no expression, no training cohort).

    Parameters
    ----------
    teacher
        The teacher MLP (``n_morphology -> latent_dim``).
    scaler
        ``{'shift': [...], 'scale': [...]}`` of the morphology input.
    """

    def __init__(self, teacher: nn.Module, scaler: dict[str, list[float]]) -> None:
        self.teacher = teacher.eval()
        self.scaler = scaler
        self.n_morphology = len(scaler["shift"])
        self.latent_dim = int(teacher[-1].out_features)

    def __call__(self, features: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
        """``(n, n_morphology)`` features -> ``(n, latent_dim)`` float32 aligned embedding."""
        from .._settings import torch_threads

        X = np.asarray(features, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_morphology:
            raise SpatlasInputError(
                f"rank_align image encoder expects {self.n_morphology} morphology features per "
                f"spot, got an array of shape {X.shape}; use the extractor it was trained with"
            )
        if not np.isfinite(X).all():
            raise SpatlasInputError("rank_align image encoder: the features hold NaN/inf values")
        Z = apply_scaler(X, self.scaler)
        dev = next(self.teacher.parameters()).device
        out = []
        with torch_threads(1), torch.no_grad():
            for start in range(0, Z.shape[0], batch_size):
                chunk = torch.from_numpy(Z[start : start + batch_size]).to(dev)
                out.append(F.normalize(self.teacher(chunk), dim=1).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.latent_dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    @classmethod
    def load(cls, path: str | Path) -> AlignedImageEncoder:
        """The image branch of a ``rank_align`` model folder written by :meth:`RankAlign.save`."""
        path = Path(path)
        meta_file, weights_file = path / "model.json", path / "weights.pt"
        if not meta_file.exists() or not weights_file.exists():
            raise SpatlasInputError(
                f"{path} holds no saved rank_align model (model.json + weights.pt)"
            )
        meta: dict[str, Any] = json.loads(meta_file.read_text())
        if meta.get("model") != "rank_align":
            raise SpatlasInputError(f"{path} holds a '{meta.get('model')}' model, not rank_align")
        p, state = meta["init_params"], meta["state"]
        teacher = mlp(state["n_morphology"], p["hidden"], p["latent_dim"], dropout=p["dropout"])
        weights = torch.load(weights_file, map_location="cpu", weights_only=True)
        teacher.load_state_dict(
            {k.removeprefix("teacher."): v for k, v in weights.items() if k.startswith("teacher.")}
        )
        return cls(teacher, state["scalers"]["morphology"])


@register_model("rank_align")
class RankAlign(SpotModel):
    """RankByGene-style alignment of the morphology embedding to expression (EMA-teacher output).

    Parameters
    ----------
    adata, expression_key, morphology_key, sample_key
        See :class:`~spatlas.models._base.BaseModel`; a morphology embedding is required.
    n_neighbors, coords
        See :class:`~spatlas.models._spot.SpotModel` (this model looks at the spot alone; the
        table is kept for a common interface, ``n_neighbors=0`` skips it).
    latent_dim
        Width of the aligned embedding.
    hidden
        Width of the heads' hidden layer.
    dropout
        Dropout in training (inference is deterministic).
    """

    requires_morphology = True

    def __init__(
        self,
        adata: AnnData,
        *,
        expression_key: str = "X_pca_harmony",
        morphology_key: str | None = K.MORPH_HARMONY,
        sample_key: str = K.SAMPLE,
        n_neighbors: int = 0,
        coords: str | Sequence[str] | None = K.SPATIAL,
        latent_dim: int = 16,
        hidden: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(
            adata,
            expression_key=expression_key,
            morphology_key=morphology_key,
            sample_key=sample_key,
            n_neighbors=n_neighbors,
            coords=coords,
        )
        check_architecture(latent_dim=latent_dim, hidden=hidden, dropout=dropout)
        self.init_params.update(latent_dim=latent_dim, hidden=hidden, dropout=dropout)

    def image_encoder(self) -> AlignedImageEncoder:
        """The trained image branch (teacher + input scaling) for new spots' features."""
        self._check_trained()
        teacher = copy.deepcopy(self.module.teacher).cpu()
        return AlignedImageEncoder(teacher, self.scalers["morphology"])

    def _build_module(self) -> RankAlignModule:
        p = self.init_params
        return RankAlignModule(
            self.n_expression,
            self.n_morphology,
            hidden=p["hidden"],
            latent_dim=p["latent_dim"],
            dropout=p["dropout"],
        )

    def train(
        self,
        *,
        steps: int = 1000,
        batch_size: int = 512,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        schedule: str = "cosine",
        contrastive_weight: float = 1.0,
        rank_weight: float = 1.0,
        temperature: float = 0.1,
        n_rank_pairs: int = 16,
        rank_margin: float = 0.05,
        momentum: float = 0.96,
        seed: int = 0,
        device: str = "auto",
        n_threads: int | None = 1,
        progress: bool = True,
    ) -> RankAlign:
        """Train the heads; the EMA teacher follows the image student.

        Parameters
        ----------
        steps, batch_size, lr, weight_decay, schedule
            AdamW steps, spots per batch, peak learning rate, weight decay, schedule.
        contrastive_weight, rank_weight
            Weights of the InfoNCE and ranking-hinge parts.
        temperature
            InfoNCE temperature.
        n_rank_pairs
            Random ``(j, k)`` pairs per anchor and step.
        rank_margin
            Hinge margin on the difference of cosine similarities.
        momentum
            Starting EMA momentum of the teacher (ramps to 1).
        seed, device, n_threads, progress
            As in :meth:`spatlas.models.grid_ae.GridAE.train`.

        Returns
        -------
        ``self``; ``self.history`` holds the loss parts every 10 steps.
        """
        if not 0 <= momentum <= 1:
            raise SpatlasInputError(f"momentum must be in [0, 1], got {momentum}")
        settings = TrainSettings(
            steps=int(steps), lr=lr, weight_decay=weight_decay, schedule=schedule
        )
        batch_size = int(min(batch_size, self.n_obs))
        self.train_params = {
            **settings.as_params(batch_size),
            "contrastive_weight": contrastive_weight,
            "rank_weight": rank_weight,
            "temperature": temperature,
            "n_rank_pairs": n_rank_pairs,
            "rank_margin": rank_margin,
            "momentum": momentum,
            "seed": seed,
        }

        def make_step(module: RankAlignModule, data, batches: Iterator[np.ndarray]):
            draws = torch.Generator().manual_seed(seed + 1)
            dev = data["expr"].device

            def step(i: int) -> LossParts:
                if i > 0:  # the student moved at step i - 1: the teacher follows
                    module.update_teacher(teacher_momentum(i, settings.steps, momentum))
                rows = torch.from_numpy(next(batches)).to(dev)
                expr, morph = data["expr"][rows], data["morph"][rows]
                gene = module.gene(expr)
                image = module.student(morph)
                contrast = info_nce(gene, image, temperature)
                rank = ranking_hinge(
                    expr, image, generator=draws, n_pairs=n_rank_pairs, margin=rank_margin
                )
                total = contrastive_weight * contrast + rank_weight * rank
                return LossParts(total, contrastive=contrast, rank=rank)

            return step

        self._fit(
            make_step,
            settings=settings,
            batch_size=batch_size,
            seed=seed,
            device=device,
            n_threads=n_threads,
            progress=progress,
        )
        return self
