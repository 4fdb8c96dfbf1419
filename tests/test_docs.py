"""The docs' generated pages: the config reference lists every key of every config section."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import pytest

from spatlas._config import Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "_ext"))
import spatlas_docs


def test_config_reference_lists_every_key_of_every_section():
    text = spatlas_docs.config_reference()
    hints = typing.get_type_hints(Config)
    sections = [
        f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])
    ]
    assert sections == [name for name, _ in spatlas_docs.config_sections()]
    assert len(sections) >= 10
    for section in sections:
        assert f"## `{section}`" in text
        for f in dataclasses.fields(hints[section]):
            assert f"| `{section}.{f.name}` |" in text, f"{section}.{f.name} missing"
    assert "| `seed` | `int` | `0` |" in text


def test_config_reference_gives_defaults_and_meanings():
    text = spatlas_docs.config_reference()
    assert "| `clustering.method` | `str` | `kmeans` |" in text
    row = next(line for line in text.splitlines() if line.startswith("| `downstream.min_spots`"))
    assert "at least this many spots" in row
    row = next(
        line for line in text.splitlines() if line.startswith("| `preprocessing.n_top_genes`")
    )
    assert "highly variable genes" in row


def test_every_config_key_has_a_meaning():
    undocumented = [
        line.split("|")[1].strip()
        for line in spatlas_docs.config_reference().splitlines()
        if line.startswith("| `") and line.rstrip().endswith("|  |")
    ]
    assert undocumented == []


@pytest.mark.parametrize("namespace", spatlas_docs.NAMESPACES)
def test_api_page_lists_every_public_name(namespace):
    import importlib

    page = spatlas_docs.api_page(namespace)
    for name in importlib.import_module(f"spatlas.{namespace}").__all__:
        assert f"   {name}\n" in page or f".. py:data:: {name}\n" in page
