"""The bad-input table: each broken cohort / config, the CLI's exit code and its error line.

    python benchmarks/bad_input_table.py      # writes benchmarks/results/bad_inputs.md

Every case is built by tests/bad_inputs.py (the same cases tests/test_validate.py checks) and run
through the real `spatlas` command in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from _common import RESULTS, ROOT, markdown_table

sys.path.insert(0, str(ROOT / "tests"))
from bad_inputs import CASES


def main() -> None:
    rows = []
    for name, (build, _) in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            argv = build(Path(tmp))
            proc = subprocess.run(
                [sys.executable, "-m", "spatlas.cli", "-q", *argv], capture_output=True, text=True
            )
            errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
            message = errors[0].removeprefix("error: ").replace(tmp, "…") if errors else proc.stderr
            rows.append(
                {
                    "bad input": name,
                    "command": f"spatlas {argv[0]}",
                    "exit": proc.returncode,
                    "error lines": len(errors),
                    "traceback": "Traceback" in proc.stderr,
                    "message": message.replace("|", "\\|"),
                }
            )
            print(f"{proc.returncode} {name}: {message}", flush=True)
    table = pd.DataFrame(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bad_inputs.md").write_text(markdown_table(table))


if __name__ == "__main__":
    main()
