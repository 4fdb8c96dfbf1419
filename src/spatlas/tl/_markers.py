"""Conserved domain markers: each domain against the rest within every sample, then combined.

Pooled over a cohort, a marker test is dominated by the largest sample and rewards genes that
separate samples whose domain mix differs. Here each sample is tested on its own (a two-sided
Wilcoxon rank-sum test of the domain's spots against the sample's other spots, with the tie
correction) and the per-sample z-scores are combined by Stouffer's method, one vote per sample.
A gene is a *conserved* marker of a domain when it is significantly up in the domain in more
than ``min_fraction`` of the samples where the domain could be tested.

The same engine (:func:`domain_contrasts`) scores pathway activities per domain
(:func:`spatlas.tl.domain_pathways`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger
from .._progress import progress

SYMBOL_COLUMNS = (
    "gene_symbols",
    "gene_symbol",
    "symbol",
    "gene_name",
    "gene_names",
    "feature_name",
)
"""``var`` columns read as gene symbols, in this order, when they differ from ``var_names``."""


@dataclass
class SampleContrasts:
    """Per-sample statistics of every group against the rest, arrays of shape (groups, features).

    ``tested[g]`` says whether group ``g`` had at least ``min_spots`` spots in the sample and
    the rest at least ``min_spots`` too; untested rows are NaN.
    """

    sample: str
    n_spots: np.ndarray  # (groups,) spots of each group in the sample
    n_rest: np.ndarray  # (groups,) the sample's other spots (in some group)
    tested: np.ndarray  # (groups,) bool
    z: np.ndarray
    effect: np.ndarray  # log2 fold change (expression) or difference of means (scores)
    mean_in: np.ndarray
    mean_out: np.ndarray
    frac_in: np.ndarray
    frac_out: np.ndarray
    padj: np.ndarray  # two-sided, Benjamini-Hochberg over the features of each group


def _dense(X, rows: np.ndarray, cols: slice) -> np.ndarray:
    block = X[rows][:, cols] if sp.issparse(X) else np.asarray(X)[rows][:, cols]
    return np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)


def _tie_terms(values: np.ndarray) -> np.ndarray:
    """Σ (t³ - t) over the groups of tied values of each column of ``values`` (n, g)."""
    n, g = values.shape
    ordered = np.sort(values, axis=0)
    new = np.ones((n, g), dtype=bool)
    new[1:] = ordered[1:] != ordered[:-1]
    starts = np.flatnonzero(new.T.ravel())  # run starts, column after column
    lengths = np.diff(np.append(starts, n * g)).astype(np.float64)
    return np.bincount(starts // n, weights=lengths**3 - lengths, minlength=g)


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values along the last axis (NaN kept as NaN)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    for idx in np.ndindex(p.shape[:-1]):
        row = p[idx]
        ok = np.isfinite(row)
        if ok.any():
            out[idx][ok] = stats.false_discovery_control(row[ok], method="bh")
    return out


def sample_contrasts(
    X,
    codes: np.ndarray,
    n_groups: int,
    *,
    sample: str = "",
    min_spots: int = 10,
    effect: str = "log2fc",
    chunk: int = 1000,
) -> SampleContrasts:
    """Wilcoxon rank-sum of each group against the rest of one sample, for every feature.

    Parameters
    ----------
    X
        (spots, features) values of the sample: log-normalised expression or activity scores.
    codes
        Group of each spot, ``0 .. n_groups - 1`` (-1: in no group; such spots are left out).
    n_groups
        Number of groups.
    sample
        Name of the sample (kept in the result).
    min_spots
        A group is tested only with at least this many spots in the sample and in the rest.
    effect
        ``log2fc``: log2 of the ratio of the mean ``expm1`` values (expression on the log
        scale); ``difference``: difference of the means (activity scores).
    chunk
        Features ranked at once (memory: spots x chunk doubles).
    """
    if effect not in ("log2fc", "difference"):
        raise ValueError(f"effect must be 'log2fc' or 'difference', got {effect!r}")
    keep = np.flatnonzero(codes >= 0)
    codes = codes[keep]
    n = keep.size
    n_features = X.shape[1]
    onehot = sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(n_groups, n))
    n_in = np.asarray(onehot.sum(axis=1)).ravel()
    n_out = n - n_in
    tested = (n_in >= min_spots) & (n_out >= min_spots)
    shape = (n_groups, n_features)
    z, eff, mean_in, mean_out, frac_in, frac_out = (np.full(shape, np.nan) for _ in range(6))
    for start in range(0, n_features, chunk):
        cols = slice(start, min(start + chunk, n_features))
        values = _dense(X, keep, cols)
        ranks = stats.rankdata(values, axis=0)
        ties = _tie_terms(values)
        rank_in = onehot @ ranks
        sum_in = onehot @ values
        sum_all = values.sum(axis=0)
        pos_in = onehot @ (values > 0).astype(np.float64)
        pos_all = (values > 0).sum(axis=0)
        if effect == "log2fc":
            lin = np.expm1(values)
            lin_in = onehot @ lin
            lin_all = lin.sum(axis=0)
        for g in np.flatnonzero(tested):
            n1, n2 = n_in[g], n_out[g]
            u = rank_in[g] - n1 * (n1 + 1) / 2
            var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
            with np.errstate(divide="ignore", invalid="ignore"):
                z[g, cols] = np.where(var > 0, (u - n1 * n2 / 2) / np.sqrt(var), 0.0)
            mean_in[g, cols] = sum_in[g] / n1
            mean_out[g, cols] = (sum_all - sum_in[g]) / n2
            frac_in[g, cols] = pos_in[g] / n1
            frac_out[g, cols] = (pos_all - pos_in[g]) / n2
            if effect == "log2fc":
                lin_mean_in = lin_in[g] / n1
                lin_mean_out = (lin_all - lin_in[g]) / n2
                eff[g, cols] = np.log2((lin_mean_in + 1e-9) / (lin_mean_out + 1e-9))
            else:
                eff[g, cols] = mean_in[g, cols] - mean_out[g, cols]
    padj = bh_adjust(2 * stats.norm.sf(np.abs(z)))
    return SampleContrasts(
        sample=sample,
        n_spots=n_in.astype(np.int64),
        n_rest=n_out.astype(np.int64),
        tested=tested,
        z=z,
        effect=eff,
        mean_in=mean_in,
        mean_out=mean_out,
        frac_in=frac_in,
        frac_out=frac_out,
        padj=padj,
    )


def domain_contrasts(
    X,
    domains: pd.Series,
    samples: pd.Series,
    *,
    min_spots: int = 10,
    effect: str = "log2fc",
) -> tuple[list[str], list[SampleContrasts]]:
    """:func:`sample_contrasts` of every domain in every sample.

    Returns the domain names (the group order of the arrays) and one result per sample.
    """
    domain_values = domains.astype("string")
    names = _ordered_names(domain_values)
    lookup = {name: i for i, name in enumerate(names)}
    codes = domain_values.map(lookup).fillna(-1).to_numpy(dtype=np.int64)
    sample_values = samples.astype(str).to_numpy()
    results = []
    for sample in progress(pd.unique(sample_values), desc="per-sample tests"):
        rows = np.flatnonzero(sample_values == sample)
        part = X[rows] if sp.issparse(X) else np.asarray(X)[rows]
        results.append(
            sample_contrasts(
                part,
                codes[rows],
                len(names),
                sample=str(sample),
                min_spots=min_spots,
                effect=effect,
            )
        )
    return names, results


def _ordered_names(values: pd.Series) -> list[str]:
    names = sorted(values.dropna().unique())
    numeric = pd.to_numeric(pd.Series(names, dtype=object), errors="coerce")
    if len(names) and numeric.notna().all():
        names = [names[i] for i in np.argsort(numeric.to_numpy(), kind="stable")]
    return [str(n) for n in names]


def combine_contrasts(
    results: Sequence[SampleContrasts], *, alpha: float = 0.05
) -> dict[str, np.ndarray]:
    """Stouffer's combination of the per-sample z of each (group, feature), one vote per sample.

    Returns arrays (groups, features): ``n_present`` / ``n_tested`` (samples where the group has
    spots / was tested), ``n_up`` / ``n_down`` (tested samples where it is significantly up /
    down: adjusted p < ``alpha`` and the effect has that sign), ``z`` (Σ z_s / √m over the m
    tested samples), ``p_up`` (one-sided, up), ``padj_up`` (BH over the features of a group),
    ``mean_effect``, ``min_effect``, ``max_effect`` (over tested samples).
    """
    tested = np.stack([r.tested for r in results])  # (samples, groups)
    present = np.stack([r.n_spots > 0 for r in results])
    z = np.stack([r.z for r in results])  # (samples, groups, features)
    effect = np.stack([r.effect for r in results])
    padj = np.stack([r.padj for r in results])
    m = tested.sum(axis=0).astype(np.float64)[:, None]
    significant = np.nan_to_num(padj, nan=1.0) < alpha
    up = (significant & (np.nan_to_num(effect) > 0) & (np.nan_to_num(z) > 0)).sum(axis=0)
    down = (significant & (np.nan_to_num(effect) < 0) & (np.nan_to_num(z) < 0)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        z_comb = np.where(m > 0, np.nansum(z, axis=0) / np.sqrt(m), np.nan)
    p_up = stats.norm.sf(z_comb)
    with warnings.catch_warnings():  # untested groups: all-NaN slices, NaN is the answer
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_effect = np.nanmean(effect, axis=0)
        min_effect = np.nanmin(effect, axis=0)
        max_effect = np.nanmax(effect, axis=0)
    shape = z_comb.shape
    return {
        "n_present": np.broadcast_to(present.sum(axis=0)[:, None], shape).copy(),
        "n_tested": np.broadcast_to(m.astype(np.int64), shape).copy(),
        "n_up": up,
        "n_down": down,
        "z": z_comb,
        "p_up": p_up,
        "padj_up": bh_adjust(p_up),
        "mean_effect": mean_effect,
        "min_effect": min_effect,
        "max_effect": max_effect,
    }


def gene_symbols(adata: ad.AnnData) -> pd.Series | None:
    """Gene symbols from a ``var`` column (see ``SYMBOL_COLUMNS``) when they differ from the ids."""
    for column in SYMBOL_COLUMNS:
        if column in adata.var:
            values = adata.var[column].astype(str)
            if not (values.to_numpy() == adata.var_names.to_numpy()).all():
                return values
    return None


def _check_domains(adata: ad.AnnData, domain_key: str, sample_key: str) -> None:
    for key, what in ((domain_key, "domains"), (sample_key, "samples")):
        if key not in adata.obs:
            raise SpatlasInputError(
                f"obs['{key}'] ({what}) does not exist; columns: {', '.join(adata.obs.columns)}"
                + (" (run spatlas.tl.cluster first)" if what == "domains" else "")
            )
    if adata.obs[domain_key].notna().sum() == 0:
        raise SpatlasInputError(f"obs['{domain_key}'] holds no domain (all missing)")


def _expression(adata: ad.AnnData, layer: str | None):
    """The log-normalised expression: ``layers[layer]``, else ``X`` when it is not raw counts."""
    if layer is not None:
        if layer not in adata.layers:
            raise SpatlasInputError(
                f"layers['{layer}'] does not exist (layers: {', '.join(adata.layers) or 'none'})"
            )
        return adata.layers[layer]
    X = adata.X
    if K.COUNTS in adata.layers and X is adata.layers[K.COUNTS]:
        raise SpatlasInputError(
            "adata.X holds the raw counts; run spatlas.pp.preprocess_expression first (markers "
            "are tested on the log-normalised expression) or name a log-normalised layer"
        )
    data = X.data if sp.issparse(X) else np.asarray(X)
    if data.size and np.issubdtype(data.dtype, np.number):
        sample = data[: min(data.size, 100_000)]
        if np.all(sample == np.round(sample)) and sample.max() > 20:
            raise SpatlasInputError(
                "adata.X looks like raw counts (integers up to "
                f"{sample.max():.0f}); run spatlas.pp.preprocess_expression first or name a "
                "log-normalised layer with layer="
            )
    return X


def domain_summary(
    names: list[str], results: Sequence[SampleContrasts], *, min_spots: int
) -> pd.DataFrame:
    """One row per domain: spots, samples containing it, samples where it could be tested."""
    spots = np.stack([r.n_spots for r in results])
    tested = np.stack([r.tested for r in results])
    table = pd.DataFrame(
        {
            "domain": names,
            "spots": spots.sum(axis=0),
            "n_present": (spots > 0).sum(axis=0),
            "n_tested": tested.sum(axis=0),
        }
    )
    table["note"] = np.where(
        table["n_tested"] == 0,
        f"fewer than {min_spots} spots (or no other spots) in every sample: not tested",
        "",
    )
    return table


def conserved_markers(
    adata: ad.AnnData,
    *,
    domain_key: str,
    sample_key: str = K.SAMPLE,
    layer: str | None = None,
    min_spots: int = 10,
    min_fraction: float = 0.5,
    alpha: float = 0.05,
    key_added: str | None = "markers",
) -> pd.DataFrame:
    """Markers of each domain that hold in most samples containing it.

    Within each sample, each domain is tested against the sample's other spots (two-sided
    Wilcoxon rank-sum with tie correction on the log-normalised expression, Benjamini-Hochberg
    over genes); the per-sample z-scores are combined by Stouffer's method, each tested sample
    weighing the same (so one large sample cannot carry a gene alone).

    Parameters
    ----------
    adata
        Cohort with log-normalised expression in ``X`` (after
        :func:`spatlas.pp.preprocess_expression`) or in ``layers[layer]``.
    domain_key
        ``obs`` column of the domains (e.g. ``spatial_domain``).
    sample_key
        ``obs`` column of the sample.
    layer
        Layer of log-normalised expression to test instead of ``X``.
    min_spots
        A domain is tested in a sample only with at least this many spots there (and at least
        as many other spots); smaller domains are reported in ``uns`` but not tested.
    min_fraction
        A gene is ``conserved`` when it is significantly up (adjusted p < ``alpha``, log2 fold
        change > 0) in more than this share of the samples where the domain was tested.
    alpha
        Significance level of the per-sample adjusted p-values.
    key_added
        ``uns['spatlas'][key_added]`` receives the table and the per-domain summary; ``None``:
        only return the table.

    Returns
    -------
    A tidy table, one row per (domain, gene) with a positive combined z: ``domain``, ``rank``
    (within the domain: conserved markers first, then by combined z), ``gene`` (``var_names``),
    ``symbol`` (when ``var`` has a symbol column that differs from the ids), ``conserved``,
    ``n_up`` (samples where the gene is significantly up), ``n_tested``, ``n_present``,
    ``z_combined``, ``padj_combined`` (one-sided, up; BH over the domain's genes),
    ``mean_log2fc``, ``min_log2fc``, ``frac_in`` / ``frac_out`` (share of the domain's / other
    spots expressing it, over the tested samples), then ``log2fc:<sample>`` and
    ``padj:<sample>`` for every sample (empty where the domain was not tested there).
    """
    _check_domains(adata, domain_key, sample_key)
    if not 0 <= min_fraction < 1:
        raise SpatlasInputError(f"min_fraction must lie in [0, 1); got {min_fraction}")
    X = _expression(adata, layer)
    names, results = domain_contrasts(
        X, adata.obs[domain_key], adata.obs[sample_key], min_spots=min_spots, effect="log2fc"
    )
    summary = domain_summary(names, results, min_spots=min_spots)
    for row in summary.loc[summary["n_tested"] == 0].itertuples():
        logger.warning(
            "domain %s (%d spots) has fewer than %d spots in every sample: no markers",
            row.domain,
            row.spots,
            min_spots,
        )
    table = _tidy(
        names,
        results,
        combine_contrasts(results, alpha=alpha),
        features=adata.var_names.astype(str).to_numpy(),
        min_fraction=min_fraction,
        effect_name="log2fc",
    )
    symbols = gene_symbols(adata)
    if symbols is not None:
        table.insert(3, "symbol", symbols.reindex(table["gene"]).to_numpy())
    logger.info(
        "conserved markers of %d domains over %d samples: %d (domain, gene) pairs conserved",
        int((summary["n_tested"] > 0).sum()),
        len(results),
        int(table["conserved"].sum()),
    )
    if key_added is not None:
        adata.uns.setdefault(K.UNS, {})[key_added] = {
            "domain_key": domain_key,
            "params": {"min_spots": min_spots, "min_fraction": min_fraction, "alpha": alpha},
            "domains": summary,
            "table": table,
        }
    return table


def _tidy(
    names: list[str],
    results: Sequence[SampleContrasts],
    combined: dict[str, np.ndarray],
    *,
    features: np.ndarray,
    min_fraction: float,
    effect_name: str,
    feature_name: str = "gene",
    keep: str = "up",
) -> pd.DataFrame:
    """The long (domain, feature) table of :func:`combine_contrasts`, sorted within domains."""
    n_features = features.size
    tested = np.stack([r.tested for r in results])
    frac_in = _pooled(results, "frac_in", tested)
    frac_out = _pooled(results, "frac_out", tested)
    frames = []
    for g, name in enumerate(names):
        m = int(combined["n_tested"][g, 0]) if n_features else 0
        if m == 0:
            continue
        z = combined["z"][g]
        rows = np.flatnonzero(z > 0) if keep == "up" else np.arange(n_features)
        frame = pd.DataFrame(
            {
                "domain": name,
                feature_name: features[rows],
                "conserved": combined["n_up"][g, rows] > min_fraction * m,
                "n_up": combined["n_up"][g, rows],
                "n_down": combined["n_down"][g, rows],
                "n_tested": m,
                "n_present": combined["n_present"][g, rows],
                "z_combined": z[rows],
                "padj_combined": combined["padj_up"][g, rows],
                f"mean_{effect_name}": combined["mean_effect"][g, rows],
                f"min_{effect_name}": combined["min_effect"][g, rows],
                "frac_in": frac_in[g, rows],
                "frac_out": frac_out[g, rows],
            }
        )
        if keep == "up":
            frame = frame.drop(columns="n_down")
        for r in results:
            frame[f"{effect_name}:{r.sample}"] = r.effect[g, rows]
            frame[f"padj:{r.sample}"] = r.padj[g, rows]
        order = np.lexsort((-frame["z_combined"].to_numpy(), ~frame["conserved"].to_numpy()))
        frame = frame.iloc[order].reset_index(drop=True)
        frame.insert(1, "rank", np.arange(1, len(frame) + 1))
        frames.append(frame)
    if not frames:
        raise SpatlasInputError(
            "no domain could be tested in any sample: every domain has fewer than min_spots "
            "spots per sample (lower min_spots or check the domains)"
        )
    return pd.concat(frames, ignore_index=True)


def _pooled(results: Sequence[SampleContrasts], field: str, tested: np.ndarray) -> np.ndarray:
    """Spot-weighted mean of a per-sample share over the samples where the group was tested."""
    weights = np.stack([r.n_spots if field == "frac_in" else r.n_rest for r in results])
    weights = np.where(tested, weights, 0).astype(np.float64)[:, :, None]
    values = np.nan_to_num(np.stack([getattr(r, field) for r in results]))
    total = weights.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (values * weights).sum(axis=0) / total, np.nan)


def top_markers(table: pd.DataFrame, *, n: int = 10, conserved_only: bool = True) -> pd.DataFrame:
    """The first ``n`` rows of each domain of a :func:`conserved_markers` table."""
    rows = table.loc[table["conserved"]] if conserved_only else table
    return rows.groupby("domain", sort=False).head(n).reset_index(drop=True)
