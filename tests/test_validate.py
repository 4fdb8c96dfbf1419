import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from spatlas import _keys as K
from spatlas._config import DataConfig, load_config
from spatlas.cli import main
from spatlas.datasets._demo import dlpfc_demo_sheet
from spatlas.io import read_cohort, read_h5ad, read_spaceranger, validate_sheet, write_h5ad
from spatlas.io._sheet import _is_run_config
from spatlas.pipeline import Config, load_cohort

from bad_inputs import (
    ACCEPTED,
    CASES,
    CLASS_OF,
    CLASSES,
    CORRUPT,
    IDENTITY,
    NUMERIC,
    SHEET,
    _stacked_sections_h5ad,
)
from spaceranger_fixtures import make_spaceranger


def _snapshot(root: Path) -> dict[Path, str]:
    """path -> sha256 of every file under ``root``."""
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _assert_unchanged(before: dict[Path, str]) -> None:
    for path, digest in before.items():
        assert path.is_file(), f"{path} was removed"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} was changed"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clear_error_and_exit_code_2(name, tmp_path, capsys):
    build, fragment = CASES[name]
    argv = build(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert "Traceback" not in err
    assert lines, err
    assert fragment in lines[0], err
    _assert_unchanged(before)


def test_every_case_has_a_class():
    assert set(CLASS_OF) == set(CASES)
    assert set(CLASS_OF.values()) <= set(CLASSES)


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_valid_input_real_users_send_is_accepted_as_written(name, tmp_path, capsys):
    argv, check = ACCEPTED[name](tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "error: " not in captured.err
    check(captured.out)
    _assert_unchanged(before)


_SHEET_CASES = [name for name in CASES if CLASS_OF[name] in (SHEET, IDENTITY, NUMERIC, CORRUPT)]


@pytest.mark.parametrize("name", _SHEET_CASES)
def test_run_refuses_what_validate_refuses_with_the_same_first_line(name, tmp_path, capsys):
    argv = CASES[name][0](tmp_path)
    if argv[0] != "validate" or Path(argv[1]).suffix not in (".csv", ".tsv", ".txt", ".yaml"):
        pytest.skip("not a sample sheet given to validate")
    if _is_run_config(Path(argv[1])):
        config = Path(argv[1])
    else:
        config = tmp_path / "run_config.yaml"
        config.write_text(f"data:\n  sheet: '{argv[1]}'\n")
    capsys.readouterr()
    assert main(argv) == 2
    validate_first = _first_error(capsys.readouterr().err)
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 2
    run_first = _first_error(capsys.readouterr().err)
    assert run_first == validate_first
    assert not (tmp_path / "run").exists()


def _first_error(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("error: "))


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_what_validate_accepts_the_run_loads(name, tmp_path):
    argv, _ = ACCEPTED[name](tmp_path)
    path = Path(argv[1])
    config = load_config(path) if _is_run_config(path) else Config(data=DataConfig(sheet=str(path)))
    cohort = load_cohort(config)
    summary, problems = validate_sheet(path)
    assert problems == []
    assert cohort.obs[K.SAMPLE].cat.categories.tolist() == summary["sample"].tolist()


def test_labels_3_and_3_0_are_one_class_across_the_cohort(tmp_path):
    argv, _ = ACCEPTED["labels 3 in one sample, 3.0 in another"](tmp_path)
    cohort = read_cohort(argv[1])
    assert cohort.obs[K.LABEL].cat.categories.tolist() == ["3", "4"]
    assert cohort.obs[K.LABEL].value_counts().to_dict() == {"3": 50, "4": 50}


def test_sample_ids_and_donors_are_kept_as_written(tmp_path):
    argv, _ = ACCEPTED["YAML sample: 0012, donor: no, sample: 1.10"](tmp_path)
    summary, problems = validate_sheet(argv[1])
    assert problems == []
    assert summary["sample"].tolist() == ["0012", "1.10"]
    assert summary["donor"].tolist() == ["no", "on"]


def test_stacked_sections_split_by_their_column_are_accepted(tmp_path):
    path = _stacked_sections_h5ad(tmp_path)
    parts = read_h5ad(path, sample_key="section", donor_key="patient")
    assert [p.obs[K.SAMPLE].iloc[0] for p in parts] == ["A1", "A2"]
    assert [p.n_obs for p in parts] == [50, 50]


def test_one_section_with_a_region_column_is_not_taken_for_several(tmp_path):
    # a column naming regions of one section (side by side, not overlapping) is no evidence
    folder, _, _ = make_spaceranger(tmp_path, "v1_h5", n_spots=300, n_genes=20)
    one = read_spaceranger(folder, sample="S")
    x = one.obsm[K.SPATIAL][:, 0]
    one.obs["section"] = (x > x.mean()).astype(str)
    one.obs = one.obs.drop(columns=[K.ARRAY_ROW, K.ARRAY_COL])
    path = tmp_path / "one.h5ad"
    write_h5ad(one, path)
    assert read_h5ad(path, sample="S").n_obs == 300


def test_run_refuses_non_empty_folder_and_keeps_its_files(tmp_path, capsys):
    build, _ = CASES["run folder not empty"]
    assert main(build(tmp_path)) == 2
    assert (tmp_path / "run" / "results.csv").read_text() == "precious"


def test_validate_summarises_the_demo_sheet(capsys):
    assert main(["validate", str(dlpfc_demo_sheet())]) == 0
    out = capsys.readouterr().out
    assert "151673" in out and "Br8100" in out
    assert "4 samples, 1 donors, 14364 spots, 14243 labelled: OK" in out


def test_validate_command_exit_code_from_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "spatlas.cli", "validate", str(tmp_path / "missing.csv")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ")
    assert "Traceback" not in proc.stderr


def test_config_samples_keep_ids_and_donors_as_written(tmp_path):
    from spatlas._config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(
        "data:\n  samples:\n    - {sample: 0012, donor: no, path: x}\n"
        "clustering:\n  n_clusters: 7\n"
    )
    config = load_config(path)
    row = config.data.samples[0]
    assert row["sample"] == "0012" and row["donor"] == "no"
    assert config.clustering.n_clusters == 7  # the rest of the config keeps its types
