"""``e2e``: batch correction and fusion in one training (the paper's future work).

The grid autoencoder fed with **uncorrected** PCs (``X_pca``, and ``X_morph_pca`` for the
morphology), with three changes that let it correct the batch itself, so no Harmony step is
needed:

- a **sample-conditional decoder**: a learned code per sample is added to the latent before
  decoding, so sample-specific offsets in the inputs are explained by the decoder, not carried
  by the latent;
- a **sample-alignment penalty** on the latent: MMD between each sample and the rest of the
  batch (default) or a sample classifier behind gradient reversal (``batch_penalty``);
- **per-sample pseudo-labels**: K-Means of each sample's window-averaged PCs, with triplets
  drawn within each sample (global K-Means of uncorrected PCs would mostly find the samples);
  halfway through training (``relabel_after``) they are replaced by K-Means of the (now
  sample-aligned) latent over all spots, with positives from other samples.

Every other part — hex-aware windows, masked reconstruction, in-batch multi-triplets, fixed
step budget, deterministic inference, save / load — is ``grid_ae``'s.
"""

from __future__ import annotations

from typing import Any

from anndata import AnnData

from .. import _keys as K
from . import register_model
from .grid_ae import GridAE

E2E_INIT = {"sample_decoder": True, "batch_penalty": "mmd"}
E2E_TRAIN = {
    "pseudo_labels": "per_sample",
    "relabel_after": 0.5,
    "cross_sample_positives": True,
    "batch_weight": 3.0,
}


@register_model("e2e")
class E2E(GridAE):
    """Grid autoencoder that corrects the batch while fusing: give it uncorrected PCs.

    Takes every :class:`~spatlas.models.grid_ae.GridAE` setting; its defaults differ in
    ``expression_key='X_pca'``, ``sample_decoder=True``, ``batch_penalty='mmd'`` (constructor)
    and ``pseudo_labels='per_sample'``, ``relabel_after=0.5``, ``cross_sample_positives=True``,
    ``batch_weight=3`` (``train()``).
    """

    @classmethod
    def parameters(cls) -> tuple[dict[str, Any], dict[str, Any]]:
        """``grid_ae``'s settings with e2e's defaults."""
        init, train = GridAE.parameters()
        return {**init, "expression_key": K.PCA, **E2E_INIT}, {**train, **E2E_TRAIN}

    def __init__(self, adata: AnnData, **kwargs: Any) -> None:
        kwargs.setdefault("expression_key", K.PCA)
        super().__init__(adata, **{**E2E_INIT, **kwargs})

    def train(self, **kwargs: Any) -> E2E:
        """Train as :meth:`GridAE.train <spatlas.models.grid_ae.GridAE.train>` (e2e defaults)."""
        super().train(**{**E2E_TRAIN, **kwargs})
        return self
