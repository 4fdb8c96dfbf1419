"""The cross_attention, rank_align and e2e models and the losses they add (issue 7).

What every registered model must do (seeded, deterministic, save / load, beats its inputs) is
tested for all of them in ``test_models.py``; here: what is particular to each.
"""

import itertools

import numpy as np
import pytest
import torch

from conftest import N_DOMAINS
from spatlas import models
from spatlas._errors import SpatlasInputError
from spatlas.metrics import ari, ilisi
from spatlas.models._losses import (
    grad_reverse,
    info_nce,
    mmd_between_samples,
    ranking_hinge,
    sample_multi_triplets,
)
from spatlas.models._spot import spatial_knn_table
from spatlas.models.rank_align import teacher_momentum
from spatlas.tl import kmeans_labels


@pytest.fixture(scope="module")
def cohort(model_cohort):
    return model_cohort


def per_sample_ari(adata, embedding):
    labels = kmeans_labels(embedding, N_DOMAINS, seed=0)
    samples = adata.obs["sample"].to_numpy()
    truth = adata.obs["label"].to_numpy()
    return np.mean([ari(truth[samples == s], labels[samples == s]) for s in np.unique(samples)])


FAST = {"steps": 60, "batch_size": 128, "progress": False}


# -- losses -----------------------------------------------------------------------------------


def test_within_sample_triplets_stay_in_the_anchor_sample():
    labels = torch.tensor([0, 0, 1, 1, 2, 0, 0, 1, 1, 1])
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])  # label 2 only in sample 0
    gen = torch.Generator().manual_seed(0)
    anchor, positive, negative = sample_multi_triplets(
        labels, generator=gen, groups=groups, within_sample=True
    )
    assert anchor.numel() > 0
    assert torch.equal(groups[positive], groups[anchor])
    assert torch.equal(groups[negative], groups[anchor])
    assert torch.equal(labels[positive], labels[anchor])
    assert not torch.any(positive == anchor)
    assert not torch.any(labels[negative] == labels[anchor])
    for a in range(len(labels)):
        got = sorted(labels[negative[anchor == a]].tolist())
        own = labels[groups == groups[a]]
        if a == 4:  # alone in its (label, sample): no triplet
            assert got == []
        else:
            assert got == sorted(set(own.tolist()) - {int(labels[a])})
    with pytest.raises(ValueError, match="exclude"):
        sample_multi_triplets(
            labels, generator=gen, groups=groups, within_sample=True, cross_sample=True
        )


def test_mmd_is_small_for_mixed_samples_and_large_for_separated_ones():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200, 8, generator=gen)
    groups = torch.arange(200) % 2
    mixed = mmd_between_samples(z, groups)
    shifted = mmd_between_samples(z + 3.0 * groups[:, None], groups)
    assert float(shifted) > 10 * float(mixed)
    assert float(mmd_between_samples(z, torch.zeros(200, dtype=torch.long))) == 0.0


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.ones(3, requires_grad=True)
    grad_reverse(x, 0.5).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), -0.5)


def test_info_nce_prefers_the_right_pairs():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 16, generator=gen)
    assert float(info_nce(a, a)) < float(info_nce(a, a[torch.randperm(64, generator=gen)]))


def test_ranking_hinge_is_zero_when_the_order_is_kept_and_positive_when_it_is_not():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(50, 10, generator=gen)
    kept = ranking_hinge(ref, ref.clone(), generator=torch.Generator().manual_seed(1), margin=0)
    other = torch.randn(50, 10, generator=gen)
    broken = ranking_hinge(ref, other, generator=torch.Generator().manual_seed(1), margin=0)
    assert float(kept) == 0.0
    assert float(broken) > 0.01


def test_spatial_knn_table_stays_within_samples_and_matches_brute_force():
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(60, 2))
    groups = np.repeat([0, 1, 2], [30, 28, 2])
    table = spatial_knn_table(xy, groups, 4)
    for i in range(60):
        nb = table[i][table[i] >= 0]
        assert np.all(groups[nb] == groups[i]) and i not in nb
        same = np.flatnonzero((groups == groups[i]) & (np.arange(60) != i))
        d = np.linalg.norm(xy[same] - xy[i], axis=1)
        assert set(nb) == set(same[np.argsort(d)[: len(nb)]])
    assert np.all(table[58:, 1:] == -1) and np.all(table[58:, 0] >= 58)  # a 2-spot sample


# -- cross_attention --------------------------------------------------------------------------


def test_cross_attention_attends_over_the_neighbourhood_not_one_token(cohort):
    model = models.fit_model(
        cohort, "cross_attention", morphology_key="X_morph", n_pseudo_labels=N_DOMAINS, **FAST
    )
    base = model.get_latent()
    spot = 0
    neighbour = int(model.knn[spot, 0])
    stranger = int(np.flatnonzero(model.sample_codes != model.sample_codes[spot])[0])
    for other, should_change in ((neighbour, True), (stranger, False)):
        saved = model.morph[other].copy()
        model.morph[other] += 3.0
        changed = not np.allclose(model.get_latent()[spot], base[spot])
        model.morph[other] = saved
        assert changed == should_change
    parts = set(model.history[-1])
    assert {"rec_expression", "rec_morphology", "link", "contrastive", "batch"} <= parts


def test_cross_attention_adversarial_penalty_and_expression_only(cohort):
    model = models.fit_model(
        cohort, "cross_attention", batch_penalty="adversarial", morphology_key="X_morph", **FAST
    )
    assert np.isfinite(model.history[-1]["batch"]) and model.module.adversary is not None
    alone = models.fit_model(cohort, "cross_attention", morphology_key=None, **FAST)
    assert alone.history[-1]["contrastive"] == 0.0 and not alone.module.has_image
    assert per_sample_ari(cohort, alone.get_latent()) > 0.8


def test_cross_attention_bad_settings_are_clear_errors(cohort):
    with pytest.raises(SpatlasInputError, match="batch_penalty"):
        models.fit_model(cohort, "cross_attention", batch_penalty="gan")
    with pytest.raises(SpatlasInputError, match="must divide"):
        models.fit_model(cohort, "cross_attention", hidden=30, heads=4)


# -- rank_align -------------------------------------------------------------------------------


def test_teacher_momentum_ramps_from_start_to_one():
    values = [teacher_momentum(i, 100) for i in range(101)]
    assert values[0] == pytest.approx(0.96) and values[-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in itertools.pairwise(values))


def _similarity_agreement(reference, embedding, n=300):
    """Spearman correlation of the pairwise cosine similarities of two embeddings."""
    from scipy.stats import spearmanr

    def cos(x):
        x = x[:n] / np.linalg.norm(x[:n], axis=1, keepdims=True)
        return (x @ x.T)[np.triu_indices(n, 1)]

    return spearmanr(cos(reference), cos(embedding)).statistic


def test_rank_align_output_is_the_teacher_and_follows_expression(cohort):
    rng = np.random.default_rng(0)
    # a morphology embedding where the domain signal is buried under noise channels
    noisy = np.column_stack([cohort.obsm["X_morph_truth"], rng.normal(size=(cohort.n_obs, 8))])
    cohort.obsm["X_morph_noisy"] = noisy.astype(np.float32)
    model = models.fit_model(
        cohort, "rank_align", morphology_key="X_morph_noisy", **{**FAST, "steps": 150}
    )
    latent = model.get_latent()
    expr = cohort.obsm["X_pca_harmony"]
    assert _similarity_agreement(expr, latent) > _similarity_agreement(expr, noisy) + 0.1
    morph = torch.from_numpy(model.morph)
    with torch.no_grad():
        teacher = torch.nn.functional.normalize(model.module.teacher(morph), dim=1).numpy()
        student = model.module.student(morph).numpy()
    np.testing.assert_allclose(latent, teacher, rtol=1e-5, atol=1e-6)
    assert not np.allclose(
        teacher, student / np.linalg.norm(student, axis=1, keepdims=True), atol=1e-3
    )
    assert {"contrastive", "rank"} <= set(model.history[-1])


def test_rank_align_needs_a_morphology_embedding(cohort):
    with pytest.raises(SpatlasInputError, match="pass morphology_key"):
        models.fit_model(cohort, "rank_align", morphology_key=None)


# -- e2e --------------------------------------------------------------------------------------


def test_e2e_on_uncorrected_pcs_mixes_samples_and_finds_domains(cohort):
    model = models.fit_model(
        cohort,
        "e2e",
        expression_key="X_pca",
        morphology_key="X_morph",
        n_pseudo_labels=N_DOMAINS,
        window=3,
        **{**FAST, "steps": 200},
    )
    assert model.train_params["pseudo_labels"] == "per_sample"
    assert model.init_params["sample_decoder"] and model.init_params["batch_penalty"] == "mmd"
    latent = model.get_latent()
    samples = cohort.obs["sample"].to_numpy()
    mixing_in = ilisi(cohort.obsm["X_pca"], samples)
    mixing_out = ilisi(latent, samples)
    assert mixing_out > mixing_in + 0.1
    assert per_sample_ari(cohort, latent) > 0.9
    assert "batch" in model.history[-1]

    # the same autoencoder without e2e's batch machinery, on global pseudo-labels (which follow
    # the samples here), keeps the samples apart
    def grid_ae_on_uncorrected_pcs(**settings):
        return models.fit_model(
            cohort,
            "grid_ae",
            expression_key="X_pca",
            morphology_key="X_morph",
            n_pseudo_labels=N_DOMAINS,
            window=3,
            **{**FAST, "steps": 200},
            **settings,
        )

    plain = grid_ae_on_uncorrected_pcs(pseudo_labels="global", key_added="X_plain")
    plain_mixing = ilisi(plain.get_latent(), samples)
    assert plain_mixing < mixing_out - 0.3
    # grid_ae's default ('auto') sees that and draws its triplets within each sample instead
    auto = grid_ae_on_uncorrected_pcs(key_added="X_auto")
    assert auto.train_params["pseudo_labels_e"] == "per_sample"
    assert auto.train_params["sample_dependence_e"] > 0.15
    assert ilisi(auto.get_latent(), samples) > plain_mixing + 0.2


def test_e2e_defaults_are_listed_as_its_parameters():
    init, train = models.get_model("e2e").parameters()
    assert init["expression_key"] == "X_pca" and init["batch_penalty"] == "mmd"
    assert train["pseudo_labels"] == "per_sample" and train["relabel_after"] == 0.5
    grid_init, _ = models.get_model("grid_ae").parameters()
    assert grid_init["batch_penalty"] == "none"
