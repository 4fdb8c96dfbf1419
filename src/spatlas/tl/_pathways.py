"""Pathway / regulator activity per spot (decoupler) and per domain, conserved across samples.

``pathway_activity`` scores every spot against a weighted network (``source, target, weight``;
PROGENy footprints ship with spatlas) with one of decoupler's methods (``ulm`` by default, the
univariate linear model decoupler recommends for footprints). ``domain_pathways`` then tests each
domain against the rest of its sample, per sample, and combines the samples as
:func:`spatlas.tl.conserved_markers` does for genes.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _keys as K
from .._deps import import_optional
from .._errors import SpatlasInputError
from .._logging import logger
from ._markers import (
    _check_domains,
    _expression,
    _ordered_names,
    _tidy,
    combine_contrasts,
    domain_contrasts,
    domain_summary,
    gene_symbols,
)

NETWORKS = {
    "progeny_human": "progeny_human_top100.csv",
    "progeny_mouse": "progeny_mouse_top100.csv",
}
"""Networks bundled with spatlas (``datasets/_data/networks``; licence and citation there)."""

METHODS = ("ulm", "mlm", "wsum", "viper", "aucell", "zscore")
"""decoupler methods :func:`pathway_activity` accepts."""


def read_network(net: str | Path | pd.DataFrame) -> pd.DataFrame:
    """A ``source, target, weight`` network: a bundled name, a CSV/TSV file or a DataFrame.

    Bundled: ``progeny_human`` and ``progeny_mouse`` (PROGENy top-100 footprints, Apache-2.0;
    Schubert et al. 2018, Holland et al. 2020). Nothing is downloaded.
    """
    if isinstance(net, pd.DataFrame):
        frame, where = net.copy(), "net"
    elif str(net) in NETWORKS:
        source = resources.files("spatlas.datasets").joinpath("_data", "networks", NETWORKS[net])
        with resources.as_file(source) as path:
            frame, where = pd.read_csv(path), str(net)
    else:
        path = Path(net).expanduser()
        if not path.is_file():
            raise SpatlasInputError(
                f"network '{net}': no such file and not a bundled network "
                f"({', '.join(NETWORKS)}); give a CSV/TSV with columns source, target, weight"
            )
        sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
        try:
            frame = pd.read_csv(path, sep=sep, comment=None, encoding="utf-8-sig")
        except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise SpatlasInputError(
                f"{path}: cannot read the network as {'TSV' if sep == chr(9) else 'CSV'} "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from None
        where = str(path)
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = [c for c in ("source", "target") if c not in frame.columns]
    if missing:
        raise SpatlasInputError(
            f"{where}: the network needs columns source, target and (optionally) weight; "
            f"missing {', '.join(missing)} (columns: {', '.join(frame.columns)})"
        )
    if "weight" not in frame:
        frame["weight"] = 1.0
    weights = pd.to_numeric(frame["weight"], errors="coerce")
    if weights.isna().any():
        bad = frame.loc[weights.isna()].iloc[0]
        raise SpatlasInputError(
            f"{where}: weight '{bad['weight']}' of {bad['source']} -> {bad['target']} is not a "
            "number (every weight must be a finite number)"
        )
    frame = frame.assign(
        source=frame["source"].astype(str).str.strip(),
        target=frame["target"].astype(str).str.strip(),
        weight=weights.astype(np.float64),
    )[["source", "target", "weight"]]
    duplicated = frame.duplicated(["source", "target"])
    if duplicated.any():
        row = frame.loc[duplicated].iloc[0]
        raise SpatlasInputError(
            f"{where}: {int(duplicated.sum())} duplicated (source, target) rows, e.g. "
            f"{row['source']} -> {row['target']}; keep one weight per edge"
        )
    if frame.empty:
        raise SpatlasInputError(f"{where}: the network has no rows")
    return frame


def _read_gene_map(path: str | Path) -> dict[str, str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpatlasInputError(f"gene_map {path}: no such file (two columns: var name, gene)")
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    frame = pd.read_csv(path, sep=sep, dtype=str, encoding="utf-8-sig")
    if frame.shape[1] < 2:
        raise SpatlasInputError(
            f"gene_map {path}: needs two columns (the cohort's gene id, the network's gene name)"
        )
    frame = frame.iloc[:, :2].dropna()
    return dict(zip(frame.iloc[:, 0].str.strip(), frame.iloc[:, 1].str.strip(), strict=True))


def network_genes(
    adata: ad.AnnData,
    net: pd.DataFrame,
    *,
    gene_symbols_key: str | None = None,
    gene_map: str | Path | dict | None = None,
) -> tuple[np.ndarray, str]:
    """The name of each ``var`` the network is matched on, and where the names came from.

    In order: ``gene_map`` (file or dict: var name -> network gene), the ``var`` column
    ``gene_symbols_key``, ``var_names`` when they share genes with the network, else the first
    symbol column of ``var`` that does. No match at all is an error that says what to give.
    """
    targets = set(net["target"])
    var_names = adata.var_names.astype(str)
    if gene_map is not None:
        mapping = gene_map if isinstance(gene_map, dict) else _read_gene_map(gene_map)
        names = np.asarray([mapping.get(v, "") for v in var_names], dtype=object)
        return names, "gene_map"
    if gene_symbols_key is not None:
        if gene_symbols_key not in adata.var:
            raise SpatlasInputError(
                f"var['{gene_symbols_key}'] does not exist (var columns: "
                f"{', '.join(adata.var.columns) or 'none'})"
            )
        return adata.var[gene_symbols_key].astype(str).to_numpy(dtype=object), gene_symbols_key
    if len(targets.intersection(var_names)):
        return var_names.to_numpy(dtype=object), "var_names"
    symbols = gene_symbols(adata)
    if symbols is not None and len(targets.intersection(symbols)):
        return symbols.to_numpy(dtype=object), "gene symbols of var"
    example_target = sorted(targets)[0]
    looks = " (Ensembl ids)" if str(var_names[0]).upper().startswith("ENS") else ""
    raise SpatlasInputError(
        f"none of the network's {len(targets):,} target genes (e.g. {example_target}) is among "
        f"the cohort's genes (e.g. {var_names[0]}{looks}); give a var column of matching names "
        "(gene_symbols_key) or a two-column gene_map file (cohort gene id -> network gene)"
    )


def match_network(
    adata: ad.AnnData,
    network: pd.DataFrame,
    *,
    gene_symbols_key: str | None = None,
    gene_map: str | Path | dict | None = None,
    tmin: int = 5,
    warn: bool = True,
) -> tuple[np.ndarray, np.ndarray, pd.Series, pd.Series, str]:
    """The cohort's genes a network scores, and how many targets each source keeps.

    Returns the ``var`` positions and network names of the matched genes (the first ``var``
    of a name named twice), targets matched per source, the sources with fewer than ``tmin``
    (left out, named in a warning unless ``warn`` is false), and where the names came from.
    Raises when no source keeps ``tmin`` targets.
    """
    names, matched_on = network_genes(
        adata, network, gene_symbols_key=gene_symbols_key, gene_map=gene_map
    )
    # one column per network gene: the first var that carries the name
    names = pd.Series(names, dtype=object).fillna("").astype(str)
    usable = (names != "") & ~names.duplicated() & names.isin(set(network["target"]))
    columns = np.flatnonzero(usable.to_numpy())
    if names[usable].size < names[(names != "") & names.isin(set(network["target"]))].size:
        logger.info("genes named twice in the cohort: the first of each is scored")
    per_source = network.loc[network["target"].isin(set(names[usable]))].groupby("source").size()
    sources = list(pd.unique(network["source"]))
    counts = per_source.reindex(sources, fill_value=0)
    dropped = counts[counts < tmin]
    if len(dropped) == len(counts):
        raise SpatlasInputError(
            f"no source of the network has {tmin} or more target genes in the cohort (matched "
            f"on {matched_on}: {int(counts.max())} at most); check the gene names or lower tmin"
        )
    if len(dropped) and warn:
        logger.warning(
            "%d of %d network sources have fewer than %d target genes in the cohort and are "
            "left out: %s",
            len(dropped),
            len(counts),
            tmin,
            ", ".join(f"{s} ({n})" for s, n in dropped.items()),
        )
    genes = names[usable].to_numpy(dtype=str)
    return columns, genes, counts, dropped, matched_on


def pathway_activity(
    adata: ad.AnnData,
    *,
    net: str | Path | pd.DataFrame = "progeny_human",
    method: str = "ulm",
    layer: str | None = None,
    gene_symbols_key: str | None = None,
    gene_map: str | Path | dict | None = None,
    tmin: int = 5,
    key_added: str = "X_pathways",
) -> pd.DataFrame:
    """Activity of every network source (pathway, regulator) in every spot, by decoupler.

    Parameters
    ----------
    adata
        Cohort with log-normalised expression in ``X`` (after
        :func:`spatlas.pp.preprocess_expression`) or ``layers[layer]``.
    net
        ``progeny_human`` | ``progeny_mouse`` (bundled PROGENy footprints), a CSV/TSV file with
        columns ``source, target, weight``, or such a DataFrame.
    method
        decoupler method (``ulm``: univariate linear model, the default; ``mlm``, ``wsum``,
        ``viper``, ``aucell``, ``zscore``).
    layer
        Layer of log-normalised expression to score instead of ``X``.
    gene_symbols_key
        ``var`` column holding the names the network uses (e.g. symbols when ``var_names`` are
        Ensembl ids). Default: ``var_names``, else a symbol column of ``var`` that matches.
    gene_map
        Two-column file (or dict) mapping the cohort's gene ids to the network's names.
    tmin
        Sources with fewer than ``tmin`` targets among the cohort's genes are left out (named
        in a warning).
    key_added
        ``obsm`` key of the scores (a DataFrame, one column per source).

    Returns
    -------
    The scores (spots x sources). Also ``uns['spatlas']['pathways']``: network, method, genes
    matched per source, the sources left out.
    """
    if method not in METHODS:
        raise SpatlasInputError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    dc = import_optional("decoupler", purpose="pathway activity (spatlas.tl.pathway_activity)")
    network = read_network(net)
    X = _expression(adata, layer)
    columns, genes, counts, dropped, matched_on = match_network(
        adata, network, gene_symbols_key=gene_symbols_key, gene_map=gene_map, tmin=tmin
    )
    matrix = X[:, columns]
    matrix = sp.csr_matrix(matrix, dtype=np.float32) if sp.issparse(matrix) else matrix
    view = ad.AnnData(
        X=matrix,
        obs=pd.DataFrame(index=adata.obs_names.astype(str)),
        var=pd.DataFrame(index=pd.Index(genes, dtype=str)),
    )
    logger.info(
        "pathway activity (%s, %s) of %d sources on %d matched genes (%s)",
        method,
        net if isinstance(net, str) else "network",
        len(counts) - len(dropped),
        len(columns),
        matched_on,
    )
    # decoupler leaves out spots without counts (then it returns a repaired copy): they get NaN
    returned = getattr(dc.mt, method)(view, network, tmin=tmin, verbose=False)
    scores = (returned if returned is not None else view).obsm[f"score_{method}"]
    scores = pd.DataFrame(
        np.asarray(scores.reindex(view.obs_names), dtype=np.float32),
        index=adata.obs_names,
        columns=[str(c) for c in scores.columns],
    )
    missing = ~np.isfinite(scores.to_numpy()).all(axis=1)
    if missing.any():
        logger.warning(
            "%d spots have no pathway score (no counts on the network's genes): NaN in "
            "obsm['%s'], left out of the domain tests",
            int(missing.sum()),
            key_added,
        )
    adata.obsm[key_added] = scores
    adata.uns.setdefault(K.UNS, {})["pathways"] = {
        "key": key_added,
        "network": str(net) if not isinstance(net, pd.DataFrame) else "DataFrame",
        "method": method,
        "matched_on": matched_on,
        "tmin": tmin,
        "targets_matched": {str(s): int(n) for s, n in counts.items()},
        "left_out": [str(s) for s in dropped.index],
    }
    return scores


def domain_pathways(
    adata: ad.AnnData,
    *,
    domain_key: str,
    key: str = "X_pathways",
    sample_key: str = K.SAMPLE,
    min_spots: int = 10,
    min_fraction: float = 0.5,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Pathway activity of each domain against the rest, per sample and across samples.

    Each sample is tested on its own (Wilcoxon rank-sum of the domain's spots against the
    sample's other spots); samples are combined by Stouffer's method, one vote each.

    Returns
    -------
    One row per (domain, pathway): ``domain``, ``rank``, ``pathway``, ``conserved`` (up in
    more than ``min_fraction`` of the samples where the domain was tested), ``n_up`` /
    ``n_down`` (samples where it is significantly higher / lower), ``n_tested``, ``n_present``,
    ``z_combined``, ``padj_combined`` (one-sided, up), ``mean_difference`` /
    ``min_difference`` (domain mean minus rest mean of the score), ``mean_activity`` (the
    domain's mean score, each sample weighing the same), then ``difference:<sample>`` and
    ``padj:<sample>``.
    """
    _check_domains(adata, domain_key, sample_key)
    if key not in adata.obsm:
        raise SpatlasInputError(
            f"obsm['{key}'] does not exist; run spatlas.tl.pathway_activity first"
        )
    scores = adata.obsm[key]
    columns = (
        [str(c) for c in scores.columns]
        if isinstance(scores, pd.DataFrame)
        else [f"source_{i}" for i in range(np.shape(scores)[1])]
    )
    values = np.asarray(scores, dtype=np.float64)
    scored = np.isfinite(values).all(axis=1)  # spots without a score stay out of the tests
    domains = adata.obs[domain_key].astype("string").where(scored)
    values = np.nan_to_num(values)
    names, results = domain_contrasts(
        values,
        domains,
        adata.obs[sample_key],
        min_spots=min_spots,
        effect="difference",
    )
    table = _tidy(
        names,
        results,
        combine_contrasts(results, alpha=alpha),
        features=np.asarray(columns, dtype=object),
        min_fraction=min_fraction,
        effect_name="difference",
        feature_name="pathway",
        keep="all",
    )
    activity = domain_means(values, domains, adata.obs[sample_key], names)
    flat = pd.DataFrame(activity, index=names, columns=columns).stack()
    position = table.columns.get_loc("frac_in")
    table.insert(
        position,
        "mean_activity",
        flat.reindex(pd.MultiIndex.from_arrays([table["domain"], table["pathway"]])).to_numpy(),
    )
    table = table.drop(columns=["frac_in", "frac_out"])
    summary = domain_summary(names, results, min_spots=min_spots)
    adata.uns.setdefault(K.UNS, {}).setdefault("pathways", {})["domains"] = summary
    return table


def domain_means(
    values: np.ndarray, domains: pd.Series, samples: pd.Series, names: list[str]
) -> np.ndarray:
    """Mean of each column per domain: the mean of per-sample means, one vote per sample."""
    frame = pd.DataFrame(values)
    frame["domain"] = domains.astype("string").to_numpy()
    frame["sample"] = samples.astype(str).to_numpy()
    per_sample = frame.dropna(subset=["domain"]).groupby(["domain", "sample"]).mean()
    means = per_sample.groupby(level="domain").mean()
    return means.reindex(names).to_numpy()


def pathway_matrix(table: pd.DataFrame, *, value: str = "z_combined") -> pd.DataFrame:
    """Domain x pathway matrix of one column of a :func:`domain_pathways` table."""
    matrix = table.pivot(index="domain", columns="pathway", values=value)
    order = _ordered_names(pd.Series(matrix.index))
    return matrix.reindex(order)
