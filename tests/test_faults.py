"""Faults during ``spatlas run`` (issue 20): signals at chosen steps, two runs on one ``--out``,
files appearing in ``--out``, ``--overwrite`` onto the inputs, a full disk.

The subprocess tests stop a real ``spatlas run`` at a chosen point with the test hook of
:func:`spatlas.io._write.pause_for_tests`: ``SPATLAS_TEST_PAUSE_AT=<point>`` makes the run write
the marker file ``SPATLAS_TEST_PAUSE_FILE`` (holding its pid) and wait until it is deleted.
"""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import spatlas
from spatlas.cli import main
from spatlas.io import atomic_output_dir

from spaceranger_fixtures import make_spaceranger

CONFIG = """\
data:
  dataset: synthetic
  dataset_params: {n_donors: 1, n_samples_per_donor: 2, n_spots: 300, n_genes: 120, image: false}
clustering:
  n_clusters: 3
"""
RUN_FILES = {"cohort.h5ad", "config.yaml", "domains.csv", "metrics.csv", "report.html", "run.log"}


def _config(root: Path) -> Path:
    path = root / "c.yaml"
    path.write_text(CONFIG)
    return path


def _previous_run(root: Path) -> Path:
    """A folder standing for an earlier run, with a nested folder and binary content."""
    run = root / "run"
    (run / "model").mkdir(parents=True)
    (run / "domains.csv").write_text("spot,spatial_domain\nA,0\nB,1\n")
    (run / "cohort.h5ad").write_bytes(bytes(range(256)) * 64)
    (run / "model" / "weights.pt").write_bytes(b"\x00\x01" * 1000)
    return run


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _start(root: Path, out: Path, *extra: str, pause_at: str) -> tuple[subprocess.Popen, Path]:
    marker = root.parent / f"paused-{pause_at}-{out.name}"
    env = {
        **os.environ,
        "SPATLAS_TEST_PAUSE_AT": pause_at,
        "SPATLAS_TEST_PAUSE_FILE": str(marker),
    }
    log = open(root.parent / f"stderr-{out.name}-{time.monotonic_ns()}", "w+")
    argv = ["run", str(root / "c.yaml"), "--out", str(out), *extra]
    proc = subprocess.Popen(
        [sys.executable, "-m", "spatlas.cli", *argv],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
    )
    proc.log = log  # type: ignore[attr-defined]
    return proc, marker


def _wait_paused(proc: subprocess.Popen, marker: Path, timeout: float = 180) -> int:
    """Wait until the run reached its pause point; return its pid."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            proc.log.seek(0)
            pytest.fail(f"run ended ({proc.returncode}) before pausing:\n{proc.log.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("run did not reach its pause point")
        time.sleep(0.05)
    time.sleep(0.1)  # let the marker's writer finish
    return int(marker.read_text())


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    code = proc.wait(timeout=180)
    proc.log.seek(0)
    err = proc.log.read()
    proc.log.close()
    return code, err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize(
    ("signame", "point", "previous"),
    [
        ("SIGINT", "preprocess", True),
        ("SIGTERM", "cluster", True),
        ("SIGINT", "write", True),
        ("SIGTERM", "commit", True),
        ("SIGTERM", "write", False),
        ("SIGINT", "commit", False),
    ],
)
def test_a_signal_leaves_the_previous_run_and_no_partial_folder(signame, point, previous, tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    _config(root)
    out = _previous_run(root) if previous else root / "run"
    before = _snapshot(out) if previous else None
    proc, marker = _start(root, out, "--overwrite", pause_at=point)
    _wait_paused(proc, marker)
    proc.send_signal(getattr(signal, signame))
    marker.unlink()
    code, err = _finish(proc)

    assert code == 128 + getattr(signal, signame), err
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: interrupted by {signame}; ")
    assert ("previous run in" in lines[0] and "is intact" in lines[0]) == previous
    assert "partial run folder .run.partial-" in lines[0] and "was removed" in lines[0]
    assert f"ERROR: interrupted by {signame}" in err  # the log line says the same
    if previous:
        assert _snapshot(out) == before
    assert sorted(p.name for p in root.iterdir()) == (["c.yaml", "run"] if previous else ["c.yaml"])


def test_a_signal_during_the_swap_lets_it_finish(tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    _config(root)
    out = _previous_run(root)
    proc, marker = _start(root, out, "--overwrite", pause_at="swap")
    _wait_paused(proc, marker)
    proc.send_signal(signal.SIGINT)  # held back until the new run is in place
    time.sleep(0.3)
    assert (out / "model" / "weights.pt").exists()  # nothing moved while paused
    marker.unlink()
    code, err = _finish(proc)

    assert code == 130, err
    assert "Traceback" not in err
    assert _error_lines(err) == [
        f"error: interrupted by SIGINT; the run had finished: {out} holds the new run"
    ]
    assert {p.name for p in out.iterdir()} >= RUN_FILES
    assert not (out / "model").exists()
    assert sorted(p.name for p in root.iterdir()) == ["c.yaml", "run"]


def test_a_second_run_on_the_same_out_refuses_while_the_first_goes(tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    config = _config(root)
    out = root / "run"
    first, marker = _start(root, out, pause_at="load")
    pid = _wait_paused(first, marker)

    second = subprocess.run(
        [sys.executable, "-m", "spatlas.cli", "run", str(config), "--out", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=180,
    )
    marker.unlink()
    code, err = _finish(first)

    assert second.returncode == 2
    assert "Traceback" not in second.stderr
    lines = _error_lines(second.stderr)
    assert len(lines) == 1
    assert f"another spatlas run (pid {pid} on " in lines[0]
    assert code == 0, err
    assert {p.name for p in out.iterdir()} >= RUN_FILES
    assert sorted(p.name for p in root.iterdir()) == ["c.yaml", "run"]


def test_a_file_put_into_out_during_the_run_is_kept(tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    _config(root)
    out = root / "run"
    proc, marker = _start(root, out, pause_at="cluster")
    pid = _wait_paused(proc, marker)
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    marker.unlink()
    code, err = _finish(proc)

    assert code == 2, err
    assert "Traceback" not in err
    finished = root / f"run.finished-{pid}"
    assert _error_lines(err) == [
        f"error: --out {out}: files appeared in it during the run and were left alone; the "
        f"finished run is in {finished} (move it yourself, or rerun with --overwrite)"
    ]
    assert _snapshot(out) == {"notes.txt": b"precious"}
    assert {p.name for p in finished.iterdir()} >= RUN_FILES
    assert sorted(p.name for p in root.iterdir()) == ["c.yaml", "run", finished.name]


def test_overwrite_onto_the_folder_of_the_sheet_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    folder, _, _ = make_spaceranger(data, "v1_h5", n_spots=50, n_genes=20)
    sheet = data / "samples.csv"
    pd.DataFrame([{"sample": "S1", "path": folder.name}]).to_csv(sheet, index=False)
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  sheet: data/samples.csv\nclustering:\n  n_clusters: 3\n")
    before = _snapshot(data)

    code = main(["run", str(config), "--out", str(data), "--overwrite"])

    err = capsys.readouterr().err
    assert code == 2
    assert _error_lines(err) == [
        f"error: --out {data} --overwrite would delete {sheet} (data.sheet), an input of this "
        "run; choose a --out folder that holds no inputs"
    ]
    assert _snapshot(data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "data"]


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(  # how h5py reports it: errno 28 only in the text
            "Can't synchronously write data (file write failed: errno = 28, "
            "error message = 'No space left on device')"
        ),
    ],
)
def test_a_full_disk_while_writing_keeps_the_previous_run(error, tmp_path, monkeypatch, capsys):
    config = _config(tmp_path)
    out = _previous_run(tmp_path)
    before = _snapshot(out)

    def write_until_full(adata, path, **kwargs):
        Path(path).write_bytes(b"\x89HDF half written")
        raise error

    monkeypatch.setattr(spatlas.io, "write_h5ad", write_until_full)
    code = main(["run", str(config), "--out", str(out), "--overwrite"])

    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert _error_lines(err) == [
        f"error: no space left on device while writing {out}; the previous run in {out} is "
        "intact and the partial run was removed; free space or choose another --out"
    ]
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "run"]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs of its own (needs root and the right to mount: skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_real_full_disk_while_writing_keeps_the_previous_run(small_disk, tmp_path):
    config = _config(tmp_path)
    out = _previous_run(small_disk)
    filler = shutil.disk_usage(small_disk).free - 200_000  # the new cohort.h5ad needs ~500 kB
    (out / "filler.bin").write_bytes(os.urandom(filler))
    before = _snapshot(out)

    argv = ["run", str(config), "--out", str(out), "--overwrite"]
    proc = subprocess.run(
        [sys.executable, "-m", "spatlas.cli", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert proc.returncode == 2, proc.stderr[-3000:]  # not 139: libhdf5 crashes at exit
    assert "Traceback" not in proc.stderr
    assert _error_lines(proc.stderr) == [
        f"error: no space left on device while writing {out}; the previous run in {out} is "
        "intact and the partial run was removed; free space or choose another --out"
    ]
    assert _snapshot(out) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["run"]


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    lock = tmp_path / ".run.lock"
    lock.write_text("pid 999999 on elsewhere, started 2020-01-01 00:00:00\n")  # nobody holds it

    with atomic_output_dir(out) as stage:
        (stage / "domains.csv").write_text("x")

    assert (out / "domains.csv").read_text() == "x"
    assert not lock.exists()
    assert "taking over" in caplog.text and "pid 999999" in caplog.text


def test_a_claimed_folder_refuses_a_second_claim(tmp_path):
    out = tmp_path / "run"
    with atomic_output_dir(out) as stage:
        with pytest.raises(spatlas.SpatlasInputError, match=f"pid {os.getpid()} on "):
            with atomic_output_dir(out):
                pass
        (stage / "domains.csv").write_text("first")
    assert _snapshot(out) == {"domains.csv": b"first"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_unwritable_out_gives_one_line(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "open", read_only)  # the lock file is the first thing written
    with pytest.raises(spatlas.SpatlasInputError) as info:
        with atomic_output_dir(tmp_path / "run"):
            pass
    assert info.value.problems == [
        f"--out {tmp_path / 'run'}: cannot write in {tmp_path} (Read-only file system); "
        "choose a writable location for --out"
    ]
