"""Pages generated from the code at build time: the config reference and the API namespaces.

``config_reference()`` reads the config dataclasses of ``spatlas._config`` (every section of
``Config``: its keys, types, defaults) and takes each key's meaning from the section's docstring,
so the reference cannot drift from the code. ``api_page(namespace)`` lists a namespace's
``__all__``. ``setup(app)`` writes both before Sphinx reads the sources.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import typing
from pathlib import Path
from typing import Any

NAMESPACES = ("io", "pp", "tl", "pl", "models", "metrics", "tune", "datasets", "report")


# -- config reference ----------------------------------------------------------------------------


def _type_text(tp: Any) -> str:
    text = tp.__name__ if isinstance(tp, type) else str(tp)
    return text.replace("typing.", "").replace("NoneType", "None")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "empty (`null`)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"


def _attribute_entries(doc: str) -> dict[str, str]:
    """Entries of a numpy-style ``Attributes`` section: name -> description."""
    match = re.search(r"^Attributes\n-+\n(.*?)(?:\n\S[^\n]*\n-+\n|\Z)", doc, re.S | re.M)
    if not match:
        return {}
    entries: dict[str, str] = {}
    name = None
    for line in match.group(1).splitlines():
        if line and not line.startswith(" "):
            name = line.strip()
            entries[name] = ""
        elif name is not None and line.strip():
            entries[name] = (entries[name] + " " + line.strip()).strip()
    return entries


def _prose_meaning(doc: str, name: str) -> str:
    """The clause of the section's prose that defines ``name`` (written ````name````: ...).

    A clause ends at the next ``; ``x````, or at the end of its sentence. A key the prose only
    mentions gets a pointer to the section text; a key it does not mention gets nothing.
    """
    text = " ".join(doc.split())
    match = re.search(rf"``{re.escape(name)}``:\s*(.+?)(?=;\s*``|\.\s+[A-Z`(]|\.?$)", text)
    if match:
        return match.group(1).strip()
    if f"``{name}``" in text:
        return "see the section text above"
    return ""


def _md(text: str) -> str:
    """RST inline markup of a docstring as MyST (``x`` -> `x`, :func:`y` -> {func}`y`)."""
    text = re.sub(r":(\w+):`([^`]+)`", r"{\1}`\2`", text)
    text = text.replace("``", "`")
    return text.replace("|", "\\|")


def config_sections() -> list[tuple[str, type]]:
    """``(section name, dataclass)`` for every section of ``spatlas._config.Config``."""
    from spatlas._config import Config

    hints = typing.get_type_hints(Config)
    return [
        (f.name, hints[f.name])
        for f in dataclasses.fields(Config)
        if dataclasses.is_dataclass(hints[f.name])
    ]


def config_reference() -> str:
    """The config reference page (MyST markdown), generated from the config dataclasses."""
    from spatlas._config import Config

    lines = [
        "# Config reference",
        "",
        "This page is generated from the config dataclasses in `spatlas._config` at every",
        "docs build (`docs/_ext/spatlas_docs.py`), so it lists exactly the keys the code reads.",
        "A config file is YAML with one mapping per section; any key can be set on the command",
        "line with",
        "`--set section.key=value`. Unknown keys are refused with the closest known name.",
        "",
    ]
    hints = typing.get_type_hints(Config)
    top = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(hints[f.name])]
    if top:
        lines += ["## Top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in top:
            meaning = "seed of every random choice of the run" if f.name == "seed" else ""
            lines.append(
                f"| `{f.name}` | `{_type_text(hints[f.name])}` | {_default_text(f)} | {meaning} |"
            )
        lines.append("")
    for section, cls in config_sections():
        doc = inspect.cleandoc(cls.__doc__ or "")
        summary, _, rest = doc.partition("\n\n")
        body = re.split(r"^Attributes\n-+$", rest, flags=re.M)[0].strip()
        entries = _attribute_entries(doc)
        hints_cls = typing.get_type_hints(cls)
        lines += [f"## `{section}`", "", _md(" ".join(summary.split())), ""]
        if body:
            lines += [_md(" ".join(body.split())), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            meaning = entries.get(f.name) or _prose_meaning(doc, f.name)
            lines.append(
                f"| `{section}.{f.name}` | `{_type_text(hints_cls[f.name])}` "
                f"| {_md(_default_text(f))} | {_md(' '.join(meaning.split()))} |"
            )
        lines.append("")
    return "\n".join(lines)


# -- API pages -----------------------------------------------------------------------------------


def api_page(namespace: str) -> str:
    """One API page (MyST markdown) for ``spatlas.<namespace>``: a summary table, then each name."""
    module = importlib.import_module(f"spatlas.{namespace}")
    names = sorted(getattr(module, "__all__", []))
    documented = [n for n in names if callable(getattr(module, n))]
    lines = [
        f"# `spatlas.{namespace}`",
        "",
        "```{eval-rst}",
        f".. automodule:: spatlas.{namespace}",
        "   :no-members:",
        "",
        f".. currentmodule:: spatlas.{namespace}",
        "",
        ".. autosummary::",
        "   :nosignatures:",
        "",
        *[f"   {name}" for name in documented],
        "",
    ]
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj):
            lines += [f".. autoclass:: {name}", "   :members:", ""]
        elif callable(obj):
            lines += [f".. autofunction:: {name}", ""]
        else:  # a constant: its ``#:`` / string doc where it is defined (not its type's doc)
            doc = _attribute_doc(module, name) or "A constant of this namespace."
            lines += [f".. py:data:: {name}", "", *[f"   {line}" for line in doc.splitlines()], ""]
    lines += ["```", ""]
    return "\n".join(lines)


def _attribute_doc(module: Any, name: str) -> str:
    """The attribute doc of ``name`` in the submodule of ``module`` that defines it."""
    import pkgutil

    from sphinx.pycode import ModuleAnalyzer

    for info in pkgutil.iter_modules(module.__path__, module.__name__ + "."):
        try:
            docs = ModuleAnalyzer.for_module(info.name).find_attr_docs()
        except Exception:  # a submodule without source: skip
            continue
        if ("", name) in docs:
            return "\n".join(docs[("", name)]).strip()
    return ""


def _write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def write_pages(srcdir: str | Path) -> None:
    """Write ``reference/config.md`` and ``api/<namespace>.md`` under ``srcdir``."""
    srcdir = Path(srcdir)
    _write_if_changed(srcdir / "reference" / "config.md", config_reference())
    for namespace in NAMESPACES:
        _write_if_changed(srcdir / "api" / f"{namespace}.md", api_page(namespace))


def setup(app):  # noqa: D103 - Sphinx extension entry point
    app.connect("builder-inited", lambda app: write_pages(app.srcdir))
    return {"parallel_read_safe": True, "parallel_write_safe": True}
