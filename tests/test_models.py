import subprocess
import sys

import numpy as np
import pytest
import torch

import spatlas
from conftest import N_DOMAINS
from spatlas import models
from spatlas._errors import SpatlasInputError
from spatlas.metrics import ari
from spatlas.models._losses import sample_multi_triplets
from spatlas.tl import kmeans_labels


@pytest.fixture(scope="module")
def cohort(model_cohort):
    return model_cohort


def fast_params(name: str) -> dict:
    """Small training settings any registered model understands (by its own signature)."""
    init, train = models.get_model(name).parameters()
    wanted = {"steps": 40, "batch_size": 128, "progress": False, "window": 3}
    wanted["n_pseudo_labels"] = N_DOMAINS
    return {k: v for k, v in wanted.items() if k in init or k in train}


def fit(adata, name, seed=0, **params):
    return models.fit_model(
        adata,
        name,
        seed=seed,
        **{
            "expression_key": "X_pca_harmony",
            "morphology_key": "X_morph",
            **fast_params(name),
            **params,
        },
    )


def per_sample_ari(adata, embedding):
    labels = kmeans_labels(embedding, N_DOMAINS, seed=0)
    samples = adata.obs["sample"].to_numpy()
    truth = adata.obs["label"].to_numpy()
    return np.mean([ari(truth[samples == s], labels[samples == s]) for s in np.unique(samples)])


# -- registry ---------------------------------------------------------------------------------


def test_registry_lists_and_gets_models():
    assert "grid_ae" in models.list_models()
    cls = models.get_model("grid_ae")
    assert cls.name == "grid_ae"
    assert models.get_model("grid_ae") is cls


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(SpatlasInputError, match=r"unknown model 'grid_a'; did you mean 'grid_ae'"):
        models.get_model("grid_a")


def test_listing_models_does_not_import_torch():
    code = (
        "import sys, spatlas\n"
        "names = spatlas.models.list_models()\n"
        "print(names, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['cross_attention', 'e2e', 'grid_ae', 'rank_align'] False"


def test_unknown_setting_is_a_clear_error(cohort):
    with pytest.raises(SpatlasInputError, match="has no setting"):
        models.fit_model(cohort, "grid_ae", no_such_setting=1)


# -- every registered model -------------------------------------------------------------------


@pytest.mark.parametrize("name", models.list_models())
def test_same_seed_gives_identical_latent_and_another_seed_differs(cohort, name):
    a = fit(cohort, name, seed=0).get_latent()
    b = fit(cohort, name, seed=0).get_latent()
    c = fit(cohort, name, seed=1).get_latent()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.dtype == np.float32 and a.shape[0] == cohort.n_obs


@pytest.mark.parametrize("name", models.list_models())
def test_inference_is_deterministic_and_written_to_obsm(cohort, name):
    model = fit(cohort, name)
    key = f"X_{name}"
    np.testing.assert_array_equal(cohort.obsm[key], model.get_latent())
    np.testing.assert_array_equal(model.get_latent(batch_size=97), model.get_latent())
    info = cohort.uns["spatlas"]["models"][key]
    assert info["model"] == name and np.isfinite(info["final_loss"]["total"])


@pytest.mark.parametrize("name", models.list_models())
def test_save_and_load_reproduce_the_latent_exactly(cohort, name, tmp_path):
    model = fit(cohort, name)
    model.save(tmp_path / "model")
    loaded = models.get_model(name).load(tmp_path / "model", cohort)
    np.testing.assert_array_equal(loaded.get_latent(), model.get_latent())
    assert loaded.train_params == model.train_params
    with pytest.raises(SpatlasInputError, match="not empty"):
        model.save(tmp_path / "model")
    with pytest.raises(SpatlasInputError, match="other spots"):
        models.get_model(name).load(tmp_path / "model", cohort[:100].copy())


@pytest.mark.parametrize("name", models.list_models())
def test_training_beats_the_input_pcs_on_synthetic_domains(cohort, name):
    before = per_sample_ari(cohort, cohort.obsm["X_pca_harmony"])
    fit(cohort, name, steps=150)
    after = per_sample_ari(cohort, cohort.obsm[f"X_{name}"])
    assert after > 0.9
    assert after > before + 0.05


# -- grid_ae ----------------------------------------------------------------------------------


def test_loss_parts_are_finite_and_total_is_the_weighted_formula(cohort):
    model = fit(cohort, "grid_ae", morphology_weight=1.2, rec_weight=0.5, triplet_weight=2.0)
    for record in model.history:
        assert all(np.isfinite(v) for v in record.values())
        expected = 1.2 * (0.5 * record["rec_morphology"] + 2.0 * record["triplet_morphology"])
        expected += 1.8 * (0.5 * record["rec_expression"] + 2.0 * record["triplet_expression"])
        assert record["total"] == pytest.approx(expected, rel=1e-5)
    assert model.history[-1]["total"] < model.history[0]["total"]


def test_morphology_weight_zero_gives_morphology_no_weight(cohort):
    model = fit(cohort, "grid_ae", morphology_weight=0.0)
    for record in model.history:
        assert record["triplet_morphology"] == 0.0
        expected = 3.0 * (record["rec_expression"] + record["triplet_expression"])
        assert record["total"] == pytest.approx(expected, rel=1e-5)
    assert model.train_params["morphology_weight"] == 0.0


def test_without_morphology_the_weight_falls_to_zero(cohort):
    model = models.fit_model(
        cohort, "grid_ae", morphology_key=None, morphology_weight=1.5, **fast_params("grid_ae")
    )
    assert model.train_params["morphology_weight"] == 0.0
    assert model.history[-1]["rec_morphology"] == 0.0


def test_sample_dependence_is_the_share_of_sample_entropy_the_labels_explain():
    from spatlas.models.grid_ae import sample_dependence

    samples = np.repeat(["a", "b", "c"], 40)
    assert sample_dependence(np.tile([0, 1], 60), samples) == pytest.approx(0.0, abs=1e-12)
    assert sample_dependence(samples, samples) == pytest.approx(1.0)
    # two of three samples share a label: log(3) - 2/3 log(2) of log(3) nats
    merged = np.where(samples == "c", 1, 0)
    expected = 1 - (2 / 3) * np.log(2) / np.log(3)
    assert sample_dependence(merged, samples) == pytest.approx(expected)
    assert sample_dependence(np.arange(10) % 3, np.zeros(10)) == 0.0


def test_auto_pseudo_labels_stay_global_on_integrated_inputs(cohort):
    auto = fit(cohort, "grid_ae")
    assert auto.train_params["pseudo_labels"] == "auto"
    for modality in ("e", "m"):
        assert auto.train_params[f"pseudo_labels_{modality}"] == "global"
        assert auto.train_params[f"sample_dependence_{modality}"] < 0.15
    explicit = fit(cohort, "grid_ae", pseudo_labels="global", key_added="X_global")
    np.testing.assert_array_equal(auto.get_latent(), explicit.get_latent())


def test_auto_pseudo_labels_go_per_sample_when_the_labels_follow_the_samples(cohort):
    shifted = cohort.copy()
    offset = np.where(shifted.obs["sample"].to_numpy() == shifted.obs["sample"].iloc[0], 25, 0)
    shifted.obsm["X_pca_harmony"] = shifted.obsm["X_pca_harmony"] + offset[:, None]
    auto = fit(shifted, "grid_ae")
    assert auto.train_params["pseudo_labels_e"] == "per_sample"
    assert auto.train_params["sample_dependence_e"] > 0.9
    assert auto.train_params["pseudo_labels_m"] == "global"  # decided per modality
    auto = fit(shifted, "grid_ae", morphology_key=None)
    per_sample = fit(
        shifted, "grid_ae", morphology_key=None, pseudo_labels="per_sample", key_added="X_ps"
    )
    np.testing.assert_array_equal(auto.get_latent(), per_sample.get_latent())


def test_adversarial_penalty_classifies_every_sample():
    adata = spatlas.datasets.synthetic_cohort(
        n_donors=2, n_samples_per_donor=2, n_spots=120, n_genes=150, image=False, seed=1
    )
    spatlas.pp.preprocess_expression(adata, n_top_genes=100, n_comps=5, seed=0)
    model = models.fit_model(
        adata,
        "grid_ae",
        expression_key="X_pca",
        batch_penalty="adversarial",
        window=3,
        steps=20,
        batch_size=64,
        progress=False,
    )
    assert model.module.adversary.net[-1].out_features == 4
    assert np.isfinite(model.history[-1]["batch"])


def test_morphology_weight_out_of_range_is_an_error(cohort):
    with pytest.raises(SpatlasInputError, match="morphology_weight"):
        fit(cohort, "grid_ae", morphology_weight=3.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_a_clear_error(cohort):
    with pytest.raises(SpatlasInputError, match="no CUDA GPU"):
        fit(cohort, "grid_ae", device="cuda")
    with pytest.raises(SpatlasInputError, match="device must be"):
        fit(cohort, "grid_ae", device="tpu")


def test_mc_dropout_is_optional_and_seeded(cohort):
    model = fit(cohort, "grid_ae")
    a = model.get_latent(mc_samples=4, seed=3)
    np.testing.assert_array_equal(a, model.get_latent(mc_samples=4, seed=3))
    assert not np.array_equal(a, model.get_latent())


def test_multi_triplets_share_the_positive_label_and_take_one_negative_per_other_label():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # label 3 has one member only
    gen = torch.Generator().manual_seed(0)
    anchor, positive, negative = sample_multi_triplets(labels, generator=gen)
    assert torch.equal(labels[positive], labels[anchor])
    assert not torch.any(positive == anchor)
    assert not torch.any(labels[negative] == labels[anchor])
    for a in range(len(labels)):
        neg_labels = sorted(labels[negative[anchor == a]].tolist())
        if a == 8:  # alone in its label: no positive, no triplet
            assert neg_labels == []
        else:
            assert neg_labels == sorted(set(range(4)) - {int(labels[a])})


def test_cross_sample_positives_come_from_other_samples_when_there_are_any():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    groups = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0])  # label 1 lives in sample 0 only
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        anchor, positive, _ = sample_multi_triplets(
            labels, generator=gen, groups=groups, cross_sample=True
        )
        label0 = labels[anchor] == 0
        assert torch.all(groups[positive[label0]] != groups[anchor[label0]])
        assert torch.equal(labels[positive], labels[anchor])  # fallback within the sample
        assert not torch.any(positive == anchor)


def test_windows_gathered_per_batch_equal_the_numpy_reference(cohort):
    model = models.get_model("grid_ae")(cohort, morphology_key="X_morph", window=5)
    rows = np.array([0, 7, 123, cohort.n_obs - 1])
    x, mask = model.windows(
        torch.from_numpy(model.features), torch.from_numpy(model.table), torch.from_numpy(rows)
    )
    ref_x, ref_mask = spatlas.pp.gather_windows(model.features, model.table, rows)
    np.testing.assert_array_equal(x.numpy(), ref_x)
    np.testing.assert_array_equal(mask.numpy(), ref_mask)
    assert model.layouts and set(model.layouts.values()) == {"hex"}


# -- pipeline ---------------------------------------------------------------------------------

PIPELINE = {
    "seed": 0,
    "data": {
        "dataset": "synthetic",
        "dataset_params": {
            "n_donors": 2,
            "n_samples_per_donor": 1,
            "n_spots": 400,
            "n_genes": 150,
            "n_domains": 4,
            "image": False,
        },
    },
    "preprocessing": {"n_top_genes": 100, "n_comps": 10},
    "clustering": {"method": "kmeans", "n_clusters": 4},
    "model": {"name": "grid_ae", "window": 3, "steps": 40, "params": {"batch_size": 128}},
    # the paper's path: the model on the (Harmony-corrected) plain PCs
    "augmentation": {"enabled": False},
}


def test_pipeline_model_section_end_to_end(tmp_path):
    from spatlas._config import config_from_dict
    from spatlas.pipeline import run

    config = config_from_dict(PIPELINE)
    first = run(config, out=tmp_path / "run")
    adata = first.adata
    assert first.domain_key == "grid_ae_domain"
    assert adata.obsm["X_grid_ae"].shape == (adata.n_obs, 16)
    assert adata.obs["grid_ae_domain"].nunique() == 4
    info = adata.uns["spatlas"]["models"]["X_grid_ae"]
    assert info["expression_key"] == "X_pca_harmony" and info["morphology_key"] == ""
    assert info["train_params"]["morphology_weight"] == 0.0  # no morphology embedding
    assert "model" in set(first.timings["step"])
    assert (tmp_path / "run" / "model" / "model.json").exists()
    assert first.metrics.set_index("sample").loc["mean", "ari"] > 0.5
    second = run(config_from_dict(PIPELINE))
    np.testing.assert_array_equal(
        second.adata.obs["grid_ae_domain"].to_numpy(), adata.obs["grid_ae_domain"].to_numpy()
    )


@pytest.mark.parametrize(("name", "integration"), [("cross_attention", "harmony"), ("e2e", "none")])
def test_pipeline_runs_the_other_models_by_name(name, integration):
    from spatlas._config import config_from_dict
    from spatlas.pipeline import run

    config = {
        **PIPELINE,
        "integration": {"method": integration},
        "model": {"name": name, "window": 3, "steps": 40, "params": {"batch_size": 128}},
    }
    result = run(config_from_dict(config))
    assert result.domain_key == f"{name}_domain"
    info = result.adata.uns["spatlas"]["models"][f"X_{name}"]
    assert info["expression_key"] == ("X_pca" if integration == "none" else "X_pca_harmony")
    assert result.metrics.set_index("sample").loc["mean", "ari"] > 0.3


def test_pipeline_rejects_an_unknown_model_before_running():
    from spatlas._config import config_from_dict
    from spatlas.pipeline import run

    bad = {**PIPELINE, "model": {"name": "grid_ea"}}
    with pytest.raises(SpatlasInputError, match="did you mean 'grid_ae'"):
        run(config_from_dict(bad))
    bad = {**PIPELINE, "model": {"name": "grid_ae", "params": {"windw": 3}}}
    with pytest.raises(SpatlasInputError, match="no setting"):
        run(config_from_dict(bad))
