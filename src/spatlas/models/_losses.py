"""Losses of the fusion models: named loss parts, masked reconstruction, in-batch multi-triplets."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass
class LossParts:
    """The total loss of one step and every named part (each a scalar tensor).

    ``total = morphology_weight · (rec_morphology + triplet_morphology)
    + expression_weight · (rec_expression + triplet_expression) + alignment`` for the grid
    autoencoder (paper eq. 5, with ``expression_weight = 3 − morphology_weight``); the parts
    enter unweighted so that each can be logged on its own scale.
    """

    total: torch.Tensor
    rec_expression: torch.Tensor
    triplet_expression: torch.Tensor
    rec_morphology: torch.Tensor
    triplet_morphology: torch.Tensor
    alignment: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        """Every part as a Python float (for logs, progress bars and training curves)."""
        return {f.name: float(getattr(self, f.name).detach()) for f in fields(self)}


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-triplets drawn within a mini-batch (no extra encoder passes).

    For every anchor ``a`` with pseudo-label ``y_a`` and every *other* label ``c`` present in the
    batch: one negative drawn uniformly from the batch members labelled ``c``, paired with one
    positive drawn from the members labelled ``y_a`` other than ``a`` (so an anchor gets as many
    triplets as there are other labels in the batch, as in the reference's multi-triplet loss).
    With ``cross_sample``, the positive is drawn from members of another sample (``groups``)
    when the batch has any with label ``y_a``, else from the anchor's own sample. Anchors alone
    in their label get no triplet.

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

    Returns
    -------
    ``(anchor, positive, negative)``: ``int64`` batch positions, each of shape ``(T,)``.
    """
    labels = labels.to("cpu", torch.int64)
    b = labels.shape[0]
    if groups is None or not cross_sample:
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
    margin: float = 1.0,
) -> torch.Tensor:
    """Mean triplet margin loss (Euclidean, on ``z``) over in-batch multi-triplets.

    See :func:`sample_multi_triplets`; 0 when the batch yields no triplet.
    """
    anchor, positive, negative = sample_multi_triplets(
        labels, generator=generator, groups=groups, cross_sample=cross_sample
    )
    if anchor.numel() == 0:
        return z.new_zeros(())
    anchor, positive, negative = (t.to(z.device) for t in (anchor, positive, negative))
    return F.triplet_margin_loss(z[anchor], z[positive], z[negative], margin=margin, p=2)
