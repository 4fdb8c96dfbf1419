"""Losses of the fusion models.

Named loss parts, masked reconstruction, in-batch multi-triplets, sample alignment (MMD,
gradient reversal), InfoNCE and the signed ranking-consistency hinge.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F

from .._errors import SpatlasInputError


@dataclass
class LossParts:
    """The total loss of one step and every named part (each a scalar tensor).

    ``total = morphology_weight · (rec_morphology + triplet_morphology)
    + expression_weight · (rec_expression + triplet_expression) + alignment`` for the grid
    autoencoder (paper eq. 5, with ``expression_weight = 3 − morphology_weight``); the parts
    enter unweighted so that each can be logged on its own scale. The other models fill the
    parts they have (``None`` = the model has no such part; it is left out of the history):
    ``batch`` (sample alignment: MMD or the adversary's cross-entropy), ``link`` (link
    prediction on the spatial graph), ``contrastive`` (gene–image InfoNCE), ``rank``
    (ranking-consistency hinge).
    """

    total: torch.Tensor
    rec_expression: torch.Tensor | None = None
    triplet_expression: torch.Tensor | None = None
    rec_morphology: torch.Tensor | None = None
    triplet_morphology: torch.Tensor | None = None
    alignment: torch.Tensor | None = None
    batch: torch.Tensor | None = None
    link: torch.Tensor | None = None
    contrastive: torch.Tensor | None = None
    rank: torch.Tensor | None = None

    def as_dict(self) -> dict[str, float]:
        """Every part the model has as a Python float (logs, progress bars, training curves)."""
        return {
            f.name: float(getattr(self, f.name).detach())
            for f in fields(self)
            if getattr(self, f.name) is not None
        }


def masked_l1(
    target: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean absolute error over the window cells that hold a spot.

    ``target`` and ``reconstruction``: ``(B, C, w, w)``; ``mask``: ``(B, 1, w, w)`` of 0 / 1.
    Empty cells (no spot at that lattice position) are neither inputs to imitate nor errors.
    """
    if target.shape[1] == 0:
        return target.new_zeros(())
    err = (reconstruction - target).abs() * mask
    return err.sum() / (mask.sum() * target.shape[1]).clamp_min(1.0)


def sample_multi_triplets(
    labels: torch.Tensor,
    *,
    generator: torch.Generator,
    groups: torch.Tensor | None = None,
    cross_sample: bool = False,
    within_sample: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-triplets drawn within a mini-batch (no extra encoder passes).

    For every anchor ``a`` with pseudo-label ``y_a`` and every *other* label ``c`` present in the
    batch: one negative drawn uniformly from the batch members labelled ``c``, paired with one
    positive drawn from the members labelled ``y_a`` other than ``a`` (so an anchor gets as many
    triplets as there are other labels in the batch, as in the reference's multi-triplet loss).
    With ``cross_sample``, the positive is drawn from members of another sample (``groups``)
    when the batch has any with label ``y_a``, else from the anchor's own sample. With
    ``within_sample``, positive and negatives all come from the anchor's own sample (for labels
    that are defined per sample, e.g. K-Means of each sample's uncorrected PCs); other labels
    absent from the anchor's sample in the batch give no triplet. Anchors alone in their label
    get no triplet.

    Parameters
    ----------
    labels
        Pseudo-labels of the batch members, ``int64`` of shape ``(B,)``.
    generator
        CPU generator of the draws.
    groups
        Sample of each member, ``(B,)``; needed for ``cross_sample``.
    cross_sample
        Prefer positives from other samples.
    within_sample
        Draw positives and negatives from the anchor's sample only (excludes ``cross_sample``).

    Returns
    -------
    ``(anchor, positive, negative)``: ``int64`` batch positions, each of shape ``(T,)``.
    """
    if cross_sample and within_sample:
        raise ValueError("cross_sample and within_sample exclude each other")
    labels = labels.to("cpu", torch.int64)
    b = labels.shape[0]
    if groups is None or not (cross_sample or within_sample):
        groups = torch.zeros(b, dtype=torch.int64)
    groups = torch.unique(groups.to("cpu"), return_inverse=True)[1].to(torch.int64)
    n_groups = int(groups.max()) + 1 if b else 1
    _, labels = torch.unique(labels, return_inverse=True)
    n_classes = int(labels.max()) + 1 if b else 0
    empty = torch.zeros(0, dtype=torch.int64)
    if n_classes < 2:
        return empty, empty, empty

    # members sorted by (label, group): each label is a contiguous block, each (label, group)
    # a contiguous sub-block
    key = labels * n_groups + groups
    order = torch.argsort(key, stable=True)
    pos_in_order = torch.empty_like(order)
    pos_in_order[order] = torch.arange(b)
    n_label = torch.bincount(labels, minlength=n_classes)
    label_start = torch.cumsum(n_label, 0) - n_label
    n_key = torch.bincount(key, minlength=n_classes * n_groups)
    key_start = torch.cumsum(n_key, 0) - n_key

    # one (anchor, other label) pair per negative
    anchor, other = torch.meshgrid(torch.arange(b), torch.arange(n_classes), indexing="ij")
    if within_sample:
        own_key = labels * n_groups + groups
        other_key = other * n_groups + groups[:, None]
        keep = (other != labels[:, None]) & (n_key[own_key][:, None] >= 2) & (n_key[other_key] > 0)
        anchor, other = anchor[keep], other[keep]
        ka, kn = own_key[anchor], other * n_groups + groups[anchor]
        u = torch.rand(anchor.shape[0], generator=generator, dtype=torch.float64)
        negative = order[key_start[kn] + (u * n_key[kn]).long().clamp_max(n_key[kn] - 1)]
        u = torch.rand(anchor.shape[0], generator=generator, dtype=torch.float64)
        size = n_key[ka] - 1
        r = (u * size).long().clamp_max(size - 1)
        rank = pos_in_order[anchor] - key_start[ka]
        positive = order[key_start[ka] + r + (r >= rank).long()]
        return anchor, positive, negative
    keep = (other != labels[:, None]) & (n_label[labels][:, None] >= 2)
    anchor, other = anchor[keep], other[keep]
    ya = labels[anchor]

    u = torch.rand(anchor.shape[0], generator=generator, dtype=torch.float64)
    negative = order[label_start[other] + (u * n_label[other]).long().clamp_max(n_label[other] - 1)]

    u = torch.rand(anchor.shape[0], generator=generator, dtype=torch.float64)
    # positive of the anchor's label other than the anchor: skip its position in the block
    size = n_label[ya] - 1
    r = (u * size).long().clamp_max(size - 1)
    rank = pos_in_order[anchor] - label_start[ya]
    positive = order[label_start[ya] + r + (r >= rank).long()]
    if cross_sample:
        ka = ya * n_groups + groups[anchor]
        own = n_key[ka]
        n_other = n_label[ya] - own
        r = (u * n_other).long().clamp_max((n_other - 1).clamp_min(0))
        offset = key_start[ka] - label_start[ya]  # where the anchor's own-sample block starts
        at = label_start[ya] + r + (r >= offset).long() * own
        cross = order[at.clamp_max(b - 1)]  # out-of-block only where n_other == 0 (unused)
        positive = torch.where(n_other > 0, cross, positive)
    return anchor, positive, negative


def multi_triplet_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    *,
    generator: torch.Generator,
    groups: torch.Tensor | None = None,
    cross_sample: bool = False,
    within_sample: bool = False,
    margin: float = 1.0,
) -> torch.Tensor:
    """Mean triplet margin loss (Euclidean, on ``z``) over in-batch multi-triplets.

    See :func:`sample_multi_triplets`; 0 when the batch yields no triplet.
    """
    anchor, positive, negative = sample_multi_triplets(
        labels,
        generator=generator,
        groups=groups,
        cross_sample=cross_sample,
        within_sample=within_sample,
    )
    if anchor.numel() == 0:
        return z.new_zeros(())
    anchor, positive, negative = (t.to(z.device) for t in (anchor, positive, negative))
    return F.triplet_margin_loss(z[anchor], z[positive], z[negative], margin=margin, p=2)


# -- sample alignment --------------------------------------------------------------------------


def mmd_between_samples(z: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean squared MMD between each sample's batch members and the rest of the batch.

    Gaussian kernels at five bandwidths around the batch's median squared distance (the
    multi-kernel MMD of Long et al. 2015); ``O(B² · S)`` for a batch of ``B`` members from ``S``
    samples, never ``N x N``. 0 when the batch holds one sample.
    """
    codes = torch.unique(groups.to(z.device), return_inverse=True)[1]
    n_groups = int(codes.max()) + 1 if codes.numel() else 0
    if n_groups < 2:
        return z.new_zeros(())
    d2 = torch.cdist(z, z).pow(2)
    scale = d2.detach().median().clamp_min(1e-6)
    kernel = sum(torch.exp(-d2 / (scale * f)) for f in (0.25, 0.5, 1.0, 2.0, 4.0)) / 5.0
    member = F.one_hot(codes, n_groups).to(z.dtype)  # (B, S)
    rest = 1.0 - member
    n_in = member.sum(0)
    n_out = rest.sum(0)
    k_in = (member * (kernel @ member)).sum(0) / n_in**2
    k_out = (rest * (kernel @ rest)).sum(0) / n_out**2
    k_cross = (member * (kernel @ rest)).sum(0) / (n_in * n_out)
    return (k_in + k_out - 2.0 * k_cross).clamp_min(0.0).mean()


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.strength * grad, None


def grad_reverse(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Identity forward, gradient times ``-strength`` backward (domain-adversarial training)."""
    return _GradReverse.apply(x, strength)


class SampleAdversary(torch.nn.Module):
    """Classifier of the sample from a latent, trained through gradient reversal.

    ``loss(z, groups)`` is the classifier's cross-entropy; minimising it trains the classifier
    and, through the reversed gradient, pushes the encoder to remove sample identity from ``z``.
    """

    def __init__(self, latent_dim: int, n_samples: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(latent_dim, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, n_samples),
        )

    def loss(self, z: torch.Tensor, groups: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """Cross-entropy of the sample predicted from ``grad_reverse(z)``."""
        return F.cross_entropy(self.net(grad_reverse(z, strength)), groups.to(z.device))


BatchPenalty = Literal["none", "mmd", "adversarial"]
BATCH_PENALTIES = ("none", "mmd", "adversarial")


def check_batch_penalty(kind: str) -> None:
    """Clear error for an unknown ``batch_penalty``."""
    if kind not in BATCH_PENALTIES:
        raise SpatlasInputError(
            f"unknown batch_penalty {kind!r} (known: {', '.join(BATCH_PENALTIES)})"
        )


def sample_penalty(
    kind: str, z: torch.Tensor, groups: torch.Tensor, adversary: SampleAdversary | None
) -> torch.Tensor:
    """The sample-alignment part of a model's loss: ``none`` (0), ``mmd`` or ``adversarial``."""
    if kind == "mmd":
        return mmd_between_samples(z, groups)
    if kind == "adversarial":
        return adversary.loss(z, groups)
    return z.new_zeros(())


# -- cross-modal alignment ---------------------------------------------------------------------


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` and ``b``.

    Row i of each is a positive pair, every other row of the batch a negative; inputs are
    L2-normalised here.
    """
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    logits = a @ b.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def ranking_hinge(
    reference: torch.Tensor,
    z: torch.Tensor,
    *,
    generator: torch.Generator,
    n_pairs: int = 16,
    margin: float = 0.05,
    min_gap: float = 0.05,
) -> torch.Tensor:
    """Signed ranking-consistency hinge (RankByGene): keep ``reference``'s similarity order.

    For every anchor ``a`` and ``n_pairs`` random pairs ``(j, k)`` of other batch members, with
    ``s`` the cosine similarity: ``max(0, margin − sign(s_ref(a,j) − s_ref(a,k)) ·
    (s_z(a,j) − s_z(a,k)))``. Pairs whose reference similarities differ by less than ``min_gap``
    are ties and skipped. ``reference`` carries no gradient (e.g. the expression PCs).
    """
    b = z.shape[0]
    if b < 3:
        return z.new_zeros(())
    anchor = torch.arange(b).repeat_interleave(n_pairs)
    # j, k uniform among the other members: draw in [0, b - 1) and skip the anchor
    j = torch.randint(0, b - 1, (anchor.shape[0],), generator=generator)
    k = torch.randint(0, b - 1, (anchor.shape[0],), generator=generator)
    j, k = j + (j >= anchor).long(), k + (k >= anchor).long()
    anchor, j, k = (t.to(z.device) for t in (anchor, j, k))
    ref = F.normalize(reference.detach(), dim=1)
    zn = F.normalize(z, dim=1)
    gap_ref = (ref[anchor] * (ref[j] - ref[k])).sum(1)
    gap_z = (zn[anchor] * (zn[j] - zn[k])).sum(1)
    keep = gap_ref.abs() >= min_gap
    if not bool(keep.any()):
        return z.new_zeros(())
    return F.relu(margin - torch.sign(gap_ref[keep]) * gap_z[keep]).mean()
