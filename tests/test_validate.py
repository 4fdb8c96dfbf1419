import subprocess
import sys

import pytest

from spatlas.cli import main
from spatlas.datasets._demo import dlpfc_demo_sheet

from bad_inputs import CASES


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clear_error_and_exit_code_2(name, tmp_path, capsys):
    build, fragment = CASES[name]
    argv = build(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2
    assert lines, err
    assert any(fragment in line for line in lines), err
    assert "Traceback" not in err


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
