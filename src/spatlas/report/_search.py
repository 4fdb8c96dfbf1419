"""``report.html`` of a search folder (``spatlas tune`` / ``spatlas benchmark``)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from ._html import _figure, _page, _run_name, _table, write_page

SEARCH_SECTIONS = {
    "summary": "Summary",
    "results": "Test scores",
    "chosen": "Chosen configurations",
    "trials": "Trials",
    "splits": "Splits",
    "config": "Configuration",
}
"""``id`` and heading of each section of a search report, in page order."""

_TOP_TRIALS = 5


def build_search_report(out: str | Path) -> Path:
    """Write ``out/report.html`` for a finished search folder and return its path."""
    from .. import pl
    from ..tune import read_search

    out = Path(out)
    tables = read_search(out)
    spec = tables["spec"]
    config = spec["config"]
    t = config.get("tune", {})
    summary = tables["summary"]
    summary = summary.set_index("group") if summary is not None else pd.DataFrame()
    gains = tables["gains"]
    seconds = _task_seconds(out)

    facts = {
        "kind": spec["kind"],
        "task": f"{t.get('task')} grouped by '{t.get('group_key')}'",
        "folds": str(len(spec["folds"])),
        "pipelines": ", ".join(p["name"] for p in spec["pipelines"]),
        "domains (K)": str(spec["n_clusters"]),
        "trials": str(0 if tables["trials"] is None else len(tables["trials"])),
        "compute": f"{seconds:.0f} s over all tasks (sum of task times)",
        "score": f"composite, λ = {t.get('lam')}, on the tuning side; ARI on the test side",
    }
    headline = ""
    if len(summary) and "mean" in summary.index:
        means = summary.loc["mean"]
        headline = (
            "<p class='headline'>Mean test ARI over held-out groups: "
            + ", ".join(f"<b>{html.escape(str(p))}</b> {v:.3f}" for p, v in means.items())
            + "</p>"
        )
    summary_html = (
        headline
        + "<dl class='facts'>"
        + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts.items())
        + "</dl>"
    )

    results = "<p class='muted'>Not finished: no test scores yet.</p>"
    if len(summary):
        fig = pl.benchmark_bars(summary, title=f"{spec['kind']}: test ARI per held-out group")
        results = (
            "<p>Test ARI of each pipeline's winning configuration, per held-out group (the "
            "mean over that group's annotated samples, and over the folds that test it).</p>"
            + _table(summary.reset_index())
            + _figure(fig, alt="bar plot of test ARI", caption="Test ARI per held-out group.")
        )
        if gains is not None:
            results += (
                "<h3>Relative gain of adding the model</h3>"
                + _table(
                    gains.assign(
                        **{
                            c: gains[c].map(lambda v: "–" if pd.isna(v) else f"{v * 100:+.0f} %")
                            for c in gains.columns
                            if c != "group"
                        }
                    )
                )
                + "<p class='muted'>In per cent: (model − baseline) / baseline; – where the "
                "baseline ARI is below 0.05 (a ratio to nearly zero says nothing).</p>"
            )
        if tables["test_scores"] is not None:
            results += "<h3>Per fold</h3>" + _table(tables["test_scores"])
    chosen = tables["chosen"]
    chosen_html = _table(chosen) if chosen is not None else ""
    trials = tables["trials"]
    trials_html = ""
    if trials is not None:
        top = (
            trials.sort_values(["pipeline", "fold", "composite"], ascending=[True, True, False])
            .groupby(["pipeline", "fold"], sort=False)
            .head(_TOP_TRIALS)
            .drop(columns=["trial"])
        )
        trials_html = (
            f"<p class='muted'>The best {_TOP_TRIALS} trials per pipeline and fold by composite "
            f"score on the tuning side; every trial is in <code>trials.csv</code>.</p>"
            + _table(top)
        )
    splits = tables["splits"]
    config_text = (out / "config.yaml").read_text() if (out / "config.yaml").exists() else ""
    sections = {
        "summary": summary_html,
        "results": results,
        "chosen": chosen_html,
        "trials": trials_html,
        "splits": _table(splits) if splits is not None else "",
        "config": f"<pre>{html.escape(config_text)}</pre>",
    }
    return write_page(
        out, _page(_run_name(out), sections, titles=SEARCH_SECTIONS, what=spec["kind"])
    )


def _task_seconds(out: Path) -> float:
    path = out / "tasks.jsonl"
    if not path.exists():
        return 0.0
    return sum(json.loads(line)["seconds"] for line in path.read_text().splitlines() if line)
