"""Shared helpers of the benchmark scripts: the real datasets, timing, tables."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from spatlas._resources import peak_rss_mb  # noqa: F401  (re-exported for the scripts)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / ".cache"

# dataset -> (K, annotated samples, label classes left out of label metrics)
DATASETS = {
    "dlpfc": {"k": 7, "annotated": ["151673", "151674", "151675", "151676"], "exclude": []},
    "her2st": {"k": 6, "annotated": ["A1", "B1", "C1", "D1", "E1"], "exclude": ["undetermined"]},
}


def load_dataset(name: str):
    """The raw cohort of a benchmark dataset (DLPFC Br8100 = the bundled demo; her2st A-E)."""
    import spatlas
    from spatlas._config import DataConfig
    from spatlas.pipeline import Config, load_cohort

    if name == "dlpfc":
        return spatlas.datasets.dlpfc_demo()
    if name == "her2st":
        data = DataConfig(
            h5ad=str(SHARED / "her2st" / "her2st_patientsA-E_counts.h5ad"),
            sample_key="section",
            donor_key="patient",
            label_column="label",
        )
        return load_cohort(Config(data=data))
    raise ValueError(f"unknown dataset {name}")


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table (no tabulate dependency)."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
