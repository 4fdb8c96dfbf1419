"""spatlas tune under faults (issue 20): changed inputs, damaged cache, signals, a busy folder.

Each test uses a tiny three-donor cohort written to an ``.h5ad`` (see ``bad_inputs_tune``).
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from spatlas import tune
from spatlas._config import load_config
from spatlas._errors import SpatlasInputError
from spatlas.cli import main

from bad_inputs_tune import edit_cohort, relabel, write_cohort, write_config


def _keys(out: Path, start: int = 0) -> list[dict]:
    lines = (out / "tasks.jsonl").read_text().splitlines()[start:]
    return [json.loads(line) for line in lines]


def _model_config(root: Path, cohort: Path) -> Path:
    """Harmony + a short grid_ae: three cached levels (integrate, model, score) per side."""
    path = write_config(root, cohort, name="model.yaml")
    data = yaml.safe_load(path.read_text())
    data["integration"] = {"method": "harmony"}
    data["model"] = {"name": "grid_ae", "steps": 20, "latent_dim": 8}
    data["tune"]["grids"] = {"harmony": {"theta": [2]}, "grid_ae": {"window": [3]}}
    data["tune"]["grids"]["clustering"] = {}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def clean_search(tmp_path_factory):
    """A finished search (harmony + grid_ae) on a tiny cohort: (config path, folder, result)."""
    root = tmp_path_factory.mktemp("faults")
    config = _model_config(root, write_cohort(root))
    out = root / "clean"
    result = tune.tune(load_config(config), out=out)
    return config, out, result


# -- changed inputs --------------------------------------------------------------------------------


def test_changed_labels_are_refused_and_the_old_search_is_kept(tmp_path, capsys):
    cohort = write_cohort(tmp_path)
    config = write_config(tmp_path, cohort)
    out = tmp_path / "search"
    assert main(["-q", "tune", str(config), "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".search.lock"}
    capsys.readouterr()

    edit_cohort(cohort, relabel)  # corrected annotations: 12 spots relabelled
    assert main(["-q", "tune", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    assert "made from different input data (labels changed in 12 spots)" in err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".search.lock"}
    assert after == before  # the old search is untouched, no old number is returned


def test_unchanged_inputs_rewritten_still_resume(tmp_path, capsys):
    cohort = write_cohort(tmp_path)
    config = write_config(tmp_path, cohort)
    out = tmp_path / "search"
    assert main(["-q", "tune", str(config), "--out", str(out)]) == 0
    lines = (out / "tasks.jsonl").read_text()
    time.sleep(0.01)
    write_cohort(tmp_path)  # the same content in a new file (new mtime)
    assert main(["-q", "tune", str(config), "--out", str(out)]) == 0
    assert (out / "tasks.jsonl").read_text() == lines  # nothing recomputed


def test_cache_keys_hold_the_input_data(tmp_path):
    cohort = write_cohort(tmp_path)
    config = write_config(tmp_path, cohort)
    first = tune.tune(load_config(config), out=tmp_path / "a")
    edit_cohort(cohort, relabel)
    second = tune.tune(load_config(config), out=tmp_path / "b")
    sides = [
        sorted(p.name for p in (tmp_path / d / "cache" / "sides").glob("*.h5ad")) for d in "ab"
    ]
    assert not set(sides[0]) & set(sides[1])  # no step of one cohort can be reused for the other
    assert set(first.trials["trial"]).isdisjoint(second.trials["trial"])


# -- damaged cache entries -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "damage"),
    [
        ("sides", "truncate"),
        ("integrate", "empty"),
        ("model", "truncate"),
        ("score", "truncate"),
        ("score", "no checksum"),
    ],
)
def test_damaged_cache_entry_is_recomputed_with_a_log_line(
    clean_search, tmp_path, caplog, level, damage
):
    config, clean, first = clean_search
    out = tmp_path / "copy"
    shutil.copytree(clean, out)
    n_lines = len(_keys(out))
    suffix = ".h5ad" if level == "sides" else ".json" if level == "score" else ".npy"
    entry = sorted((out / "cache" / level).glob(f"*{suffix}"))[0]
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # the writer was killed between writing the entry and its checksum
        Path(f"{entry}.sha256").unlink()

    with caplog.at_level(logging.INFO, logger="spatlas"):
        second = tune.tune(load_config(config), out=out)
    name = f"cache/{level}/{entry.name}"
    assert f"cache entry {name} is corrupt: recomputing" in caplog.text
    if level != "sides":
        assert [t["key"] for t in _keys(out, n_lines)] == [entry.stem]  # only that step ran
    assert entry.is_file() and Path(f"{entry}.sha256").is_file()
    for frame in ("trials", "chosen", "test", "summary"):
        pd.testing.assert_frame_equal(getattr(first, frame), getattr(second, frame))


def test_state_files_left_by_a_killed_search_are_repaired(clean_search, tmp_path, caplog):
    config, clean, first = clean_search
    out = tmp_path / "copy"
    shutil.copytree(clean, out)
    lines = (out / "tasks.jsonl").read_text()
    with open(out / "tasks.jsonl", "a") as fh:
        fh.write('{"key": "abc", "kin')  # an append cut short
    stale = out / "cache" / "model" / ".0123.npy.tmp-4242"
    stale.write_bytes(b"half")
    with caplog.at_level(logging.INFO, logger="spatlas"):
        tune.tune(load_config(config), out=out)
    assert "dropped 1 unreadable line(s)" in caplog.text
    assert (out / "tasks.jsonl").read_text() == lines
    assert not stale.exists()
    assert main(["report", str(out)]) == 0  # reads tasks.jsonl


def test_a_folder_in_use_is_refused(clean_search, tmp_path):
    from spatlas.tune._search import _lock, _release

    config, clean, _ = clean_search
    out = tmp_path / "copy"
    shutil.copytree(clean, out)
    lock = _lock(out)  # another search holds the folder
    try:
        with pytest.raises(SpatlasInputError, match="another spatlas search is running"):
            tune.tune(load_config(config), out=out)
    finally:
        _release(lock)
    tune.tune(load_config(config), out=out)  # free again


# -- signals ---------------------------------------------------------------------------------------

# Loaded by every Python process of the search (PYTHONPATH): a model step records its worker's
# pid and then stalls, so the signal reaches the search while both workers are busy.
_STALL_HOOK = """
import os, time
if os.environ.get("SPATLAS_TEST_STALL"):
    import spatlas.tune._tasks as tasks

    _model = tasks._model

    def _stalled(task):
        with open(os.environ["SPATLAS_TEST_STALL"], "a") as fh:
            fh.write(f"{os.getpid()}\\n")
        time.sleep(300)
        return _model(task)

    tasks._model = _stalled
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _parent(int(entry.name)) == pid:
                    out.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -signal.SIGKILL)],
)
def test_signal_stops_the_workers_at_once_and_a_rerun_resumes(tmp_path, signum, code):
    """SIGTERM / Ctrl-C: one line, exit 143 / 130; SIGKILL: the workers die with the search."""
    config = _model_config(tmp_path, write_cohort(tmp_path))
    out = tmp_path / "search"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_STALL_HOOK)
    stalled = tmp_path / "stalled.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
        "SPATLAS_TEST_STALL": str(stalled),
    }
    argv = [sys.executable, "-m", "spatlas.cli", "tune", str(config), "--out", str(out)]
    proc = subprocess.Popen(
        [*argv, "--workers", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(workers) < 2:  # both workers are inside a model step
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the workers never reached a model step"
            time.sleep(0.2)
            workers = [int(x) for x in stalled.read_text().split()] if stalled.exists() else []
        assert all(_parent(pid) == proc.pid for pid in workers)
        sent = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
        stopped = time.monotonic() - sent
        err = err.decode()
        assert proc.returncode == code, err[-3000:]
        assert stopped < 15
        assert "Traceback" not in err
        if signum != signal.SIGKILL:
            errors = [line for line in err.splitlines() if line.startswith("ERROR")]
            name = signal.Signals(signum).name
            assert len(errors) == 1 and f"tune stopped by {name}" in errors[0], err[-3000:]
            assert "resumes the search" in errors[0]
        deadline = time.monotonic() + 3
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "a worker outlived the search"
        assert not _children(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:  # never leave a stalled worker behind, even when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    # what the signal left: the tuning sides' integrate steps (finished before the model
    # steps), no temporary file beside a cache entry, no tables
    done = _keys(out)
    assert {t["kind"] for t in done} == {"integrate"} and len(done) == 3
    assert not list(out.rglob(".*.tmp-*"))
    assert not (out / "trials.csv").exists()

    rerun = subprocess.run([*argv, "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming the search" in rerun.stderr
    assert "tuning: 3 integrate step(s), 3 already done" in rerun.stderr
    new = _keys(out, len(done))
    assert not {t["key"] for t in new} & {t["key"] for t in done}  # finished steps were kept
    assert {t["kind"] for t in new} == {"integrate", "model", "score"}  # the test sides' too
    assert pd.read_csv(out / "trials.csv")["composite"].notna().all()
