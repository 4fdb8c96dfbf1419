"""Bad-input cases of the output class (issue 20), merged into ``bad_inputs.CASES``.

Same form as ``bad_inputs.CASES``: name -> (builder(root) -> CLI argv, a fragment the first
error line must contain). Each is refused before anything is read or written; the cases that
point ``--out`` at the current directory, its parent, the home folder or ``/`` use a config whose
sheet does not exist, so even a broken refusal could not replace anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from spaceranger_fixtures import make_spaceranger

_SYNTHETIC = "data:\n  dataset: synthetic\n  dataset_params: {n_spots: 200, image: false}\n"


def _run(config: Path, out: Path | str, *extra: str) -> list[str]:
    return ["run", str(config), "--out", str(out), *extra]


def _data_folder(root: Path) -> tuple[Path, Path]:
    """``root/data`` holding a sample sheet and one Space Ranger sample; a config beside it."""
    data = root / "data"
    data.mkdir()
    folder, _, _ = make_spaceranger(data, "v1_h5", n_spots=50, n_genes=20)
    sheet = data / "samples.csv"
    pd.DataFrame([{"sample": "S1", "donor": "D1", "path": folder.name}]).to_csv(sheet, index=False)
    config = root / "c.yaml"
    config.write_text(f"data:\n  sheet: {sheet}\n")
    return data, config


def overwrite_sheet_folder(root: Path) -> list[str]:
    data, config = _data_folder(root)
    return _run(config, data, "--overwrite")


def overwrite_sample_folder(root: Path) -> list[str]:
    data, _ = _data_folder(root)
    config = root / "c2.yaml"
    config.write_text(f"data:\n  samples:\n    - {{sample: S1, path: {data / 'outs_v1_h5'}}}\n")
    return _run(config, data / "outs_v1_h5", "--overwrite")


def overwrite_annotations_folder(root: Path) -> list[str]:
    data, _ = _data_folder(root)
    notes = root / "notes"
    notes.mkdir()
    (notes / "labels.csv").write_text("barcode,layer\nAAAC-1,L1\n")
    sheet = data / "samples.csv"
    sheet.write_text(f"sample,path,annotations\nS1,outs_v1_h5,{notes / 'labels.csv'}\n")
    config = root / "c.yaml"
    config.write_text(f"data:\n  sheet: {sheet}\n")
    return _run(config, notes, "--overwrite")


def overwrite_config_folder(root: Path) -> list[str]:
    folder = root / "configs"
    folder.mkdir()
    (folder / "c.yaml").write_text(_SYNTHETIC)
    return _run(folder / "c.yaml", folder, "--overwrite")


def overwrite_h5ad_folder(root: Path) -> list[str]:
    folder = root / "cohort"
    folder.mkdir()
    (folder / "cohort.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n")  # only its place matters here
    config = root / "c.yaml"
    config.write_text(f"data:\n  h5ad: {folder / 'cohort.h5ad'}\n  sample_key: sample\n")
    return _run(config, folder, "--overwrite")


def _no_sheet(root: Path) -> Path:
    config = root / "c.yaml"
    config.write_text(f"data:\n  sheet: {root / 'no_such_sheet.csv'}\n")
    return config


def overwrite_current_directory(root: Path) -> list[str]:
    return _run(_no_sheet(root), ".", "--overwrite")


def overwrite_parent_of_current_directory(root: Path) -> list[str]:
    return _run(_no_sheet(root), Path.cwd().parent, "--overwrite")


def overwrite_home(root: Path) -> list[str]:
    return _run(_no_sheet(root), Path.home(), "--overwrite")


def overwrite_root(root: Path) -> list[str]:
    return _run(_no_sheet(root), "/", "--overwrite")


def out_is_a_file(root: Path) -> list[str]:
    (root / "run").write_text("precious")
    return ["demo", "--out", str(root / "run")]


def out_parent_is_a_file(root: Path) -> list[str]:
    (root / "results").write_text("precious")
    return ["demo", "--out", str(root / "results" / "run")]


def out_parent_read_only(root: Path) -> list[str]:
    parent = root / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    return ["demo", "--out", str(parent / "run")]


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "--overwrite onto the folder of the sample sheet": (
        overwrite_sheet_folder,
        "samples.csv (data.sheet), an input of this run",
    ),
    "--overwrite onto a sample's Space Ranger folder": (
        overwrite_sample_folder,
        "(sample S1 path), an input of this run",
    ),
    "--overwrite onto the folder of an annotations file": (
        overwrite_annotations_folder,
        "labels.csv (sample S1 annotations), an input of this run",
    ),
    "--overwrite onto the folder of the config file": (
        overwrite_config_folder,
        "c.yaml (the config file), an input of this run",
    ),
    "--overwrite onto the folder of the input .h5ad": (
        overwrite_h5ad_folder,
        "cohort.h5ad (data.h5ad), an input of this run",
    ),
    "--overwrite onto the current directory (--out .)": (
        overwrite_current_directory,
        "it is or holds the current directory",
    ),
    "--overwrite onto the parent of the current directory": (
        overwrite_parent_of_current_directory,
        "it is or holds the current directory",
    ),
    "--overwrite onto the home folder": (overwrite_home, "it is or holds your home folder"),
    "--overwrite onto /": (overwrite_root, "refusing to replace the root folder"),
    "--out names a file": (out_is_a_file, "a file of that name exists"),
    "--out inside a file": (out_parent_is_a_file, "results is a file, not a folder"),
}
if os.geteuid() != 0:  # root writes into a read-only folder anyway
    CASES["--out in a read-only folder"] = (out_parent_read_only, "cannot write in")
