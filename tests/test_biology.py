"""Conserved domain markers, pathway activity per domain, domain colours, the downstream step."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

import spatlas
from spatlas._errors import SpatlasInputError
from spatlas.tl._markers import sample_contrasts
from spatlas.tl._pathways import read_network


def _cohort(
    genes: list[str],
    *,
    n_samples: int = 3,
    n_spots: int = 240,
    up: dict[str, float] | None = None,
    up_in: tuple[str, ...] = ("tumour",),
    seed: int = 0,
    only_sample: int | None = None,
) -> ad.AnnData:
    """Poisson counts; the genes in ``up`` get exp(lfc) times the rate in the ``up_in`` domains.

    ``only_sample``: plant the effect in that sample only.
    """
    rng = np.random.default_rng(seed)
    domains = np.array(["tumour", "immune", "stroma"])
    parts = []
    for s in range(n_samples):
        labels = domains[rng.integers(0, 3, n_spots)]
        base = rng.gamma(2.0, 1.0, len(genes))
        rates = np.tile(base, (n_spots, 1))
        if up and (only_sample is None or only_sample == s):
            columns = [genes.index(g) for g in up]
            factor = np.exp(np.array(list(up.values())))
            rows = np.isin(labels, up_in)
            rates[np.ix_(rows, columns)] *= factor
        counts = rng.poisson(rates).astype(np.float32)
        obs = pd.DataFrame(
            {"sample": f"s{s}", "donor": f"d{s}", "truth": labels},
            index=[f"s{s}_{i}" for i in range(n_spots)],
        )
        parts.append(ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes)))
    adata = ad.concat(parts)
    adata.obs["truth"] = adata.obs["truth"].astype(str)
    spatlas.pp.preprocess_expression(adata, n_top_genes=len(genes), n_comps=5, min_spots=1)
    return adata


def test_wilcoxon_z_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    X = np.round(rng.exponential(1.0, (80, 6)), 1)
    X[X < 0.6] = 0  # many zeros: heavy ties
    codes = rng.integers(0, 3, 80)
    result = sample_contrasts(X, codes, 3, min_spots=5, effect="difference")
    for g in range(3):
        for j in range(6):
            test = stats.mannwhitneyu(
                X[codes == g, j], X[codes != g, j], use_continuity=False, method="asymptotic"
            )
            expected = stats.norm.isf(test.pvalue / 2) * np.sign(result.z[g, j])
            assert result.z[g, j] == pytest.approx(expected, abs=1e-8)
            assert result.effect[g, j] == pytest.approx(
                X[codes == g, j].mean() - X[codes != g, j].mean()
            )


def test_conserved_markers_need_most_samples_not_the_pool():
    genes = [f"g{i}" for i in range(60)]
    everywhere = _cohort(genes, up={"g0": 1.5, "g1": 1.0})
    table = spatlas.tl.conserved_markers(everywhere, domain_key="truth")
    tumour = table.loc[table["domain"] == "tumour"].set_index("gene")
    assert tumour.loc["g0", "conserved"] and tumour.loc["g1", "conserved"]
    assert tumour.loc["g0", "n_up"] == 3 and tumour.loc["g0", "n_tested"] == 3
    assert list(tumour.index[:2]) == ["g0", "g1"]  # ranked first
    assert tumour.loc["g0", "mean_log2fc"] == pytest.approx(1.5 / np.log(2), abs=0.35)
    for s in ("s0", "s1", "s2"):
        assert tumour.loc["g0", f"padj:{s}"] < 1e-6
    # other genes are not conserved markers of the tumour (few false positives at 5 %)
    assert tumour["conserved"].sum() <= 4
    # immune does not get g0
    immune = table.loc[table["domain"] == "immune"].set_index("gene")
    assert "g0" not in immune.index or not immune.loc["g0", "conserved"]

    # a strong effect in one sample only: significant there, not conserved
    one = _cohort(genes, up={"g0": 2.0}, only_sample=0, seed=3)
    table = spatlas.tl.conserved_markers(one, domain_key="truth")
    row = table.loc[(table["domain"] == "tumour") & (table["gene"] == "g0")].iloc[0]
    assert row["n_up"] == 1 and not row["conserved"]
    assert row["padj:s0"] < 1e-6
    stored = one.uns["spatlas"]["markers"]
    assert stored["domain_key"] == "truth" and len(stored["table"]) == len(table)


def test_markers_absent_and_tiny_domains_are_reported(caplog):
    genes = [f"g{i}" for i in range(30)]
    adata = _cohort(genes, up={"g0": 1.5})
    truth = adata.obs["truth"].astype(str).to_numpy().copy()
    truth[(adata.obs["sample"] == "s2").to_numpy() & (truth == "immune")] = "stroma"  # absent
    tiny = np.flatnonzero((adata.obs["sample"] == "s0").to_numpy())[:4]
    truth[tiny] = "rare"  # 4 spots in one sample: never testable
    adata.obs["domain"] = truth
    with caplog.at_level("WARNING", logger="spatlas"):
        table = spatlas.tl.conserved_markers(adata, domain_key="domain", min_spots=10)
    summary = adata.uns["spatlas"]["markers"]["domains"].set_index("domain")
    assert summary.loc["immune", "n_present"] == 2 and summary.loc["immune", "n_tested"] == 2
    assert summary.loc["rare", "n_tested"] == 0 and "not tested" in summary.loc["rare", "note"]
    assert "rare" not in set(table["domain"])
    assert "domain rare" in caplog.text
    immune = table.loc[table["domain"] == "immune"]
    assert (immune["n_tested"] == 2).all() and immune["log2fc:s2"].isna().all()


def test_markers_refuse_raw_counts_and_missing_domains():
    adata = spatlas.datasets.synthetic_cohort(n_donors=1, n_samples_per_donor=1, n_spots=200)
    with pytest.raises(SpatlasInputError, match="raw counts"):
        spatlas.tl.conserved_markers(adata, domain_key="label")
    with pytest.raises(SpatlasInputError, match="obs\\['nope'\\]"):
        spatlas.tl.conserved_markers(adata, domain_key="nope")


def test_planted_pathway_is_recovered_in_its_domain():
    net = read_network("progeny_human")
    genes = sorted(set(net["target"]))
    pi3k = net.loc[net["source"] == "PI3K"].set_index("target")["weight"]
    # the footprint: PI3K's targets move in the direction of their weights in the tumour
    planted = {g: 0.9 * np.sign(w) for g, w in pi3k.items()}
    adata = _cohort(genes, up=planted, n_spots=300)
    scores = spatlas.tl.pathway_activity(adata, net="progeny_human")
    assert list(adata.obsm["X_pathways"].columns) == list(scores.columns)
    assert "PI3K" in scores.columns and scores.shape == (adata.n_obs, 14)
    table = spatlas.tl.domain_pathways(adata, domain_key="truth")
    tumour = table.loc[table["domain"] == "tumour"].set_index("pathway")
    assert tumour["z_combined"].idxmax() == "PI3K"
    assert tumour.loc["PI3K", "n_up"] == 3 and tumour.loc["PI3K", "conserved"]
    others = table.loc[(table["domain"] != "tumour") & (table["pathway"] == "PI3K")]
    assert (others["z_combined"] < 0).all()
    matrix = spatlas.tl.pathway_matrix(table)
    assert matrix.loc["tumour"].idxmax() == "PI3K"


def test_pathways_say_when_gene_ids_do_not_match(tmp_path):
    net = read_network("progeny_human")
    symbols = sorted(set(net["target"]))[:200]
    ids = [f"ENSG{i:011d}" for i in range(200)]
    adata = _cohort(ids, n_samples=2, n_spots=60)
    with pytest.raises(SpatlasInputError, match=r"Ensembl ids.*gene_map"):
        spatlas.tl.pathway_activity(adata, net="progeny_human")
    mapping = tmp_path / "map.csv"
    pd.DataFrame({"gene_id": ids, "symbol": symbols}).to_csv(mapping, index=False)
    scores = spatlas.tl.pathway_activity(adata, net="progeny_human", gene_map=mapping, tmin=3)
    assert scores.shape[0] == adata.n_obs and np.isfinite(scores.to_numpy()).all()
    assert adata.uns["spatlas"]["pathways"]["matched_on"] == "gene_map"
    adata.var["symbol"] = symbols
    scores = spatlas.tl.pathway_activity(adata, net="progeny_human", tmin=3)
    assert adata.uns["spatlas"]["pathways"]["matched_on"] == "gene symbols of var"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("src,target,weight\nA,g1,1\n", "missing source"),
        ("source,target,weight\nA,g1,strong\n", "not a number"),
        ("source,target,weight\nA,g1,1\nA,g1,2\n", "duplicated"),
    ],
)
def test_bad_networks_are_refused(tmp_path, text, message):
    path = tmp_path / "net.csv"
    path.write_text(text)
    with pytest.raises(SpatlasInputError, match=message):
        read_network(path)
    with pytest.raises(SpatlasInputError, match="bundled network"):
        read_network(tmp_path / "absent.csv")


def test_domain_colours_follow_the_best_label():
    labels = pd.Series(["A"] * 50 + ["B"] * 30 + ["C"] * 20)
    domains = pd.Series(["1"] * 45 + ["0"] * 35 + ["2"] * 10 + ["3"] * 10)
    label_colours = spatlas.pl.category_colours(labels)
    colours = spatlas.pl.domain_colours(domains, labels)
    assert colours["1"] == label_colours["A"]
    assert colours["0"] == label_colours["B"]
    assert colours["2"] == label_colours["C"] or colours["3"] == label_colours["C"]
    assert len(set(colours.values())) == 4  # the unmatched domain gets a colour of its own
    assert spatlas.pl.domain_colours(domains) == spatlas.pl.category_colours(domains)


def test_run_writes_markers_pathways_and_the_report_section(tmp_path):
    net = read_network("progeny_human")
    symbols = sorted(set(net["target"]))[:300]
    mapping = tmp_path / "map.csv"
    pd.DataFrame({"gene": [f"gene_{i:04d}" for i in range(300)], "symbol": symbols}).to_csv(
        mapping, index=False
    )
    from spatlas._config import config_from_dict

    config = config_from_dict(
        {
            "data": {
                "dataset": "synthetic",
                "dataset_params": {
                    "n_donors": 2,
                    "n_samples_per_donor": 1,
                    "n_spots": 400,
                    "n_genes": 300,
                    "image": False,
                },
            },
            "preprocessing": {"n_top_genes": 300},
            "clustering": {"n_clusters": 4},
            "downstream": {
                "markers": True,
                "pathways": "progeny_human",
                "gene_map": str(mapping),
            },
        }
    )
    out = tmp_path / "run"
    result = spatlas.pipeline.run(config, out=out)
    markers = pd.read_csv(out / "markers.csv")
    pathways = pd.read_csv(out / "pathways.csv")
    assert {"domain", "gene", "conserved", "z_combined", "n_up", "n_tested"} <= set(markers)
    assert markers["domain"].nunique() >= 3 and markers["conserved"].any()
    assert {"domain", "pathway", "z_combined", "mean_activity"} <= set(pathways)
    assert {"markers", "pathways"} <= set(result.timings["step"])
    assert "X_pathways" in result.adata.obsm
    page = (out / "report.html").read_text()
    section = page[page.index("id='biology'") :]
    assert section.count("<img") >= 2 and "Conserved markers" in section


def test_bad_downstream_settings_fail_before_the_run(tmp_path):
    from spatlas._config import config_from_dict
    from spatlas._errors import ConfigError

    for downstream, message in (
        ({"pathways": "progeny_martian"}, "neither a bundled network"),
        ({"pathways": "progeny_human", "pathway_method": "magic"}, "pathway_method"),
        ({"markers": True, "min_fraction": 1.5}, "min_fraction"),
        ({"pathways": "progeny_human", "gene_map": "absent.csv"}, "gene_map"),
    ):
        config = config_from_dict(
            {"data": {"dataset": "synthetic"}, "downstream": downstream}, base=tmp_path
        )
        with pytest.raises(ConfigError, match=message):
            spatlas.pipeline.run(config, out=tmp_path / "never")
        assert not (tmp_path / "never").exists()


def test_a_network_that_matches_no_gene_fails_before_the_slow_steps(tmp_path):
    from spatlas._config import config_from_dict

    config = config_from_dict(
        {
            "data": {"dataset": "synthetic", "dataset_params": {"n_spots": 200, "image": False}},
            "downstream": {"pathways": "progeny_mouse"},
        }
    )
    with pytest.raises(SpatlasInputError, match="none of the network's"):
        spatlas.pipeline.run(config, out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_report_names_precomputed_inputs_and_ignored_features_are_refused(tmp_path):
    from spatlas._config import config_from_dict
    from spatlas._errors import ConfigError

    adata = spatlas.datasets.synthetic_cohort(
        n_donors=2, n_samples_per_donor=1, n_spots=300, image=False
    )
    rng = np.random.default_rng(0)
    adata.obsm["X_fm"] = rng.normal(size=(adata.n_obs, 12)).astype(np.float32)
    adata.obsm["X_uni"] = rng.normal(size=(adata.n_obs, 16)).astype(np.float32)
    path = tmp_path / "cohort.h5ad"
    adata.write_h5ad(path)
    data = {"h5ad": str(path), "sample_key": "sample", "donor_key": "donor"}
    with pytest.raises(ConfigError, match=r"morphology\.enabled is false"):
        spatlas.pipeline.run(config_from_dict({"data": data, "morphology": {"features": "X_uni"}}))
    config = config_from_dict(
        {
            "data": {**data, "expression_embedding": "X_fm"},
            "morphology": {"enabled": True, "features": "X_uni"},
            "clustering": {"n_clusters": 3},
        }
    )
    spatlas.pipeline.run(config, out=tmp_path / "run")
    page = (tmp_path / "run" / "report.html").read_text()
    assert "precomputed embedding X_fm (12-d)" in page
    assert "precomputed features X_uni" in page
