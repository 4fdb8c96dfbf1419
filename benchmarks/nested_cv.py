"""The paper's Figure-2 comparison by donor-grouped nested cross-validation (GitHub issue 6).

1. ``spatlas benchmark configs/her2st_benchmark.yaml``: her2st patients A-E, multi-donor task
   (tune on four patients, test on the fifth, its sections processed jointly), Harmony /
   Scanorama / scVI alone and followed by grid_ae, each tuned by grid search on the composite
   score of the tuning side. Test ARI per held-out patient (on its annotated section X1) and the
   relative gain of each "+ grid_ae" over its baseline.
2. The same search, Harmony pipelines only, on the ``local`` backend and on a local Ray started
   for the run, in two fresh folders: the chosen configurations (and every trial's scores) must
   be identical.

    python benchmarks/nested_cv.py                       # both parts; resumes a stopped part 1
    python benchmarks/nested_cv.py --parts backends      # part 2 only

Writes benchmarks/results/nested_cv_her2st.md (+ .csv tables, the bar plot PNG) and
benchmarks/results/nested_cv_backends.md. Search folders go to benchmarks/.cache/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, RESULTS, ROOT, markdown_table, peak_rss_mb

CONFIG = ROOT / "configs" / "her2st_benchmark.yaml"


def _worker_peak_mb(out: Path) -> str:
    import json

    lines = (out / "tasks.jsonl").read_text().splitlines()
    peaks = [json.loads(line).get("worker_peak_rss_mb") for line in lines if line]
    peaks = [p for p in peaks if p is not None]
    return f"{max(peaks):.0f} MB" if peaks else "not recorded"


def _task_seconds(out: Path) -> float:
    import json

    lines = (out / "tasks.jsonl").read_text().splitlines()
    return sum(json.loads(line)["seconds"] for line in lines if line)


def part_benchmark(workers: int | None) -> None:
    import spatlas
    from spatlas._config import load_config

    out = CACHE / "nested_cv_her2st"
    config = load_config(CONFIG)
    start = time.perf_counter()
    result = spatlas.tune.benchmark(config, out=out, n_workers=workers)
    wall = time.perf_counter() - start
    summary = result.summary
    gains = spatlas.tune.gains(summary)
    test = result.test
    per_fold = test.merge(
        result.chosen.drop(columns=["tune_groups"]), on=["pipeline", "fold"], how="left"
    )
    summary.reset_index().to_csv(RESULTS / "nested_cv_her2st.csv", index=False, float_format="%.4f")
    per_fold.to_csv(RESULTS / "nested_cv_her2st_folds.csv", index=False, float_format="%.4f")
    fig = spatlas.pl.benchmark_bars(summary, title="her2st A-E, multi-donor nested CV: test ARI")
    fig.savefig(RESULTS / "nested_cv_her2st.png", dpi=110, facecolor="white")

    table = summary.reset_index()
    table["group"] = table["group"].map(lambda g: g if g == "mean" else f"{g} (held out)")
    gain_table = (gains * 100).round(0).reset_index()
    chosen = result.chosen.drop(columns=["tune_groups", "point_index"])
    lines = [
        "# Nested cross-validation on her2st patients A-E (multi-donor task)",
        "",
        f"`python benchmarks/nested_cv.py` (= `spatlas benchmark {CONFIG.relative_to(ROOT)}`)",
        "",
        "Each fold tunes on four patients (all their sections; the annotated X1 sections give the",
        "labels of the composite score, lambda = 0.6) and tests the winner on the fifth patient's",
        "sections processed jointly; the test ARI is that patient's annotated section X1",
        "('undetermined' spots left out). K-Means with K = 6, refinement searched.",
        "",
        "## Test ARI per held-out patient",
        "",
        markdown_table(table),
        "## Relative gain of + grid_ae over its baseline (per cent)",
        "",
        markdown_table(gain_table, digits=0),
        "## Chosen configuration per fold",
        "",
        markdown_table(chosen),
        "## Cost",
        "",
        f"- wall time of this call: {wall:.0f} s (a resumed run counts only the rest); sum of "
        f"all task times {_task_seconds(out):.0f} s",
        f"- peak RSS (VmHWM): this process {peak_rss_mb():.0f} MB (it loads the whole cohort and "
        f"prepares the sides), largest worker {_worker_peak_mb(out)}",
        f"- grids: `{config.tune.grids or 'Table 1'}`; fixed: `{config.tune.fixed}`",
        "",
        "![bar plot](nested_cv_her2st.png)",
        "",
    ]
    (RESULTS / "nested_cv_her2st.md").write_text("\n".join(lines))
    print("\n".join(lines))


def part_backends(workers: int | None) -> None:
    import spatlas
    from spatlas._config import load_config

    config = load_config(CONFIG)
    config.benchmark.methods = ["harmony"]
    # a smaller grid than part 1, so that two searches from scratch fit in minutes
    config.tune.grids = {"harmony": {"theta": [0, 1, 2, 4, 8]}, "grid_ae": {"window": [5]}}
    rows, results = [], {}
    for backend in ("local", "ray"):
        out = CACHE / f"nested_cv_backend_{backend}"
        shutil.rmtree(out, ignore_errors=True)  # fresh: nothing reused from a previous run
        start = time.perf_counter()
        results[backend] = spatlas.tune.benchmark(
            config, out=out, backend=backend, n_workers=workers
        )
        rows.append(
            {
                "backend": backend,
                "trials": len(results[backend].trials),
                "wall seconds": round(time.perf_counter() - start, 1),
                "mean test ARI harmony": results[backend].summary.loc["mean", "harmony"],
                "mean test ARI harmony+grid_ae": results[backend].summary.loc[
                    "mean", "harmony+grid_ae"
                ],
            }
        )
    local, ray = results["local"], results["ray"]
    same_chosen = local.chosen.equals(ray.chosen)
    same_trials = local.trials.equals(ray.trials)
    lines = [
        "# Local and Ray backends choose the same configurations (her2st A-E, Harmony pipelines)",
        "",
        "`python benchmarks/nested_cv.py --parts backends`: the search of "
        "`configs/her2st_benchmark.yaml` restricted to harmony and harmony+grid_ae (Harmony "
        "theta {0, 1, 2, 4, 8}, window 5, refine on/off), run twice from scratch in fresh "
        "folders, on a process pool and on a local Ray.",
        "",
        markdown_table(pd.DataFrame(rows)),
        f"- chosen configurations identical: **{same_chosen}**",
        f"- every trial's tuning-side scores identical: **{same_trials}**",
        "",
        markdown_table(local.chosen.drop(columns=["point_index"])),
    ]
    (RESULTS / "nested_cv_backends.md").write_text("\n".join(lines))
    print("\n".join(lines))
    if not (same_chosen and same_trials):
        raise SystemExit("the backends disagree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["benchmark", "backends"])
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    import spatlas

    spatlas.set_verbosity("INFO")
    CACHE.mkdir(exist_ok=True)
    if "benchmark" in args.parts:
        part_benchmark(args.workers)
    if "backends" in args.parts:
        part_backends(args.workers)


if __name__ == "__main__":
    main()
