"""``cross_attention``: MultiST-style fusion by cross-attention over spatial neighbourhoods (§2.5).

Gene branch: an MLP of each spot's expression PCs, then one graph convolution over the
per-sample spatial kNN graph (the spot's own code plus the mean of its neighbours', gathered
from an ``(N, k)`` table, never an ``N x N`` matrix). Image branch: the morphology embedding
projected by an MLP to the same width. Fusion: multi-head cross-attention in which the spot's
gene code queries the **image tokens of its whole neighbourhood** (itself and its k
neighbours, with a learned self / neighbour role embedding and padding masked), and the spot's
image code queries the neighbourhood's gene tokens. (The published MultiST attends over a single
token, where the softmax is 1 and attention degenerates to a linear map of the value.) The two
attended codes are concatenated and projected to the latent.

Losses (:class:`~spatlas.models._losses.LossParts`):

- ``rec_expression`` / ``rec_morphology``: MSE of both modalities decoded from the latent;
- ``link``: link prediction on the spatial graph — the latent must score the spot's true
  neighbours above random spots of the batch (binary cross-entropy);
- ``contrastive``: InfoNCE between the spot's gene and image codes;
- ``batch``: sample identity removed from the latent, by MMD between samples (default) or a
  sample classifier behind gradient reversal (``batch_penalty='adversarial'``);
- optional ``triplet_expression``: in-batch multi-triplets on K-Means pseudo-labels of the
  window-averaged expression (as in ``grid_ae``; ``triplet_weight=0`` turns it off).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from anndata import AnnData
from torch import nn

from .. import _keys as K
from .._errors import SpatlasInputError
from . import register_model
from ._base import check_architecture
from ._losses import (
    BatchPenalty,
    LossParts,
    SampleAdversary,
    check_batch_penalty,
    info_nce,
    multi_triplet_loss,
    sample_penalty,
)
from ._spot import SpotModel, mlp
from ._trainer import TrainSettings


class CrossAttentionModule(nn.Module):
    """Gene MLP + graph convolution, image projection, neighbourhood cross-attention, decoders."""

    def __init__(
        self,
        n_expression: int,
        n_morphology: int,
        n_samples: int,
        *,
        hidden: int = 64,
        latent_dim: int = 16,
        heads: int = 4,
        dropout: float = 0.1,
        adversary: bool = False,
    ) -> None:
        super().__init__()
        self.has_image = n_morphology > 0
        self.gene = mlp(n_expression, hidden, hidden, dropout=dropout)
        self.gene_self = nn.Linear(hidden, hidden)
        self.gene_neighbours = nn.Linear(hidden, hidden, bias=False)
        self.role = nn.Embedding(2, hidden)  # token 0 = the spot itself, 1 = a neighbour
        if self.has_image:
            self.image = mlp(n_morphology, hidden, hidden, dropout=dropout)
            attention = {"dropout": dropout, "batch_first": True}
            self.gene_to_image = nn.MultiheadAttention(hidden, heads, **attention)
            self.image_to_gene = nn.MultiheadAttention(hidden, heads, **attention)
            self.norm_gene = nn.LayerNorm(hidden)
            self.norm_image = nn.LayerNorm(hidden)
            self.head_gene = nn.Linear(hidden, hidden)
            self.head_image = nn.Linear(hidden, hidden)
            self.decode_morphology = mlp(latent_dim, hidden, n_morphology)
        self.to_latent = nn.Linear(hidden * (2 if self.has_image else 1), latent_dim)
        self.decode_expression = mlp(latent_dim, hidden, n_expression)
        self.link = nn.Linear(latent_dim, hidden)
        self.adversary = SampleAdversary(latent_dim, max(n_samples, 2)) if adversary else None

    def encode(
        self, expr: torch.Tensor, morph: torch.Tensor, valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Latent and intermediate codes of a batch of neighbourhoods ``(B, 1 + k, ·)``."""
        g = self.gene(expr)  # gene tokens (B, 1 + k, H)
        nb_valid = valid[:, 1:].unsqueeze(-1).to(g.dtype)
        nb_mean = (g[:, 1:] * nb_valid).sum(1) / nb_valid.sum(1).clamp_min(1.0)
        gene = F.relu(self.gene_self(g[:, 0]) + self.gene_neighbours(nb_mean))  # graph conv
        out = {"gene_tokens": g, "gene": gene}
        if not self.has_image:
            out["z"] = self.to_latent(gene)
            return out
        roles = torch.ones(valid.shape, dtype=torch.long, device=valid.device)
        roles[:, 0] = 0
        role = self.role(roles)
        image_tokens = self.image(morph) + role
        gene_tokens = g + role
        padding = ~valid
        attended_image, _ = self.gene_to_image(
            gene[:, None], image_tokens, image_tokens, key_padding_mask=padding, need_weights=False
        )
        image = image_tokens[:, 0]
        attended_gene, _ = self.image_to_gene(
            image[:, None], gene_tokens, gene_tokens, key_padding_mask=padding, need_weights=False
        )
        fused_gene = self.norm_gene(gene + attended_image[:, 0])
        fused_image = self.norm_image(image + attended_gene[:, 0])
        out.update(image=image, z=self.to_latent(torch.cat([fused_gene, fused_image], dim=1)))
        return out

    def embed(self, expr: torch.Tensor, morph: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The latent ``(B, latent_dim)``."""
        return self.encode(expr, morph, valid)["z"]


@register_model("cross_attention")
class CrossAttention(SpotModel):
    """MultiST-style fusion: graph-convolved genes and images cross-attending over neighbourhoods.

    Parameters
    ----------
    adata, expression_key, morphology_key, sample_key
        See :class:`~spatlas.models._base.BaseModel` (without morphology the image branch and
        the attention are skipped).
    n_neighbors
        Spatial neighbours per spot within its sample (the graph and the attention tokens).
    coords
        ``obsm`` key or two ``obs`` columns of the coordinates (default ``obsm['spatial']``).
    latent_dim
        Width of the fused latent.
    hidden
        Width of the gene and image codes (the attention's model width).
    heads
        Attention heads (must divide ``hidden``).
    dropout
        Dropout in training (inference is deterministic).
    batch_penalty
        ``mmd`` (default), ``adversarial`` (sample classifier + gradient reversal) or ``none``.
    """

    def __init__(
        self,
        adata: AnnData,
        *,
        expression_key: str = "X_pca_harmony",
        morphology_key: str | None = None,
        sample_key: str = K.SAMPLE,
        n_neighbors: int = 6,
        coords: str | Sequence[str] | None = K.SPATIAL,
        latent_dim: int = 16,
        hidden: int = 64,
        heads: int = 4,
        dropout: float = 0.1,
        batch_penalty: BatchPenalty = "mmd",
    ) -> None:
        super().__init__(
            adata,
            expression_key=expression_key,
            morphology_key=morphology_key,
            sample_key=sample_key,
            n_neighbors=n_neighbors,
            coords=coords,
        )
        check_batch_penalty(batch_penalty)
        check_architecture(latent_dim=latent_dim, hidden=hidden, heads=heads, dropout=dropout)
        if hidden % heads:
            raise SpatlasInputError(f"heads ({heads}) must divide hidden ({hidden})")
        self.init_params.update(
            latent_dim=latent_dim,
            hidden=hidden,
            heads=heads,
            dropout=dropout,
            batch_penalty=batch_penalty,
        )

    def _build_module(self) -> CrossAttentionModule:
        p = self.init_params
        return CrossAttentionModule(
            self.n_expression,
            self.n_morphology,
            self.n_samples,
            hidden=p["hidden"],
            latent_dim=p["latent_dim"],
            heads=p["heads"],
            dropout=p["dropout"],
            adversary=p["batch_penalty"] == "adversarial",
        )

    def train(
        self,
        *,
        steps: int = 1000,
        batch_size: int = 512,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        schedule: str = "cosine",
        rec_weight: float = 1.0,
        link_weight: float = 1.0,
        contrastive_weight: float = 0.5,
        batch_weight: float = 1.0,
        triplet_weight: float = 1.0,
        n_pseudo_labels: int = 7,
        temperature: float = 0.2,
        seed: int = 0,
        device: str = "auto",
        n_threads: int | None = 1,
        progress: bool = True,
    ) -> CrossAttention:
        """Train the model.

        Parameters
        ----------
        steps, batch_size, lr, weight_decay, schedule
            AdamW steps (a budget that does not grow with N), spots per batch, peak learning
            rate, weight decay, ``cosine`` or ``constant`` schedule.
        rec_weight, link_weight, contrastive_weight, batch_weight, triplet_weight
            Weights of the reconstruction, link-prediction, gene–image InfoNCE, sample-alignment
            and pseudo-label triplet parts (0 turns a part off).
        n_pseudo_labels
            K of the expression pseudo-labels of the triplet part (the number of domains).
        temperature
            InfoNCE temperature.
        seed, device, n_threads, progress
            As in :meth:`spatlas.models.grid_ae.GridAE.train`.

        Returns
        -------
        ``self``; ``self.history`` holds the loss parts every 10 steps.
        """
        from ..tl._cluster import kmeans_labels
        from .grid_ae import window_mean

        settings = TrainSettings(
            steps=int(steps), lr=lr, weight_decay=weight_decay, schedule=schedule
        )
        batch_size = int(min(batch_size, self.n_obs))
        self.train_params = {
            **settings.as_params(batch_size),
            "rec_weight": rec_weight,
            "link_weight": link_weight,
            "contrastive_weight": contrastive_weight,
            "batch_weight": batch_weight,
            "triplet_weight": triplet_weight,
            "n_pseudo_labels": n_pseudo_labels,
            "temperature": temperature,
            "seed": seed,
        }
        penalty = self.init_params["batch_penalty"]
        k = int(min(n_pseudo_labels, self.n_obs))
        labels = None
        if triplet_weight > 0 and k >= 2:
            smoothed = window_mean(
                self._expr_raw, np.concatenate([np.arange(self.n_obs)[:, None], self.knn], axis=1)
            )
            labels = torch.from_numpy(kmeans_labels(smoothed, k, seed=seed))
        has_image = self.n_morphology > 0

        def make_step(module, data, batches: Iterator[np.ndarray]):
            draws = torch.Generator().manual_seed(seed + 1)
            dev = data["expr"].device
            zero = torch.zeros((), device=dev)

            def step(_: int) -> LossParts:
                rows_np = next(batches)
                rows = torch.from_numpy(rows_np).to(dev)
                expr, morph, valid = self.tokens(data, rows)
                out = module.encode(expr, morph, valid)
                z = out["z"]
                rec_e = F.mse_loss(module.decode_expression(z), expr[:, 0])
                rec_m = F.mse_loss(module.decode_morphology(z), morph[:, 0]) if has_image else zero
                # link prediction: true neighbours' gene tokens vs random batch members'
                u = module.link(z)
                scale = u.shape[1] ** -0.5
                pos = (u[:, None] * out["gene_tokens"][:, 1:]).sum(-1) * scale
                perm = torch.randperm(rows.shape[0], generator=draws).to(dev)
                neg = (u * out["gene_tokens"][perm, 0]).sum(-1) * scale
                nb = valid[:, 1:]
                link = (
                    0.5
                    * (
                        F.binary_cross_entropy_with_logits(pos[nb], torch.ones_like(pos[nb]))
                        + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))
                    )
                    if bool(nb.any())
                    else zero
                )
                contrast = (
                    info_nce(
                        module.head_gene(out["gene"]), module.head_image(out["image"]), temperature
                    )
                    if has_image
                    else zero
                )
                batch = sample_penalty(penalty, z, data["sample"][rows], module.adversary)
                triplet = (
                    multi_triplet_loss(z, labels[rows_np], generator=draws)
                    if labels is not None
                    else zero
                )
                total = (
                    rec_weight * (rec_e + rec_m)
                    + link_weight * link
                    + contrastive_weight * contrast
                    + batch_weight * batch
                    + triplet_weight * triplet
                )
                return LossParts(
                    total,
                    rec_expression=rec_e,
                    rec_morphology=rec_m,
                    triplet_expression=triplet,
                    link=link,
                    contrastive=contrast,
                    batch=batch,
                )

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
