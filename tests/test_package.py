import subprocess
import sys

import pytest

import spatlas

HEAVY = ("torch", "scvi", "ray", "timm", "torchvision", "jax")

CHECK = """
import sys
{code}
heavy = [m for m in {heavy!r} if m in sys.modules]
print("HEAVY:" + ",".join(heavy))
"""


def _heavy_modules_after(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", CHECK.format(code=code, heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip().splitlines()[-1].removeprefix("HEAVY:")


def test_import_spatlas_and_namespaces_do_not_import_heavy_dependencies():
    code = (
        "import spatlas\n"
        "for m in ('io', 'pp', 'tl', 'metrics', 'datasets', 'pipeline'):\n"
        "    getattr(spatlas, m)"
    )
    assert _heavy_modules_after(code) == ""


def test_cli_help_does_not_import_heavy_dependencies():
    code = (
        "from spatlas.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass"
    )
    assert _heavy_modules_after(code) == ""


def test_top_level_import_is_lazy():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import spatlas, sys; print('scanpy' in sys.modules, 'anndata' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.split() == ["False", "False"]


def test_console_script_help_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "spatlas.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for command in ("run", "demo", "validate"):
        assert command in proc.stdout


def test_missing_optional_dependency_gives_install_hint():
    from spatlas._deps import import_optional
    from spatlas._errors import MissingDependencyError

    saved = sys.modules.get("scvi")
    sys.modules["scvi"] = None  # type: ignore[assignment]  # makes `import scvi` fail
    try:
        with pytest.raises(MissingDependencyError, match=r"pip install 'spatlas\[scvi\]'"):
            import_optional("scvi", purpose="integration method 'scvi'")
    finally:
        if saved is None:
            del sys.modules["scvi"]
        else:
            sys.modules["scvi"] = saved


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError):
        spatlas.no_such_namespace  # noqa: B018
