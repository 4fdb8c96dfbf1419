"""``build_report(run_dir)``: ``report.html`` from what a run folder holds.

The page is self-contained (figures as base64 PNG data URIs, inline CSS, no scripts, no links
out of the page) so it can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger

REPORT_NAME = "report.html"
"""File name of the report inside a run folder."""

SECTIONS = {
    "summary": "Summary",
    "domains": "Spatial domains",
    "umap": "Embedding",
    "biology": "Markers and pathways",
    "expression": "Expression from the image",
    "metrics": "Metrics and timings",
    "training": "Model training",
    "config": "Configuration",
}
"""``id`` and heading of each section of the report, in page order."""

REQUIRED = ("config.yaml", "cohort.h5ad", "domains.csv", "timings.csv")
"""Files a run folder must hold to be reported on."""

_DPI = 100
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1340px; margin: 1.5em auto; padding: 0 1.5em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
nav a { margin-right: 1em; color: #3060a0; text-decoration: none; }
.muted { color: #666; font-size: 0.9em; }
.headline { font-size: 1.15em; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1.2em; }
dl.facts dt { font-weight: 600; }
dl.facts dd { margin: 0; }
table.data { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
table.data th, table.data td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
table.data th { background: #f3f3f3; }
table.data tr:nth-child(even) td { background: #fafafa; }
figure { margin: 0.5em 0 1em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; border: 1px solid #e2e2e2; padding: 0.8em; overflow-x: auto;
      font-size: 0.85em; }
"""


def build_report(run_dir: str | Path, *, adata: Any = None) -> Path:
    """Write ``run_dir/report.html``: a self-contained HTML report of a run.

    A search folder (``spatlas tune`` / ``spatlas benchmark``) gets the search report instead
    (see :func:`spatlas.report.build_search_report`).

    Reads ``config.yaml``, ``cohort.h5ad``, ``domains.csv``, ``timings.csv`` and, when present,
    ``metrics.csv`` and ``model/model.json``. The domains are the cohort's ``*_domain`` column
    (the one ``domains.csv`` holds); the embedding is the model's latent
    (``uns['spatlas']['models']``), else the integrated PCs, else ``X_pca``.

    Parameters
    ----------
    run_dir
        A run folder, as ``spatlas run`` / :func:`spatlas.pipeline.run` write it.
    adata
        The run's cohort when it is in memory (the pipeline passes it, saving a second read
        of ``cohort.h5ad``); default: read from ``run_dir``.

    Returns
    -------
    The path of the report. Sections (``<h2>`` ids): ``summary``, ``domains``, ``umap``,
    ``biology``, ``metrics``, ``training``, ``config``. The file is written to a temporary
    name and renamed into place, so an existing report is only ever replaced by a complete one.

    Raises
    ------
    SpatlasInputError
        ``run_dir`` is not a run folder (it says which files are missing).
    """
    import anndata as ad
    import yaml

    run_dir = Path(run_dir)
    if (run_dir / "search.json").is_file():
        from ._search import build_search_report

        return build_search_report(run_dir)
    if not run_dir.is_dir():
        raise SpatlasInputError(f"{run_dir}: no such folder; give a run folder (spatlas run --out)")
    missing = [name for name in REQUIRED if not (run_dir / name).is_file()]
    if missing:
        raise SpatlasInputError(
            f"{run_dir} is not a spatlas run folder: missing {', '.join(missing)}"
        )
    config_text = (run_dir / "config.yaml").read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError as err:
        raise SpatlasInputError(f"{run_dir / 'config.yaml'}: not valid YAML ({err})") from None
    if not isinstance(config, dict):
        raise SpatlasInputError(f"{run_dir / 'config.yaml'}: expected a mapping of sections")
    if adata is None:
        adata = ad.read_h5ad(run_dir / "cohort.h5ad")
    domain_columns = pd.read_csv(run_dir / "domains.csv", nrows=0).columns
    key = _domain_key(adata.obs.columns, domain_columns, run_dir)
    basis = _embedding_basis(adata, config)
    timings = pd.read_csv(run_dir / "timings.csv")
    metrics_path = run_dir / "metrics.csv"
    metrics = pd.read_csv(metrics_path) if metrics_path.is_file() else None
    markers = _read_table(run_dir / "markers.csv", dtype={"domain": str, "gene": str})
    pathways = _read_table(run_dir / "pathways.csv", dtype={"domain": str, "pathway": str})
    colours = _domain_colours(adata, key)
    model_path = run_dir / "model" / "model.json"
    model_meta = json.loads(model_path.read_text()) if model_path.is_file() else None
    logger.info("report of %s: domains '%s', embedding '%s'", run_dir, key, basis)

    sections = {
        "summary": _summary(adata, config, key, basis, metrics, timings),
        "domains": _domains(adata, key, colours),
        "umap": _umap(adata, basis, key, colours, seed=int(config.get("seed", 0) or 0)),
        "biology": _biology(adata, key, colours, markers, pathways, config),
        "expression": _expression(adata, run_dir, config),
        "metrics": _metrics(metrics, timings, labelled=_has_labels(adata)),
        "training": _training(model_meta, config, basis),
        "config": (
            "<p class='muted'>The resolved configuration of the run (<code>config.yaml</code>)."
            f"</p>\n<pre>{html.escape(config_text)}</pre>"
        ),
    }
    return write_page(run_dir, _page(_run_name(run_dir), sections))


def write_page(folder: Path, page: str) -> Path:
    """Write ``folder/report.html`` through a temporary file renamed into place."""
    from ..io._write import atomic_path

    path = folder / REPORT_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    logger.info("report written to %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


# -- what to report on ---------------------------------------------------------------------


def _domain_key(obs_columns: pd.Index, domain_columns: pd.Index, run_dir: Path) -> str:
    """The domains column: the ``*_domain`` column of ``domains.csv``, else of the cohort."""
    in_obs = [str(c) for c in obs_columns if str(c).endswith("_domain")]
    preferred = [str(c) for c in domain_columns if str(c) in in_obs]
    if preferred:
        return preferred[0]
    if in_obs:
        return in_obs[0]
    raise SpatlasInputError(
        f"{run_dir}: cohort.h5ad has no '*_domain' column in obs; was it written by spatlas run?"
    )


def _embedding_basis(adata: Any, config: Mapping[str, Any]) -> str:
    """The embedding the domains were clustered from: model latent, integrated PCs or PCs."""
    uns = adata.uns.get(K.UNS, {})
    models = uns.get(K.MODELS, {})
    model_name = (config.get("model") or {}).get("name", "none")
    method = (config.get("integration") or {}).get("method", "none")
    candidates = [k for k, info in models.items() if info.get("model") == model_name]
    candidates += list(models)
    if method not in (None, "none"):
        candidates.append(f"{K.PCA}_{method}")
    candidates += list(uns.get("integration", {}))
    candidates.append(K.PCA)
    for key in candidates:
        if key in adata.obsm:
            return str(key)
    raise SpatlasInputError(
        "the cohort has none of the embeddings "
        f"{', '.join(dict.fromkeys(candidates))} in obsm; was it written by spatlas run?"
    )


# -- sections --------------------------------------------------------------------------------


def _summary(
    adata: Any,
    config: Mapping[str, Any],
    key: str,
    basis: str,
    metrics: pd.DataFrame | None,
    timings: pd.DataFrame,
) -> str:
    obs = adata.obs
    samples = obs[K.SAMPLE].astype(str)
    donors = obs[K.DONOR].astype(str) if K.DONOR in obs else None
    model = (config.get("model") or {}).get("name", "none") or "none"
    integration = (config.get("integration") or {}).get("method", "none")
    clustering = config.get("clustering") or {}
    morphology = config.get("morphology") or {}
    n_labelled = int(obs[K.LABEL].notna().sum()) if K.LABEL in obs else 0
    headline = (
        "no <code>metrics.csv</code> in the run folder"
        if n_labelled
        else "no ground-truth labels in this cohort: no metrics"
    )
    if metrics is not None and "mean" in set(metrics["sample"]):
        mean = metrics.set_index("sample").loc["mean"]
        headline = f"mean per-sample ARI <b>{mean['ari']:.3f}</b>"
        if "nmi" in mean:
            headline += f" (NMI {mean['nmi']:.3f})"
    facts = {
        "Dataset": f"{adata.n_obs:,} spots × {adata.n_vars:,} genes"
        + (f", {n_labelled:,} with ground-truth labels" if n_labelled else ""),
        "Samples": f"{samples.nunique()} ({', '.join(pd.unique(samples))})",
        "Donors": (
            f"{donors.nunique()} ({', '.join(pd.unique(donors))})" if donors is not None else "–"
        ),
        "Integration": str(integration),
        "Expression input": _expression_input(adata),
        "Morphology": _morphology_line(adata, morphology),
        "Model": _model_line(config, model),
        "Embedding": f"<code>obsm['{html.escape(basis)}']</code>",
        "Domains": (
            f"<code>obs['{html.escape(key)}']</code>: {obs[key].nunique()} domains "
            f"({clustering.get('method', '?')}"
            + (", spatially refined" if clustering.get("refine") else "")
            + ")"
        ),
        "Run time": f"{timings['seconds'].sum():.1f} s over {len(timings)} steps",
    }
    rows = "\n".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts.items())
    per_sample = _per_sample(obs, key, metrics)
    return (
        f"<p class='headline'>{headline}</p>\n<dl class='facts'>\n{rows}\n</dl>\n"
        f"<h3>Samples</h3>\n{_table(per_sample)}"
    )


def _expression_input(adata: Any) -> str:
    """What the expression basis was: the HVG counts, or a precomputed embedding."""
    info = adata.uns.get(K.UNS, {}).get("expression_input")
    if not info:
        return "highly variable genes (log-normalised counts)"
    dims = info.get("dims", "?")
    n_comps = info.get("n_comps")
    reduced = f", reduced to {n_comps} PCs" if n_comps and n_comps != dims else ""
    return f"precomputed embedding {html.escape(str(info.get('source', '')))} ({dims}-d{reduced})"


def _morphology_line(adata: Any, morphology: Mapping[str, Any]) -> str:
    if not morphology.get("enabled"):
        return "off"
    info = adata.uns.get(K.UNS, {}).get(K.MORPHOLOGY) or {}
    info = info.get(K.MORPH_FEATURES, info)
    if info.get("extractor") == "precomputed":
        return f"precomputed features {html.escape(str(info.get('source', '')))}"
    return f"{html.escape(str(morphology.get('extractor', '')))} features"


def _model_line(config: Mapping[str, Any], model: str) -> str:
    if model == "none":
        return "none (domains clustered from the expression embedding)"
    settings = config.get("model") or {}
    shown = ", ".join(
        f"{name} {settings[name]}"
        for name in ("latent_dim", "window", "steps", "morphology_weight")
        if name in settings
    )
    return f"{html.escape(model)} ({html.escape(shown)})" if shown else html.escape(model)


def _per_sample(obs: pd.DataFrame, key: str, metrics: pd.DataFrame | None) -> pd.DataFrame:
    groups = obs.groupby(obs[K.SAMPLE].astype(str), sort=False, observed=True)
    table = pd.DataFrame(
        {
            "donor": groups[K.DONOR].first().astype(str) if K.DONOR in obs else "",
            "spots": groups.size(),
            "domains": groups[key].nunique(),
        }
    )
    if K.LABEL in obs:
        table["labelled"] = groups[K.LABEL].count()
    if metrics is not None:
        scores = metrics.assign(sample=metrics["sample"].astype(str)).set_index("sample")
        for column in ("ari", "nmi"):
            if column in scores:
                table[column.upper()] = scores[column].reindex(table.index)
    return table.rename_axis("sample").reset_index()


def _read_table(path: Path, *, dtype: dict) -> pd.DataFrame | None:
    return pd.read_csv(path, dtype=dtype) if path.is_file() else None


def _domain_colours(adata: Any, key: str) -> dict[str, str]:
    """One colour per domain for every figure; matched to the best label when there are labels."""
    from ..pl._utils import domain_colours

    labels = adata.obs[K.LABEL] if _has_labels(adata) else None
    return domain_colours(adata.obs[key], labels)


def _domains(adata: Any, key: str, colours: Mapping[str, str]) -> str:
    from .. import pl

    fig = pl.spatial_domains(adata, key=key, colours=colours)
    has_images = any(
        K.IMAGES in entry and entry[K.IMAGES] for entry in adata.uns.get(K.SPATIAL, {}).values()
    )
    where = "on each sample's H&amp;E image" if has_images else "at their array positions"
    truth = ", beside the ground truth (grey: unannotated)" if _has_labels(adata) else ""
    return _figure(
        fig,
        alt=f"spatial domains {key}",
        caption=f"Domains <code>{html.escape(key)}</code> {where}{truth}; one colour per domain "
        "across samples and figures"
        + (", each domain in the colour of the label it overlaps best." if truth else "."),
    )


def _umap(adata: Any, basis: str, key: str, colours: Mapping[str, str], *, seed: int) -> str:
    from .. import pl

    columns = [c for c in (K.SAMPLE, K.DONOR, key, K.LABEL) if c in adata.obs]
    fig = pl.umap(adata, basis=basis, color=columns, seed=seed, palettes={key: colours})
    return _figure(
        fig,
        alt=f"UMAP of {basis}",
        caption=f"UMAP of <code>obsm['{html.escape(basis)}']</code> (at most 20,000 spots, seed "
        f"{seed}): samples and donors should mix, domains and labels should separate.",
    )


def _biology(
    adata: Any,
    key: str,
    colours: Mapping[str, str],
    markers: pd.DataFrame | None,
    pathways: pd.DataFrame | None,
    config: Mapping[str, Any],
) -> str:
    from .. import pl

    if markers is None and pathways is None:
        return (
            "<p>No <code>markers.csv</code> or <code>pathways.csv</code> in this run: turn them "
            "on with <code>downstream: {markers: true, pathways: progeny_human}</code>.</p>"
        )
    down = config.get("downstream") or {}
    parts = []
    if markers is not None:
        n_top = int(down.get("n_top", 3) or 3)
        conserved = markers.loc[markers["conserved"].astype(bool)]
        counts = conserved.groupby("domain").size()
        fig = pl.marker_dotplot(adata, markers, domain_key=key, n_genes=n_top, colours=colours)
        parts.append(
            _figure(
                fig,
                alt="conserved markers dot plot",
                caption=f"The top {n_top} conserved markers of each domain "
                "(<code>markers.csv</code>): up in the domain against the rest of its sample "
                "in most samples where the domain has enough spots (Wilcoxon per sample, "
                "samples combined by Stouffer). Dot size: share of the domain's spots "
                "expressing the gene; colour: mean expression scaled per gene.",
            )
        )
        shown = [
            c
            for c in (
                "domain",
                "rank",
                "gene",
                "symbol",
                "n_up",
                "n_tested",
                "z_combined",
                "mean_log2fc",
                "frac_in",
                "frac_out",
            )
            if c in markers
        ]
        top = conserved.groupby("domain", sort=False).head(5)[shown]
        parts.append(
            "<h3>Conserved markers</h3>\n<p class='muted'>"
            + ", ".join(f"{html.escape(str(d))}: {n}" for d, n in counts.items())
            + " conserved markers per domain; the first five of each:</p>\n"
            + _table(top)
        )
    if pathways is not None:
        fig = pl.pathway_heatmap(pathways, colours=colours)
        network = html.escape(str(down.get("pathways", "")))
        method = html.escape(str(down.get("pathway_method", "ulm")))
        parts.append(
            "<h3>Pathway activity</h3>\n"
            + _figure(
                fig,
                alt="domain x pathway heat map",
                caption=f"Activity of each pathway ({network}, decoupler {method}) in each "
                "domain against the rest of its sample, combined over samples (red: higher). "
                "Cell text: in how many of the samples where the domain was tested it is "
                "significantly higher (negative: lower). From <code>pathways.csv</code>.",
            )
        )
    return "\n".join(parts)


def _expression(adata: Any, run_dir: Path, config: Mapping[str, Any]) -> str:
    from .. import pl, tl

    if K.PREDICTED_EXPRESSION not in adata.obsm:
        return (
            "<p>Expression was not predicted from the image in this run: turn it on with "
            "<code>expression: {predict: true, holdout: [a sample]}</code> (needs "
            "<code>morphology.enabled</code>).</p>"
        )
    meta = adata.uns.get(K.UNS, {}).get(K.PREDICTED, {}).get(K.PREDICTED_EXPRESSION, {})
    genes = list(meta.get("genes", []))
    model_file = run_dir / "expression_model" / "predictor.json"
    info = json.loads(model_file.read_text()).get("info", {}) if model_file.is_file() else {}
    aligner = str(meta.get("aligner", "none"))
    lines = [
        f"<p>{len(genes)} genes predicted for every spot from its image features "
        f"(<code>obsm['{K.PREDICTED_EXPRESSION}']</code>) by a ridge predictor fitted on "
        f"{html.escape(', '.join(map(str, meta.get('train_samples', []))))}"
        + (", features aligned to expression by rank_align" if aligner == "rank_align" else "")
        + f"; per-{html.escape(str(meta.get('feature_scaling', 'sample')))} feature scaling, "
        f"penalty {float(meta.get('alpha', float('nan'))):.3g}. The predictor is in "
        "<code>expression_model/</code>.</p>"
    ]
    cv = info.get("cv", {})
    if cv.get("groups") and cv.get("per_group_r"):
        alphas = np.asarray(cv["alphas"])
        j = int(np.argmin(np.abs(alphas - float(meta.get("alpha", alphas[0])))))
        frame = pd.DataFrame(
            {
                "predicted group": cv["groups"],
                "mean r (all genes)": [row[j] for row in cv["per_group_r"]],
            }
        )
        how = (
            "Validation samples, left out of a probe aligner and ridge trained on the other "
            "training samples (how the penalty and the aligner's training length were chosen)."
            if aligner == "rank_align"
            else "Each training sample (or spatial block) predicted by a model fitted on the "
            "others, at the chosen penalty."
        )
        lines.append(
            "<h3>Cross-validation within the training samples</h3>\n<p class='muted'>"
            + how
            + "</p>\n"
            + _table(frame)
        )
    table = _read_table(run_dir / "expression.csv", dtype={"sample": str, "gene": str})
    if table is None:
        lines.append(
            "<p class='muted'>No sample was held out, so there is no test of the prediction on "
            "unseen sections: list some in <code>expression.holdout</code>.</p>"
        )
        return "\n".join(lines)
    summary = tl.correlation_summary(table)
    lines.append(
        "<h3>Held-out samples</h3>\n<p class='muted'>Pearson r of predicted vs measured "
        "log-normalised expression per gene on samples the predictor never saw the counts of "
        "(<code>expression.csv</code>); top 50 / 250: the most variable genes of the training "
        "samples.</p>\n" + _table(summary)
    )
    target_sum = float((config.get("preprocessing") or {}).get("target_sum", 1e4) or 1e4)
    first = str(summary["sample"].iloc[0])
    part = table.loc[table["sample"] == first].dropna(subset=["r"]).sort_values("r")
    if len(part) >= 2:
        chosen = [str(part["gene"].iloc[-1]), str(part["gene"].iloc[-2]), str(part["gene"].iloc[0])]
        chosen = list(dict.fromkeys(chosen))
        fig = pl.expression_maps(
            adata,
            sample=first,
            genes=chosen,
            r=dict(zip(part["gene"], part["r"], strict=True)),
            target_sum=target_sum,
        )
        lines.append(
            _figure(
                fig,
                alt="measured and predicted expression maps",
                caption=f"Held-out sample {html.escape(first)}: the two best-predicted genes "
                "and the worst one, measured (left) and predicted from the H&E alone (right); "
                "each panel scaled to its own 2nd-98th percentile.",
            )
        )
    return "\n".join(lines)


def _has_labels(adata: Any) -> bool:
    return K.LABEL in adata.obs and bool(adata.obs[K.LABEL].notna().any())


def _metrics(metrics: pd.DataFrame | None, timings: pd.DataFrame, *, labelled: bool) -> str:
    parts = []
    if metrics is None:
        why = "the run folder has none" if labelled else "the cohort has no ground-truth labels"
        parts.append(f"<p>No <code>metrics.csv</code>: {why}.</p>")
    else:
        parts.append(
            "<h3>Metrics</h3>\n<p class='muted'>Per sample, their mean (<code>mean</code>) and "
            "on the pooled cohort (<code>all</code>), from <code>metrics.csv</code>.</p>\n"
            + _table(metrics)
        )
    total = pd.DataFrame([{"step": "total", "seconds": timings["seconds"].sum(), **_peak(timings)}])
    parts.append(
        "<h3>Timings</h3>\n<p class='muted'>Wall-clock seconds and peak resident memory after "
        "each step, from <code>timings.csv</code>.</p>\n"
        + _table(pd.concat([timings, total], ignore_index=True))
    )
    return "\n".join(parts)


def _peak(timings: pd.DataFrame) -> dict[str, float]:
    return {"peak_rss_mb": timings["peak_rss_mb"].max()} if "peak_rss_mb" in timings else {}


def _training(model_meta: Mapping[str, Any] | None, config: Mapping[str, Any], basis: str) -> str:
    from .. import pl

    if model_meta is None:
        model = (config.get("model") or {}).get("name", "none") or "none"
        return (
            f"<p>No model was trained in this run (<code>model.name: {html.escape(model)}"
            f"</code>); the domains were clustered from <code>obsm['{html.escape(basis)}']"
            "</code>.</p>"
        )
    history = model_meta.get("history") or []
    name = str(model_meta.get("model", "model"))
    if not history:
        return f"<p>The {html.escape(name)} model saved no loss history.</p>"
    final = {k: v for k, v in history[-1].items() if k not in ("step", "lr")}
    final_line = ", ".join(f"{k} {v:.4g}" for k, v in final.items())
    fig = pl.loss_curves(history, title=f"{name} training loss")
    return _figure(
        fig,
        alt=f"{name} training loss",
        caption=f"Training loss of {html.escape(name)} from <code>model/model.json</code>, "
        f"{int(history[-1].get('step', len(history) - 1)) + 1} steps; final: "
        f"{html.escape(final_line)}.",
    )


def _run_name(run_dir: Path) -> str:
    """The run's folder name; the pipeline's staging folder ``.NAME.partial-PID`` becomes NAME."""
    name = run_dir.resolve().name
    staged = re.fullmatch(r"\.(.+)\.partial-\d+", name)
    return staged.group(1) if staged else name


# -- HTML ------------------------------------------------------------------------------------


_FORMATS = {"seconds": "{:.2f}", "peak_rss_mb": "{:.0f}"}  # other floats: 3 decimals


def _table(frame: pd.DataFrame) -> str:
    formatters = {
        column: (lambda v, f=fmt: "–" if pd.isna(v) else f.format(v))
        for column, fmt in _FORMATS.items()
        if column in frame
    }
    return frame.to_html(
        index=False,
        border=0,
        classes="data",
        na_rep="–",
        float_format=lambda v: f"{v:.3f}",
        formatters=formatters,
        escape=True,
    )


def _figure(fig: Any, *, alt: str, caption: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f"<figure><img alt='{html.escape(alt, quote=True)}' "
        f"src='data:image/png;base64,{data}'>\n<figcaption>{caption}</figcaption></figure>"
    )


def _page(
    run_name: str,
    sections: Mapping[str, str],
    *,
    titles: Mapping[str, str] = SECTIONS,
    what: str = "run",
) -> str:
    from .. import __version__

    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = " ".join(f"<a href='#{sid}'>{title}</a>" for sid, title in titles.items())
    body = "\n".join(
        f"<section>\n<h2 id='{sid}'>{title}</h2>\n{sections[sid]}\n</section>"
        for sid, title in titles.items()
    )
    name = html.escape(run_name)
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>spatlas {what} {name}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>spatlas {what} <code>{name}</code></h1>\n"
        f"<p class='muted'>Report written {when} by spatlas {__version__}.</p>\n"
        f"<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )
