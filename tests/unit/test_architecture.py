"""The shape of the code, checked: who may import whom, the folder table of the documentation's architecture page
against the tree, and every setting read by something. (The configuration page is generated from the settings:
tests/unit/test_docs.py checks it.)"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pixelpipe.core.settings import Settings
from pixelpipe.tools.stack.settings import StackSettings

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE_PAGE = ROOT / "docs" / "contributors" / "architecture.md"

# Where each package's files are: the folder-to-package mapping of pyproject.toml, the one place it is written.
PACKAGE_DIRS = {
    package: ROOT / folder
    for package, folder in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ].items()
}
STAGE_FOLDERS = ("producers", "processors", "sinks", "analytics")


def package_dir(package: str) -> Path:
    """Where ``package``'s modules are: its mapped folder, or its parent's folder and its own name below it."""
    parent, _, name = package.rpartition(".")
    return PACKAGE_DIRS[package] if package in PACKAGE_DIRS else package_dir(parent) / name


LAYER_DIRS = {
    "schemas": PACKAGE_DIRS["pixelpipe.schemas"],
    "core": PACKAGE_DIRS["pixelpipe"] / "core",
    "tools": PACKAGE_DIRS["pixelpipe"] / "tools",
    **{stage: PACKAGE_DIRS[f"pixelpipe.{stage}"] for stage in STAGE_FOLDERS},
    "gateway": PACKAGE_DIRS["pixelpipe.gateway"],
}
ALLOWED = {
    "schemas": {"schemas"},
    "core": {"core", "schemas"},
    **{stage: {stage, "core", "schemas"} for stage in STAGE_FOLDERS},
    # An upstream service of the pipeline: it publishes with the producer SDK and reads core; no stage imports it.
    "gateway": {"gateway", "producers", "core", "schemas"},
    "tools": {"tools", "core", "schemas", "gateway", *STAGE_FOLDERS},
}


def _files(layer: str) -> list[Path]:
    return sorted(LAYER_DIRS[layer].rglob("*.py"))


def _layer_of(module: str) -> str:
    """The layer of an imported ``pixelpipe...`` module name."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in LAYER_DIRS:
        return parts[1]
    return "cli"  # pixelpipe.cli, pixelpipe.__main__: the command line, on top of everything


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pixelpipe"):
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.startswith("pixelpipe"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_is_below_it(layer):
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in _files(layer)
        for line, module in _imports(path)
        if _layer_of(module) not in ALLOWED[layer] and module != "pixelpipe"
    ]
    assert not wrong, "\n".join(wrong)


def test_no_stage_folder_imports_a_sibling_and_the_runtime_never_imports_the_tools():
    # The same rule as above, said the way the architecture page says it, so a change to ALLOWED cannot quietly
    # loosen it.
    for stage in STAGE_FOLDERS:
        for path in _files(stage):
            for _, module in _imports(path):
                assert _layer_of(module) not in (set(STAGE_FOLDERS) - {stage}) | {"tools", "cli", "gateway"}, (
                    path,
                    module,
                )


def _page_table(heading: str) -> list[list[str]]:
    section = ARCHITECTURE_PAGE.read_text().split(f"\n{heading}\n", 1)[1]
    rows = [line for line in section.split("\n\n| ", 1)[1].split("\n\n", 1)[0].splitlines()]
    return [
        [cell.strip() for cell in ("| " + row if i == 0 else row).strip("|").split("|")] for i, row in enumerate(rows)
    ]


def test_the_architecture_page_folder_table_matches_the_tree():
    rows = _page_table("## Folders")[2:]
    listed = {row[0].strip("`") for row in rows}
    for folder, package, _ in rows:
        if package:  # the package column says what pyproject.toml maps the folder to
            assert ROOT / folder.strip("`") == package_dir(package.strip("`")), (folder, package)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    top_level = {f"{name.split('/')[0]}/" for name in tracked.splitlines() if "/" in name}
    top_level = {folder for folder in top_level if not folder.startswith(".")}
    assert top_level <= listed, f"folders missing from {ARCHITECTURE_PAGE.name}'s table: {sorted(top_level - listed)}"
    assert all((ROOT / folder).is_dir() for folder in listed), f"listed but absent: {listed}"


def _settings_reads() -> set[tuple[str, str]]:
    """(section class, field) pairs read anywhere outside the settings modules: ``x.<section>.<field>``, or
    ``p.<field>`` where ``p`` is a parameter annotated with the section's class; and ``self.<field>`` in a section's
    public methods (``KafkaSettings.client_config``, which every Kafka client is built from)."""
    sections = {f.name: f.default_factory.__name__ for f in dataclasses.fields(Settings)} | {"stack": "StackSettings"}
    reads: set[tuple[str, str]] = set()
    for section in ast.parse((ROOT / "pixelpipe" / "core" / "settings.py").read_text()).body:
        if isinstance(section, ast.ClassDef) and section.name in sections.values():
            for method in section.body:
                if isinstance(method, ast.FunctionDef) and not method.name.startswith("_"):
                    reads |= {
                        (section.name, node.attr)
                        for node in ast.walk(method)
                        if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "self"
                    }
    sources = [p for layer in LAYER_DIRS for p in _files(layer)] + [ROOT / "pixelpipe" / "cli.py"]
    for path in sources:
        if path.name == "settings.py":
            continue
        tree = ast.parse(path.read_text())
        annotated: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for arg in node.args.args + node.args.kwonlyargs:
                    if isinstance(arg.annotation, ast.Name) and arg.annotation.id in sections.values():
                        annotated[arg.arg] = arg.annotation.id
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            holder = node.value
            name = holder.attr if isinstance(holder, ast.Attribute) else getattr(holder, "id", None)
            if name in sections:
                reads.add((sections[name], node.attr))
            if isinstance(holder, ast.Name) and holder.id in annotated:
                reads.add((annotated[holder.id], node.attr))
    return reads


def test_every_documented_setting_is_read_by_something():
    reads = _settings_reads()
    unread = [
        f"{field.metadata['env']} ({section.__name__}.{field.name})"
        for section in [*Settings.sections(), StackSettings]
        for field in dataclasses.fields(section)
        if (section.__name__, field.name) not in reads
    ]
    assert not unread, "settings read by nothing: " + ", ".join(unread)
