"""MkDocs hooks (mkdocs.yml, ``hooks:``): the reference pages made from the code at build time, so they cannot drift.

A page asks for a generated part with a marker line, ``<!-- generated: NAME -->``, replaced by:

- ``settings``: every ``PIXELPIPE_*`` setting with its default and meaning, one table per settings dataclass
  (``pixelpipe.core.settings``, and the local stack's ``pixelpipe.tools.stack.settings``);
- ``contracts``: each Avro schema in ``schemas/``, its fields' types, defaults and ``doc``, and its frozen versions.

A marker no generator knows, or a generator no page asked for, fails the build.

mkdocstrings reads the SDK's source statically (griffe), looking packages up by folder; pixelpipe's subpackages live
in top-level folders (``pixelpipe.producers`` is ``producers/``), so the hook lays out a tree of links shaped like
the installed package, from ``[tool.setuptools.package-dir]`` in pyproject.toml, and points the handler at it.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

from pixelpipe.core import events
from pixelpipe.core.settings import Settings, settings_table
from pixelpipe.schemas import SCHEMA_DIR, SCHEMA_NAMES
from pixelpipe.tools.stack.settings import StackSettings

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- generated: ([\w-]+) -->$", re.MULTILINE)

_used: set[str] = set()
_package_tree: tempfile.TemporaryDirectory[str] | None = None  # removed when replaced, or when the build exits


def settings_reference() -> str:
    """One table per settings dataclass, in the order ``Settings`` holds them, the local stack's last."""
    sections = [*Settings.sections(), StackSettings]
    return "\n\n".join(f"## `{section.__name__}`\n\n{settings_table([section])}" for section in sections)


def avro_type(schema: Any) -> str:
    """An Avro type as a reader says it: ``string or null``, ``array of StoredImage``, ``enum Priority: ...``."""
    if isinstance(schema, list):
        named = [avro_type(branch) for branch in schema if branch != "null"]
        return " or ".join(named + (["null"] if "null" in schema else []))
    if isinstance(schema, str):
        return schema.rsplit(".", 1)[-1]
    if "logicalType" in schema:
        return f"{schema['logicalType']} ({schema['type']})"
    kind = schema["type"]
    if kind == "enum":
        return f"enum {schema['name']}: {', '.join(schema['symbols'])}"
    if kind == "array":
        return f"array of {avro_type(schema['items'])}"
    if kind == "map":
        return f"map of {avro_type(schema['values'])}"
    return schema["name"] if kind in ("record", "fixed") else kind


def _records(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The record and the records declared inside its fields, in the order they are declared."""
    found = [schema]
    pending = [field["type"] for field in schema["fields"]]
    while pending:
        kind = pending.pop(0)
        if isinstance(kind, list):
            pending[:0] = kind
        elif isinstance(kind, dict):
            if kind["type"] == "record":
                found += _records(kind)
            pending += [kind[key] for key in ("items", "values") if key in kind]
    return found


def _plain(text: str) -> str:
    """An Avro doc, plain text, as Markdown: ``<instance>`` stays text, not an HTML tag."""
    return html.escape(text, quote=False)


def _cell(text: str) -> str:
    return _plain(text).replace("|", "\\|").replace("\n", " ")


def _field_table(record: dict[str, Any]) -> str:
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for field in record["fields"]:
        default = f"`{json.dumps(field['default'])}`" if "default" in field else "required"
        rows.append(
            f"| `{field['name']}` | {_cell(avro_type(field['type']))} | {default} | {_cell(field.get('doc', ''))} |"
        )
    return "\n".join(rows)


def contracts_reference() -> str:
    """Each schema of ``schemas/``: its doc, version, frozen copies, and a table of fields per record in it."""
    parts = []
    for name in SCHEMA_NAMES:
        schema = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
        version = next(f.default for f in dataclasses.fields(getattr(events, name)) if f.name == "schema_version")
        frozen = sorted(
            path.relative_to(SCHEMA_DIR.parent).as_posix()
            for path in SCHEMA_DIR.glob(f"v*/{name}.avsc")
            if int(path.parent.name[1:]) < version
        )
        earlier = f"; earlier versions, frozen: {', '.join(f'`{p}`' for p in frozen)}" if frozen else ""
        parts.append(
            f"## {name}\n\n{_plain(schema.get('doc', ''))}\n\n"
            f"`schemas/{name}.avsc`, namespace `{schema['namespace']}`, schema version {version}{earlier}."
        )
        for record in _records(schema):
            heading = "" if record is schema else f"### {record['name']}\n\n{_plain(record.get('doc', ''))}\n\n"
            parts.append(heading + _field_table(record))
    return "\n\n".join(parts)


GENERATORS: dict[str, Callable[[], str]] = {"settings": settings_reference, "contracts": contracts_reference}


def _lay_out_package(tree: Path) -> None:
    """``pixelpipe`` laid out in ``tree`` as installed: links to the repository's folders, mapped as pyproject.toml
    maps them (every subpackage mapped elsewhere is a direct child of ``pixelpipe``)."""
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    top = tree / "pixelpipe"
    top.mkdir()
    for entry in (ROOT / package_dirs["pixelpipe"]).iterdir():
        (top / entry.name).symlink_to(entry)
    for package, folder in package_dirs.items():
        if package != "pixelpipe":
            (tree / package.replace(".", "/")).symlink_to(ROOT / folder)


@event_priority(100)  # before mkdocstrings' own, which makes its handlers
def on_config(config: MkDocsConfig) -> MkDocsConfig:
    global _package_tree
    _used.clear()
    _package_tree = tempfile.TemporaryDirectory(prefix="pixelpipe-docs-")
    _lay_out_package(Path(_package_tree.name))
    python_handler = config.plugins["mkdocstrings"].config.handlers.setdefault("python", {})
    python_handler["paths"] = [_package_tree.name]
    return config


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    def generated(marker: re.Match[str]) -> str:
        name = marker[1]
        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_uri}: no generator {name!r}; known: {', '.join(GENERATORS)}")
        _used.add(name)
        return GENERATORS[name]()

    return MARKER.sub(generated, markdown)


def on_post_build(config: MkDocsConfig) -> None:
    unused = sorted(set(GENERATORS) - _used)
    if unused:
        raise PluginError(f"generated parts that no page asks for: {', '.join(unused)}")
