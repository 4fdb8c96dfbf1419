"""The ``spatlas`` command line: run, demo, tune, benchmark, report, validate.

Only argparse and the cheap top-level package are imported here; the heavy work (scanpy,
optional torch/scvi/ray/timm) loads inside the sub-commands.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from . import __version__
from ._errors import MissingDependencyError, SpatlasInputError

EXIT_INPUT = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, so a run cleans up as on Ctrl-C (exit code 143)."""

    signum = signal.SIGTERM


@contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """While a run goes, SIGTERM raises :class:`Terminated` (when it would have killed us).

    A full disk also must not print a traceback for each line of ``run.log``.
    """
    main_pid = os.getpid()

    def handler(signum: int, frame) -> None:
        if os.getpid() != main_pid:  # a forked worker inherited the handler: die as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated

    install = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    )
    raise_exceptions = logging.raiseExceptions
    if install:
        signal.signal(signal.SIGTERM, handler)
    logging.raiseExceptions = False
    try:
        yield
    finally:
        logging.raiseExceptions = raise_exceptions
        if install:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _exit_now_if_hdf5_is_broken(code: int) -> None:
    """Exit at once after an ``.h5ad`` write failed on a full disk.

    libhdf5 may then crash in its exit handlers (h5py#914), turning exit code 2 into a
    segmentation fault; everything the run wrote is already cleaned up.
    """
    write = sys.modules.get("spatlas.io._write")
    if write is not None and write.hdf5_failed_on_full_disk():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="run folder to create")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set clustering.n_clusters=7 (repeatable)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out folder (only once the new run has succeeded)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``spatlas`` command."""
    parser = argparse.ArgumentParser(
        prog="spatlas",
        description="Multi-modal spatial-transcriptomics atlases across many samples.",
    )
    parser.add_argument("--version", action="version", version=f"spatlas {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_run = sub.add_parser("run", help="run the pipeline described by a YAML config")
    p_run.add_argument("config", type=Path, help="YAML config (see configs/ for examples)")
    _add_run_options(p_run)

    p_demo = sub.add_parser("demo", help="run the pipeline on the bundled DLPFC demo cohort")
    _add_run_options(p_demo)

    for name, text in (
        ("tune", "tune a config's pipeline by donor-grouped nested cross-validation"),
        ("benchmark", "each benchmark.methods alone vs + the model, tuned by nested CV"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", type=Path, help="YAML config with a tune section")
        p.add_argument(
            "--out",
            required=True,
            type=Path,
            help="search folder; rerun with the same config and folder to resume",
        )
        p.add_argument("--backend", choices=["local", "ray"], help="overrides tune.backend")
        p.add_argument(
            "--address", help="ray: address of an existing cluster (ray://... or host:port)"
        )
        p.add_argument("--workers", type=int, help="local: worker processes (default: the cores)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set tune.task=single_donor (repeatable)",
        )

    p_report = sub.add_parser("report", help="(re)build report.html of a run folder")
    p_report.add_argument("run_dir", type=Path, metavar="DIR", help="run folder (from --out)")

    p_val = sub.add_parser(
        "validate", help="check a sample sheet and every sample it names; exit code 2 on problems"
    )
    p_val.add_argument("sheet", type=Path, help="sample sheet (CSV/TSV/YAML)")
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    from ._logging import set_verbosity

    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    set_verbosity(level)


def _cmd_run(args: argparse.Namespace, config_path: Path) -> int:
    with _terminate_as_exception():
        from ._config import load_config
        from .pipeline import run

        config = load_config(config_path, args.overrides)
        result = run(config, out=args.out, overwrite=args.overwrite, inputs=(config_path,))
    if result.metrics is not None:
        cols = ["sample", "n_spots", "n_labelled", "ari", "nmi"]
        print(result.metrics[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    total = result.timings["seconds"].sum()
    print(
        f"run folder: {args.out} ({total:.1f} s, "
        f"peak RSS {result.timings['peak_rss_mb'].max():.0f} MB)"
    )
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from ._config import load_config
    from .tune import benchmark, gains, tune

    config = load_config(args.config, args.overrides)
    fn = tune if args.command == "tune" else benchmark
    result = fn(
        config, out=args.out, backend=args.backend, n_workers=args.workers, address=args.address
    )
    fmt = lambda v: f"{v:.3f}"  # noqa: E731
    print("test ARI per held-out group (winner of each fold's search):")
    print(result.summary.to_string(float_format=fmt))
    g = gains(result.summary)
    if not g.empty:
        print("relative gain of + model (n/a: baseline ARI below 0.05):")
        print((g * 100).to_string(float_format=lambda v: f"{v:+.0f}%", na_rep="n/a"))
    print(f"search folder: {args.out} ({result.seconds:.0f} s)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    path = build_report(args.run_dir)
    print(f"report: {path}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .io import validate_sheet

    summary, problems = validate_sheet(args.sheet)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_INPUT
    assert summary is not None
    print(summary.to_string(index=False))
    print(
        f"{len(summary)} samples, {summary['donor'].nunique()} donors, "
        f"{summary['spots'].sum()} spots, {int(summary['labelled'].sum())} labelled: OK"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spatlas`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_INPUT
    _configure_logging(args)
    try:
        if args.command == "run":
            return _cmd_run(args, args.config)
        if args.command == "demo":
            demo = resources.files("spatlas") / "configs" / "demo.yaml"
            with resources.as_file(demo) as path:
                return _cmd_run(args, path)
        if args.command in ("tune", "benchmark"):
            return _cmd_search(args)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "validate":
            return _cmd_validate(args)
    except (SpatlasInputError, MissingDependencyError) as err:
        lines = err.problems if isinstance(err, SpatlasInputError) else [str(err)]
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        _exit_now_if_hdf5_is_broken(EXIT_INPUT)
        return EXIT_INPUT
    except KeyboardInterrupt as err:  # SIGINT (Ctrl-C) or, as Terminated, SIGTERM
        name = signal.Signals(getattr(err, "signum", signal.SIGINT)).name
        detail = f"; {err}" if str(err) not in ("", name) else ""
        print(f"error: interrupted by {name}{detail}", file=sys.stderr)
        return 128 + signal.Signals[name]
    parser.error(f"unknown command {args.command}")
    return EXIT_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
